"""`ztgpu install`: hooks written, slurm.conf updated once, with a backup and a diff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ZTGPU = str(Path(sys.executable).with_name("ztgpu"))
SITE_CONF = """\
ClusterName=site
SlurmctldHost=head
PrologFlags=X11
prolog=/usr/local/sbin/old-prolog
NodeName=gpu[01-04] CPUs=64 Gres=gpu:8
PartitionName=gpu Nodes=gpu[01-04] Default=YES
"""


def run(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ZTGPU, "--config", str(config), *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_install_dry_run_then_real_then_rerun(tmp_path):
    config = tmp_path / "ztgpu.yaml"
    config.write_text(yaml.safe_dump({"paths": {"hooks_dir": str(tmp_path / "libexec"),
                                                "socket": str(tmp_path / "noded.sock"),
                                                "task_socket": str(tmp_path / "task.sock")}}))
    conf = tmp_path / "slurm.conf"
    conf.write_text(SITE_CONF)

    dry = run("install", "--slurm-conf", str(conf), "--dry-run", config=config)
    assert dry.returncode == 0, dry.stderr
    assert "+Prolog=" + str(tmp_path / "libexec" / "prolog") in dry.stdout
    assert "+PrologFlags=X11,Alloc,Contain" in dry.stdout
    assert "dry run" in dry.stdout
    assert conf.read_text() == SITE_CONF
    assert not (tmp_path / "libexec").exists()
    assert "old-prolog" in dry.stderr  # the replaced site hook is called out

    real = run("install", "--slurm-conf", str(conf), config=config)
    assert real.returncode == 0, real.stderr
    text = conf.read_text()
    assert f"Prolog={tmp_path / 'libexec' / 'prolog'}" in text
    assert f"TaskProlog={tmp_path / 'libexec' / 'task_prolog'}" in text
    assert "PrologFlags=X11,Alloc,Contain" in text
    backups = list(tmp_path.glob("slurm.conf.ztgpu-backup-*"))
    assert len(backups) == 1 and backups[0].read_text() == SITE_CONF
    for hook in ("prolog", "epilog", "task_prolog"):
        assert (tmp_path / "libexec" / hook).stat().st_mode & 0o777 == 0o755

    again = run("install", "--slurm-conf", str(conf), config=config)
    assert again.returncode == 0
    assert f"unchanged: {conf}" in again.stdout
    assert conf.read_text() == text
    assert len(list(tmp_path.glob("slurm.conf.ztgpu-backup-*"))) == 1


def test_install_refuses_a_missing_slurm_conf(tmp_path):
    config = tmp_path / "ztgpu.yaml"
    config.write_text(yaml.safe_dump({"paths": {"hooks_dir": str(tmp_path / "libexec")}}))
    res = run("install", "--slurm-conf", str(tmp_path / "nope.conf"), "--dry-run", config=config)
    assert res.returncode == 2
    assert "nope.conf" in res.stderr


def test_install_writes_no_hook_when_slurm_conf_is_unusable(tmp_path):
    config = tmp_path / "ztgpu.yaml"
    config.write_text(yaml.safe_dump({"paths": {"hooks_dir": str(tmp_path / "libexec")}}))
    conf = tmp_path / "slurm.conf"
    conf.write_text("NodeName=n1 Prolog=/x CPUs=4\n")  # a managed key on a node line
    res = run("install", "--slurm-conf", str(conf), config=config)
    assert res.returncode == 2, res.stdout
    assert "line 1" in res.stderr
    assert not (tmp_path / "libexec").exists()
    assert conf.read_text() == "NodeName=n1 Prolog=/x CPUs=4\n"


def test_hooks_only_writes_the_hooks_and_leaves_slurm_conf_alone(tmp_path):
    """A node whose slurm.conf is shared or configless gets its hooks alone."""
    config = tmp_path / "ztgpu.yaml"
    config.write_text(yaml.safe_dump({"paths": {"hooks_dir": str(tmp_path / "libexec"),
                                                "socket": str(tmp_path / "noded.sock"),
                                                "task_socket": str(tmp_path / "task.sock")}}))
    first = run("install", "--hooks-only", config=config)
    assert first.returncode == 0, first.stderr
    for hook in ("prolog", "epilog", "task_prolog"):
        assert f"wrote: {tmp_path / 'libexec' / hook}" in first.stdout
        assert (tmp_path / "libexec" / hook).stat().st_mode & 0o777 == 0o755
    assert list(tmp_path.glob("*slurm.conf*")) == []
    again = run("install", "--hooks-only", config=config)
    assert again.returncode == 0 and "wrote" not in again.stdout, again.stdout
    assert again.stdout.count("unchanged: ") == 3
    # Combined with what it leaves to other runs: a usage error, nothing written.
    conf = tmp_path / "slurm.conf"
    conf.write_text(SITE_CONF)
    mixed = run("install", "--hooks-only", "--slurm-conf", str(conf), config=config)
    assert mixed.returncode == 2 and "--hooks-only writes this node's hooks alone" in mixed.stderr
    assert conf.read_text() == SITE_CONF
