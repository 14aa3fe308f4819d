"""Taking a GPU back ends every process still holding it, and a driver that could
reopen GPUs behind the agent stops every grant.

A real ztgpu-noded and its installed hooks, on simulated GPUs whose device
files are the kernel's memory devices (major 1): they really open, so a
process can hold one the way a CUDA program holds a GPU, and a write on an
old descriptor shows whether it still works.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root
from test_node_agent import job_env, owner_mode

from ztgpu.noded import holders
from ztgpu.testing.agent_process import StandaloneAgent, standalone_agent
from ztgpu.testing.slurm_cluster import CGROUP_ROOT

pytestmark = needs_root

NOBODY = pwd.getpwnam("nobody")
DAEMON = pwd.getpwnam("daemon")

# Holds the device file open (a descriptor number passed in, or a path it
# opens itself) and reads from it every 20 ms, saying how each read went.
HOLD = """
import os, sys, time
arg = sys.argv[1]
fd = int(arg) if arg.isdigit() else os.open(arg, os.O_RDONLY)
print("holding", flush=True)
while True:
    try:
        os.read(fd, 1)
        print("read", flush=True)
    except OSError as exc:
        print("refused", exc.errno, flush=True)
    time.sleep(0.02)
"""


@pytest.fixture
def openable(request: pytest.FixtureRequest) -> Iterator[StandaloneAgent]:
    """An agent on two openable simulated GPUs (gres 0 = nvidia7, 1 = nvidia8)."""
    overrides = getattr(request, "param", {})
    base = Path(tempfile.mkdtemp(prefix="ztgpu-holders-"))
    try:
        with standalone_agent(base, gpus=2, openable=True, **overrides) as running:
            yield running
    finally:
        shutil.rmtree(base, ignore_errors=True)


def hold(path: Path, user: pwd.struct_passwd, fd: int | None = None
         ) -> subprocess.Popen[str]:
    """A process of *user*, outside any job, holding *path* (opened by itself, or *fd*)."""
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-I", "-c", HOLD, str(path) if fd is None else str(fd)],
        user=user.pw_uid, group=user.pw_gid, extra_groups=[], stdout=subprocess.PIPE,
        text=True, pass_fds=() if fd is None else (fd,), start_new_session=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "holding"
    assert proc.stdout.readline().strip() == "read"
    return proc


def reaped(proc: subprocess.Popen[str], timeout: float = 10) -> int:
    code = proc.wait(timeout)
    if proc.stdout is not None:
        proc.stdout.close()
    return code


def test_a_process_of_the_user_outside_the_job_loses_the_gpu_before_the_next_grant(openable):
    agent = openable
    assert agent.run_hook("prolog", job_env("51", gpus="0")).returncode == 0
    gpu = agent.dev_dir / "nvidia7"
    holder = hold(gpu, NOBODY)  # as from an SSH session: not in the job
    res = agent.run_hook("epilog", job_env("51"))
    assert res.returncode == 0, res.stderr
    # Gone before the Epilog answered: the next job's Prolog finds nobody on it.
    assert holder.poll() is not None
    assert reaped(holder) == -9
    ended = agent.events("device.holder", "51")
    assert [(e["pid"], e["uid"], e["how"], [g["minor"] for g in e["gpus"]], e["outcome"])
            for e in ended] == [(holder.pid, NOBODY.pw_uid, ["fd"], [7], "ended")]
    assert "/usr/bin/python3" in ended[0]["command"] and ended[0]["context"] == "release"
    release = agent.events("job.release", "51")[-1]
    assert release["outcome"] == "released" and release["seq"] > ended[0]["seq"]
    assert owner_mode(gpu) == (0, 0, 0o600)
    res = agent.run_hook("prolog", job_env("52", uid=DAEMON.pw_uid, user="daemon", gpus="0"))
    assert res.returncode == 0, res.stderr
    assert owner_mode(gpu)[0] == DAEMON.pw_uid


def test_a_descriptor_passed_on_is_found_and_root_processes_are_left_alone(openable):
    agent = openable
    assert agent.run_hook("prolog", job_env("53", gpus="1")).returncode == 0
    gpu = agent.dev_dir / "nvidia8"
    fd = os.open(gpu, os.O_RDONLY)  # the test (root) holds it too: exempt
    try:
        holder = hold(gpu, DAEMON, fd=fd)  # another user, given the job's descriptor
        assert agent.run_hook("epilog", job_env("53")).returncode == 0
        assert reaped(holder) == -9
        assert len(os.read(fd, 1)) == 1  # root's own descriptor was not touched
    finally:
        os.close(fd)
    ended = agent.events("device.holder", "53")
    assert [(e["pid"], e["uid"]) for e in ended] == [(holder.pid, DAEMON.pw_uid)]


@pytest.mark.parametrize("openable", [{"isolation": {"holder_kill_timeout_s": 1}}],
                         indirect=True)
def test_a_holder_that_will_not_die_keeps_its_gpu_out_of_every_grant(openable):
    agent = openable
    freezer = CGROUP_ROOT / "freezer" / f"ztgpu_test_hold_{secrets.token_hex(4)}"
    assert agent.run_hook("prolog", job_env("61", gpus="0")).returncode == 0
    holder = hold(agent.dev_dir / "nvidia7", NOBODY)
    freezer.mkdir()
    try:
        # A frozen (cgroup v1 freezer) process cannot act on SIGKILL until thawed:
        # it stands for one stuck in the driver.
        (freezer / "cgroup.procs").write_text(str(holder.pid))
        (freezer / "freezer.state").write_text("FROZEN")
        deadline = time.monotonic() + 10
        while (freezer / "freezer.state").read_text().strip() != "FROZEN":
            assert time.monotonic() < deadline, "could not freeze the holder"
            time.sleep(0.05)
        res = agent.run_hook("epilog", job_env("61"))
        assert res.returncode == 1, "the node must drain"
        assert f"pid {holder.pid}" in res.stderr
        held = agent.wait_event("device.held", "61")
        assert held["pids"] == [holder.pid] and held["gpus"][0]["minor"] == 7
        assert agent.events("job.release", "61")[-1]["outcome"] == "held"
        drain = agent.wait_event("node.drain")
        # No Slurm around this agent: the drain is tried, and its failure recorded.
        assert drain["outcome"] == "failed" and f"pid {holder.pid}" in drain["reason"]
        daemon_job = {"uid": DAEMON.pw_uid, "user": "daemon"}
        res = agent.run_hook("prolog", job_env("62", **daemon_job, gpus="0"))
        assert res.returncode == 1 and f"pid {holder.pid}" in res.stderr
        assert agent.events("job.refused", "62")[-1]["outcome"] == "node_unsafe"
        assert owner_mode(agent.dev_dir / "nvidia7") == (0, 0, 0o600)
        # The other GPU is still granted.
        assert agent.run_hook("prolog", job_env("63", **daemon_job, gpus="1")).returncode == 0
        # A restarted agent still keeps it out.
        agent.stop()
        agent.start()
        res = agent.run_hook("prolog", job_env("64", **daemon_job, gpus="0"))
        assert res.returncode == 1 and f"pid {holder.pid}" in res.stderr
        (freezer / "freezer.state").write_text("THAWED")
        assert reaped(holder) == -9
        res = agent.run_hook("prolog", job_env("65", **daemon_job, gpus="0"))
        assert res.returncode == 0, res.stderr
        freed = agent.events("device.freed")
        assert freed and freed[-1]["gpus"][0]["minor"] == 7
    finally:
        with contextlib.suppress(OSError):
            (freezer / "freezer.state").write_text("THAWED")
        if holder.poll() is None:
            holder.kill()
            reaped(holder)
        with contextlib.suppress(OSError):
            freezer.rmdir()


def test_whoever_opened_an_idle_gpu_while_its_file_had_drifted_loses_it(openable):
    agent = openable
    gpu = agent.dev_dir / "nvidia8"
    fd = os.open(gpu, os.O_RDONLY)
    try:
        # As after nvidia-modprobe reset the file to 0666: a user opened it.
        holder = hold(gpu, NOBODY, fd=fd)
    finally:
        os.close(fd)
    os.chmod(gpu, 0o666)
    assert reaped(holder, timeout=20) == -9
    drift = agent.events("device.drift")[-1]
    assert drift["path"] == str(gpu) and drift["outcome"] == "restored"
    ended = agent.wait_event("device.holder")  # recorded just after the kill
    assert (ended["pid"], ended["context"]) == (holder.pid, "drift")
    assert owner_mode(gpu) == (0, 0, 0o600)


# ---- the scanner on a recorded /proc tree ----------------------------------

def test_a_mapping_of_a_gpu_is_a_hold_even_without_a_descriptor(tmp_path):
    """The maps/map_files half, on a fabricated /proc entry (a real mapping of a
    GPU needs its driver): the device node's (dev, inode) in maps, confirmed
    by the map_files entry's device number."""
    dev = tmp_path / "dev"
    dev.mkdir()
    node = dev / "nvidia2"
    os.mknod(node, 0o600 | 0o020000, os.makedev(195, 2))
    st = os.lstat(node)
    pid = tmp_path / "proc" / "4242"
    (pid / "fd").mkdir(parents=True)
    (pid / "map_files").mkdir()
    span = "7f0000000000-7f0000200000"
    os.mknod(pid / "map_files" / span, 0o600 | 0o020000, os.makedev(195, 2))
    fs = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    (pid / "maps").write_text(
        f"5600000000-5600001000 r-xp 00000000 {fs} 99 /usr/bin/app\n"
        f"{span} rw-s 00000000 {fs} {st.st_ino} {node}\n")
    (pid / "status").write_text("Name:\tapp\nUid:\t1001\t1001\t1001\t1001\n")
    (pid / "stat").write_text("4242 (my app) S " + " ".join(["0"] * 18) + " 123456 0 0\n")
    (pid / "cmdline").write_bytes(b"app\0--train\0")
    found = holders.find_holders(195, [2], nodes=holders.device_nodes([node]),
                                 exempt_uids={0}, proc_root=tmp_path / "proc")
    assert [(h.pid, h.uid, h.start, h.command, set(h.minors), h.how) for h in found] == [
        (4242, 1001, 123456, "app --train", {2}, ("mmap",))]
    # Another GPU's minor, or a uid that is exempt, is not a hold to end.
    assert holders.find_holders(195, [1], nodes=holders.device_nodes([node]),
                                exempt_uids={0}, proc_root=tmp_path / "proc") == []
    assert holders.find_holders(195, [2], nodes=holders.device_nodes([node]),
                                exempt_uids={0, 1001}, proc_root=tmp_path / "proc") == []


