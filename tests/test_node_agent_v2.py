"""The node agent in cgroup v2 mode on this host's real cgroup2 hierarchy, no
Slurm: a private tree laid out as Slurm's cgroup/v2 plugin lays out a node
(``system.slice/<node>_slurmstepd.scope/job_<id>/step_<s>/user/task_<n>``),
processes placed in it as slurmstepd places them, and the installed hooks
and the agent's sockets as the only way in. The same flows run under real
Slurm on the pure-v2 VMs."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import HAVE_ROOT
from ztgpu.cgroups import device_bpf as bpf
from ztgpu.cgroups.device_bpf import DevicePolicy, DeviceRule, DevicesV2

from ztgpu.testing.agent_process import StandaloneAgent, standalone_agent
from ztgpu.testing.cgroup2 import scratch_tree, spawn_in, try_opens, unified_root
from ztgpu.testing.slurm_cluster import wait_for

pytestmark = pytest.mark.skipif(not HAVE_ROOT, reason="needs root (bpf(2), cgroups)")

NOBODY = pwd.getpwnam("nobody")
ZTGPU = str(Path(sys.executable).with_name("ztgpu"))


@dataclass
class V2Node:
    agent: StandaloneAgent
    top: Path
    scope: Path
    procs: list[subprocess.Popen[str]]

    def step(self, job: str, step: str = "0") -> Path:
        return self.scope / f"job_{job}" / f"step_{step}"

    def task(self, job: str, step: str = "0", task: str = "0") -> Path:
        path = self.step(job, step) / "user" / f"task_{task}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start_user_process(self, cgroup: Path, uid: int = NOBODY.pw_uid,
                           gid: int = NOBODY.pw_gid) -> subprocess.Popen[str]:
        proc = spawn_in(cgroup, uid, gid, ["sleep", "120"])
        self.procs.append(proc)
        wait_for(lambda: str(proc.pid) in (cgroup / "cgroup.procs").read_text().split(), 10,
                 f"pid {proc.pid} in {cgroup}")
        return proc

    def task_prolog(self, cgroup: Path, job: str, uid: int = NOBODY.pw_uid,
                    gid: int = NOBODY.pw_gid) -> subprocess.CompletedProcess[str]:
        hook = str(self.agent.hooks_dir / "task_prolog")
        proc = spawn_in(cgroup, uid, gid, [hook], env={"PATH": "/usr/bin:/bin",
                                                       "SLURM_JOB_ID": job},
                        capture=True)
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def end_processes(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()


def job_env(job_id: str, gpus: str | None) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job_id, "SLURM_JOB_UID": str(NOBODY.pw_uid),
           "SLURM_JOB_USER": "nobody", "SLURM_SCRIPT_CONTEXT": "prolog_slurmd"}
    if gpus is not None:
        env["SLURM_JOB_GPUS"] = gpus
    return env


@pytest.fixture
def node() -> Iterator[V2Node]:
    root = unified_root()
    assert root is not None, "no cgroup2 hierarchy mounted"
    with scratch_tree(root) as top:
        scope = top / "system.slice" / "testnode_slurmstepd.scope"
        (scope / "system").mkdir(parents=True)
        base = Path(tempfile.mkdtemp(prefix="ztgpu-agent-"))
        v2 = V2Node(agent=None, top=top, scope=scope, procs=[])  # type: ignore[arg-type]
        try:
            with standalone_agent(base, cgroups={"mode": "v2", "unified_root": str(top)}) as a:
                v2.agent = a
                yield v2
        finally:
            v2.end_processes()
            shutil.rmtree(base, ignore_errors=True)


def ours(cgroup: Path) -> list[str]:
    return [p.name for p in bpf.attached(cgroup).ours()]


def programs_named(name: str, want: int) -> int:
    """How many of our programs named ``ztgpu_<name>`` are loaded, waiting up
    to 5 s for the count to become *want* (the kernel frees them asynchronously)."""
    devices = DevicesV2(Path("/sys/fs/cgroup"))
    deadline = time.monotonic() + 5
    while True:
        count = len(devices.programs([name]))
        if count == want or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def test_the_agent_reports_v2_and_starts_ok(node):
    status = node.agent.call("status")
    assert status["cgroups"]["mode"] == "v2", status["cgroups"]
    assert status["refusing_grants"] == []
    start = node.agent.wait_event("agent.start")
    assert start["cgroup_mode"] == "v2" and start["outcome"] == "ok", start
    out = subprocess.run([ZTGPU, "--config",
                          str(node.agent.config_path), "status", "--node"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "cgroups: v2 (cgroup v2 device programs (eBPF)" in out.stdout


def test_a_v2_job_opens_only_its_gpus_in_every_step_and_its_programs_go_with_it(node):
    agent = node.agent
    assert agent.run_hook("prolog", job_env("41", "1")).returncode == 0
    task = node.task("41")
    extern = node.step("41", "extern")
    extern.mkdir(parents=True)
    # Slurm's own job-level program (ConstrainDevices=yes) as Slurm writes it:
    # OVERRIDE, guarding only gres GPUs, here allowing all four (as a wrong or
    # wide allocation would): ours, on the step, still decides.
    slurm_like = DevicePolicy(guarded=tuple(DeviceRule(195, m) for m in range(4)),
                              allowed=tuple(DeviceRule(195, m) for m in range(4)))
    fd = bpf.load(slurm_like, "slurmlike")
    try:
        bpf.attach(node.scope / "job_41", fd, flags=bpf.F_ALLOW_OVERRIDE)
    finally:
        os.close(fd)
    # The TaskProlog, from inside the task as the job's user, has its step confined.
    res = node.task_prolog(task, "41")
    assert res.returncode == 0, res.stderr
    assert ours(node.step("41")) == ["ztgpu_j41"]
    # The sweep covers every step, the extern one included.
    wait_for(lambda: ours(extern) == ["ztgpu_j41"], 10, "the extern step's program")
    node.start_user_process(task)
    dev = Path(agent.config["paths"]["device_dir"])
    names = ["nvidia0", "nvidia1", "nvidia2", "nvidia3", "nvidiactl"]
    got = try_opens(task, [(dev / n, "rw") for n in names])
    assert {n: got[f"{dev / n}:rw"] for n in names} == {
        "nvidia0": "EPERM", "nvidia1": "open", "nvidia2": "EPERM", "nvidia3": "EPERM",
        "nvidiactl": "open"}
    # The agent's own probe, through the socket, proves the same from the task cgroup.
    results = agent.call("verify", job_id="41")
    assert len(results) == 1 and results[0]["ok"], results
    assert results[0]["cgroup"].endswith("job_41/step_0/user/task_0"), results
    assert results[0]["cgroup_only"] == {"nvidia0": "EPERM", "nvidia1": "open",
                                         "nvidia2": "EPERM", "nvidia3": "EPERM",
                                         "nvidiactl": "open"}, results
    assert agent.wait_event("isolation.verified", "41")["probe"]["cgroup"] == results[0]["cgroup"]
    # Epilog: programs detached from the steps still there, none left loaded.
    node.end_processes()
    assert agent.run_hook("epilog", job_env("41", None)).returncode == 0
    assert ours(node.step("41")) == [] and ours(extern) == []
    assert programs_named("j41", 0) == 0


def test_the_task_prolog_confines_only_granted_jobs_tasks(node):
    agent = node.agent
    # A process in the scope but in no job (slurmstepd's waiting area).
    res = node.task_prolog(node.scope / "system", "41")
    assert res.returncode != 0 and "cannot be confined" in res.stderr
    # A job this agent never granted.
    res = node.task_prolog(node.task("77"), "77")
    assert res.returncode != 0 and "job 77 was not granted" in res.stderr, res.stderr
    assert ours(node.step("77")) == []
    # A granted job, but the caller is another user.
    assert agent.run_hook("prolog", job_env("42", "0")).returncode == 0
    daemon = pwd.getpwnam("daemon")
    res = node.task_prolog(node.task("42"), "42", uid=daemon.pw_uid, gid=daemon.pw_gid)
    assert res.returncode != 0 and "was not granted on this node" in res.stderr, res.stderr
    assert agent.run_hook("epilog", job_env("42", None)).returncode == 0


def test_without_a_cgroup_layer_the_agent_grants_nothing(tmp_path):
    plain = tmp_path / "not-a-cgroup"
    plain.mkdir()
    base = Path(tempfile.mkdtemp(prefix="ztgpu-agent-"))
    try:
        with standalone_agent(base, cgroups={"mode": "v2", "unified_root": str(plain)}) as a:
            start = a.wait_event("agent.start")
            assert start["outcome"] == "degraded" and start["cgroup_mode"] == "none", start
            unsafe = a.wait_event("node.unsafe")
            assert unsafe["check"] == "cgroups" and "no cgroup2 hierarchy" in unsafe["reason"]
            res = a.run_hook("prolog", job_env("43", "0"))
            assert res.returncode != 0
            assert not a.events("job.grant", "43")
            status = a.call("status")
            assert status["cgroups"]["mode"] == "none" and status["refusing_grants"]
            out = subprocess.run([ZTGPU, "--config",
                                  str(a.config_path), "node", "verify"],
                                 capture_output=True, text=True, timeout=60, check=False)
            assert out.returncode == 1 and "node refuses grants" in out.stdout, out.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_node_verify_fails_for_a_job_it_cannot_probe(node):
    """A granted job with no process in a confined cgroup is not 'verified'."""
    agent = node.agent
    assert agent.run_hook("prolog", job_env("44", "2")).returncode == 0
    out = subprocess.run([ZTGPU, "--config",
                          str(agent.config_path), "node", "verify"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1, out.stdout
    assert "job 44: NOT VERIFIED" in out.stdout
    assert agent.run_hook("epilog", job_env("44", None)).returncode == 0


def test_revocation_replaces_the_steps_program_with_one_that_allows_nothing(munge_daemon):
    """authd revokes the user: the agent's program on the job's step is replaced
    in place by one that denies every GPU-class device, proven by opens from
    the job's task cgroup (as root: the program alone decides)."""
    from test_node_grants import Site

    from ztgpu.testing.authd_process import secret_from_uri

    root = unified_root()
    assert root is not None
    base = Path(tempfile.mkdtemp(prefix="ztgpu-grants-"))
    base.chmod(0o755)
    made = Site(base, munge_daemon)
    made.authd.start()
    procs: list[subprocess.Popen[str]] = []
    try:
        reply = made.admin("/v1/admin/enroll", user="nobody")
        made.secrets["nobody"] = secret_from_uri(reply["otpauth_uri"])
        with scratch_tree(root) as top:
            scope = top / "system.slice" / "gpu01_slurmstepd.scope"
            scope.mkdir(parents=True)
            with standalone_agent(base / "agent", node={"name": "gpu01"},
                                  cgroups={"mode": "v2", "unified_root": str(top)},
                                  **made.node_config) as agent:
                node = V2Node(agent=agent, top=top, scope=scope, procs=procs)
                made.login("nobody")
                env = {**job_env("601", "0,1"), "SLURM_JOB_PARTITION": "gpu"}
                assert agent.run_hook("prolog", env).returncode == 0
                task = node.task("601")
                assert node.task_prolog(task, "601").returncode == 0
                node.start_user_process(task)
                dev = agent.dev_dir
                before = try_opens(task, [(dev / "nvidia0", "rw"), (dev / "nvidia1", "rw")])
                assert set(before.values()) == {"open"}, before
                made.admin("/v1/admin/revoke", user="nobody", reason="token stolen")
                wait_for(lambda: any(e["action"] == "revoke"
                                     for e in agent.events("job.action", "601")),
                         30, "the agent to act on the revocation")
                names = ["nvidia0", "nvidia1", "nvidiactl"]
                after = try_opens(task, [(dev / n, "rw") for n in names])
                assert set(after.values()) == {"EPERM"}, after
                assert ours(node.step("601")) == ["ztgpu_j601"]  # replaced, not added
                # The agent's own probe after the revoke agrees: a revoked job
                # opening nothing (nvidiactl included) is what it must find.
                wait_for(lambda: any(e["probe"]["cgroup_only"].get("nvidia0")
                                     == "EPERM"
                                     for e in agent.events("isolation.verified", "601")),
                         30, "the agent's probe after the revocation")
                assert not agent.events("isolation.violated", "601")
                node.end_processes()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        made.authd.stop()
        shutil.rmtree(base, ignore_errors=True)
