"""cgroup v2 device programs (ztgpu.cgroups.device_bpf) on this host's real
cgroup2 hierarchy, no Slurm: a pure-v2 node's /sys/fs/cgroup, or a hybrid
host's /sys/fs/cgroup/unified. Decisions are read from a root process placed
in the cgroup opening mknod'ed device nodes (ENXIO: the cgroup let the open
through; EPERM: a program denied it)."""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import HAVE_ROOT
from ztgpu.cgroups import device_bpf as bpf
from ztgpu.cgroups.device_bpf import DevicePolicy, DeviceRule, DevicesV2

from ztgpu.errors import CgroupError
from ztgpu.testing.cgroup2 import make_char_device, scratch_tree, try_opens, unified_root

pytestmark = pytest.mark.skipif(not HAVE_ROOT, reason="needs root (bpf(2), cgroups, mknod)")

GPU_MAJOR = 195      # nvidia-frontend; no driver here, so an allowed open gives ENXIO
OTHER_MAJOR = 240    # a major nobody guards


@pytest.fixture
def tree() -> Iterator[Path]:
    root = unified_root()
    assert root is not None, "no cgroup2 hierarchy mounted: this kernel cannot run the v2 tests"
    with scratch_tree(root) as top:
        yield top


@pytest.fixture
def nodes() -> Iterator[dict[str, Path]]:
    with tempfile.TemporaryDirectory(prefix="ztgpu-dev-") as d:
        base = Path(d)
        made = {f"nvidia{m}": make_char_device(base / f"nvidia{m}", GPU_MAJOR, m) for m in range(4)}
        made["nvidiactl"] = make_char_device(base / "nvidiactl", GPU_MAJOR, 255)
        made["other"] = make_char_device(base / "other", OTHER_MAJOR, 0)
        yield made


def v2(tree: Path) -> DevicesV2:
    return DevicesV2(tree.parent)


def opens(cgroup: Path, nodes: dict[str, Path], names: list[str],
          mode: str = "rw") -> dict[str, str]:
    got = try_opens(cgroup, [(nodes[n], mode) for n in names])
    return {n: got[f"{nodes[n]}:{mode}"] for n in names}


def job_policy(*minors: int, ctl: bool = True) -> DevicePolicy:
    allowed = [DeviceRule(GPU_MAJOR, m) for m in minors]
    if ctl and minors:
        allowed.append(DeviceRule(GPU_MAJOR, 255))
    return DevicePolicy(guarded=(DeviceRule(GPU_MAJOR),), allowed=tuple(allowed))


def test_a_job_program_denies_every_guarded_device_but_its_own(tree, nodes):
    step = tree / "step_0"
    step.mkdir()
    v2(tree).restrict(step, job_policy(1), "t1")
    names = ["nvidia0", "nvidia1", "nvidia2", "nvidia3", "nvidiactl", "other"]
    assert opens(step, nodes, names) == {
        "nvidia0": "EPERM", "nvidia1": "open", "nvidia2": "EPERM", "nvidia3": "EPERM",
        "nvidiactl": "open", "other": "open"}
    # The cgroup itself, without a program, is not confined (the oracle works).
    assert opens(tree, nodes, names) == dict.fromkeys(names, "open")


def test_a_job_without_gpus_gets_no_control_node_either(tree, nodes):
    v2(tree).restrict(tree, job_policy(), "t2")
    assert opens(tree, nodes, ["nvidia0", "nvidiactl", "other"]) == {
        "nvidia0": "EPERM", "nvidiactl": "EPERM", "other": "open"}


def test_access_bits_are_checked_read_write_and_mknod(tree, nodes):
    policy = DevicePolicy(guarded=(DeviceRule(GPU_MAJOR),),
                          allowed=(DeviceRule(GPU_MAJOR, 0, "r"), DeviceRule(GPU_MAJOR, 1, "rw")))
    v2(tree).restrict(tree, policy, "t3")
    got = try_opens(tree, [(nodes[n], mode) for n, mode in itertools.product(
        ["nvidia0", "nvidia1", "nvidia2"], ["r", "w", "rw", "m"])])
    table = {k.rsplit("/", 1)[1]: v for k, v in got.items()}
    assert table == {
        "nvidia0:r": "open", "nvidia0:w": "EPERM", "nvidia0:rw": "EPERM", "nvidia0:m": "EPERM",
        "nvidia1:r": "open", "nvidia1:w": "open", "nvidia1:rw": "open", "nvidia1:m": "EPERM",
        "nvidia2:r": "EPERM", "nvidia2:w": "EPERM", "nvidia2:rw": "EPERM", "nvidia2:m": "EPERM"}


