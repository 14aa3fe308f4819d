"""KEK: sealing round trips, owner binding, tampering, rotation/retirement, file checks."""

from __future__ import annotations

import base64
import os
import pwd
import stat
from pathlib import Path

import pytest

from ztgpu.errors import ConfigError
from ztgpu.trust.kek import KekError, KeyRing

NOBODY = pwd.getpwnam("nobody")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))


@pytest.fixture
def kek_file(tmp_path: Path) -> Path:
    path = tmp_path / "kek"
    KeyRing.create(path)
    return path


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _flip(sealed: str, field: int, byte: int) -> str:
    parts = sealed.split(".")
    raw = bytearray(base64.urlsafe_b64decode(parts[field] + "=" * (-len(parts[field]) % 4)))
    raw[byte] ^= 0x01
    parts[field] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    return ".".join(parts)


# ------------------------------------------------------------------- sealing


def test_round_trip_and_format(kek_file: Path) -> None:
    ring = KeyRing.load(kek_file)
    sealed = ring.seal(b"JBSWY3DPEHPK3PXP secret", b"totp:alice")
    version, kid, nonce, _ = sealed.split(".")
    assert version == "v1" and kid == ring.current_kid
    assert len(base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))) == 12
    assert b"secret" not in sealed.encode()
    assert ring.open(sealed, b"totp:alice") == b"JBSWY3DPEHPK3PXP secret"
    # A fresh nonce each time.
    assert ring.seal(b"x", b"a") != ring.seal(b"x", b"a")
    assert not ring.needs_rewrap(sealed)


def test_empty_plaintext_round_trip() -> None:
    ring = KeyRing([("k1", KEY_A)])
    assert ring.open(ring.seal(b"", b""), b"") == b""


def test_aad_binds_secret_to_owner(kek_file: Path) -> None:
    ring = KeyRing.load(kek_file)
    sealed = ring.seal(b"secret", b"totp:alice")
    with pytest.raises(KekError, match="another owner"):
        ring.open(sealed, b"totp:bob")
    with pytest.raises(KekError, match="another owner"):
        ring.open(sealed, b"")


@pytest.mark.parametrize(("field", "byte"), [(2, 0), (2, 11), (3, 0), (3, -1)])
def test_tampered_secret_refused(field: int, byte: int) -> None:
    ring = KeyRing([("k1", KEY_A)])
    sealed = ring.seal(b"secret", b"totp:alice")
    with pytest.raises(KekError, match="altered"):
        ring.open(_flip(sealed, field, byte), b"totp:alice")


def test_relabelled_kid_refused() -> None:
    # Same key bytes under two ids: moving a secret to the other id must fail,
    # because the kid is authenticated too.
    ring = KeyRing([("k1", KEY_A), ("k2", KEY_A)])
    sealed = ring.seal(b"secret", b"aad")
    moved = sealed.replace(".k1.", ".k2.", 1)
    with pytest.raises(KekError, match="altered"):
        ring.open(moved, b"aad")


@pytest.mark.parametrize("text", [
    "", "v1", "v2.k1.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA", "v1.k1.AAAA.AAAA",
    "v1..AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA", "v1.k1.AAAAAAAAAAAAAAAA.AAAA",
    "v1.k1.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA.extra", "v1.k 1.AAAA.AAAA",
    "v1.k1.AAAAAAAAAAAAAAA=.AAAAAAAAAAAAAAAAAAAAAA",
    "v1.k1.AAAAAAAAAAAAAAA+.AAAAAAAAAAAAAAAAAAAAAA",
])
def test_malformed_sealed_text_refused(text: str) -> None:
    ring = KeyRing([("k1", KEY_A)])
    with pytest.raises(KekError, match=r"malformed|not a sealed secret"):
        ring.open(text, b"")
    with pytest.raises(KekError):
        ring.needs_rewrap(text)


def test_non_canonical_base64_refused() -> None:
    ring = KeyRing([("k1", KEY_A)])
    sealed = ring.seal(b"secret", b"")
    v, kid, nonce, ct = sealed.split(".")
    # 12-byte nonce -> 16 chars with no spare bits; the ciphertext (22 bytes)
    # ends in a character with 4 unused bits: set one of them.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(ct[-1])
    assert last & 0x0F == 0
    odd = ct[:-1] + alphabet[last | 0x01]
    with pytest.raises(KekError, match="malformed"):
        ring.open(".".join((v, kid, nonce, odd)), b"")


