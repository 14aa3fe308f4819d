"""What the node agent checks before it will grant a GPU, in one place.

The agent runs these at start (a failure either stops it or stops every
grant, recorded), and ``ztgpu config check`` runs the very same functions,
so an admin learns before a restart what the agent would refuse:

* the rest state's owner and group exist (else the agent cannot start);
* every path root trusts is changeable by root alone, all the way up;
* the device directory holds each GPU's device file;
* Slurm numbers the GPUs as the agent does (gres.conf ``File=``);
* the NVIDIA driver cannot recreate device files other than at rest.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ztgpu.cgroups.device_files import FileState, read_state
from ztgpu.config import Config
from ztgpu.errors import ConfigError, DeviceError, Fault, GpuError
from ztgpu.gpu.backend import GpuBackend, GpuInfo
from ztgpu.gpu.devices import gpu_device_path
from ztgpu.gpu.driver_params import device_file_problem
from ztgpu.noded.cgroup_layer import CgroupLayer
from ztgpu.noded.cgroup_layer import detect as detect_layer
from ztgpu.slurm.gres_conf import gpu_files
from ztgpu.trust.safe_paths import untrusted_component

log = logging.getLogger("ztgpu.noded")


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``problem`` None means it passed."""

    name: str
    problem: str | None
    #: What was (or could not be) looked at, for people.
    note: str = ""


def rest_state(config: Config) -> FileState:
    """The device files' state while no job holds them.

    Raises:
        Fault: ``devices.rest_owner`` or ``rest_group`` does not exist here.
    """
    dev = config.devices
    try:
        uid = pwd.getpwnam(dev.rest_owner).pw_uid
    except KeyError:
        raise Fault(f"devices.rest_owner: user {dev.rest_owner} does not exist") from None
    try:
        gid = grp.getgrnam(dev.rest_group).gr_gid
    except KeyError:
        raise Fault(f"devices.rest_group: group {dev.rest_group} does not exist") from None
    return FileState(uid=uid, gid=gid, mode=dev.rest_mode_bits)


def trusted_paths(config: Config) -> list[tuple[str, Path]]:
    """The paths the agent trusts as root: (config key, path)."""
    paths = config.paths
    return [("paths.state_dir", paths.state_dir), ("paths.spool_dir", paths.spool_dir),
            ("the directory of paths.socket", paths.socket.parent),
            ("the directory of paths.task_socket", paths.task_socket.parent),
            ("paths.hooks_dir", paths.hooks_dir)]


def path_problem(what: str, path: Path) -> str | None:
    """Why root must not trust *path*, with the fix, or None."""
    problem = untrusted_component(path)
    if problem is None:
        return None
    return (f"{what} {path} is not safe for root to use: {problem}; make every directory on "
            "the way root-owned and writable only by root (chown root; chmod go-w)")


def require_trusted_paths(config: Config, names: Sequence[str]) -> None:
    """ConfigError for the first of the named trusted paths that is not safe."""
    for what, path in trusted_paths(config):
        if what in names and (problem := path_problem(what, path)) is not None:
            raise ConfigError(problem)


def device_problem(config: Config, inventory: Sequence[GpuInfo], major: int) -> str | None:
    """Which GPU's device file is missing or wrong under ``paths.device_dir``, or None."""
    bad = []
    for gpu in inventory:
        try:
            read_state(gpu_device_path(config.paths.device_dir, gpu), major, gpu.minor)
        except DeviceError as exc:
            bad.append(str(exc))
    return "; ".join(bad) if bad else None


def driver_problem(backend: GpuBackend, rest: FileState) -> str | None:
    """Why the driver could reopen GPUs behind the agent, or None (see driver_params)."""
    try:
        params = backend.driver_params()
        if params is None:
            return None
        return device_file_problem(params, rest)
    except GpuError as exc:
        return f"cannot tell whether the NVIDIA driver may reopen device files: {exc}"


