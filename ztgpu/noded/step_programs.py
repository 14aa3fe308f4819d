"""Confinement on cgroup v2: one device program of ours on every step of a job.

Where it goes, and why there. Slurm's cgroup/v2 plugin attaches its device
programs with ``BPF_F_ALLOW_OVERRIDE`` to ``job_<id>`` and to
``step_<s>/user``, and with no flag to ``task_<n>`` (src/plugins/cgroup/v2).
A cgroup's programs all share one flag, so ours (``BPF_F_ALLOW_MULTI``)
cannot sit on any of those; and an OVERRIDE program further up is dropped
below any cgroup with a program of its own, so ours on the job directory
would not run at all once Slurm attached there. ``step_<s>`` is the one
level Slurm never attaches to: a MULTI program there runs for every process
of the step, below whatever Slurm attaches, and both must allow. A ceiling
above the job (the slurmstepd scope) would be shared by every job, and a
device program learns nothing about the process but the device asked for.

The program guards every GPU-class device: the NVIDIA majors the kernel lists
in /proc/devices (nvidiaN, nvidiactl, nvidia-modeset, nvidia-uvm*,
nvidia-caps, nvidia-nvlink, nvidia-nvswitch), each GPU the backend reports,
the control node in the device directory, and the DRM render nodes when
``cgroups.guard_dri_render`` is set. Of those a step may open, read and write
only its job's GPUs and, while it holds at least one, the control nodes CUDA
needs (nvidiactl and nvidia-uvm); nothing after its access is revoked.

Programs are replaced in place (atomically) on revocation, detached when the
job is released, and freed by the kernel with a step's cgroup when Slurm
removes it; :meth:`DevicesV2.programs` counts what is left.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Collection, Iterable
from pathlib import Path

from ztgpu.cgroups.device_bpf import DevicePolicy, DeviceRule, DevicesV2
from ztgpu.gpu.backend import GpuInfo

#: nvidia-frontend's fixed major: nvidiaN (0-253), nvidia-modeset (254), nvidiactl (255).
NVIDIA_MAJOR = 195
_CONTROL_MINOR = 255


def nvidia_char_majors(proc_devices: Path = Path("/proc/devices")) -> dict[str, int]:
    """Character-device drivers whose name starts with ``nvidia``, by name."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        in_char = False
        for line in proc_devices.read_text().splitlines():
            if line.strip().endswith("devices:"):
                in_char = line.startswith("Character")
                continue
            parts = line.split()
            if in_char and len(parts) == 2 and parts[0].isdigit() and parts[1].startswith("nvidia"):
                found[parts[1]] = int(parts[0])
    return found


def _char_rdev(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _rule_order(rule: DeviceRule) -> tuple[int, int]:
    return rule.major, -1 if rule.minor is None else rule.minor


class StepPrograms:
    """Builds each job's policy and keeps one program of ours on each of its steps."""

    def __init__(self, devices: DevicesV2, *, inventory: Iterable[GpuInfo], major: int,
                 device_dir: Path, guard_dri_render: bool = False,
                 proc_devices: Path = Path("/proc/devices")) -> None:
        self.devices = devices
        self.major = major
        #: One change at a time (the sweep and a TaskProlog may meet on a step).
        self._lock = threading.Lock()
        majors = nvidia_char_majors(proc_devices)
        guarded = {DeviceRule(NVIDIA_MAJOR)}
        guarded.update(DeviceRule(m) for m in majors.values())
        guarded.update(DeviceRule(major, g.minor) for g in inventory)
        ctl = _char_rdev(device_dir / "nvidiactl") or (NVIDIA_MAJOR, _CONTROL_MINOR)
        guarded.add(DeviceRule(*ctl))
        if guard_dri_render:
            for node in sorted(Path("/dev/dri").glob("renderD*")):
                rdev = _char_rdev(node)
                if rdev is not None:
                    guarded.add(DeviceRule(*rdev))
        self.guarded = tuple(sorted(guarded, key=_rule_order))
        control = [DeviceRule(ctl[0], ctl[1], "rw")]
        if "nvidia-uvm" in majors:
            control.append(DeviceRule(majors["nvidia-uvm"], None, "rw"))
        self.control = tuple(control)

    def policy(self, minors: Collection[int], *, revoked: bool = False) -> DevicePolicy:
        if revoked or not minors:
            return DevicePolicy(guarded=self.guarded)
        own = tuple(DeviceRule(self.major, m, "rw") for m in sorted(minors))
        return DevicePolicy(guarded=self.guarded, allowed=own + self.control)

    @staticmethod
    def name(job_id: str) -> str:
        # At most 9 characters after the "ztgpu_" prefix; only a label (ours
        # are found by prefix, detached by cgroup).
        return f"j{job_id}"[:9]

    def restrict(self, step: Path, job_id: str, minors: Collection[int], *,
                 revoked: bool = False) -> None:
        with self._lock:
            self.devices.restrict(step, self.policy(minors, revoked=revoked), self.name(job_id))

    def release(self, steps: Iterable[Path]) -> int:
        """Detach ours from each step still there; how many programs were detached."""
        with self._lock:
            return sum(self.devices.release(step) for step in steps)
