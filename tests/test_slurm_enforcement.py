"""Per-job GPU least privilege on a real Slurm cluster (slurmctld, slurmd, munge).

Runs twice: with Slurm's ``ConstrainDevices=yes`` and with it off (a common
misconfiguration); the suite must hold in both. GPUs are simulated device
nodes: an allowed open gives ENXIO (reported as ``open``), a cgroup denial
EPERM, a file-permission denial EACCES.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_slurm

from ztgpu.testing import gpu_probe
from ztgpu.testing.slurm_cluster import ClusterSpec, wait_for
from ztgpu.testing.suite_cluster import SuiteCluster, suite_cluster

pytestmark = [needs_slurm, pytest.mark.slurm]

def job_script(suite: SuiteCluster, hold_end: bool = False) -> str:
    return gpu_probe.job_script(suite.cluster.work_dir, suite.cluster.dev_dir, hold_end)


probes = gpu_probe.parse_probes


@pytest.fixture(scope="module", params=["ConstrainDevices=yes", "ConstrainDevices=no"])
def suite(request: pytest.FixtureRequest) -> Iterator[SuiteCluster]:
    constrain = request.param.endswith("yes")
    with suite_cluster(ClusterSpec(constrain_devices=constrain)) as running:
        gpu_probe.install_probe(running.cluster.work_dir)
        yield running


@pytest.fixture(autouse=True)
def _no_jobs_left(suite: SuiteCluster) -> Iterator[None]:
    """Each test starts and ends with an empty queue and an idle node."""
    yield
    suite.cluster.clean_slate()


def go(suite: SuiteCluster, job_id: str) -> None:
    (suite.cluster.work_dir / f"go-{job_id}").touch()


def finish(suite: SuiteCluster, job_id: str) -> dict[str, str]:
    go(suite, job_id)
    return suite.cluster.wait_job(job_id, ["COMPLETED", "FAILED", "CANCELLED"], timeout=60)


def running_verified(suite: SuiteCluster, user: str, script: str) -> tuple[str, int]:
    """Submit a 1-GPU job; once it runs and its isolation was verified, return
    its id and the minor of its GPU."""
    job = suite.cluster.sbatch(user, script, gpus=1)
    suite.cluster.wait_job(job, ["RUNNING"])
    suite.wait_event("isolation.verified", job)
    return job, int(suite.wait_event("job.grant", job)["gpus"][0]["minor"])


def cancel_outcome(suite: SuiteCluster, job: str) -> str:
    """How the agent's cancel of *job* ended. Under load Slurm may still list
    the job as completing right after the scancel: the agent then records a
    "failed ... retrying" first and the end on its next look."""
    def ends() -> list[dict[str, Any]]:
        return [e for e in suite.events("job.action", job)
                if e["outcome"] != "failed" or "gave up" in e["reason"]]

    wait_for(lambda: bool(ends()), 60, f"the end of job {job}'s cancel")
    assert len(ends()) == 1, suite.events("job.action", job)
    return str(ends()[0]["outcome"])


def owner(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def uid_of(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def shell_probe(suite: SuiteCluster, user: str) -> dict[str, str]:
    res = subprocess.run(["runuser", "-u", user, "--", "python3",
                          str(suite.cluster.work_dir / "probe.py"), "shell",
                          str(suite.cluster.dev_dir)],
                         capture_output=True, text=True, timeout=30, check=True)
    return probes(res.stdout)["shell"]


def test_two_users_jobs_side_by_side_each_opens_only_its_gpus(suite):
    c = suite.cluster
    alice = c.sbatch("ztalice", job_script(suite), gpus=2)
    bob = c.sbatch("ztbob", job_script(suite), gpus=1)
    for job in (alice, bob):
        c.wait_job(job, ["RUNNING"])
        suite.wait_event("isolation.verified", job)
    wait_for(lambda: all("PROBE step0" in c.output(j) for j in (alice, bob)), 30,
             "step0 probes")
    alice_gpus = suite.wait_event("job.grant", alice)["gpus"]
    bob_gpus = suite.wait_event("job.grant", bob)["gpus"]
    alice_minors = {g["minor"] for g in alice_gpus}
    bob_minors = {g["minor"] for g in bob_gpus}
    assert len(alice_minors) == 2 and len(bob_minors) == 1 and not alice_minors & bob_minors

    # While both run: each job's GPUs belong to its user only; the rest are root 0600.
    for minor in range(4):
        want = (uid_of("ztalice") if minor in alice_minors else
                uid_of("ztbob") if minor in bob_minors else 0, 0, 0o600)
        assert owner(c.gpu_path(minor)) == want

    # A shell of a user with no job here opens nothing; a job's user outside it too
    # sees only what file permissions allow (PAM adoption will confine these).
    shell = shell_probe(suite, "ztcarol")
    assert {shell[f"nvidia{m}"] for m in range(4)} == {"EACCES"}, shell

    # Alice's job ends; Bob's keeps running and keeps exactly its GPU.
    result = finish(suite, alice)
    assert result["JobState"] == "COMPLETED", result
    for minor in alice_minors:
        assert owner(c.gpu_path(minor)) == (0, 0, 0o600)
    assert c.job_state(bob)["JobState"] == "RUNNING"
    result = finish(suite, bob)
    assert result["JobState"] == "COMPLETED", result

    for job, mine in ((alice, alice_minors), (bob, bob_minors)):
        seen = probes(c.output(job))
        assert set(seen) == {"batch", "step0", "batch-late", "step1"}, c.output(job)
        for label, outcome in seen.items():
            for minor in range(4):
                got = outcome[f"nvidia{minor}"]
                if minor in mine:
                    assert got == "open", (job, label, outcome)
                else:
                    assert got in ("EPERM", "EACCES"), (job, label, outcome)
            assert outcome["nvidiactl"] == "open"
    assert c.node_state() == "idle"
    for minor in range(4):
        assert owner(c.gpu_path(minor)) == (0, 0, 0o600)


def test_agent_probe_proves_cgroup_denies_every_unallocated_gpu(suite):
    """Every devices cgroup of every step is probed; the cgroup alone gives EPERM."""
    c = suite.cluster
    job = c.sbatch("ztalice", job_script(suite), gpus=1)
    c.wait_job(job, ["RUNNING"])
    wait_for(lambda: "PROBE step0" in c.output(job), 30, "step0 probe")
    results = suite.call("verify", job_id=job)
    assert results, "no job cgroup was probed"
    minor = suite.wait_event("job.grant", job)["gpus"][0]["minor"]
    for r in results:
        assert r["ok"], r
        for m in range(4):
            want = "open" if m == minor else "EPERM"
            assert r["cgroup_only"][f"nvidia{m}"] == want, r
    cgroups = {r["cgroup"] for r in results}
    if suite.cluster.spec.constrain_devices:
        # Where the user's code runs: the batch step's task cgroup and the srun
        # step's (gone by now, probed while it ran). Cgroups holding only root
        # processes (slurmstepd, the extern step's holder) are not probed.
        assert any("step_batch/task_" in cg for cg in cgroups), cgroups
    else:
        assert cgroups == {f"{suite.cgroup_name}/job_{job}"}
    # Every process of the job (extern, batch, steps) sits in a confining cgroup.
    from ztgpu.noded.job_cgroups import cgroup_pids, devices_cgroup_of, find_job_cgroups

    found = find_job_cgroups(Path("/sys/fs/cgroup"), uid_of("ztalice"), job)
    pids = set().union(*(cgroup_pids(d) for d in found.freezer))
    assert pids
    def unconfined() -> dict[int, str]:
        paths = {pid: devices_cgroup_of(pid) for pid in pids}
        return {pid: path for pid, path in paths.items()
                if path is not None and f"/job_{job}" not in path}

    # slurmstepd joins a new task to the freezer cgroup a moment before the
    # devices one: a process caught in between must be placed within moments.
    stray = unconfined()
    if stray:
        time.sleep(2)
        stray = unconfined()
    assert not stray, {pid: (path, _comm(pid)) for pid, path in stray.items()}
    finish(suite, job)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "(exited)"


def test_same_user_two_jobs_are_separated_by_the_cgroup(suite):
    c = suite.cluster
    first = c.sbatch("ztalice", job_script(suite, hold_end=True), gpus=1)
    second = c.sbatch("ztalice", job_script(suite, hold_end=True), gpus=1)
    for job in (first, second):
        c.wait_job(job, ["RUNNING"])
        suite.wait_event("isolation.verified", job)
    m1, m2 = (suite.wait_event("job.grant", j)["gpus"][0]["minor"] for j in (first, second))
    # Both device files now belong to ztalice: only the cgroup tells the jobs apart.
    assert owner(c.gpu_path(m1))[0] == owner(c.gpu_path(m2))[0] == uid_of("ztalice")
    for job in (first, second):
        go(suite, job)
    # Both jobs stay alive until both have probed: each sees the other's GPU.
    wait_for(lambda: all("PROBE step1" in c.output(j) for j in (first, second)), 60,
             "step1 probes")
    for job in (first, second):
        (c.work_dir / f"end-{job}").touch()
    for job, mine, other in ((first, m1, m2), (second, m2, m1)):
        c.wait_job(job, ["COMPLETED"], timeout=60)
        late = probes(c.output(job))
        for label in ("batch-late", "step1"):
            assert late[label][f"nvidia{mine}"] == "open", late
            assert late[label][f"nvidia{other}"] == "EPERM", late


def test_driver_resetting_device_modes_is_caught_and_the_cgroup_still_holds(suite):
    """Like the NVIDIA driver with NVreg_ModifyDeviceFiles=1 rewriting modes to 0666."""
    c = suite.cluster
    job, mine = running_verified(suite, "ztalice", job_script(suite))
    other = (mine + 1) % 4
    before = len(suite.events("device.drift"))
    os.chmod(c.gpu_path(other), 0o666)
    go(suite, job)
    c.wait_job(job, ["COMPLETED"], timeout=60)
    late = probes(c.output(job))
    # Whether or not the agent restored the mode yet, the job never opened it.
    assert late["step1"][f"nvidia{other}"] in ("EPERM", "EACCES"), late
    wait_for(lambda: len(suite.events("device.drift")) > before, 20, "device.drift event")
    drift = suite.events("device.drift")[-1]
    assert drift["path"] == str(c.gpu_path(other)) and drift["outcome"] == "restored"
    assert owner(c.gpu_path(other)) == (0, 0, 0o600)


def job_devices_cgroups(job: str) -> set[str]:
    """The devices cgroups that the job's processes are in now."""
    from ztgpu.noded.job_cgroups import cgroup_pids, devices_cgroup_of, find_job_cgroups

    found = find_job_cgroups(Path("/sys/fs/cgroup"), uid_of("ztalice"), job)
    leaves = {devices_cgroup_of(p) for d in found.freezer for p in cgroup_pids(d)}
    return {leaf for leaf in leaves if leaf}


