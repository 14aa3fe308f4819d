"""The installed distribution's layout, and that the test cluster leaves nothing behind."""

from __future__ import annotations

import importlib.metadata
import pwd
from pathlib import Path

from conftest import needs_slurm

from ztgpu.testing.slurm_cluster import CGROUP_ROOT, ClusterSpec, slurm_cluster


def test_one_distribution_one_namespace():
    files = [str(f) for f in importlib.metadata.files("ztgpu") or []]
    assert files, "ztgpu is not installed"
    top = {f.split("/")[0] for f in files if not f.startswith("..")}
    assert {t for t in top if not t.endswith(".dist-info")} == {"ztgpu"}, top
    for sub in ("cgroups", "pam", "prolog_epilog", "slurm_plugins"):
        assert any(f.startswith(f"ztgpu/{sub}/__init__.py") for f in files), sub
    assert "ztgpu/py.typed" in files


def test_console_scripts_use_the_venv_of_the_system_interpreter():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")
           if ep.dist is not None and ep.dist.name == "ztgpu"}
    assert eps == {"ztgpu": "ztgpu.cli.main:main", "ztgpu-noded": "ztgpu.noded.__main__:main",
                   "ztgpu-collectord": "ztgpu.collector.__main__:main",
                   "ztgpu-authd": "ztgpu.authd.__main__:main"}


@needs_slurm
def test_cluster_teardown_leaves_no_daemon_user_cgroup_or_device():
    spec = ClusterSpec(users=("ztcleanup",))
    with slurm_cluster(spec) as cluster:
        root = cluster.root
        assert pwd.getpwnam("ztcleanup")
        job = cluster.sbatch("ztcleanup", "#!/bin/sh\nsleep 2\n", gpus=1)
        cluster.wait_job(job, ["RUNNING"])
        pids = [p.pid for p in cluster.procs.values()]
        before = cluster.cgroups_before
    assert not root.exists()
    try:
        pwd.getpwnam("ztcleanup")
        raise AssertionError("test user left behind")
    except KeyError:
        pass
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    leftover = {p for ctrl in CGROUP_ROOT.iterdir() if ctrl.is_dir()
                for p in ctrl.glob("slurm*") if p.is_dir()} - before
    assert leftover == set()
    marker = f"ZTGPU_TEST_CLUSTER={root}".encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                assert marker not in (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
