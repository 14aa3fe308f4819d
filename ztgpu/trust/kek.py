"""Secrets encrypted at rest under a key-encryption key (KEK) read from a 0600 file.

The KEK file holds one key per line, ``<kid> <base64 of 32 bytes>``; the
first line is the current key, which seals; later lines are older keys,
kept only so that secrets sealed under them still open while they are
rewrapped after a rotation. Blank lines are ignored; nothing else is
allowed. The file must be a regular file (not a link) with no group or
other permission bits.

A sealed secret is the text ``v1.<kid>.<nonce>.<ciphertext>`` (nonce and
ciphertext in unpadded base64url): AES-256-GCM with a random 96-bit nonce.
The associated data is ``b"ztgpu-kek.v1.<kid>\\0"`` followed by the caller's
``aad``, which names what the secret belongs to (``b"totp:alice"``), so a
sealed value copied into another user's row, or relabelled with another
key id, does not open.

Every error is a ``KekError`` naming the file (and line) involved; no
message carries key material or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ztgpu.errors import ConfigError
from ztgpu.trust.private_files import create_exclusive, owner_ids

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_FILE_BYTES = 64 * 1024
VERSION = "v1"

_KID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class KekError(ConfigError):
    """A KEK file is unusable, or a sealed secret does not open. Never carries key bytes."""


class KeyRing:
    """The keys of one KEK file: the current key first, then older ones.

    ``repr`` shows key ids only.
    """

    __slots__ = ("_keys", "_source")

    def __init__(self, keys: Sequence[tuple[str, bytes]], source: str = "<memory>") -> None:
        """Hold ``keys`` (``(kid, 32-byte key)``, current first); ``source`` names them in errors.

        Raises ``KekError`` if there are no keys, a kid is malformed or
        repeated, or a key is not 32 bytes.
        """
        if not keys:
            raise KekError(f"{source} holds no key")
        seen: dict[str, bytes] = {}
        for kid, key in keys:
            _check_kid(kid, source)
            if kid in seen:
                raise KekError(f"{source}: key id {kid!r} appears twice")
            if len(key) != KEY_BYTES:
                raise KekError(f"{source}: key {kid!r} is {len(key)} bytes, not {KEY_BYTES}")
            seen[kid] = bytes(key)
        self._keys = seen  # insertion order: current first
        self._source = source

    def __repr__(self) -> str:
        return f"KeyRing(source={self._source!r}, kids={self.kids!r})"

    # ----------------------------------------------------------- file handling

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        """Read the KEK file at ``path``.

        Raises ``KekError`` naming the file if it is missing, a link, not a
        regular file, or has any group/other permission bit; and naming the
        line if a line is not ``<kid> <base64>``, repeats a kid, or its key
        is not 32 bytes.
        """
        path = Path(path)
        keys, _ = _read(path)
        return cls(keys, str(path))

    @classmethod
    def create(cls, path: Path, owner: str | None = None) -> KeyRing:
        """Write a new KEK file at ``path`` with one fresh key; return its ring.

        The file is created 0600 with ``O_EXCL|O_NOFOLLOW`` (never replacing
        anything, not even a dangling link) and, with ``owner``, given to
        that user and its primary group before the key is written.

        Raises ``KekError`` if ``path`` exists, ``owner`` is not a user, or
        the file cannot be written.
        """
        path = Path(path)
        ids = owner_ids(owner, KekError)
        keys = [(_new_kid(()), AESGCM.generate_key(bit_length=KEY_BYTES * 8))]
        create_exclusive(path, _render(keys), ids, KekError,
                         exists="refusing to replace a KEK file")
        return cls(keys, str(path))

    @staticmethod
    def rotate(path: Path) -> str:
        """Make a fresh key current in the KEK file at ``path``; return its kid.

        The older keys stay (for opening) after it. The file is replaced by
        rename, keeping its mode and owner; concurrent ``rotate``/``retire``
        calls on the same directory are serialised by a lock on it.

        Raises ``KekError`` for the failures of ``load`` or if the file
        cannot be replaced.
        """
        path = Path(path)
        with _dir_lock(path):
            keys, st = _read(path)
            kid = _new_kid([k for k, _ in keys])
            _replace(path, [(kid, AESGCM.generate_key(bit_length=KEY_BYTES * 8)), *keys], st)
        return kid

    @staticmethod
    def retire(path: Path, kid: str) -> None:
        """Remove the older key ``kid`` from the KEK file at ``path``.

        Secrets still sealed under it no longer open: rewrap them first
        (``needs_rewrap``). Replaces the file like ``rotate``.

        Raises ``KekError`` if ``kid`` is the current key or not in the file,
        and for the failures of ``load``.
        """
        path = Path(path)
        with _dir_lock(path):
            keys, st = _read(path)
            if keys[0][0] == kid:
                raise KekError(f"{kid!r} is the current key of {path}; rotate before retiring it")
            rest = [(k, key) for k, key in keys if k != kid]
            if len(rest) == len(keys):
                raise KekError(f"{path} has no key {kid!r}")
            _replace(path, rest, st)

    # ---------------------------------------------------------------- sealing

    @property
    def current_kid(self) -> str:
        """The id of the key ``seal`` uses."""
        return next(iter(self._keys))

    @property
    def kids(self) -> tuple[str, ...]:
        """All key ids, current first."""
        return tuple(self._keys)

    def seal(self, plaintext: bytes, aad: bytes) -> str:
        """Encrypt ``plaintext`` under the current key, bound to ``aad``; return the text."""
        kid = self.current_kid
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(self._keys[kid]).encrypt(nonce, plaintext, _full_aad(kid, aad))
        return ".".join((VERSION, kid, _b64(nonce), _b64(sealed)))

    def open(self, sealed: str, aad: bytes) -> bytes:
        """Decrypt text made by ``seal`` with the same ``aad``; return the plaintext.

        Raises ``KekError`` if the text is malformed, names a key this ring
        does not hold (retired, or another site's), or does not
        authenticate (wrong ``aad``, tampered, or sealed under another key
        with the same id).
        """
        kid, nonce, ciphertext = self._parse(sealed)
        key = self._keys.get(kid)
        if key is None:
            raise KekError(f"secret sealed under key {kid!r}, which {self._source} does not "
                           "hold (retired, or from another KEK file)")
        try:
            return AESGCM(key).decrypt(nonce, ciphertext, _full_aad(kid, aad))
        except InvalidTag:
            raise KekError(f"sealed secret does not open under key {kid!r} of {self._source}: "
                           "it belongs to another owner (aad) or was altered") from None

    def needs_rewrap(self, sealed: str) -> bool:
        """Whether ``sealed`` is under a key other than the current one.

        Raises ``KekError`` if the text is malformed.
        """
        kid, _, _ = self._parse(sealed)
        return kid != self.current_kid

    def rewrap(self, sealed: str, aad: bytes) -> str:
        """Return ``sealed`` re-sealed under the current key (same ``aad``).

        Raises ``KekError`` for the failures of ``open``.
        """
        return self.seal(self.open(sealed, aad), aad)

    def _parse(self, sealed: str) -> tuple[str, bytes, bytes]:
        parts = sealed.split(".") if isinstance(sealed, str) else []
        if len(parts) != 4 or parts[0] != VERSION:
            raise KekError(f"not a sealed secret (expected {VERSION}.<kid>.<nonce>.<ciphertext>)")
        _, kid, nonce_text, ct_text = parts
        if not _KID.fullmatch(kid):
            raise KekError("sealed secret has a malformed key id")
        nonce, ciphertext = _unb64(nonce_text), _unb64(ct_text)
        if nonce is None or ciphertext is None or len(nonce) != NONCE_BYTES \
                or len(ciphertext) < TAG_BYTES:
            raise KekError(f"sealed secret under key {kid!r} has a malformed nonce or ciphertext")
        return kid, nonce, ciphertext


# ------------------------------------------------------------------- private


def _check_kid(kid: str, where: str) -> None:
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise KekError(f"{where}: a key id must be 1-64 letters, digits, '-' or '_'")


def _new_kid(taken: Sequence[str]) -> str:
    while True:
        kid = secrets.token_hex(4)
        if kid not in taken:
            return kid


def _full_aad(kid: str, aad: bytes) -> bytes:
    # kid holds no NUL, so the prefix ends unambiguously before the caller's aad.
    return f"ztgpu-kek.{VERSION}.{kid}\0".encode("ascii") + aad


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    """Decode unpadded base64url; ``None`` unless ``text`` is its canonical encoding."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # Canonical only: a text differing in the unused low bits of its last
    # character would decode to the same bytes.
    return data if _b64(data) == text else None


def _read(path: Path) -> tuple[list[tuple[str, bytes]], os.stat_result]:
    """Read and parse the KEK file; return its keys and its ``fstat``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KekError(f"KEK file {path} is a symbolic link; refusing to follow it") from exc
        raise KekError(f"cannot open KEK file {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KekError(f"KEK file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KekError(f"KEK file {path} has mode {st.st_mode & 0o777:04o}, readable "
                           f"beyond its owner; run: chmod 600 {path}")
        if st.st_size > MAX_FILE_BYTES:
            raise KekError(f"KEK file {path} is {st.st_size} bytes; a KEK file is a few "
                           "lines (wrong file?)")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise KekError(f"cannot read KEK file {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    keys: list[tuple[str, bytes]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"KEK file {path} line {number}"
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise KekError(f"{where}: not ASCII text") from None
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise KekError(f"{where}: expected '<kid> <base64 key>' ({len(fields)} fields)")
        kid, text = fields
        _check_kid(kid, where)
        if kid in seen:
            raise KekError(f"{where}: key id {kid!r} already used on line {seen[kid]}")
        try:
            key = base64.b64decode(text, validate=True)
        except binascii.Error:
            # Not chained: the decoder's message could quote the key text.
            raise KekError(f"{where}: key {kid!r} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise KekError(f"{where}: key {kid!r} is {len(key)} bytes, not {KEY_BYTES}")
        seen[kid] = number
        keys.append((kid, key))
    if not keys:
        raise KekError(f"KEK file {path} holds no key")
    return keys, st


def _render(keys: Sequence[tuple[str, bytes]]) -> bytes:
    return b"".join(f"{kid} ".encode("ascii") + base64.b64encode(key) + b"\n"
                    for kid, key in keys)


def _replace(path: Path, keys: Sequence[tuple[str, bytes]], st: os.stat_result) -> None:
    """Write ``keys`` to a 0600 temporary file beside ``path`` and rename it over ``path``.

    The new file gets the old one's owner, group and mode before the rename.
    """
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            f.write(_render(keys))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise KekError(f"cannot replace KEK file {path}: {exc.strerror}") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``'s directory (the file itself is replaced)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise KekError(f"cannot open directory of KEK file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class KeyRingFile:
    """The key ring of a KEK file, reloaded whenever the file changes.

    A running service keeps working across ``ztgpu admin kek rotate`` and
    ``retire``: the next seal uses the new current key, and secrets already
    re-sealed under it open. Thread-safe.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._ring: KeyRing | None = None
        self.ring()  # fail now, not at the first secret, if the file is unusable

    def ring(self) -> KeyRing:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        with self._lock:
            if self._ring is None or stamp != self._stamp:
                self._ring = KeyRing.load(self.path)
                self._stamp = stamp
            return self._ring

    def seal(self, plaintext: bytes, aad: bytes) -> str:
        return self.ring().seal(plaintext, aad)

    def open(self, sealed: str, aad: bytes) -> bytes:
        return self.ring().open(sealed, aad)
