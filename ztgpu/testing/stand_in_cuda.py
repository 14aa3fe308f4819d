"""Build the stand-in CUDA driver library (``stand_in_libcuda.c``) for tests
and ``bench/gpu_wipe.py``: a libcuda of host memory with the entry points
the wiper calls (see the C file for what it imitates and its faults)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from ztgpu.testing.prerequisites import require

SOURCE = Path(__file__).with_name("stand_in_libcuda.c")


def build(cache_dir: Path) -> Path:
    """The stand-in library under *cache_dir*, built once per source version."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    out = cache_dir / f"stand-in-libcuda-{digest}.so"
    if not out.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            built = Path(tmp) / "libcuda.so"
            subprocess.run([str(require("gcc")), "-O2", "-g", "-Wall", "-Wextra", "-Werror",
                            "-fPIC", "-shared", "-pthread", "-o", str(built), str(SOURCE)],
                           check=True, capture_output=True, text=True, timeout=120)
            built.replace(out)
    return out


def fresh_copy(library: Path, where: Path) -> Path:
    """A copy under a name of its own: loading it gives a process a stand-in
    with no state left by an earlier load (as a new process would have)."""
    where.mkdir(parents=True, exist_ok=True)
    copy = Path(tempfile.mkstemp(dir=where, prefix="libcuda-", suffix=".so.1")[1])
    shutil.copyfile(library, copy)
    return copy