def _open_cgroups_for(job: str, minor: int) -> None:
    """Tamper: allow *minor* in every devices cgroup of the job, top down."""
    root = Path("/sys/fs/cgroup/devices")
    # Wait until the agent's sweep has confined every process (extern step too).
    wait_for(lambda: all(f"/job_{job}" in leaf for leaf in job_devices_cgroups(job)), 30,
             "every job process to be confined")
    for leaf in sorted(job_devices_cgroups(job)):
        parts = leaf.strip("/").split("/")
        start = next(i for i, p in enumerate(parts) if p.startswith("job_"))
        for depth in range(start, len(parts)):
            (root.joinpath(*parts[: depth + 1]) / "devices.allow").write_text(
                f"c 195:{minor} rwm")


def test_isolation_violation_is_critical_and_ends_the_job(suite):
    c = suite.cluster
    job, mine = running_verified(suite, "ztalice", "#!/bin/sh\nsleep 300\n")
    other = (mine + 2) % 4
    _open_cgroups_for(job, other)
    results = suite.call("verify", job_id=job)
    assert any(not r["ok"] for r in results), results
    violated = suite.wait_event("isolation.violated", job)
    assert violated["severity"] == "critical"
    assert violated["action"] == "cancel_job"
    assert f"minor {other}" in violated["reason"]
    state = c.wait_job(job, ["CANCELLED"], timeout=30)
    assert "ztgpu" in state.get("AdminComment", ""), state
    assert cancel_outcome(suite, job) == "cancelled"
    # The node stays in service: a job decision never drains it.
    wait_for(lambda: c.node_state() == "idle", 30, "node idle")
    suite.wait_event("job.release", job)


