"""Device-file ownership (the DAC half of device access control).

Root-only mechanism: checks that a path really is the expected character
device before changing its owner, group or mode, and never follows links.
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


def read_state(path: Path, major: int, minor: int) -> FileState:
    """Owner, group and mode of the character device at *path*.

    Raises:
        DeviceError: missing, not a character device, or not major:minor.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise DeviceError(f"{path} does not exist") from None
    except OSError as exc:
        raise DeviceError(f"cannot stat {path}: {exc.strerror}") from exc
    if not stat.S_ISCHR(st.st_mode):
        raise DeviceError(f"{path} is not a character device")
    if (os.major(st.st_rdev), os.minor(st.st_rdev)) != (major, minor):
        raise DeviceError(f"{path} is device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, "
                          f"expected {major}:{minor}")
    return FileState(uid=st.st_uid, gid=st.st_gid, mode=stat.S_IMODE(st.st_mode))


def apply_state(path: Path, major: int, minor: int, wanted: FileState) -> bool:
    """Make the device file match *wanted*; True if anything had to change.

    The order closes access before opening it: the mode drops to 0 first,
    then the owner changes, then the final mode is set.

    Raises:
        DeviceError: the path is not the expected device, or chown/chmod failed.
    """
    current = read_state(path, major, minor)
    if current == wanted:
        return False
    # lstat above proved this is a device node, not a link, so chmod (which
    # cannot refuse links on Linux) acts on the node itself.
    try:
        os.chmod(path, 0)
        os.chown(path, wanted.uid, wanted.gid, follow_symlinks=False)
        os.chmod(path, wanted.mode)
    except OSError as exc:
        raise DeviceError(f"cannot set {wanted.describe()} on {path}: {exc.strerror}") from exc
    return True
