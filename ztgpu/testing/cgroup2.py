"""A scratch cgroup v2 tree, and a process inside it that tries device opens.

On a pure-v2 node the unified hierarchy is /sys/fs/cgroup; on a hybrid
host (v1 controllers) it is mounted at /sys/fs/cgroup/unified with no
controllers, which is enough for device programs: the kernel runs a
cgroup's device programs for every process in it whatever controllers are
enabled. The tree is removed (children first) when the context ends.

The oracle is the one the v1 tests use: a device node made with ``mknod``
for a major no driver serves opens with ENXIO once the cgroup layer lets the
open through, and fails with EPERM when a device program denies it, so a
root process inside the cgroup tells the cgroup layer's decision apart from
everything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from ztgpu.testing.slurm_cluster import _rmdir_tree


def unified_root(mounts: Path = Path("/proc/self/mounts")) -> Path | None:
    """Where the cgroup2 hierarchy is mounted, or None."""
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


@contextlib.contextmanager
def scratch_tree(root: Path, prefix: str = "ztgpu-test") -> Iterator[Path]:
    top = root / f"{prefix}-{uuid.uuid4().hex[:8]}"
    top.mkdir()
    try:
        yield top
    finally:
        _rmdir_tree(top)


_CHILD = r"""
import json, os, sys
cgroup, paths = sys.argv[1], json.loads(sys.argv[2])
with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
modes = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}
out = {}
for path, mode in paths:
    try:
        if mode == "m":
            os.mknod(path + ".m", 0o600 | 0o020000, os.stat(path).st_rdev)
            os.unlink(path + ".m")
        else:
            os.close(os.open(path, modes[mode] | os.O_NONBLOCK))
        out[path + ":" + mode] = "open"
    except OSError as e:
        import errno
        out[path + ":" + mode] = "open" if e.errno == errno.ENXIO else errno.errorcode[e.errno]
print(json.dumps(out))
"""


def try_opens(cgroup: Path, attempts: Sequence[tuple[Path, str]]) -> dict[str, str]:
    """From a fresh process placed in *cgroup*, try each (device node, mode);
    mode is ``r``, ``w``, ``rw`` or ``m`` (mknod of the same device number
    beside it). Results by ``"path:mode"``: ``open`` (ENXIO counts as open:
    the cgroup layer let it through) or the errno name."""
    run = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(cgroup),
                          json.dumps([[str(p), m] for p, m in attempts])],
                         capture_output=True, text=True, timeout=30, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"device probe in {cgroup} failed: {run.stderr.strip()}")
    result: dict[str, str] = json.loads(run.stdout)
    return result


def make_char_device(path: Path, major: int, minor: int) -> Path:
    os.mknod(path, 0o600 | 0o020000, os.makedev(major, minor))
    return path


_ENTER = r"""
import os, sys
cgroup, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
os.setgroups([gid])
os.setgid(gid)
os.setuid(uid)
os.execvp(sys.argv[4], sys.argv[4:])
"""


def spawn_in(cgroup: Path, uid: int, gid: int, argv: Sequence[str],
             env: dict[str, str] | None = None, *, capture: bool = False
             ) -> subprocess.Popen[str]:
    """Start *argv* inside *cgroup* as *uid*/*gid*, as slurmstepd starts a task:
    placed by root first, then dropped to the user, then exec'd."""
    pipe = subprocess.PIPE if capture else None
    return subprocess.Popen([sys.executable, "-I", "-c", _ENTER, str(cgroup), str(uid),
                             str(gid), *argv], env=env, text=True, stdout=pipe, stderr=pipe)
