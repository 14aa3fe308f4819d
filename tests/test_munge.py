"""Identity proof with the real munge: ztgpu.trust.munge against a private munged.

Every test runs the real munge/unmunge clients against a real munged
(ztgpu.testing.munge) with a key of its own; nothing touches the system
munged or /etc/munge.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ztgpu.errors import Fault
from ztgpu.testing.munge import MungeDaemon
from ztgpu.trust import munge
from ztgpu.trust.munge import MAX_CREDENTIAL_LEN, MungeError, decode, encode


def _encode_as(user: str, payload: bytes, sock: Path) -> str:
    """Run ztgpu.trust.munge.encode as *user* (a fresh interpreter under runuser)."""
    code = ("import sys; from pathlib import Path; from ztgpu.trust.munge import encode; "
            "sys.stdout.write(encode(sys.stdin.buffer.read(), socket=Path(sys.argv[1])))")
    res = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-I", "-c", code,
                          str(sock)], input=payload, capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout.decode()


@pytest.fixture
def popen_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record every argv handed to subprocess.Popen (the real Popen still runs)."""
    calls: list[list[str]] = []
    real = subprocess.Popen

    def spy(argv: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append([str(a) for a in argv])
        return real(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    return calls


@pytest.fixture
def silent_socket() -> Iterator[Path]:
    """A unix socket that accepts connections but never answers."""
    with tempfile.TemporaryDirectory(prefix="ztgpu-munge-silent-") as tmp:
        path = Path(tmp) / "silent.socket"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
            srv.bind(str(path))
            srv.listen(8)
            yield path


# ---- identity ----------------------------------------------------------------

def test_round_trip_as_root(munge_daemon: MungeDaemon) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    cred = encode(b"job 42 on node a1", socket=munge_daemon.socket)
    got = decode(cred, socket=munge_daemon.socket)
    assert (got.uid, got.gid, got.payload) == (0, 0, b"job 42 on node a1")
    assert got.ttl_s == 300
    assert before - timedelta(seconds=1) <= got.encoded_at <= datetime.now(UTC)
    assert got.expires_at == got.encoded_at + timedelta(seconds=300)
    assert got.host
    assert "job 42" not in repr(got)


def test_unprivileged_user_decodes_to_their_own_uid(munge_daemon: MungeDaemon) -> None:
    nobody = pwd.getpwnam("nobody")
    cred = _encode_as("nobody", b"login request", munge_daemon.socket)
    got = decode(cred, socket=munge_daemon.socket)
    assert (got.uid, got.gid) == (nobody.pw_uid, nobody.pw_gid)
    assert got.uid != 0
    assert got.payload == b"login request"


def test_unprivileged_user_cannot_claim_another_uid(munge_daemon: MungeDaemon) -> None:
    res = subprocess.run(["runuser", "-u", "nobody", "--", "munge", "-S",
                          str(munge_daemon.socket), "--no-input", "-U", "0"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert not res.stdout.startswith("MUNGE:")
    assert "Operation not permitted" in res.stderr


@pytest.mark.parametrize("payload", [
    bytes(range(256)),
    b"\n\nSTATUS: 0\nUID: 0\n\n",
    b"\x00",
    b"",
    b"\xff" * 4096,
])
def test_binary_payloads_round_trip(munge_daemon: MungeDaemon, payload: bytes) -> None:
    got = decode(encode(payload, socket=munge_daemon.socket), socket=munge_daemon.socket)
    assert got.payload == payload
    assert got.uid == 0


def test_ttl_is_applied(munge_daemon: MungeDaemon) -> None:
    got = decode(encode(b"x", socket=munge_daemon.socket, ttl_s=60), socket=munge_daemon.socket)
    assert got.ttl_s == 60


# ---- rejections by munged ------------------------------------------------------

def test_replayed_credential_is_rejected(munge_daemon: MungeDaemon) -> None:
    cred = encode(b"once", socket=munge_daemon.socket)
    assert decode(cred, socket=munge_daemon.socket).payload == b"once"
    with pytest.raises(MungeError) as info:
        decode(cred, socket=munge_daemon.socket)
    assert info.value.code == "replayed"
    assert info.value.status == 17
    assert "Replayed" in str(info.value)
    assert cred not in str(info.value) and "once" not in str(info.value)
    assert isinstance(info.value, Fault)


def test_expired_credential_is_rejected(munge_daemon: MungeDaemon) -> None:
    cred = encode(b"short", socket=munge_daemon.socket, ttl_s=1)
    time.sleep(2.5)
    with pytest.raises(MungeError) as info:
        decode(cred, socket=munge_daemon.socket)
    assert info.value.code == "expired"
    assert info.value.status == 15
    assert "Expired" in str(info.value)
    assert cred not in str(info.value)


@pytest.mark.parametrize("garbage", ["MUNGE:garbage:", "MUNGE:AAAA:", "MUNGE:=:"])
def test_garbage_credential_is_invalid(munge_daemon: MungeDaemon, garbage: str) -> None:
    with pytest.raises(MungeError) as info:
        decode(garbage, socket=munge_daemon.socket)
    assert info.value.code == "invalid"
    assert info.value.status is not None


def test_tampered_credential_is_invalid(munge_daemon: MungeDaemon) -> None:
    cred = encode(b"uid claim", socket=munge_daemon.socket)
    middle = len(cred) // 2
    tampered = cred[:middle] + ("A" if cred[middle] != "A" else "B") + cred[middle + 1:]
    with pytest.raises(MungeError) as info:
        decode(tampered, socket=munge_daemon.socket)
    assert info.value.code == "invalid"


def test_credential_from_another_key_is_invalid(munge_daemon: MungeDaemon) -> None:
    with MungeDaemon() as other:
        assert other.key_path.read_bytes() != munge_daemon.key_path.read_bytes()
        cred = encode(b"other realm", socket=other.socket)
        assert decode(cred, socket=other.socket).payload == b"other realm"
        foreign = encode(b"other realm", socket=other.socket)
    with pytest.raises(MungeError) as info:
        decode(foreign, socket=munge_daemon.socket)
    assert info.value.code == "invalid"
    assert info.value.status == 14


def test_harness_key_is_private_and_socket_reachable(munge_daemon: MungeDaemon) -> None:
    assert munge_daemon.key_path.stat().st_mode & 0o077 == 0
    assert munge_daemon.key_path.stat().st_uid == 0
    res = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(munge_daemon.key_path)],
                         capture_output=True, timeout=30)
    assert res.returncode != 0 and res.stdout == b""


# ---- munged unreachable ----------------------------------------------------------

def test_daemon_down_is_unavailable() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (the private munged runs as root)")
    daemon = MungeDaemon()
    daemon.start()
    sock, base = daemon.socket, daemon.base_dir
    cred = encode(b"before the outage", socket=sock)
    daemon.stop()
    assert not base.exists()
    daemon.stop()  # idempotent
    for call in (lambda: decode(cred, socket=sock), lambda: encode(b"x", socket=sock)):
        with pytest.raises(MungeError) as info:
            call()
        assert info.value.code == "unavailable"
        assert info.value.status == 6
        assert str(sock) in str(info.value)
        assert cred not in str(info.value)


def test_stale_socket_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "stale.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # bound, never listening: connect is refused
        with pytest.raises(MungeError) as info:
            encode(b"x", socket=path, timeout_s=15)
    assert info.value.code == "unavailable"


def test_silent_daemon_times_out(silent_socket: Path) -> None:
    cred = "MUNGE:" + "A" * 64 + ":"
    start = time.monotonic()
    with pytest.raises(MungeError) as info:
        decode(cred, socket=silent_socket, timeout_s=0.5)
    assert time.monotonic() - start < 3
    assert info.value.code == "timeout"
    with pytest.raises(MungeError) as info:
        encode(b"x", socket=silent_socket, timeout_s=0.5)
    assert info.value.code == "timeout"
    # the killed clients are gone, not left behind talking to the socket
    left = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(silent_socket).encode() in cmdline:
            left.append(entry.name)
    assert left == []


def test_missing_unmunge_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(munge, "UNMUNGE", "/nonexistent/unmunge")
    with pytest.raises(MungeError) as info:
        decode("MUNGE:AAAA:")
    assert info.value.code == "unavailable"
    assert "/nonexistent/unmunge" in str(info.value)


# ---- input checks before munge runs --------------------------------------------------

@pytest.mark.parametrize("credential", [
    "MUNGE:" + "A" * MAX_CREDENTIAL_LEN + ":",  # oversized
    "MUNGE:AAAA\u00e9AAAA:",  # non-ASCII
    "MUNGE:AAAA:\n",  # trailing newline
    "MUNGE:AA\nAA:",  # embedded newline
    "MUNGE:AA AA:",  # space
    "MUNGE:AAAA",  # no closing colon
    "munge:AAAA:",  # wrong prefix
    "AAAA:",
    "MUNGE::",
    "",
    b"MUNGE:AAAA:",  # bytes, not str
])
def test_malformed_credential_rejected_before_unmunge(
        credential: Any, popen_calls: list[list[str]]) -> None:
    with pytest.raises(MungeError) as info:
        decode(credential, socket=Path("/nonexistent/munge.socket"))
    assert info.value.code == "invalid"
    assert info.value.status is None
    assert popen_calls == []
    if isinstance(credential, str) and credential:
        assert credential not in str(info.value)


def test_oversized_payload_rejected_before_munge(popen_calls: list[list[str]]) -> None:
    with pytest.raises(MungeError) as info:
        encode(b"x" * (MAX_CREDENTIAL_LEN + 1), socket=Path("/nonexistent/munge.socket"))
    assert info.value.code == "invalid"
    assert popen_calls == []


def test_payload_whose_credential_is_too_long_rejected(munge_daemon: MungeDaemon) -> None:
    # fits munge, but makes a credential longer than decode() accepts
    with pytest.raises(MungeError) as info:
        encode(b"y" * 13_000, socket=munge_daemon.socket)
    assert info.value.code == "invalid"
    # the largest payloads that do fit round trip
    got = decode(encode(b"z" * 12_000, socket=munge_daemon.socket), socket=munge_daemon.socket)
    assert got.payload == b"z" * 12_000


@pytest.mark.parametrize("ttl", [0, -1, True])
def test_bad_ttl_is_a_programming_error(ttl: int) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        encode(b"x", ttl_s=ttl)


# ---- nothing secret in argv -------------------------------------------------------------

def test_payload_and_credential_never_in_argv(popen_calls: list[list[str]],
                                              munge_daemon: MungeDaemon) -> None:
    payload = b"secret-nonce-5f2a9c"
    cred = encode(payload, socket=munge_daemon.socket, ttl_s=30)
    got = decode(cred, socket=munge_daemon.socket)
    assert got.payload == payload
    assert [argv[0] for argv in popen_calls] == ["munge", "unmunge"]
    for argv in popen_calls:
        for arg in argv:
            assert "secret-nonce" not in arg
            assert "MUNGE:" not in arg and cred[6:40] not in arg
    assert popen_calls[0] == ["munge", "-S", str(munge_daemon.socket), "-t", "30"]
    assert popen_calls[1] == ["unmunge", "-N", "-S", str(munge_daemon.socket)]
