"""The node agent and its hooks against a real ztgpu-noded process (no Slurm).

Device nodes are simulated (195:N in a private directory); everything else
is real: the daemon, its unix socket with peer-credential checks, chown and
chmod on device nodes, the SQLite state and spool, the installed hooks.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ztgpu.testing.agent_process import StandaloneAgent

NOBODY = pwd.getpwnam("nobody")
DAEMON = pwd.getpwnam("daemon")


def job_env(job_id: str = "41", uid: int = NOBODY.pw_uid, user: str = "nobody",
            gpus: str | None = "0,2") -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job_id, "SLURM_JOB_UID": str(uid),
           "SLURM_JOB_USER": user, "SLURM_SCRIPT_CONTEXT": "prolog_slurmd"}
    if gpus is not None:
        env["SLURM_JOB_GPUS"] = gpus
    return env


def owner_mode(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def device_states(agent: StandaloneAgent) -> dict[str, tuple[int, int, int]]:
    return {p.name: owner_mode(p) for p in sorted(agent.dev_dir.iterdir())}


def raw_request(sock_path: str, payload: bytes, *, shut: bool = True) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(sock_path)
        sock.sendall(payload)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


ROOT_0600 = (0, 0, 0o600)


def test_device_files_are_root_0600_at_rest_and_control_node_untouched(agent):
    states = device_states(agent)
    assert {k: v for k, v in states.items() if k != "nvidiactl"} == {
        f"nvidia{m}": ROOT_0600 for m in range(4)}
    assert states["nvidiactl"] == (0, 0, 0o666)
    start = agent.events("agent.start")
    assert start and start[-1]["gpu_backend"] == "simulated"
    assert "simulated" in start[-1]["reason"]


def test_prolog_grants_only_allocated_gpus_and_epilog_takes_them_back(agent):
    res = agent.run_hook("prolog", job_env(gpus="0,2"))
    assert res.returncode == 0, res.stderr
    states = device_states(agent)
    assert states["nvidia0"] == (NOBODY.pw_uid, 0, 0o600)
    assert states["nvidia2"] == (NOBODY.pw_uid, 0, 0o600)
    assert states["nvidia1"] == ROOT_0600
    assert states["nvidia3"] == ROOT_0600
    grant = agent.events("job.grant")[-1]
    # Slurm's gres indices 0,2 are minors 0,2; their NVML indices differ.
    assert grant["job_id"] == "41" and grant["user"] == "nobody"
    assert [(g["minor"], g["index"]) for g in grant["gpus"]] == [(0, 2), (2, 3)]
    status = agent.call("status")
    assert [j["job_id"] for j in status["jobs"]] == ["41"]

    res = agent.run_hook("epilog", job_env(gpus="0,2"))
    assert res.returncode == 0, res.stderr
    assert all(v == ROOT_0600 for k, v in device_states(agent).items() if k != "nvidiactl")
    release = agent.events("job.release")[-1]
    assert release["job_id"] == "41" and release["outcome"] == "released"
    assert agent.call("status")["jobs"] == []


def test_two_users_on_different_gpus_and_one_ending_leaves_the_other(agent):
    assert agent.run_hook("prolog", job_env("41", gpus="0")).returncode == 0
    assert agent.run_hook("prolog", job_env("42", DAEMON.pw_uid, "daemon", "1")).returncode == 0
    assert owner_mode(agent.dev_dir / "nvidia0")[0] == NOBODY.pw_uid
    assert owner_mode(agent.dev_dir / "nvidia1")[0] == DAEMON.pw_uid
    assert agent.run_hook("epilog", job_env("41", gpus="0")).returncode == 0
    assert owner_mode(agent.dev_dir / "nvidia0") == ROOT_0600
    assert owner_mode(agent.dev_dir / "nvidia1") == (DAEMON.pw_uid, 0, 0o600)
    assert [j["job_id"] for j in agent.call("status")["jobs"]] == ["42"]


def test_gpu_held_by_another_job_is_not_handed_over(agent):
    assert agent.run_hook("prolog", job_env("41", gpus="0")).returncode == 0
    res = agent.run_hook("prolog", job_env("42", DAEMON.pw_uid, "daemon", "0"))
    assert res.returncode == 0  # a job decision: the node must not drain
    assert "still held by job 41" in res.stderr
    assert owner_mode(agent.dev_dir / "nvidia0")[0] == NOBODY.pw_uid
    refused = agent.events("job.refused")[-1]
    assert refused["job_id"] == "42" and "still held" in refused["reason"]


BAD_ENVS = {
    "job id path traversal": (job_env(job_id="../../x"), "SLURM_JOB_ID"),
    "job id shell injection": (job_env(job_id="1;id"), "SLURM_JOB_ID"),
    "job id 20 digits": (job_env(job_id="9" * 20), "SLURM_JOB_ID"),
    "job id empty": (job_env(job_id=""), "SLURM_JOB_ID"),
    "job id zero-padded": (job_env(job_id="007"), "SLURM_JOB_ID"),
    "gpu out of range": (job_env(gpus="7"), "not in this node's inventory"),
    "gpu duplicated": (job_env(gpus="0,0"), "names a GPU twice"),
    "gpu garbage": (job_env(gpus="0,a;rm"), "SLURM_JOB_GPUS"),
    "gpu negative": (job_env(gpus="-1"), "SLURM_JOB_GPUS"),
    "uid does not match user": (job_env(uid=DAEMON.pw_uid), "has uid"),
    "unknown user": (job_env(user="nosuchuser"), "does not exist"),
    "uid not numeric": ({**job_env(), "SLURM_JOB_UID": "0x41"}, "SLURM_JOB_UID"),
    "user missing": ({k: v for k, v in job_env().items() if k != "SLURM_JOB_USER"},
                     "SLURM_JOB_USER"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENVS))
def test_malformed_slurm_environment_is_refused_without_draining(agent, case):
    env, expected = BAD_ENVS[case]
    before = device_states(agent)
    res = agent.run_hook("prolog", env)
    assert res.returncode == 0, "a bad job must not drain the node"
    assert expected in res.stderr
    assert "no GPU granted" in res.stderr
    assert device_states(agent) == before
    refused = agent.events("job.refused")
    assert refused, "the refusal must be recorded"
    assert expected.split()[0] in refused[-1]["reason"] or expected in refused[-1]["reason"]
    assert agent.call("status")["jobs"] == []
    assert agent.call("ping") == {"pong": True}


def test_prolog_with_agent_down_fails_loudly_so_slurm_drains_the_node(agent):
    agent.stop()
    res = agent.run_hook("prolog", job_env())
    assert res.returncode == 1
    assert "node unsafe" in res.stderr and "ztgpu-noded" in res.stderr
    assert "systemctl start ztgpu-noded" in res.stderr
    res = agent.run_hook("epilog", job_env())
    assert res.returncode == 1


def test_refusal_with_agent_down_still_drains(agent):
    agent.stop()
    res = agent.run_hook("prolog", job_env(job_id="1;id"))
    assert res.returncode == 1
    assert "SLURM_JOB_ID" in res.stderr


GARBAGE = {
    "binary": b"\x00\xff\xfe garbage\n",
    "json array": b"[1, 2, 3]\n",
    "no op": b'{"job": {}}\n',
    "op not a string": b'{"op": 5}\n',
    "unknown op": b'{"op": "format_disk"}\n',
    "empty": b"\n",
    "job not an object": b'{"op": "prolog", "job": "41"}\n',
    "uid is a bool": b'{"op": "prolog", "job": {"job_id": "41", "uid": true, '
                     b'"user": "root", "gpus": []}}\n',
    "gpus not ints": b'{"op": "prolog", "job": {"job_id": "41", "uid": 0, '
                     b'"user": "root", "gpus": ["0"]}}\n',
    "deeply nested": b'{"op": "prolog", "job": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_on_the_socket_gets_a_clear_error_and_the_agent_keeps_serving(agent, case):
    before = device_states(agent)
    answer = raw_request(agent.socket, GARBAGE[case])
    assert answer["ok"] is False
    assert answer["kind"] == "bad_request"
    assert answer["error"]
    assert device_states(agent) == before
    assert agent.call("ping") == {"pong": True}
    assert agent.alive()


def test_oversized_request_is_cut_off(agent):
    before = len(agent.events("request.rejected"))
    answer = raw_request(agent.socket, b'{"op": "ping", "pad": "' + b"x" * 200_000 + b'"}\n')
    assert answer == {"ok": False, "kind": "bad_request",
                      "error": "request larger than 65536 bytes"}
    assert len(agent.events("request.rejected")) == before + 1
    assert agent.call("ping") == {"pong": True}


def test_silent_client_times_out_without_blocking_others(agent):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(agent.socket)
        idle.sendall(b'{"op": "pi')  # never finishes
        assert agent.call("ping") == {"pong": True}


def test_only_root_and_the_slurm_user_may_use_the_socket(agent):
    os.chmod(agent.socket, 0o666)  # take file permissions out of the way
    os.chmod(Path(agent.socket).parent, 0o755)
    code = ("import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            "s.sendall(b'{\"op\":\"status\"}\\n'); s.shutdown(1); print(s.recv(9999).decode())")
    res = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", code,
                          agent.socket], capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert answer["ok"] is False and answer["kind"] == "denied"
    rejected = agent.events("request.rejected")[-1]
    assert rejected["peer_uid"] == NOBODY.pw_uid


def test_restarted_agent_still_knows_which_jobs_hold_which_gpus(agent):
    assert agent.run_hook("prolog", job_env("41", gpus="1,3")).returncode == 0
    agent.stop(signal.SIGKILL)
    # While the agent is down, something resets the files to the driver default.
    for name in ("nvidia0", "nvidia1"):
        os.chmod(agent.dev_dir / name, 0o666)
    agent.start()
    jobs = agent.call("status")["jobs"]
    assert [(j["job_id"], j["user"]) for j in jobs] == [("41", "nobody")]
    assert owner_mode(agent.dev_dir / "nvidia1") == (NOBODY.pw_uid, 0, 0o600)
    assert owner_mode(agent.dev_dir / "nvidia0") == ROOT_0600
    assert agent.events("agent.recovered")[-1]["jobs"] == ["41"]
    assert agent.run_hook("epilog", job_env("41", gpus="1,3")).returncode == 0
    assert owner_mode(agent.dev_dir / "nvidia1") == ROOT_0600
    assert owner_mode(agent.dev_dir / "nvidia3") == ROOT_0600


def test_clean_shutdown_is_recorded_and_removes_the_socket(agent):
    assert agent.stop() == 0
    assert not Path(agent.socket).exists()
    stop = agent.events("agent.stop")[-1]
    assert stop["reason"] == "SIGTERM"


def test_device_mode_changed_by_someone_else_is_recorded_and_restored(agent):
    os.chmod(agent.dev_dir / "nvidia2", 0o666)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not agent.events("device.drift"):
        time.sleep(0.1)
    drift = agent.events("device.drift")
    assert drift, "drift was not noticed"
    assert drift[-1]["path"].endswith("nvidia2")
    assert "mode=0666" in drift[-1]["found"] and drift[-1]["outcome"] == "restored"
    assert owner_mode(agent.dev_dir / "nvidia2") == ROOT_0600


def test_audit_tail_and_verify_read_the_local_spool(agent):
    assert agent.run_hook("prolog", job_env("41", gpus="0")).returncode == 0
    env = agent.env()
    ztgpu = str(Path(sys.executable).with_name("ztgpu"))
    tail = subprocess.run([ztgpu, "audit", "tail", "--local"], env=env, capture_output=True,
                          text=True, timeout=30, check=False)
    assert tail.returncode == 0, tail.stderr
    assert "job.grant" in tail.stdout and "job=41" in tail.stdout and "nobody" in tail.stdout
    verify = subprocess.run([ztgpu, "audit", "verify", "--local"], env=env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert verify.returncode == 0 and verify.stdout.startswith("OK")
    status = subprocess.run([ztgpu, "status", "--node"], env=env, capture_output=True,
                            text=True, timeout=30, check=False)
    assert "job 41" in status.stdout and "SIMULATED" in status.stdout


def _as_nobody(agent: StandaloneAgent, payload: str) -> dict[str, Any]:
    code = ("import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            "s.sendall(sys.argv[2].encode()); s.shutdown(1); d=b''\n"
            "while (c := s.recv(9999)): d += c\n"
            "print(d.decode())")
    res = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", code,
                          str(agent.base / "run" / "task.sock"), payload],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    answer: dict[str, Any] = json.loads(res.stdout)
    return answer


def test_task_socket_confines_only_real_job_tasks(agent):
    # Any user can reach it, but a process outside a Slurm job gets nothing.
    answer = _as_nobody(agent, '{"op": "confine"}\n')
    assert answer["ok"] is False and answer["kind"] == "denied"
    assert "not a process of a Slurm job" in answer["error"]
    # Anything but 'confine' is refused and recorded, at a bounded rate.
    before = len(agent.events("request.rejected"))
    for _ in range(15):
        answer = _as_nobody(agent, '{"op": "prolog", "job": {}}\n')
        assert answer["kind"] == "bad_request"
    recorded = agent.events("request.rejected")[before:]
    assert 1 <= len(recorded) <= 10
    assert all(r["peer_uid"] == NOBODY.pw_uid for r in recorded)
    assert agent.call("ping") == {"pong": True}


def test_task_prolog_without_agent_fails_the_task(agent):
    agent.stop()
    res = agent.run_hook("task_prolog", {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "41"})
    assert res.returncode == 1
    assert "cannot be confined" in res.stderr
    assert res.stdout == ""  # Slurm parses a TaskProlog's stdout


def test_grants_from_before_a_reboot_are_not_restored(agent):
    import sqlite3

    assert agent.run_hook("prolog", job_env("41", gpus="0")).returncode == 0
    agent.stop()
    db = sqlite3.connect(Path(agent.config["paths"]["state_dir"]) / "state.db")
    with db:
        db.execute("UPDATE meta SET value = 'another-boot' WHERE key = 'boot_id'")
    db.close()
    agent.start()
    assert agent.call("status")["jobs"] == []
    assert owner_mode(agent.dev_dir / "nvidia0") == ROOT_0600
    recovered = agent.events("agent.recovered")[-1]
    assert recovered["outcome"] == "discarded" and recovered["jobs"] == ["41"]


def test_stale_grant_whose_epilog_never_came_is_reclaimed(tmp_path):
    from ztgpu.testing.agent_process import standalone_agent

    base = tmp_path / "a"
    with standalone_agent(base, isolation={"stale_grant_s": 1}) as stale_agent:
        os.chmod(tmp_path, 0o755)
        assert stale_agent.run_hook("prolog", job_env("41", gpus="0")).returncode == 0
        time.sleep(1.2)  # job 41 never started any process here and its Epilog was lost
        res = stale_agent.run_hook("prolog", job_env("42", DAEMON.pw_uid, "daemon", "0"))
        assert res.returncode == 0 and res.stderr == ""
        assert owner_mode(stale_agent.dev_dir / "nvidia0")[0] == DAEMON.pw_uid
        release = [e for e in stale_agent.events("job.release") if e["job_id"] == "41"]
        assert release and "stale grant" in release[-1]["reason"]
        assert [j["job_id"] for j in stale_agent.call("status")["jobs"]] == ["42"]


def test_rest_state_is_configurable_for_site_monitoring(tmp_path):
    """E.g. DCGM running in a group: GPUs root:daemon 0660 at rest, kept for the group in jobs."""
    from ztgpu.testing.agent_process import standalone_agent

    with standalone_agent(tmp_path / "a", devices={"rest_group": "daemon",
                                                   "rest_mode": "0660"}) as site:
        daemon_gid = DAEMON.pw_gid
        assert owner_mode(site.dev_dir / "nvidia1") == (0, daemon_gid, 0o660)
        assert site.run_hook("prolog", job_env("41", gpus="1")).returncode == 0
        assert owner_mode(site.dev_dir / "nvidia1") == (NOBODY.pw_uid, daemon_gid, 0o660)
        assert site.run_hook("epilog", job_env("41", gpus="1")).returncode == 0
        assert owner_mode(site.dev_dir / "nvidia1") == (0, daemon_gid, 0o660)


def test_socket_file_is_private_to_root_and_the_slurm_user(agent):
    st = os.stat(agent.socket)
    assert stat.S_IMODE(st.st_mode) == 0o600
    task = os.stat(Path(agent.socket).with_name("task.sock"))
    assert stat.S_IMODE(task.st_mode) == 0o666  # reachable by tasks; the agent checks callers


def test_epilog_releases_a_known_job_even_if_its_user_vanished(agent):
    """Through the installed Epilog: the job's user no longer resolves (deleted while
    the job ran, or LDAP down), yet the GPU goes back and the release is recorded."""
    assert agent.run_hook("prolog", job_env("41", gpus="2")).returncode == 0
    assert owner_mode(agent.dev_dir / "nvidia2")[0] == NOBODY.pw_uid
    vanished = {**job_env("41", gpus="2"), "SLURM_JOB_UID": "54321",
                "SLURM_JOB_USER": "ztgpu-deleted-user"}
    res = agent.run_hook("epilog", vanished)
    assert res.returncode == 0, res.stderr
    assert owner_mode(agent.dev_dir / "nvidia2") == ROOT_0600
    release = agent.events("job.release", "41")
    assert release and release[-1]["outcome"] == "released"
    assert release[-1]["user"] == "nobody" and release[-1]["uid"] == NOBODY.pw_uid, (
        "recorded from the agent's own record, not the Epilog's environment")
    assert [g["minor"] for g in release[-1]["gpus"]] == [2]
    assert not agent.events("job.refused")


def test_epilog_without_a_usable_job_id_is_recorded_and_leaves_nothing_open(agent):
    assert agent.run_hook("prolog", job_env("42", gpus="1")).returncode == 0
    res = agent.run_hook("epilog", {**job_env("42"), "SLURM_JOB_ID": "42; rm -rf"})
    assert res.returncode == 0
    assert agent.events("hook.error")[-1]["hook"] == "epilog"
    assert owner_mode(agent.dev_dir / "nvidia1")[0] == NOBODY.pw_uid, (
        "a release names its job: an unreadable id releases nothing of job 42")


def test_prolog_rerun_with_other_gpus_returns_the_old_ones(agent):
    assert agent.run_hook("prolog", job_env("41", gpus="0,1")).returncode == 0
    assert agent.run_hook("prolog", job_env("41", gpus="3")).returncode == 0
    states = device_states(agent)
    assert states["nvidia0"] == ROOT_0600 and states["nvidia1"] == ROOT_0600
    assert states["nvidia3"] == (NOBODY.pw_uid, 0, 0o600)
    assert agent.events("device.drift") == []


def test_refusal_of_a_wellformed_job_id_names_the_job(agent):
    # The hook cannot parse this job (uid and user disagree) but its id is
    # sound, so the agent records which job was refused and tries to end it.
    res = agent.run_hook("prolog", job_env("77", uid=DAEMON.pw_uid))
    assert res.returncode == 0
    refused = agent.events("job.refused")[-1]
    assert refused["job_id"] == "77" and "has uid" in refused["reason"]
    action = agent.wait_event("job.action", "77")
    assert action["action"] == "cancel_job"
    assert action["outcome"] == "failed"  # no Slurm here: scancel cannot run, and says so


def test_job_cgroup_paths_match_whole_components():
    from ztgpu.noded.job_cgroups import in_job_cgroup

    assert in_job_cgroup("/slurm_n1/uid_5/job_4/step_0/task_0", "4")
    assert in_job_cgroup("/ztgpu/job_4", "4")
    assert not in_job_cgroup("/slurm_n1/uid_5/job_41/step_0", "4")
    assert not in_job_cgroup("/", "4")


def test_a_device_file_swapped_for_a_link_is_never_changed_through_it(agent):
    target = agent.base / "not-a-gpu"
    target.write_text("root's file\n")
    target.chmod(0o600)
    gpu = agent.dev_dir / "nvidia1"
    gpu.unlink()
    gpu.symlink_to(target)
    res = agent.run_hook("prolog", job_env("45", gpus="1"))
    assert res.returncode == 1 and "not a character device" in res.stderr
    drift = agent.wait_event("device.drift")
    assert drift["path"] == str(gpu) and drift["outcome"] == "unrecoverable"
    assert owner_mode(target) == ROOT_0600  # never handed to the job's user
    assert gpu.is_symlink()


def test_by_default_only_root_may_ask_the_agent_to_grant(tmp_path):
    """slurmd runs the Prolog as root; SlurmUser ('slurm', the controller's account)
    must not be able to prolog any uid onto any GPU."""
    import shutil
    import tempfile

    from ztgpu.testing.agent_process import standalone_agent

    slurm = pwd.getpwnam("slurm")  # Debian's slurm-wlm creates it
    base = Path(tempfile.mkdtemp(prefix="ztgpu-agent-"))
    try:
        with standalone_agent(base, slurm={"user": None}) as running:
            os.chmod(running.socket, 0o666)
            os.chmod(Path(running.socket).parent, 0o755)
            request = json.dumps({"op": "prolog", "job": {
                "job_id": "77", "uid": NOBODY.pw_uid, "user": "nobody", "gpus": [0]}})
            code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
                    "s.sendall(sys.argv[2].encode()+b'\\n'); s.shutdown(1);"
                    "print(s.recv(9999).decode())")
            res = subprocess.run(["runuser", "-u", "slurm", "--", sys.executable, "-c", code,
                                  running.socket, request], capture_output=True, text=True,
                                 timeout=30, check=False)
            assert res.returncode == 0, res.stderr
            answer = json.loads(res.stdout)
            assert answer["ok"] is False and answer["kind"] == "denied", answer
            assert running.events("request.rejected")[-1]["peer_uid"] == slurm.pw_uid
            assert owner_mode(running.dev_dir / "nvidia0") == ROOT_0600
            assert running.events("job.grant") == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _call_as(user: str, sock: str, request: dict[str, Any]) -> dict[str, Any]:
    code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            "s.sendall(sys.argv[2].encode()+b'\\n'); s.shutdown(1); d=b''\n"
            "while (c := s.recv(9999)): d += c\n"
            "print(d.decode())")
    res = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", code, sock,
                          json.dumps(request)], capture_output=True, text=True, timeout=30,
                         check=False, cwd="/")
    assert res.returncode == 0, res.stderr
    answer: dict[str, Any] = json.loads(res.stdout)
    return answer


def test_a_non_root_slurmd_user_reaches_the_socket_but_not_roots_operations():
    """Where slurmd runs as a SlurmdUser other than root (slurm.user), that
    user may drive the hooks' operations but not what only root may: record
    an assessment (a planted clean one would hide a weak node), recover the
    node, answer for sshd's PAM stack."""
    import shutil
    import tempfile

    from ztgpu.testing.agent_process import standalone_agent

    base = Path(tempfile.mkdtemp(prefix="ztgpu-agent-"))
    try:
        with standalone_agent(base, slurm={"user": "slurm"}) as running:
            os.chmod(Path(running.socket).parent, 0o755)
            assert _call_as("slurm", running.socket, {"op": "ping"})["result"] == {"pong": True}
            clean = {"op": "assessed", "facts_sha256": "0" * 64, "findings": []}
            for request, why in (
                    (clean, "only root may record an assessment"),
                    ({"op": "recover"}, "only root may recover the node"),
                    ({"op": "ssh_account", "user": "nobody"}, "only root (sshd's PAM stack)")):
                answer = _call_as("slurm", running.socket, request)
                assert answer["ok"] is False and answer["kind"] == "denied", answer
                assert why in answer["error"], answer
            assert running.events("node.assessed") == []
            # Root records one through the same socket.
            assert running.call("assessed", facts_sha256="0" * 64, findings=[])
            assert len(running.events("node.assessed")) == 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("field", ["SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT"])
def test_a_partition_or_account_cannot_rewrite_the_prologs_request(agent, field):
    """The hook writes these into its JSON request by hand: only checked words may
    pass, so a value that tries to add GPUs or change the uid is dropped."""
    env = {**job_env("47", gpus="0"), field: 'x","gpus":[0,1,2,3],"uid":0,"y":"'}
    res = agent.run_hook("prolog", env)
    assert res.returncode == 0, res.stderr
    grant = agent.wait_event("job.grant", "47")
    assert grant["uid"] == NOBODY.pw_uid and len(grant["gpus"]) == 1, grant
    states = device_states(agent)
    assert sum(1 for name, st in states.items()
               if name != "nvidiactl" and st[0] == NOBODY.pw_uid) == 1, states
    assert agent.run_hook("epilog", job_env("47")).returncode == 0
