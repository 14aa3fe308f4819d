"""Shared fixtures: a standalone node agent, and the suite on a real Slurm cluster."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztgpu.testing.agent_process import StandaloneAgent, standalone_agent

HAVE_ROOT = os.geteuid() == 0
HAVE_SLURM = all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch"))

needs_root = pytest.mark.skipif(not HAVE_ROOT, reason="needs root (device nodes, cgroups, chown)")
needs_slurm = pytest.mark.skipif(not (HAVE_ROOT and HAVE_SLURM),
                                 reason="needs root and slurm-wlm + munge (run `make test`)")


@pytest.fixture
def agent() -> Iterator[StandaloneAgent]:
    """A real ztgpu-noded process on simulated GPUs in a private device dir.

    The directory is world-traversable (unlike pytest's tmp_path) so that
    tests can act as unprivileged users against the socket and devices.
    """
    if not HAVE_ROOT:
        pytest.skip("needs root (device nodes, cgroups, chown)")
    base = Path(tempfile.mkdtemp(prefix="ztgpu-agent-"))
    try:
        with standalone_agent(base) as running:
            yield running
    finally:
        shutil.rmtree(base, ignore_errors=True)
