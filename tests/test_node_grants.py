"""The node agent grants GPUs only with authd's signed grant; revocation takes them back.

Real processes: ztgpu-noded (simulated GPUs, driven through its Prolog hook),
ztgpu-authd, and a private munged.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_root

from ztgpu.auth_client import AuthdClient
from ztgpu.authd.authority import ADMIN, LOGIN
from ztgpu.testing.agent_process import StandaloneAgent, standalone_agent
from ztgpu.testing.authd_process import AuthdProcess, CodeSource, secret_from_uri
from ztgpu.testing.collector_process import SitePki
from ztgpu.testing.munge import MungeDaemon
from ztgpu.testing.slurm_cluster import wait_for
from ztgpu.trust.pki import client_context

pytestmark = needs_root
NOBODY = pwd.getpwnam("nobody")


def job_env(job_id: str, gpus: str = "0,1") -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job_id, "SLURM_JOB_UID": str(NOBODY.pw_uid),
            "SLURM_JOB_USER": "nobody", "SLURM_SCRIPT_CONTEXT": "prolog_slurmd",
            "SLURM_JOB_GPUS": gpus, "SLURM_JOB_PARTITION": "gpu"}


class Site:
    def __init__(self, base: Path, munge: MungeDaemon) -> None:
        self.base = base
        self.pki = SitePki(base / "pki")
        self.authd = AuthdProcess(base / "authd", self.pki, munge.socket)
        res = self.authd.ztgpu("admin", "enroll", "root", "--local")
        assert res.returncode == 0, res.stderr
        found = re.search(r"otpauth://\S+", res.stdout)
        assert found is not None
        self.codes = CodeSource()
        self.secrets = self.codes.secrets
        self.secrets["root"] = secret_from_uri(found.group(0))
        cert, key = self.pki.issue("node", "gpu01")
        self.node_config = {"auth": {"authd_url": self.authd.url, "revocation_poll_s": 0.2},
                            "tls": {"ca_cert": str(self.pki.ca_cert), "cert": str(cert),
                                    "key": str(key)}}

    def client(self) -> AuthdClient:
        return AuthdClient(self.authd.url, client_context(self.pki.ca_cert, None, None))

    def code(self, user: str) -> str:
        return self.codes.code(user)

    def login(self, user: str | None) -> None:
        name = user or "root"
        with self.client() as client:
            client.request("POST", "/v1/login", {
                "credential": self.authd.credential_as(user, LOGIN), "code": self.code(name)})

    def admin(self, path: str, **body: Any) -> Any:
        self.login(None)
        with self.client() as client:
            return client.request("POST", path, {
                "credential": self.authd.credential_as(None, ADMIN), **body})


@pytest.fixture
def site(munge_daemon: MungeDaemon) -> Iterator[tuple[Site, StandaloneAgent]]:
    base = Path(tempfile.mkdtemp(prefix="ztgpu-grants-"))
    base.chmod(0o755)
    made = Site(base, munge_daemon)
    made.authd.start()
    reply = made.admin("/v1/admin/enroll", user="nobody")
    made.secrets["nobody"] = secret_from_uri(reply["otpauth_uri"])
    try:
        with standalone_agent(base / "agent", node={"name": "gpu01"},
                              **made.node_config) as agent:
            yield made, agent
    finally:
        made.authd.stop()
        shutil.rmtree(base, ignore_errors=True)


def owner(agent: StandaloneAgent, minor: int) -> int:
    return os.lstat(agent.dev_dir / f"nvidia{minor}").st_uid


def granted_minors(agent: StandaloneAgent, job_id: str) -> list[int]:
    return [g["minor"] for g in agent.wait_event("job.grant", job_id)["gpus"]]


def revoked_job(made: Site, agent: StandaloneAgent, job_id: str, reason: str) -> list[int]:
    """nobody logs in, job ``job_id`` gets its GPUs, nobody is revoked and the agent has
    taken them back; returns their minors."""
    made.login("nobody")
    assert agent.run_hook("prolog", job_env(job_id)).returncode == 0
    minors = granted_minors(agent, job_id)
    made.admin("/v1/admin/revoke", user="nobody", reason=reason)
    wait_for(lambda: any(e["action"] == "revoke" for e in agent.events("job.action", job_id)),
             30, "the agent to act on the revocation")
    assert all(owner(agent, m) == 0 for m in minors)
    return minors


def test_without_mfa_the_job_gets_no_gpu_and_the_node_stays_up(
        site: tuple[Site, StandaloneAgent]) -> None:
    _, agent = site
    res = agent.run_hook("prolog", job_env("500"))
    assert res.returncode == 0, res.stderr  # a refused job, not a node fault
    assert "ztgpu login" in res.stderr
    refused = agent.wait_event("job.refused", "500")
    assert "MFA session required" in refused["reason"]
    assert not agent.events("job.grant", "500")
    assert all(owner(agent, m) == 0 for m in range(4))
    action = agent.wait_event("job.action", "500")  # the job is ended with the reason
    assert action["action"] == "cancel_job"
    assert agent.call("ping") == {"pong": True}


def test_after_login_the_grant_is_verified_and_gpus_are_handed_over(
        site: tuple[Site, StandaloneAgent]) -> None:
    made, agent = site
    made.login("nobody")
    res = agent.run_hook("prolog", job_env("501"))
    assert res.returncode == 0, res.stderr
    minors = granted_minors(agent, "501")
    assert minors and all(owner(agent, m) == NOBODY.pw_uid for m in minors)
    assert agent.run_hook("epilog", job_env("501")).returncode == 0


def test_revocation_takes_the_gpus_back(
        site: tuple[Site, StandaloneAgent]) -> None:
    made, agent = site
    # How fast is measured by bench/revocation.py; here only that it happens.
    minors = revoked_job(made, agent, "502", "token stolen")
    actions = [e["action"] for e in agent.events("job.action", "502")]
    wait_for(lambda: "cancel_job" in [e["action"] for e in agent.events("job.action", "502")],
             10, "the job to be ended")
    assert "revoke" in actions
    # The drift check must not hand the files back to the revoked user.
    time.sleep(1.2)
    assert all(owner(agent, m) == 0 for m in minors)


def test_authd_unreachable_denies_by_default(site: tuple[Site, StandaloneAgent]) -> None:
    made, agent = site
    made.login("nobody")
    made.authd.stop()
    res = agent.run_hook("prolog", job_env("503"))
    assert res.returncode == 0
    assert "authd unreachable" in agent.wait_event("job.refused", "503")["reason"]
    assert all(owner(agent, m) == 0 for m in range(4))


def test_authd_unreachable_with_allow_grants_and_records_it(munge_daemon: MungeDaemon) -> None:
    base = Path(tempfile.mkdtemp(prefix="ztgpu-grants-"))
    base.chmod(0o755)
    made = Site(base, munge_daemon)
    made.node_config["auth"]["unreachable_action"] = "allow"
    try:
        with standalone_agent(base / "agent", node={"name": "gpu01"},
                              **made.node_config) as agent:
            assert agent.run_hook("prolog", job_env("504")).returncode == 0
            assert granted_minors(agent, "504")
            action = agent.wait_event("job.action", "504")
            assert action["action"] == "grant_without_authd"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_revocation_survives_an_agent_crash_even_with_authd_away(
        site: tuple[Site, StandaloneAgent]) -> None:
    """kill -9 after the revocation; the agent comes back while authd is down (so its
    feed cannot be read again): the revoked job's GPUs stay at rest, the revocation is
    reapplied from the agent's own state and the job is cancelled again."""
    made, agent = site
    minors = revoked_job(made, agent, "503", "laptop stolen")
    agent.stop(signal.SIGKILL)
    made.authd.stop()
    agent.start()
    assert all(owner(agent, m) == 0 for m in minors), "the restart gave the GPUs back"
    reapplied = [e for e in agent.events("job.action", "503")
                 if e["action"] == "revoke" and "reapplied" in e["reason"]]
    assert reapplied and "laptop stolen" in reapplied[0]["reason"]
    # Cancelled again by the restarted agent (the first try may or may not have
    # been made before the kill).
    restarted = agent.events("agent.start")[-1]["seq"]
    wait_for(lambda: any(e["action"] == "cancel_job" and e["seq"] > restarted
                         for e in agent.events("job.action", "503")), 20,
             "the cancel to be tried again")
    time.sleep(1.2)  # a drift pass: it must not hand the files back either
    assert all(owner(agent, m) == 0 for m in minors)
    # The Epilog ends the revocation with the job.
    assert agent.run_hook("epilog", job_env("503")).returncode == 0
    assert agent.events("job.release", "503")


