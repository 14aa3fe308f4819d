"""The login session's binding key, kept in the kernel session keyring.

``ztgpu login`` receives a key from authd that only this login session may
use: the key proves, job by job, that a job was submitted from the session
that passed MFA. It lives in the kernel's *session* keyring, which sshd's
``pam_keyinit force revoke`` makes new for every login and which the
login's processes inherit (tmux and screen servers too). Another login of
the same user has a keyring of its own and, not possessing this one, may
see that the key exists but not read it (the kernel's default permissions
for a user key: possessor all, user view).

A process without a session keyring of its own (no pam_keyinit in the login
stack) shares the *user-session* keyring with every such process of the
user; storing the key there would hand it to every session, so
:func:`store` refuses. Standard library (ctypes on the raw syscalls), no
keyutils library needed.
"""

from __future__ import annotations

import ctypes
import os
import platform

from ztgpu.errors import Fault

#: Key description in the session keyring.
KEY_NAME = b"ztgpu:session"
KEY_TYPE = b"user"

_SYSCALLS = {  # add_key, request_key, keyctl
    "x86_64": (248, 249, 250),
    "aarch64": (217, 218, 219),
    "ppc64le": (269, 270, 271),
}
_SESSION = -3  # KEY_SPEC_SESSION_KEYRING
_USER_SESSION = -5  # KEY_SPEC_USER_SESSION_KEYRING
_GET_KEYRING_ID = 0
_READ = 11
_CHOWN = 4
_SET_TIMEOUT = 15
_INVALIDATE = 21


class KeyringError(Fault):
    """The session keyring cannot hold or give the key."""


def _libc() -> tuple[ctypes.CDLL, tuple[int, int, int]]:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise KeyringError(f"kernel keyrings are not supported on {platform.machine()} here")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc, numbers


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise KeyringError(f"{what}: {os.strerror(err)}")
    return result


def own_session_keyring() -> bool:
    """Whether this process has a session keyring of its own (not the user's
    shared user-session keyring)."""
    libc, (_, _, keyctl) = _libc()
    session = int(libc.syscall(keyctl, _GET_KEYRING_ID, _SESSION, 0))
    user_session = int(libc.syscall(keyctl, _GET_KEYRING_ID, _USER_SESSION, 0))
    return session >= 0 and session != user_session


def store(payload: bytes, lifetime_s: int, owner: tuple[int, int] | None = None) -> None:
    """Keep *payload* in this login's session keyring for *lifetime_s* seconds;
    *owner* (uid, gid): root (the PAM module) gives the key to the user.

    Raises KeyringError when the login has no session keyring of its own.
    """
    if not own_session_keyring():
        raise KeyringError(
            "this login has no session keyring of its own (the login node's sshd PAM stack "
            "needs `session optional pam_keyinit.so force revoke`): a key kept in the shared "
            "user keyring would be readable by every session of yours")
    libc, (add_key, _, keyctl) = _libc()
    key = _check(libc.syscall(add_key, KEY_TYPE, KEY_NAME, payload, len(payload), _SESSION),
                 "cannot add the key to the session keyring")
    _check(libc.syscall(keyctl, _SET_TIMEOUT, key, max(1, int(lifetime_s))),
           "cannot set the key's lifetime")
    if owner is not None:
        _check(libc.syscall(keyctl, _CHOWN, key, owner[0], owner[1]),
               "cannot give the key to the user")


def read() -> bytes | None:
    """This login's key, or None when it has none (or it expired)."""
    libc, (_, request_key, keyctl) = _libc()
    key = libc.syscall(request_key, KEY_TYPE, KEY_NAME, None, 0)
    if key < 0:
        return None
    buf = ctypes.create_string_buffer(4096)
    size = libc.syscall(keyctl, _READ, key, buf, len(buf))
    if size < 0:
        err = ctypes.get_errno()
        raise KeyringError(f"cannot read this login's key: {os.strerror(err)}")
    return buf.raw[:size]


def forget() -> bool:
    """Invalidate this login's key (``ztgpu logout``); False if there was none."""
    libc, (_, request_key, keyctl) = _libc()
    key = libc.syscall(request_key, KEY_TYPE, KEY_NAME, None, 0)
    if key < 0:
        return False
    _check(libc.syscall(keyctl, _INVALIDATE, key), "cannot invalidate this login's key")
    return True
