"""MFA-backed job identity on the real private Slurm cluster.

The job gate holds a GPU job without MFA (no node drains) with a reason the
user can read, `ztgpu login` releases it, the node agent grants only with
authd's signed grant, and a revocation takes a running job's GPUs away
(proven by the agent's probe) and ends it.
"""

from __future__ import annotations

from collections.abc import Iterator
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
def site() -> Iterator[MfaCluster]:
    with mfa_cluster(policy=POLICY) as made:
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
    assert status.returncode == 0 and f"job {job} waits for MFA" in status.stdout

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
