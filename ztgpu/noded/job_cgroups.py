"""Where Slurm keeps a job's processes, read from cgroupfs.

With ``ProctrackType=proctrack/cgroup`` (cgroup v1) every process of every
step of job J lives under ``freezer:/slurm*/uid_U/job_J/``; with
``ConstrainDevices=yes`` Slurm also builds ``devices:/slurm*/uid_U/job_J/``.
Users cannot move their processes out of these root-owned cgroups, which is
what makes them a trustworthy answer to "which processes belong to job J".
The ``slurm*`` part is ``slurm`` or ``slurm_<nodename>`` depending on how
Slurm was built.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class JobCgroups:
    #: Job directories in the freezer hierarchy (normally one).
    freezer: tuple[Path, ...]
    #: Job directories Slurm made in the devices hierarchy (ConstrainDevices=yes).
    devices: tuple[Path, ...]


def find_job_cgroups(cgroup_root: Path, uid: int, job_id: str) -> JobCgroups:
    pattern = f"slurm*/uid_{uid}/job_{job_id}"
    return JobCgroups(
        freezer=tuple(sorted((cgroup_root / "freezer").glob(pattern))),
        devices=tuple(sorted((cgroup_root / "devices").glob(pattern))),
    )


def cgroup_pids(directory: Path) -> set[int]:
    """Every pid in *directory* and its descendants (vanishing dirs are skipped)."""
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for procs in [directory / "cgroup.procs", *directory.rglob("*/cgroup.procs")]:
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in procs.read_text().split())
    return pids


def subdirs(directory: Path) -> list[Path]:
    """*directory* and all cgroup directories below it."""
    found = [directory]
    with contextlib.suppress(OSError):
        found.extend(p for p in directory.rglob("*") if p.is_dir())
    return found


def devices_cgroup_of(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The pid's path in the v1 devices hierarchy, or None if it has exited."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "devices" in controllers.split(","):
            return path
    return None