def test_unknown_kid_refused() -> None:
    sealed = KeyRing([("other", KEY_A)]).seal(b"secret", b"aad")
    with pytest.raises(KekError, match=r"'other'.*does not hold"):
        KeyRing([("k1", KEY_A)]).open(sealed, b"aad")


def test_repr_hides_keys() -> None:
    ring = KeyRing([("k1", KEY_A), ("k2", KEY_B)])
    text = repr(ring)
    assert "k1" in text and "k2" in text
    assert _b64(KEY_A) not in text and str(KEY_A) not in text and KEY_A.hex() not in text


@pytest.mark.parametrize(("keys", "message"), [
    ([], "no key"),
    ([("k1", KEY_A), ("k1", KEY_B)], "twice"),
    ([("k1", b"short")], "5 bytes"),
    ([("bad.kid", KEY_A)], "key id"),
])
def test_ring_constructor_validates(keys: list[tuple[str, bytes]], message: str) -> None:
    with pytest.raises(KekError, match=message):
        KeyRing(keys)


# ------------------------------------------------------------------ the file


def test_create_writes_0600_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    ring = KeyRing.create(path)
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    kid, key = lines[0].split(" ")
    assert kid == ring.current_kid and len(kid) == 8 and int(kid, 16) >= 0
    assert len(base64.b64decode(key)) == 32
    assert KeyRing.load(path).open(ring.seal(b"x", b"a"), b"a") == b"x"
    with pytest.raises(KekError, match="already exists"):
        KeyRing.create(path)
    assert path.read_text().splitlines() == lines


def test_create_refuses_dangling_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / "kek"
    link.symlink_to(target)
    with pytest.raises(KekError, match="already exists"):
        KeyRing.create(link)
    assert not target.exists()


def test_create_unknown_owner(tmp_path: Path) -> None:
    with pytest.raises(KekError, match="unknown user"):
        KeyRing.create(tmp_path / "kek", owner="no-such-user-ztgpu")
    assert not (tmp_path / "kek").exists()


@needs_root
def test_create_with_owner_and_rotate_keeps_owner(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    KeyRing.create(path, owner="nobody")
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    KeyRing.rotate(path)
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_load_refuses_group_or_other_bits(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path / "kek", f"k1 {_b64(KEY_A)}\n", mode)
    with pytest.raises(KekError, match=f"{path}.*mode {mode:04o}.*chmod 600"):
        KeyRing.load(path)


def test_load_accepts_0400(tmp_path: Path) -> None:
    path = _write(tmp_path / "kek", f"k1 {_b64(KEY_A)}\n", 0o400)
    assert KeyRing.load(path).kids == ("k1",)


def test_load_refuses_symlink(tmp_path: Path) -> None:
    real = _write(tmp_path / "real", f"k1 {_b64(KEY_A)}\n")
    link = tmp_path / "kek"
    link.symlink_to(real)
    with pytest.raises(KekError, match="symbolic link"):
        KeyRing.load(link)


def test_load_refuses_directory_and_fifo(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(KekError, match="not a regular file"):
        KeyRing.load(d)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KekError, match="not a regular file"):
        KeyRing.load(fifo)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KekError, match="cannot open KEK file"):
        KeyRing.load(tmp_path / "absent")


def test_kek_error_is_a_config_error() -> None:
    assert issubclass(KekError, ConfigError)
    assert KekError.exit_code == 2


SECRET_TEXT = _b64(KEY_B)