# ---- the probe sees the job's user as a job would (item 6) ------------------

@contextlib.contextmanager
def user_in_group() -> Iterator[tuple[pwd.struct_passwd, str]]:
    """A throwaway user that is a supplementary member of a throwaway group."""
    tag = secrets.token_hex(3)
    group, user = f"ztgpu_mon_{tag}", f"ztgpu_job_{tag}"
    subprocess.run(["groupadd", "--system", group], check=True, capture_output=True)
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--user-group", "--groups", group, user], check=True,
                       capture_output=True)
        try:
            yield pwd.getpwnam(user), group
        finally:
            subprocess.run(["userdel", user], capture_output=True, check=False)
            subprocess.run(["groupdel", user], capture_output=True, check=False)
    finally:
        subprocess.run(["groupdel", group], capture_output=True, check=False)


def test_the_probe_opens_as_the_user_with_the_users_groups(tmp_path):
    """With a group-readable rest state (monitoring in a group the job's user is
    in), the user gets past file permissions on the job's other GPUs and only
    the cgroup stops it: the probe must see that (EPERM), not EACCES."""
    base = Path(tempfile.mkdtemp(prefix="ztgpu-groups-"))
    job_dir = CGROUP_ROOT / "freezer" / f"slurm_ztgpu_t{secrets.token_hex(3)}"
    with user_in_group() as (user, group):
        sleeper: subprocess.Popen[bytes] | None = None
        try:
            with standalone_agent(base, gpus=2, devices={"rest_group": group,
                                                         "rest_mode": "0660"}) as agent:
                env = job_env("81", uid=user.pw_uid, user=user.pw_name, gpus="0")
                assert agent.run_hook("prolog", env).returncode == 0
                # The job's process, where Slurm's proctrack/cgroup would put it.
                cgroup = job_dir / f"uid_{user.pw_uid}" / "job_81"
                cgroup.mkdir(parents=True)
                sleeper = subprocess.Popen(["sleep", "60"], user=user.pw_uid,
                                           group=user.pw_gid, extra_groups=[])
                (cgroup / "cgroup.procs").write_text(str(sleeper.pid))
                verified = agent.wait_event("isolation.verified", "81")
                assert verified["probe"]["user"] == {"nvidia0": "open", "nvidia1": "EPERM",
                                                     "nvidiactl": "open"}
        finally:
            if sleeper is not None:
                sleeper.kill()
                sleeper.wait()
            for directory in [*sorted(job_dir.rglob("*"), reverse=True), job_dir]:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            shutil.rmtree(base, ignore_errors=True)
