"""Device-file ownership (the DAC half of device access control).

Root-only mechanism: checks that a path really is the expected character
device before changing its owner, group or mode, through one descriptor of
the file itself, and never follows a link.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ztgpu.errors import DeviceError


@dataclass(frozen=True)
class FileState:
    uid: int
    gid: int
    mode: int  # permission bits only

    def describe(self) -> str:
        return f"uid={self.uid} gid={self.gid} mode={self.mode:04o}"


def _open_node(path: Path) -> int:
    """An O_PATH descriptor of *path* itself (a final symlink is not followed)."""
    try:
        return os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DeviceError(f"{path} does not exist") from None
    except OSError as exc:
        raise DeviceError(f"cannot open {path}: {exc.strerror}") from exc


def _checked(fd: int, path: Path, major: int, minor: int) -> FileState:
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode):
        raise DeviceError(f"{path} is not a character device")
    if (os.major(st.st_rdev), os.minor(st.st_rdev)) != (major, minor):
        raise DeviceError(f"{path} is device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, "
                          f"expected {major}:{minor}")
    return FileState(uid=st.st_uid, gid=st.st_gid, mode=stat.S_IMODE(st.st_mode))


def read_state(path: Path, major: int, minor: int) -> FileState:
    """Owner, group and mode of the character device at *path*.

    Raises:
        DeviceError: missing, not a character device (a symlink included), or
            not major:minor.
    """
    fd = _open_node(path)
    try:
        return _checked(fd, path, major, minor)
    finally:
        os.close(fd)


def apply_state(path: Path, major: int, minor: int, wanted: FileState) -> bool:
    """Make the device file match *wanted*; True if anything had to change.

    The file is opened once with O_PATH|O_NOFOLLOW, checked through that
    descriptor and changed through it, so a path swapped for a link (or for
    another file) between the check and the change is never acted on. The
    order closes access before opening it: the mode drops to 0 first, then
    the owner changes, then the final mode is set.

    Raises:
        DeviceError: the path is not the expected device, or chown/chmod failed.
    """
    fd = _open_node(path)
    try:
        current = _checked(fd, path, major, minor)
        if current == wanted:
            return False
        # fchmod/fchown refuse O_PATH descriptors; the /proc/self/fd link
        # names the very inode the descriptor holds.
        node = f"/proc/self/fd/{fd}"
        try:
            os.chmod(node, 0)
            os.chown(node, wanted.uid, wanted.gid)
            os.chmod(node, wanted.mode)
        except OSError as exc:
            raise DeviceError(f"cannot set {wanted.describe()} on {path}: {exc.strerror}"
                              ) from exc
        return True
    finally:
        os.close(fd)