def test_the_program_agrees_with_its_reference_on_a_grid(tree, nodes):
    """Exact-minor guards, wildcard allows and partial access: the kernel's
    answers equal DevicePolicy.decide's for every device and mode."""
    policy = DevicePolicy(
        guarded=(DeviceRule(GPU_MAJOR, 0), DeviceRule(GPU_MAJOR, 2), DeviceRule(GPU_MAJOR, 255),
                 DeviceRule(OTHER_MAJOR)),
        allowed=(DeviceRule(GPU_MAJOR, 2, "w"), DeviceRule(OTHER_MAJOR, None, "rm")))
    v2(tree).restrict(tree, policy, "t4")
    modes = ["r", "w", "rw", "m"]
    got = try_opens(tree, [(p, m) for p in nodes.values() for m in modes])
    for name, path in nodes.items():
        dev = path.stat().st_rdev
        for mode in modes:
            want = policy.decide(os.major(dev), os.minor(dev), mode)
            assert got[f"{path}:{mode}"] == ("open" if want else "EPERM"), (name, mode)


def test_slurm_style_override_programs_cannot_displace_ours(tree, nodes):
    """Slurm's layout and flags: OVERRIDE on job_N and step_X/user, flag 0 on
    task_N. Ours is MULTI on step_X, the level Slurm never attaches to: it
    runs below every Slurm program, and both must allow."""
    job = tree / "job_7"
    step = job / "step_0"
    task = step / "user" / "task_0"
    task.mkdir(parents=True)
    # Like Slurm's: only the gres.conf GPUs are listed, the rest is accepted.
    slurm_like = DevicePolicy(guarded=tuple(DeviceRule(GPU_MAJOR, m) for m in range(4)),
                              allowed=(DeviceRule(GPU_MAJOR, 0), DeviceRule(GPU_MAJOR, 1)))
    for cgroup, flags in ((job, bpf.F_ALLOW_OVERRIDE), (step / "user", bpf.F_ALLOW_OVERRIDE),
                          (task, 0)):
        fd = bpf.load(slurm_like, "slurmlike")
        try:
            bpf.attach(cgroup, fd, flags=flags)
        finally:
            os.close(fd)
    devices = v2(tree)
    devices.restrict(step, job_policy(1), "t5")
    names = ["nvidia0", "nvidia1", "nvidia2", "nvidiactl"]
    # Slurm's allows nvidia0-1 (and leaves nvidiactl open); ours allows nvidia1 and ctl.
    for cgroup in (task, step / "user", step):
        assert opens(cgroup, nodes, names) == {
            "nvidia0": "EPERM", "nvidia1": "open", "nvidia2": "EPERM", "nvidiactl": "open"}, cgroup
    # Ours cannot go where Slurm's OVERRIDE program sits: a clear error, not a silent gap.
    with pytest.raises(CgroupError, match="without BPF_F_ALLOW_MULTI"):
        devices.restrict(job, job_policy(1), "t5")


def loaded_ids(devices: DevicesV2, name: str, until: set[int]) -> set[int]:
    """Ids of our programs named *name*, waiting up to 5 s for them to become
    *until*: the kernel frees a detached program asynchronously."""
    deadline = time.monotonic() + 5
    while True:
        ids = {p.id for p in devices.programs([name])}
        if ids == until or time.monotonic() > deadline:
            return ids
        time.sleep(0.05)


def test_restrict_replaces_ours_in_place_and_release_frees_it(tree, nodes):
    devices = v2(tree)
    assert devices.programs(["t6"]) == []
    first = devices.restrict(tree, job_policy(0, 1), "t6")
    second = devices.restrict(tree, job_policy(1), "t6")  # revocation of GPU 0
    assert first.id != second.id
    assert [p.id for p in bpf.attached(tree).ours()] == [second.id]
    assert loaded_ids(devices, "t6", until={second.id}) == {second.id}, "the replaced one leaked"
    assert opens(tree, nodes, ["nvidia0", "nvidia1"]) == {"nvidia0": "EPERM", "nvidia1": "open"}
    assert devices.release(tree) == 1
    assert bpf.attached(tree).ours() == ()
    assert loaded_ids(devices, "t6", until=set()) == set()
    assert opens(tree, nodes, ["nvidia0"]) == {"nvidia0": "open"}


def test_removing_the_cgroup_frees_its_program(tree):
    devices = v2(tree)
    step = tree / "step_9"
    step.mkdir()
    program = devices.restrict(step, job_policy(2), "t7")
    assert program.id in {p.id for p in devices.programs(["t7"])}
    step.rmdir()
    assert loaded_ids(devices, "t7", until=set()) == set()
    assert devices.release(step) == 0


@pytest.mark.parametrize("rule", [
    {"major": 195, "minor": 0, "access": ""},
    {"major": 195, "minor": 0, "access": "rx"},
    {"major": -1, "minor": 0, "access": "r"},
    {"major": 195, "minor": 2**32, "access": "r"},
])
def test_bad_rules_are_refused(rule):
    with pytest.raises(CgroupError):
        DeviceRule(**rule)


def test_bad_program_names_are_refused():
    for name in ("a" * 10, "job-1", "x/y"):
        with pytest.raises(CgroupError, match="bad device program name"):
            bpf.load(job_policy(0), name)