def test_malformed_job_env_from_slurm_does_not_drain_and_agent_down_does(suite):
    """Run the installed hooks exactly as slurmd would, then take the agent away."""
    c = suite.cluster
    prolog = suite.base / "libexec" / "prolog"
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "1;id", "SLURM_JOB_UID": "0",
           "SLURM_JOB_USER": "root", "SLURM_JOB_GPUS": "0"}
    res = subprocess.run([str(prolog)], env=env, capture_output=True, text=True, timeout=30,
                         check=False)
    assert res.returncode == 0 and "SLURM_JOB_ID" in res.stderr
    suite.stop_agent()
    try:
        job = c.sbatch("ztbob", "#!/bin/sh\ntrue\n", gpus=1)
        # Slurm drains the node on a failing Prolog, and holds the job for requeue.
        wait_for(lambda: "drain" in c.node_state(), 60, "the node to drain")
        assert "prolog" in c.node_reason().lower(), c.node_reason()
        for minor in range(4):
            assert owner(c.gpu_path(minor)) == (0, 0, 0o600)
        c.slurm(["scancel", job], check=False)
    finally:
        suite.start_agent()
        c.resume_node()
        wait_for(lambda: c.node_state() == "idle", 60, "node back to idle")


def test_install_is_idempotent_on_the_live_slurm_conf(suite):
    res = suite.ztgpu("install", "--slurm-conf", str(suite.cluster.slurm_conf), "--dry-run")
    assert "unchanged" in res.stdout
    text = suite.cluster.slurm_conf.read_text()
    assert re.search(r"^Prolog=.*/libexec/prolog$", text, re.M)
    assert re.search(r"^PrologFlags=.*Alloc.*Contain", text, re.M)
    # The hooks run the suite's own interpreter, isolated (-I) and without site (-S).
    shebang = (suite.base / "libexec" / "prolog").read_text().splitlines()[0]
    assert shebang.startswith(f"#!{Path(sys.executable).parent}/python")
    assert shebang.endswith(" -IS")


