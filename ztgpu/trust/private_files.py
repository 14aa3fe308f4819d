"""Files that hold secrets: created 0600, never over something already there.

Shared by the PKI (private keys) and the KEK file. Errors are raised as the
caller's own error class, so each names its own file and context; no
message ever contains the file's content.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from pathlib import Path


def owner_ids(owner: str | None, error: type[Exception]) -> tuple[int, int] | None:
    """(uid, gid) of user ``owner`` (None for None); ``error`` if there is no such user."""
    if owner is None:
        return None
    try:
        entry = pwd.getpwnam(owner)
    except KeyError as exc:
        raise error(f"unknown user {owner!r}") from exc
    return entry.pw_uid, entry.pw_gid


def create_exclusive(path: Path, data: bytes, ids: tuple[int, int] | None,
                     error: type[Exception], exists: str = "refusing to replace it") -> None:
    """Write a new 0600 file at ``path`` (given to ``ids`` before the data is written).

    Fails with ``error`` if anything, even a dangling link, is at ``path``
    (``O_EXCL|O_NOFOLLOW``); a partly written file is removed. The data is
    fsync'ed before returning.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise error(f"{path} already exists; {exists}") from exc
    except OSError as exc:
        raise error(f"cannot create {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # the umask may have removed bits; never adds
            if ids is not None:
                os.fchown(f.fileno(), *ids)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise error(f"cannot write {path}: {exc.strerror}") from exc
