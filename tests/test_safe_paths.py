"""Paths root executes or trusts: refused when anyone else could change them, all the way up."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root

from ztgpu.errors import ConfigError
from ztgpu.trust.safe_paths import require_trusted, untrusted_component

pytestmark = needs_root


@pytest.fixture
def base() -> Iterator[Path]:
    made = Path(tempfile.mkdtemp(prefix="ztgpu-paths-"))  # under /tmp: 1777, root's below
    made.chmod(0o755)
    try:
        yield made
    finally:
        subprocess.run(["rm", "-rf", str(made)], check=False)


def test_root_owned_paths_under_a_sticky_tmp_are_trusted(base: Path) -> None:
    (base / "libexec").mkdir(mode=0o755)
    assert untrusted_component(base / "libexec" / "prolog") is None
    assert untrusted_component(base / "not" / "yet" / "made") is None


@pytest.mark.parametrize("mode, who", [(0o777, "others"), (0o775, "its group")])
def test_a_writable_directory_on_the_way_is_named(base: Path, mode: int, who: str) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(mode)
    (shared / "libexec").mkdir(mode=0o755)
    problem = untrusted_component(shared / "libexec")
    assert problem is not None and str(shared) in problem and who in problem
    with pytest.raises(ConfigError, match=r"paths\.hooks_dir .* not safe .*chmod go-w"):
        require_trusted(shared / "libexec", "paths.hooks_dir")


def test_a_directory_owned_by_another_user_is_named(base: Path) -> None:
    theirs = base / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    problem = untrusted_component(theirs / "state")
    assert problem is not None and "uid 65534" in problem


def test_a_sticky_directory_is_trusted_only_above_a_root_owned_entry(base: Path) -> None:
    sticky = base / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "mine").mkdir(mode=0o755)
    assert untrusted_component(sticky / "mine" / "libexec") is None, "like /tmp"
    assert "writable by others" in (untrusted_component(sticky) or ""), "but not itself"
    planted = sticky / "ztgpu"
    planted.mkdir(mode=0o755)
    os.chown(planted, 65534, 65534)  # e.g. nobody made it first
    assert "uid 65534" in (untrusted_component(planted / "libexec") or "")


def test_a_link_to_an_unsafe_place_is_followed_and_refused(base: Path) -> None:
    unsafe = base / "open"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    (base / "hooks").symlink_to(unsafe)
    problem = untrusted_component(base / "hooks")
    assert problem is not None and "links to" in problem


def test_ztgpu_install_refuses_a_world_writable_hooks_dir(base: Path) -> None:
    """Through the command: nothing is written, slurm.conf is unchanged."""
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    conf = base / "slurm.conf"
    conf.write_text("ClusterName=c\nSlurmctldHost=h\nNodeName=n Gres=gpu:1\n")
    config = base / "ztgpu.yaml"
    config.write_text(f"paths:\n  hooks_dir: {shared / 'libexec'}\n")
    res = subprocess.run([str(Path(sys.executable).with_name("ztgpu")), "--config", str(config),
                          "install", "--slurm-conf", str(conf)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "paths.hooks_dir" in res.stderr and "writable by others" in res.stderr
    assert not (shared / "libexec").exists()
    assert conf.read_text().startswith("ClusterName=c") and "Prolog" not in conf.read_text()


def test_the_agent_refuses_a_state_dir_others_can_write(base: Path) -> None:
    from ztgpu.testing.agent_process import standalone_agent
    from ztgpu.testing.slurm_cluster import ClusterError

    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ClusterError, match=r"paths\.state_dir .* not safe"), \
            standalone_agent(base / "agent", paths={"state_dir": str(shared / "state")}):
        pass
    assert not (shared / "state").exists(), "it refused before creating anything there"
