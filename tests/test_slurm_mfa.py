"""MFA-backed job identity on the real private Slurm cluster.

The job gate holds a GPU job without MFA (no node drains) with a reason the
user can read, `ztgpu login` releases it, the node agent grants only with
authd's signed grant, and a revocation takes a running job's GPUs away
(proven by the agent's probe) and ends it.
"""

from __future__ import annotations

import json
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_slurm

from ztgpu.testing import gpu_probe
from ztgpu.testing.mfa_cluster import MfaCluster, held_reason, mfa_cluster
from ztgpu.testing.slurm_cluster import wait_for

pytestmark = needs_slurm


POLICY = """\
version: 1
defaults: {mfa_max_age_h: 12, max_gpus_per_job: 4, max_gpus_per_user_per_node: 4}
admins:
  - user: root
    roles: [enroll, revoke, keys, jit_approve, policy, audit]
rules:
  - name: no-bob
    users: [ztbob]
    allow: false
    reason: "ztbob has no GPU project; ask hpc-support"
  - name: everyone
    users: ["*"]
    allow: true
default: deny
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MfaCluster]:
    # Scripted telemetry (empty: idle GPUs) for the hold_user test; a process
    # on another job's GPU is ended and its owner held at authd.
    script = tmp_path_factory.mktemp("mfa-telemetry") / "telemetry.json"
    script.write_text("{}")
    agent = {"telemetry": {"interval_s": 0.5,
                           "responses": {"foreign_process": ["end_process", "hold_user"]}},
             "gpu": {"simulated_telemetry": str(script)}}
    with mfa_cluster(policy=POLICY, sections=agent) as made:
        made.enroll("ztalice")
        yield made


def test_job_without_mfa_is_held_with_a_reason_and_released_by_login(site: MfaCluster) -> None:
    cluster = site.suite.cluster
    job = cluster.sbatch("ztalice", "#!/bin/sh\nsleep 1\n", gpus=1)

    def held() -> bool:
        reason, comment = held_reason(cluster, job)
        return reason == "JobHeldAdmin" and "ztgpu login" in comment

    wait_for(held, 60, "the job to be held for MFA")
    assert cluster.node_state() in ("idle", "mixed", "allocated")  # never drained
    assert not site.suite.events("job.grant", job)
    status = site.ztgpu_as("ztalice", "status")
    assert status.returncode == 0 and f"job {job} held since" in status.stdout
    assert "MFA session required" in status.stdout, status.stdout

    res = site.login("ztalice")
    assert res.returncode == 0, res.stderr
    state = cluster.wait_job(job, ["COMPLETED", "FAILED", "CANCELLED"], timeout=90)
    assert state["JobState"] == "COMPLETED"
    grant = site.suite.wait_event("job.grant", job)
    assert grant["user"] == "ztalice"
    assert cluster.node_state() != "drained"


def test_revocation_removes_gpu_access_proven_by_probe_and_ends_the_job(
        site: MfaCluster) -> None:
    cluster = site.suite.cluster
    assert site.login("ztalice").returncode == 0
    gpu_probe.install_probe(cluster.work_dir)
    job = cluster.sbatch("ztalice", gpu_probe.job_script(cluster.work_dir, cluster.dev_dir,
                                                          True), gpus=1)
    cluster.wait_job(job, ["RUNNING"], timeout=60)
    site.suite.wait_event("isolation.verified", job)
    # How fast is measured by bench/revocation.py; here only what happens.
    res = site.admin("revoke", "--user", "ztalice", "--reason", "lost laptop")
    assert res.returncode == 0, res.stderr
    wait_for(lambda: any(e["action"] == "revoke"
                         for e in site.suite.events("job.action", job)), 30,
             "the agent to act on the revocation")
    # The agent probed again (just after recording the revoke): from inside
    # the job, no GPU opens any more.
    def no_gpu_probes() -> list[dict[str, Any]]:
        return [e for e in site.suite.events("isolation.verified", job)
                if all(v != "open" for k, v in e["probe"].get("user", {}).items()
                       if k.startswith("nvidia") and k != "nvidiactl")]

    wait_for(no_gpu_probes, 10, "a probe showing the job without GPU access")
    probes = no_gpu_probes()
    assert not site.suite.events("isolation.violated", job)
    # Both layers: the devices cgroup alone refuses the job's own GPU too.
    granted = [f"nvidia{g['minor']}" for g in site.suite.wait_event("job.grant", job)["gpus"]]
    assert all(probes[-1]["probe"]["cgroup_only"][name] == "EPERM" for name in granted)
    state = cluster.wait_job(job, ["CANCELLED", "FAILED", "COMPLETED"], timeout=30)
    assert state["JobState"] == "CANCELLED"
    assert cluster.node_state() != "drained"


def test_a_job_the_policy_never_allows_is_ended_with_the_reason(site: MfaCluster) -> None:
    cluster = site.suite.cluster
    job = cluster.sbatch("ztbob", "#!/bin/sh\nsleep 1\n", gpus=1)
    state = cluster.wait_job(job, ["CANCELLED"], timeout=60)
    assert state["JobState"] == "CANCELLED"
    _, comment = held_reason(cluster, job)
    assert "no GPU project" in comment
    assert not site.suite.events("job.grant", job)
    assert cluster.node_state() != "drained"


def test_the_gate_believes_no_caller_about_whose_job_it_is(site: MfaCluster) -> None:
    """A controller certificate asking about ztalice's real job in ztbob's name (or
    ztbob about it) gets a denial that touches no job: authd asks Slurm."""
    from ztgpu.auth_client import AuthdClient

    cluster = site.suite.cluster
    site.enroll("ztalice")  # an earlier test revoked her, which ends the enrolment
    assert site.login("ztalice").returncode == 0
    job = cluster.sbatch("ztalice", "#!/bin/sh\nsleep 30\n", gpus=1)
    cluster.wait_job(job, ["RUNNING"], timeout=60)
    import pwd

    bob = pwd.getpwnam("ztbob")
    client = AuthdClient(site.authd.url, site.pki.context("controller", "slurmctld-x"))
    try:
        answer = client.request("POST", "/v1/gate", {
            "job_id": job, "uid": bob.pw_uid, "user": "ztbob", "partition": "gpu",
            "account": None, "gpus_count": 1, "time_limit_s": None})
        missing = client.request("POST", "/v1/gate", {
            "job_id": "999999", "uid": bob.pw_uid, "user": "ztbob", "partition": "gpu",
            "account": None, "gpus_count": 1, "time_limit_s": None})
    finally:
        client.close()
    assert answer["allow"] is False and answer["code"] == "job_user_mismatch", answer
    assert "belongs to ztalice, not ztbob" in answer["reason"]
    assert missing["code"] == "job_user_mismatch" and "does not know" in missing["reason"]
    # Nothing happened to the job: no hold, no cancel.
    assert cluster.job_state(job)["JobState"] == "RUNNING"
    cluster.slurm(["scancel", job], check=False)


def test_a_process_on_another_users_gpu_holds_its_owner_at_authd_until_released(
        site: MfaCluster) -> None:
    """Response [end_process, hold_user]: the agent ends ztbob's process on
    ztcarol's GPU and asks authd to hold ztbob; the gate then holds ztbob's
    next GPU job with the reason, and only an admin's release lets it go on
    (to the policy, which ends it: ztbob has no GPU project)."""
    cluster = site.suite.cluster
    script = Path(site.suite.config["gpu"]["simulated_telemetry"])
    site.enroll("ztcarol")
    assert site.login("ztcarol").returncode == 0
    job = cluster.sbatch("ztcarol", "#!/bin/sh\nsleep 120\n", gpus=1)
    cluster.wait_job(job, ["RUNNING"], timeout=60)
    site.suite.wait_event("isolation.verified", job)
    minor = int(site.suite.wait_event("job.grant", job)["gpus"][0]["minor"])
    uuid = next(g["uuid"] for g in site.suite.config["gpu"]["simulated"] if g["minor"] == minor)
    bob = pwd.getpwnam("ztbob")
    intruder = subprocess.Popen(["setpriv", f"--reuid={bob.pw_uid}", f"--regid={bob.pw_gid}",
                                 "--clear-groups", "sleep", "300"])
    held_job = None
    try:
        script.write_text(json.dumps({uuid: {"util_pct": 90, "memory_used_bytes": 8 << 30,
                                             "pids": [intruder.pid]}}))
        found: list[dict[str, Any]] = []

        def misuse() -> bool:
            found[:] = [e for e in site.suite.events("gpu.misuse")
                        if e["rule"] == "foreign_process" and e.get("job_id") == job]
            return bool(found)

        wait_for(misuse, 30, "the foreign process to be found")
        event = found[0]
        assert (event["response"], event["outcome"]) == ("end_process+hold_user", "ended+held")
        assert "ztbob held at authd" in event["reason"], event["reason"]
        assert intruder.wait(timeout=10) < 0  # ended by a signal

        held_job = cluster.sbatch("ztbob", "#!/bin/sh\nsleep 1\n", gpus=1)

        def held() -> bool:
            reason, comment = held_reason(cluster, held_job)
            return reason == "JobHeldAdmin" and "foreign_process" in comment

        wait_for(held, 60, "ztbob's job to be held by the user hold")
        _, comment = held_reason(cluster, held_job)
        assert cluster.node in comment and f"job {job}" in comment, comment
        listed = site.admin("hold", "list")
        assert listed.returncode == 0 and "ztbob: held since" in listed.stdout, listed
        status = site.ztgpu_as("ztbob", "status")
        assert "ztbob's GPU jobs are held" in status.stdout, status
        # ztcarol's own job was not touched by the finding.
        assert cluster.job_state(job)["JobState"] == "RUNNING"
        bad = site.admin("hold", "release", "--user", "ztalice", "--reason", "x")
        assert bad.returncode != 0 and "not held" in bad.stderr, bad

        released = site.admin("hold", "release", "--user", "ztbob", "--reason", "cleared")
        assert released.returncode == 0, released.stderr
        state = cluster.wait_job(held_job, ["CANCELLED"], timeout=90)
        assert state["JobState"] == "CANCELLED"
        assert "no GPU project" in held_reason(cluster, held_job)[1]
        assert "ztbob: held" not in site.admin("hold", "list").stdout
    finally:
        script.write_text("{}")
        if intruder.poll() is None:
            intruder.kill()
            intruder.wait()
        cluster.cancel_all()


def test_the_revocation_drill_shows_a_running_job_lose_its_gpus_and_end(
        site: MfaCluster) -> None:
    """`ztgpu drill --scenario revoked` on the node, by root (admin, fresh MFA
    login): authd revokes the job's user, the agent takes the GPUs back and
    ends the job, and the drill shows it with the time and the trail entry."""
    cluster = site.suite.cluster
    site.enroll("ztalice")  # also root's fresh login: the drill's admin request
    assert site.login("ztalice").returncode == 0
    job = cluster.sbatch("ztalice", "#!/bin/sh\nsleep 120\n", gpus=1)
    cluster.wait_job(job, ["RUNNING"], timeout=60)
    site.suite.wait_event("isolation.verified", job)
    res = site.suite.ztgpu("drill", "--scenario", "revoked", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"revoking ztalice, whose job {job} runs" in res.stdout, res.stdout
    assert "action=revoke outcome=access_removed" in res.stdout, res.stdout
    assert "audit trail: seq" in res.stdout
    event = next(e for e in site.suite.events("job.action", job) if e["action"] == "revoke")
    assert f"seq {event['seq']} hash {event['hash'][:16]}" in res.stdout
    assert cluster.wait_job(job, ["CANCELLED"], timeout=30)["JobState"] == "CANCELLED"
    assert site.login("ztalice").returncode != 0  # the enrolment ended with it
    # Nothing left to drill: said so, not an error.
    again = site.suite.ztgpu("drill", "--scenario", "revoked", check=False)
    assert again.returncode == 0 and "skipped: no running job" in again.stdout, again
