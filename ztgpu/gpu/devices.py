"""NVIDIA character devices: major numbers, control nodes and device paths.

The kernel driver registers major 195 for ``/dev/nvidia<minor>`` and
``/dev/nvidiactl`` (minor 255); ``nvidia-uvm`` gets a dynamic major that only
``/proc/devices`` tells.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ztgpu.errors import DeviceError
from ztgpu.gpu.backend import GpuInfo

#: Major number the NVIDIA driver uses for GPUs and nvidiactl.
NVIDIA_MAJOR_DEFAULT = 195
#: Minor number of ``/dev/nvidiactl`` under the NVIDIA major.
NVIDIACTL_MINOR = 255
#: Shared device files CUDA needs besides the GPUs themselves.
CONTROL_DEVICES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")

_CHAR_HEADER = "Character devices:"
_BLOCK_HEADER = "Block devices:"
# Names the NVIDIA driver has registered its main major under: current drivers
# say "nvidia-frontend", older ones "nvidia".
_NVIDIA_DRIVER_NAMES = ("nvidia-frontend", "nvidia")


@dataclass(frozen=True)
class MajorSource:
    """A major number and whether the running kernel reported it."""

    major: int
    #: True when read from /proc/devices; False when it is the built-in default.
    from_proc: bool


def char_device_major(driver: str = "nvidia-frontend",
                      proc_devices: Path = Path("/proc/devices")) -> int | None:
    """The character-device major registered under exactly the name *driver*.

    Only the ``Character devices:`` section counts; a block driver of the same
    name is ignored. Returns None when no character driver has that name.

    Raises:
        DeviceError: the file cannot be read, or a line in the character
            section is not ``<major> <name>``.
    """
    try:
        text = proc_devices.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceError(f"cannot read {proc_devices}: {exc}") from exc
    in_char = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line == _CHAR_HEADER:
            in_char = True
            continue
        if line == _BLOCK_HEADER:
            in_char = False
            continue
        if not in_char or not line:
            continue
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or not fields[0].isdigit():
            raise DeviceError(f"{proc_devices}: line {lineno}: expected '<major> <name>', "
                              f"got {raw!r}")
        if fields[1] == driver:
            return int(fields[0])
    return None


def nvidia_major(proc_devices: Path = Path("/proc/devices")) -> MajorSource:
    """The major of ``/dev/nvidia<minor>`` and ``/dev/nvidiactl``.

    Read from *proc_devices* when the driver registered one (as
    ``nvidia-frontend`` or, on older drivers, ``nvidia``); otherwise
    :data:`NVIDIA_MAJOR_DEFAULT` with ``from_proc=False`` so the caller can
    say that it is assuming.

    Raises:
        DeviceError: as :func:`char_device_major`.
    """
    for name in _NVIDIA_DRIVER_NAMES:
        major = char_device_major(name, proc_devices)
        if major is not None:
            return MajorSource(major=major, from_proc=True)
    return MajorSource(major=NVIDIA_MAJOR_DEFAULT, from_proc=False)


def gpu_device_path(device_dir: Path, gpu: GpuInfo) -> Path:
    """The device file of *gpu* under *device_dir* (``<device_dir>/nvidia<minor>``)."""
    return device_dir / gpu.device_name


def driver_present(proc_root: Path = Path("/proc")) -> bool:
    """True when the NVIDIA kernel driver is loaded (``driver/nvidia/version`` exists)."""
    return (proc_root / "driver" / "nvidia" / "version").exists()