def test_agent_killed_and_restarted_mid_job_keeps_enforcing(suite):
    c = suite.cluster
    job, minor = running_verified(suite, "ztalice", job_script(suite))
    suite.stop_agent(signal.SIGKILL)
    suite.start_agent()
    status = suite.call("status")
    assert [j["job_id"] for j in status["jobs"]] == [job]
    assert suite.wait_event("agent.recovered")["jobs"] == [job]
    # The restarted agent re-learns the job's cgroups and proves isolation again.
    results = suite.call("verify", job_id=job)
    assert results and all(r["ok"] for r in results), results
    assert owner(c.gpu_path(minor))[0] == uid_of("ztalice")
    finish(suite, job)
    late = probes(c.output(job))["step1"]
    assert late[f"nvidia{minor}"] == "open"
    assert all(late[f"nvidia{m}"] in ("EPERM", "EACCES") for m in range(4) if m != minor)
    release = suite.wait_event("job.release", job)
    assert release["outcome"] == "released"
    assert owner(c.gpu_path(minor)) == (0, 0, 0o600)


FLOOD = r"""
import socket, sys, time
path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
held, opened, end = [], 0, time.monotonic() + seconds
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(0.2)
    try:
        s.connect(path)
        held.append(s)
        opened += 1
    except OSError:
        s.close()
    if len(held) >= count:
        held.pop(0).close()
    if opened == count:
        print("flooding", flush=True)
    time.sleep(0.001)
print(opened, flush=True)
"""


