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
import re
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
    return _cgroup_line(pid, "devices", proc_root)


_JOB_PATH = re.compile(r"^/slurm[^/]*/uid_([0-9]+)/job_([0-9]+)(?:/|$)")


def _cgroup_line(pid: int, controller: str, proc_root: Path) -> str | None:
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return None


def in_job_cgroup(path: str, job_id: str) -> bool:
    """Whether a cgroup path lies inside a ``job_<job_id>`` directory (a whole
    path component: job 4 is not job 41)."""
    return f"/job_{job_id}/" in path.rstrip("/") + "/"


def job_of_pid(pid: int, proc_root: Path = Path("/proc")) -> tuple[int, str] | None:
    """(uid, job id) of the Slurm job whose freezer cgroup holds *pid*, if any."""
    path = _cgroup_line(pid, "freezer", proc_root)
    match = _JOB_PATH.match(path) if path else None
    return (int(match.group(1)), match.group(2)) if match else None


def proc_info(pid: int, proc_root: Path = Path("/proc")) -> tuple[int, int] | None:
    """(parent pid, real uid) of *pid*, or None if it has exited."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
        status = (proc_root / str(pid) / "status").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return ppid, int(uid_line.split()[1])


# ---- cgroup v2 -------------------------------------------------------------
#
# Slurm's cgroup/v2 plugin keeps every step's processes under one delegated
# systemd scope (``slurmstepd.scope``, prefixed by the node name where
# several slurmd share a host): ``<scope>/job_<id>/step_<s>/user/task_<n>``
# for the user's processes and ``<scope>/job_<id>/step_<s>/slurm`` for the
# step's slurmstepd. Only the unified hierarchy exists, so the path carries
# no uid: who owns a job comes from the agent's own grant. From Slurm 26.05
# job directories are named by SLUID unless ``CgroupJobIdPaths=yes``; the
# agent needs ``job_<id>`` names.

_V2_JOB = re.compile(r"/[^/]*slurmstepd\.scope/job_([0-9]+)(?:/|$)")
_V2_SCOPE_GLOBS = ("*slurmstepd.scope", "*/*slurmstepd.scope", "*/*/*slurmstepd.scope")


def unified_path_of(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The pid's path in the cgroup v2 hierarchy (its ``0::`` line), or None."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def v2_job_of_path(path: str) -> tuple[str, str] | None:
    """(job id, the job directory's path) of a v2 cgroup path inside a job."""
    match = _V2_JOB.search(path)
    return (match.group(1), path[:match.end()].rstrip("/")) if match else None


def v2_job_of_pid(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The id of the Slurm job whose v2 cgroup holds *pid*, if any."""
    path = unified_path_of(pid, proc_root)
    found = v2_job_of_path(path) if path else None
    return found[0] if found else None


def v2_job_dirs(unified_root: Path, job_id: str) -> tuple[Path, ...]:
    """The job's directories under every slurmstepd scope (normally one)."""
    found: set[Path] = set()
    for pattern in _V2_SCOPE_GLOBS:
        found.update(p for p in unified_root.glob(f"{pattern}/job_{job_id}") if p.is_dir())
    return tuple(sorted(found))


def v2_step_dirs(job_dir: Path) -> list[Path]:
    """The job's step directories (``step_<s>``): the level Slurm attaches no
    device program to."""
    with contextlib.suppress(OSError):
        return sorted(p for p in job_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
    return []


def v2_step_of(job_dir: Path, cgroup: Path) -> Path | None:
    """The step directory of *job_dir* that contains *cgroup*, if any."""
    try:
        rel = cgroup.relative_to(job_dir)
    except ValueError:
        return None
    return job_dir / rel.parts[0] if rel.parts and rel.parts[0].startswith("step_") else None


def v2_is_user_leaf(step: Path, cgroup: Path) -> bool:
    """Whether *cgroup* is where Slurm runs the step's user processes
    (``step_<s>/user/...``), not slurmstepd's own ``step_<s>/slurm``: a
    process of the user seen there is one slurmstepd forked and has not yet
    moved into its task's cgroup."""
    try:
        parts = cgroup.relative_to(step).parts
    except ValueError:
        return False
    return len(parts) >= 1 and parts[0] == "user"


def populated_leaves(directory: Path) -> dict[Path, set[int]]:
    """Every cgroup at or below *directory* that holds processes, with its pids."""
    found: dict[Path, set[int]] = {}
    for cgroup in subdirs(directory):
        with contextlib.suppress(OSError):
            pids = {int(x) for x in (cgroup / "cgroup.procs").read_text().split()}
            if pids:
                found[cgroup] = pids
    return found
