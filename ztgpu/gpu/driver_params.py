"""The NVIDIA driver's device-file parameters, and whether they let it undo the agent.

With ``NVreg_ModifyDeviceFiles=1`` (the driver's default) the driver, and the
setuid ``nvidia-modprobe`` that any user may run, (re)create the GPU device
files with ``DeviceFileMode``/``DeviceFileUID``/``DeviceFileGID`` (default
0666 root:root). A process outside any job could then open an idle GPU
before the agent's next drift check and keep it. So the agent grants
nothing unless the driver leaves the files alone (``ModifyDeviceFiles: 0``)
or would make them exactly what the agent keeps at rest.

``/proc/driver/nvidia/params`` holds one ``Key: value`` per line; the three
``DeviceFile*`` values are decimal (``DeviceFileMode: 438`` is 0666).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ztgpu.cgroups.device_files import FileState
from ztgpu.errors import GpuError

#: Where the loaded driver publishes its parameters.
PARAMS_PATH = Path("/proc/driver/nvidia/params")
#: The modprobe.d file the fix goes into.
MODPROBE_FILE = "/etc/modprobe.d/ztgpu-nvidia.conf"


def read_params(path: Path = PARAMS_PATH) -> dict[str, str]:
    """The driver's parameters as text, by name.

    Raises:
        GpuError: the file cannot be read, or a line is not ``Key: value``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GpuError(f"cannot read the NVIDIA driver's parameters from {path}: {exc}"
                       ) from exc
    params: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        key, sep, value = raw.partition(":")
        if not sep or not key.strip() or " " in key.strip():
            raise GpuError(f"{path}: line {lineno}: expected 'Key: value', got {raw!r}")
        params[key.strip()] = value.strip()
    return params


def modprobe_line(rest: FileState) -> str:
    """The modprobe.d line that makes the driver create files in the rest state."""
    return (f"options nvidia NVreg_DeviceFileUID={rest.uid} NVreg_DeviceFileGID={rest.gid} "
            f"NVreg_DeviceFileMode=0{rest.mode:o}")


def _number(params: Mapping[str, str], key: str, source: str) -> int:
    raw = params.get(key)
    if raw is None:
        raise GpuError(f"{source} has no {key}")
    try:
        return int(raw, 0) if raw.startswith("0x") else int(raw)
    except ValueError:
        raise GpuError(f"{source}: {key} is {raw!r}, not a number") from None


def device_file_problem(params: Mapping[str, str], rest: FileState,
                        source: str = str(PARAMS_PATH)) -> str | None:
    """Why the driver could reopen GPUs behind the agent, or None when it cannot.

    The answer names the setting found and the modprobe.d line that fixes it.

    Raises:
        GpuError: a parameter the decision needs is missing or not a number.
    """
    if _number(params, "ModifyDeviceFiles", source) == 0:
        return None
    driver = FileState(uid=_number(params, "DeviceFileUID", source),
                       gid=_number(params, "DeviceFileGID", source),
                       mode=_number(params, "DeviceFileMode", source) & 0o7777)
    if driver == rest:
        return None
    return (f"the NVIDIA driver may recreate GPU device files as {driver.describe()} "
            f"(ModifyDeviceFiles: 1 in {source}), which is not the rest state "
            f"{rest.describe()}: any user could run nvidia-modprobe and open an idle GPU. "
            f"Add '{modprobe_line(rest)}' (or 'options nvidia NVreg_ModifyDeviceFiles=0' "
            f"where udev creates the files) to {MODPROBE_FILE} and reload the nvidia "
            f"module (or reboot)")