def test_idle_connections_of_one_user_do_not_fail_other_users_tasks(suite):
    """200 idle connections from ztbob, kept up while ztalice's tasks start: every
    TaskProlog of hers still confines its task, and the flood is recorded, bounded."""
    c = suite.cluster
    task_socket = suite.config["paths"]["task_socket"]
    flood = subprocess.Popen(["runuser", "-u", "ztbob", "--", sys.executable, "-I", "-c",
                              FLOOD, task_socket, "200", "40"],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert flood.stdout is not None
        assert flood.stdout.readline().strip() == "flooding"
        before = len(suite.events("job.grant"))
        for _ in range(5):
            # check=True: a failed TaskProlog fails the step and srun exits non-zero.
            c.slurm(["srun", "--gres=gpu:1", "-n1", f"--chdir={c.work_dir}", "true"],
                    user="ztalice", timeout=60)
        assert flood.poll() is None, "the flood was still on"
    finally:
        os.killpg(flood.pid, signal.SIGKILL)  # runuser and the flood under it
        flood.communicate(timeout=10)
    assert len(suite.events("job.grant")) == before + 5
    rejected = [e for e in suite.events("request.rejected")
                if e.get("peer_uid") == uid_of("ztbob")]
    assert 1 <= len(rejected) <= 11, "recorded, at most 10 a minute plus a summary"
    assert any("connections at once" in e["reason"] for e in rejected)


def test_a_job_that_ended_while_the_agent_was_down_loses_its_gpu_and_recover_resumes(suite):
    c = suite.cluster
    job, minor = running_verified(suite, "ztalice", job_script(suite))
    suite.stop_agent(signal.SIGKILL)
    # While the agent is down: a new job's Prolog fails (Slurm drains the node
    # and holds the job), and the running job ends (its Epilog fails too).
    held = c.sbatch("ztbob", "sleep 1", gpus=1)
    wait_for(lambda: c.job_state(held).get("Reason") == "launch_failed_requeued_held", 60,
             "the job to be held after its failed launch")
    assert "drain" in c.node_state()
    c.slurm(["scancel", job])
    wait_for(lambda: c.job_state(job).get("JobState") in ("CANCELLED", "COMPLETED", None, ""),
             60, "the job to end")
    assert owner(c.gpu_path(minor))[0] == uid_of("ztalice")  # nobody took it back yet
    suite.start_agent()
    release = suite.wait_event("job.release", job)
    assert release["outcome"] == "released"
    assert "ended while the agent was down" in release["reason"]
    assert owner(c.gpu_path(minor)) == (0, 0, 0o600)
    # One command brings the node back: checked, resumed, the held job released.
    res = suite.ztgpu("node", "recover")
    assert "resumed node" in res.stdout and f"released job {held}" in res.stdout, res.stdout
    recovered = suite.wait_event("node.recover")
    assert recovered["outcome"] == "recovered" and recovered["released_jobs"] == [held]
    assert "Prolog error" in recovered["was"] or "Epilog error" in recovered["was"]
    c.wait_job(held, ["COMPLETED"], timeout=60)
    assert c.node_state() in ("idle", "mixed", "allocated")


def test_recover_refuses_to_resume_a_node_that_is_not_safe(suite):
    c = suite.cluster
    suite.stop_agent(signal.SIGKILL)
    held = c.sbatch("ztbob", "sleep 1", gpus=1)
    wait_for(lambda: "drain" in c.node_state(), 60, "the node to drain")
    suite.start_agent()
    os.unlink(c.gpu_path(2))  # a GPU's device file the agent cannot restore
    try:
        res = suite.ztgpu("node", "recover", check=False)
        assert res.returncode == 1 and "NOT SAFE" in res.stderr, res.stderr
        assert "drain" in c.node_state()
        assert c.job_state(held).get("Reason") == "launch_failed_requeued_held"
        assert suite.wait_event("node.recover")["outcome"] == "failed"
    finally:
        c._mknod(c.gpu_path(2), 2)
        suite.call("drift")
    c.slurm(["scancel", held])


def test_install_check_sees_the_hooks_live_and_a_controller_on_an_old_file(suite):
    import yaml

    c = suite.cluster
    res = suite.ztgpu("install", "--check", "--slurm-conf", str(c.slurm_conf), timeout=200,
                      check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    probe = re.search(r"ok    slurmd: probe job (\d+) \(COMPLETED", res.stdout)
    assert probe, res.stdout
    assert suite.events("job.grant", probe.group(1)) and suite.events("job.release",
                                                                      probe.group(1))
    # The admin moves the hooks and installs again, but restarts nothing.
    moved = {**suite.config, "paths": {**suite.config["paths"],
                                       "hooks_dir": str(suite.base / "libexec-moved")}}
    moved_path = suite.base / "moved.yaml"
    moved_path.write_text(yaml.safe_dump(moved, sort_keys=False))
    ztgpu = str(Path(sys.executable).with_name("ztgpu"))

    def as_moved(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ztgpu, "--config", str(moved_path), *args], capture_output=True,
                              text=True, timeout=200, check=False, env=suite.env())
    try:
        assert as_moved("install", "--slurm-conf", str(c.slurm_conf)).returncode == 0
        res = as_moved("install", "--check", "--slurm-conf", str(c.slurm_conf))
        assert res.returncode == 1, res.stdout
        assert (f"FAIL  slurmctld: Prolog is {suite.config['paths']['hooks_dir']}/prolog, "
                f"slurm.conf says {suite.base}/libexec-moved/prolog") in res.stdout, res.stdout
        assert "restart slurmctld" in res.stdout
        assert "no probe job: fix the above first" in res.stdout
    finally:
        suite.ztgpu("install", "--slurm-conf", str(c.slurm_conf))


def test_ending_the_array_task_that_shares_the_arrays_id_spares_the_other_tasks(suite):
    c = suite.cluster
    out = c.slurm(["sbatch", "--parsable", "--array=1-3", "--gres=gpu:1", "-n1",
                   f"--chdir={c.work_dir}", f"--output={c.work_dir}/slurm-%A_%a.out",
                   "--wrap=sleep 300"], user="ztalice")
    array = out.strip().split(";")[0]

    def tasks() -> dict[str, tuple[str, str]]:
        listing = c.slurm(["squeue", "-h", "-r", "-j", array, "-o", "%i %A %T"], check=False)
        return {f[0]: (f[1], f[2]) for f in (line.split() for line in listing.splitlines())}
    wait_for(lambda: [t[1] for t in tasks().values()] == ["RUNNING"] * 3, 60,
             "all three tasks to run")
    # One task runs under the array's own id: `scancel <id>` would end all three.
    same = next(task for task, (job, _) in tasks().items() if job == array)
    suite.wait_event("isolation.verified", array)
    mine = int(suite.wait_event("job.grant", array)["gpus"][0]["minor"])
    _open_cgroups_for(array, (mine + 2) % 4)
    assert any(not r["ok"] for r in suite.call("verify", job_id=array))
    assert cancel_outcome(suite, array) == "cancelled"
    wait_for(lambda: same not in tasks(), 30, f"task {same} to end")
    others = tasks()
    assert len(others) == 2 and all(state == "RUNNING" for _, state in others.values()), others
    c.slurm(["scancel", array], check=False)


def test_the_agents_drain_reaches_sinfo_with_its_reason(suite):
    """The call the agent makes when a GPU stays held (its end-to-end test runs
    without Slurm, where the drain can only fail): against the real controller."""
    from ztgpu.slurm.client import CliSlurmClient

    c = suite.cluster
    client = CliSlurmClient(Path("/usr/bin"), c.slurm_conf, 10.0)
    client.drain(c.node, "GPU 0 (minor 0) is still held by pid 4242 (uid 1001, 'python3 x')")
    state, reason = client.node_state(c.node)
    assert "DRAIN" in state and "pid 4242" in reason and reason.startswith("ztgpu: ")
    assert "pid 4242" in c.node_reason()
    client.resume(c.node)
    assert "DRAIN" not in client.node_state(c.node)[0]