def gres_problem(config: Config, inventory: Sequence[GpuInfo], major: int
                 ) -> tuple[str | None, str]:
    """Whether Slurm numbers this node's GPUs as the agent does: (problem, note).

    The agent's rule is gres index *i* = the GPU with the *i*-th smallest
    minor; Slurm's comes from gres.conf ``File=`` (every listed file must
    exist, or slurmd numbers the ones after it differently).
    """
    path = config.slurm.gres_conf_path
    try:
        found = gpu_files(path, config.node_name)
    except ConfigError as exc:
        return f"cannot check Slurm's GPU order: {exc}", ""
    if found is None or not found.files:
        return None, f"{path} lists no GPU files for this node: GPU order not cross-checked"
    if not found.in_index_order:
        return None, (f"{path}: AutoDetect={found.autodetect} orders the GPUs; order not "
                      "cross-checked")
    slurm: list[str] = []
    for file in found.files:
        try:
            st = os.stat(file)
        except OSError as exc:
            return (f"{path} lists {file}, which cannot be read ({exc.strerror}): slurmd then "
                    "numbers the GPUs after it differently"), ""
        slurm.append(f"minor {os.minor(st.st_rdev)}"
                     if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == major
                     else str(file))
    mine = [f"minor {gpu.minor}" for gpu in inventory]
    if slurm == mine:
        return None, f"{path}: {len(slurm)} GPUs in the agent's order"

    def show(items: list[str]) -> str:
        return ", ".join(f"{i}={item}" for i, item in enumerate(items)) or "none"
    return (f"Slurm's GPU order ({path}, File=) is not the agent's: Slurm gres index -> "
            f"{show(slurm)}; agent -> {show(mine)}. List the GPU files in ascending minor "
            f"order (e.g. File=/dev/nvidia[0-{max(len(mine) - 1, 0)}]) and restart slurmd, so "
            f"SLURM_JOB_GPUS names the GPUs the agent grants"), ""


def cgroup_problem(layer: CgroupLayer) -> str | None:
    """Why the node's cgroups cannot confine jobs, if they cannot."""
    if layer.mode != "none":
        return None
    return (f"no cgroup device layer: {layer.detail}. Device-file ownership alone would "
            "protect the GPUs (no separation between one user's jobs, nothing the agent "
            "can prove), so the agent grants nothing; mount the v1 devices controller or "
            "boot with the unified cgroup v2 hierarchy")


def agent_checks(config: Config) -> list[Check]:
    """Every check the agent makes at start, run here and now (``ztgpu config check``).

    Never raises: a check that cannot run is a failed check.
    """
    from ztgpu.gpu.devices import nvidia_major
    from ztgpu.gpu.select import open_backend

    checks: list[Check] = []
    try:
        rest: FileState | None = rest_state(config)
        checks.append(Check("rest_state", None, "devices.rest_owner/rest_group exist"))
    except Fault as exc:
        rest = None
        checks.append(Check("rest_state", f"{exc}: the agent will not start"))
    for what, path in trusted_paths(config):
        checks.append(Check("trusted_path", path_problem(what, path), f"{what} {path}"))
    layer = detect_layer(config.cgroups)
    checks.append(Check("cgroups", cgroup_problem(layer), layer.detail))
    missing = [name for name in config.devices.holder_exempt_users if not _user_exists(name)]
    if missing:
        checks.append(Check("holder_exempt_users", None,
                            f"{', '.join(missing)} do(es) not exist here: exempts nobody"))
    try:
        backend = open_backend(config.gpu)
        try:
            from ztgpu.gpu.backend import slurm_order

            inventory = slurm_order(backend.inventory())
            major = nvidia_major().major
            if backend.simulated and config.gpu.simulated_major is not None:
                major = config.gpu.simulated_major
            checks.append(Check("devices", device_problem(config, inventory, major),
                                f"{len(inventory)} GPUs ({backend.name}) under "
                                f"{config.paths.device_dir}"))
            problem, note = gres_problem(config, inventory, major)
            checks.append(Check("gres_order", problem, note))
            if rest is not None:
                checks.append(Check("driver_params", driver_problem(backend, rest),
                                    "the driver's ModifyDeviceFiles and DeviceFile*"))
        finally:
            backend.close()
    except (GpuError, DeviceError) as exc:
        if config.gpu.backend != "auto":
            checks.append(Check("gpus", f"gpu.backend {config.gpu.backend}: {exc}: the agent "
                                "will not start"))
        else:
            checks.append(Check("gpus", None, f"no GPU inventory on this host ({exc}): the "
                                "checks of device files, gres order and driver were skipped"))
    return checks


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
