"""Which cgroup device mechanism this node offers: v1, v2, or none.

* **v1**: the v1 ``devices`` controller is mounted (``<root>/devices``). On a
  hybrid node (v1 controllers plus an empty cgroup2 at ``unified``) Slurm
  also uses v1, so the agent does too.
* **v2**: ``root`` (or ``cgroups.unified_root``) is a cgroup2 hierarchy and
  this kernel has bpf(2): device programs (:mod:`ztgpu.cgroups.device_bpf`).
* **none**: neither; device files are then the only layer, the agent's start
  is degraded and it grants nothing (``node.unsafe``).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ztgpu.config import CgroupsConfig

Mode = Literal["v1", "v2", "none"]

_BPF_MACHINES = frozenset({"x86_64", "aarch64", "ppc64le", "s390x"})


@dataclass(frozen=True)
class CgroupLayer:
    mode: Mode
    #: v1: the devices hierarchy; v2: the unified hierarchy (or the part of
    #: it configured); none: what was looked at.
    root: Path
    #: Where the hierarchy is mounted: /proc/PID/cgroup paths are relative to it.
    mount: Path
    #: What was found, in words (status, agent.start, node.unsafe).
    detail: str


def filesystem_of(path: Path, mounts: Path = Path("/proc/self/mounts")
                  ) -> tuple[Path, str] | None:
    """(mount point, type) of the filesystem *path* lies on, from the mount table."""
    best: tuple[int, str, str] | None = None
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    target = str(path).rstrip("/") or "/"
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), point, fields[2])
    return (Path(best[1]), best[2]) if best else None


def detect(config: CgroupsConfig, *, mounts: Path = Path("/proc/self/mounts"),
           machine: str | None = None) -> CgroupLayer:
    v1_root = config.root / "devices"
    v1 = (v1_root / "devices.deny").exists()
    unified = config.unified_root or config.root
    fs = filesystem_of(unified, mounts)
    v2 = fs is not None and fs[1] == "cgroup2" and (unified / "cgroup.procs").exists()
    bpf = (machine or platform.machine()) in _BPF_MACHINES
    if config.mode in ("auto", "v1") and v1:
        return CgroupLayer("v1", v1_root, v1_root, f"cgroup v1 devices controller at {v1_root}")
    if config.mode in ("auto", "v2") and v2 and bpf:
        assert fs is not None
        return CgroupLayer("v2", unified, fs[0], f"cgroup v2 device programs (eBPF) on {unified}")
    looked = {"v1": f"no cgroup v1 devices controller at {v1_root}",
              "v2": (f"no cgroup2 hierarchy at {unified}" if not v2
                     else f"bpf(2) is not supported on {machine or platform.machine()}")}
    wanted = ("v1", "v2") if config.mode == "auto" else (config.mode,)
    where = v1_root if wanted == ("v1",) else unified
    return CgroupLayer("none", where, where,
                       "; ".join(looked[m] for m in wanted)
                       + " (cgroups.mode " + config.mode + ")")