def test_pinned_grant_keys_refuse_a_key_the_site_did_not_distribute(
        munge_daemon: MungeDaemon) -> None:
    """With auth.grant_keys_file, a grant signed by any other key (an authd that
    started signing with a key nobody distributed, a forged JWKS) gives no GPU."""
    from ztgpu.audit.spool import Spool

    base = Path(tempfile.mkdtemp(prefix="ztgpu-pinned-"))
    base.chmod(0o755)
    made = Site(base, munge_daemon)
    made.authd.start()
    reply = made.admin("/v1/admin/enroll", user="nobody")
    made.secrets["nobody"] = secret_from_uri(reply["otpauth_uri"])
    keys = base / "grant-keys.json"

    def export() -> None:
        res = made.authd.ztgpu("admin", "keys", "export", "--out", str(keys))
        assert res.returncode == 0, res.stderr
        assert "key " in res.stdout and oct(keys.stat().st_mode)[-3:] == "644"
    export()
    pinned = {**made.node_config, "auth": {**made.node_config["auth"],
                                           "grant_keys_file": str(keys)}}
    try:
        with standalone_agent(base / "agent", node={"name": "gpu01"}, **pinned) as agent:
            made.login("nobody")
            assert agent.run_hook("prolog", job_env("601")).returncode == 0
            grant = agent.wait_event("job.grant", "601")
            with Spool.open(made.authd.base / "spool" / "authd-events.db", "authd") as spool:
                issued = [e for e in spool.read(limit=1000, code="auth.grant")
                          if e.get("job_id") == "601"]
            # The node's record and authd's name the same grant.
            assert issued and grant["jti"] == issued[-1]["jti"]
            assert agent.run_hook("epilog", job_env("601")).returncode == 0
            made.admin("/v1/admin/keys/rotate")  # signs with a key the nodes were not given
            res = agent.run_hook("prolog", job_env("602"))
            assert res.returncode == 0, res.stderr  # the job is refused, the node stays up
            refused = agent.wait_event("job.refused", "602")
            assert "not in auth.grant_keys_file" in refused["reason"]
            assert not agent.events("job.grant", "602")
            assert all(owner(agent, m) == 0 for m in range(4))
            export()  # the site distributes the new key set
            assert agent.run_hook("prolog", job_env("603")).returncode == 0
            assert agent.wait_event("job.grant", "603")["jti"]
            assert agent.run_hook("epilog", job_env("603")).returncode == 0
    finally:
        made.authd.stop()
        shutil.rmtree(base, ignore_errors=True)