@pytest.mark.parametrize(("text", "line", "message"), [
    (f"k1 {_b64(KEY_A)}\nk2\n", 2, "expected '<kid> <base64 key>'"),
    (f"k1 {_b64(KEY_A)}\nk2 {SECRET_TEXT} extra\n", 2, "3 fields"),
    (f"k1 {_b64(KEY_A)}\nk1 {SECRET_TEXT}\n", 2, "already used on line 1"),
    (f"k1 {_b64(KEY_A)}\n\nk2 {SECRET_TEXT[:-4]}\n", 3, "is 30 bytes, not 32"),
    (f"k1 {_b64(KEY_A)}\nk2 {SECRET_TEXT[:-1]}!\n", 2, "not valid base64"),
    (f"k1 {_b64(KEY_A)}\nk2 {SECRET_TEXT[1:]}\n", 2, "not valid base64"),
    (f"bad.kid {SECRET_TEXT}\n", 1, "key id"),
    (f"k1 {SECRET_TEXT}\n\u00e9 x\n", 2, "not ASCII"),
])
def test_malformed_lines_named_without_key_material(tmp_path: Path, text: str, line: int,
                                                    message: str) -> None:
    path = _write(tmp_path / "kek", text)
    with pytest.raises(KekError) as info:
        KeyRing.load(path)
    msg = str(info.value)
    assert f"{path} line {line}:" in msg
    assert message in msg
    # Neither the key text nor any long piece of it is echoed.
    for secret in (SECRET_TEXT, _b64(KEY_A)):
        for i in range(len(secret) - 8):
            assert secret[i:i + 8] not in msg
    assert info.value.__cause__ is None  # no chained parser message quoting the line


def test_empty_file_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "kek", "\n\n")
    with pytest.raises(KekError, match="holds no key"):
        KeyRing.load(path)


def test_blank_lines_and_crlf_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path / "kek", f"k1 {_b64(KEY_A)}\r\n\r\nk2 {_b64(KEY_B)}\r\n")
    ring = KeyRing.load(path)
    assert ring.kids == ("k1", "k2") and ring.current_kid == "k1"
    assert KeyRing([("k1", KEY_A)]).open(ring.seal(b"x", b"a"), b"a") == b"x"


# ---------------------------------------------------- rotation and retirement


def test_rotate_keeps_old_keys_for_opening(kek_file: Path) -> None:
    old = KeyRing.load(kek_file)
    sealed_old = old.seal(b"alice's secret", b"totp:alice")
    new_kid = KeyRing.rotate(kek_file)
    assert len(new_kid) == 8 and new_kid != old.current_kid
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o600
    ring = KeyRing.load(kek_file)
    assert ring.kids == (new_kid, old.current_kid)
    assert ring.open(sealed_old, b"totp:alice") == b"alice's secret"
    assert ring.needs_rewrap(sealed_old)
    fresh = ring.seal(b"bob's secret", b"totp:bob")
    assert fresh.split(".")[1] == new_kid and not ring.needs_rewrap(fresh)
    rewrapped = ring.rewrap(sealed_old, b"totp:alice")
    assert not ring.needs_rewrap(rewrapped)
    assert ring.open(rewrapped, b"totp:alice") == b"alice's secret"
    # The old ring cannot open what the new key sealed.
    with pytest.raises(KekError, match="does not hold"):
        old.open(fresh, b"totp:bob")
    # No temporary files are left beside the KEK file.
    assert sorted(p.name for p in kek_file.parent.iterdir()) == ["kek"]


def test_rotate_keeps_mode_0400(kek_file: Path) -> None:
    os.chmod(kek_file, 0o400)
    KeyRing.rotate(kek_file)
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o400


def test_rotate_refuses_unsafe_file(kek_file: Path) -> None:
    before = kek_file.read_text()
    os.chmod(kek_file, 0o644)
    with pytest.raises(KekError, match="mode 0644"):
        KeyRing.rotate(kek_file)
    assert kek_file.read_text() == before


def test_retire_old_key(kek_file: Path) -> None:
    first = KeyRing.load(kek_file)
    sealed = first.seal(b"s", b"a")
    new_kid = KeyRing.rotate(kek_file)
    with pytest.raises(KekError, match="current key"):
        KeyRing.retire(kek_file, new_kid)
    with pytest.raises(KekError, match="no key 'nope'"):
        KeyRing.retire(kek_file, "nope")
    KeyRing.retire(kek_file, first.current_kid)
    ring = KeyRing.load(kek_file)
    assert ring.kids == (new_kid,)
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o600
    with pytest.raises(KekError, match="does not hold"):
        ring.open(sealed, b"a")
    assert ring.needs_rewrap(sealed)


def test_several_rotations_order(kek_file: Path) -> None:
    first = KeyRing.load(kek_file).current_kid
    k2 = KeyRing.rotate(kek_file)
    k3 = KeyRing.rotate(kek_file)
    assert KeyRing.load(kek_file).kids == (k3, k2, first)
