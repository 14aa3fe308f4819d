"""Node agent -> collector: delivery, outages, the bounded spool, crashes.

Real processes throughout: ``ztgpu-noded`` on simulated GPUs (standalone,
driven through its hooks) and ``ztgpu-collectord`` over mutual TLS.
"""

from __future__ import annotations

import pwd
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_root

from ztgpu.audit.events import verify_chain
from ztgpu.audit.spool import Spool
from ztgpu.testing.agent_process import StandaloneAgent, standalone_agent
from ztgpu.testing.collector_process import (
    CollectorClient,
    CollectorProcess,
    SitePki,
    wait_until_stored,
)
from ztgpu.testing.slurm_cluster import wait_for

NOBODY = pwd.getpwnam("nobody")
pytestmark = needs_root


def job_env(job_id: str, gpus: str = "0") -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job_id, "SLURM_JOB_UID": str(NOBODY.pw_uid),
            "SLURM_JOB_USER": "nobody", "SLURM_SCRIPT_CONTEXT": "prolog_slurmd",
            "SLURM_JOB_GPUS": gpus}


class Site:
    """A PKI, a collector and a forwarding node agent in one private directory."""

    def __init__(self, base: Path, node: str = "gpu01", **audit: Any) -> None:
        self.base = base
        self.node = node
        self.pki = SitePki(base / "pki")
        self.collector = CollectorProcess(base / "collector", self.pki)
        cert, key = self.pki.issue("node", node)
        self.audit = {"collector_url": self.collector.url, "retry_min_s": 0.2,
                      "retry_max_s": 1.0, "checkpoint_interval_s": 1.0, **audit}
        self.tls = {"ca_cert": str(self.pki.ca_cert), "cert": str(cert), "key": str(key)}
        self.auditor = CollectorClient(self.collector.url, self.pki.context("auditor", "aud"))

    def stored(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while True:
            after = events[-1]["seq"] if events else 0
            status, body = self.auditor.get("/v1/chain", node=self.node, after_seq=after,
                                            limit=5000)
            assert status == 200, body
            if not body["events"]:
                return events
            events.extend(body["events"])

    def own(self, code: str) -> list[dict[str, Any]]:
        status, body = self.auditor.get("/v1/events", node="collector", code=code)
        assert status == 200
        return list(body["events"])


@pytest.fixture
def site() -> Iterator[tuple[Site, Any]]:
    base = Path(tempfile.mkdtemp(prefix="ztgpu-pipe-"))
    base.chmod(0o755)
    made = Site(base)
    made.collector.start()
    try:
        with standalone_agent(base / "agent", node={"name": "gpu01"}, tls=made.tls,
                              audit=made.audit) as agent:
            yield made, agent
    finally:
        made.auditor.close()
        made.collector.stop()
        shutil.rmtree(base, ignore_errors=True)


def run_jobs(agent: StandaloneAgent, first: int, count: int) -> None:
    for job in range(first, first + count):
        assert agent.run_hook("prolog", job_env(str(job))).returncode == 0
        assert agent.run_hook("epilog", job_env(str(job))).returncode == 0


def local(agent: StandaloneAgent) -> Spool:
    return Spool.open(Path(agent.config["paths"]["spool_dir"]) / "events.db", "gpu01")


def test_agent_events_reach_the_collector_in_order(site: tuple[Site, Any]) -> None:
    made, agent = site
    run_jobs(agent, 100, 5)
    with local(agent) as spool:
        head = spool.head()[0]
    wait_until_stored(made.auditor, "gpu01", head)
    stored = made.stored()
    assert [e["seq"] for e in stored] == list(range(1, head + 1))
    assert verify_chain(stored).ok
    grants = [e for e in stored if e["code"] == "job.grant"]
    assert [e["job_id"] for e in grants] == [str(j) for j in range(100, 105)]
    wait_for(lambda: local_acked(agent) == head, 10, "the acknowledgement to reach the spool")
    # The node signs its acknowledged head; the collector keeps the checkpoint.
    wait_for(lambda: made.auditor.get("/v1/checkpoints", node="gpu01")[1]["checkpoints"], 15,
             "a signed checkpoint")


def local_acked(agent: StandaloneAgent) -> int:
    with local(agent) as spool:
        return spool.acked_seq()


def test_status_shows_spool_depth_and_age(site: tuple[Site, Any]) -> None:
    made, agent = site
    made.collector.stop()
    run_jobs(agent, 200, 2)
    time.sleep(1.1)
    status = agent.call("status")["audit"]
    assert status["forwarding"] and not status["connected"]
    assert status["unacked"] >= 4 and status["oldest_unacked_age_s"] >= 1.0
    out = _cli_status(agent)
    assert "NOT CONNECTED" in out and f"{status['unacked']} unacknowledged" in out
    made.collector.start()
    wait_for(lambda: agent.call("status")["audit"]["unacked"] == 0, 30, "the backlog to drain")
    assert "(connected)" in _cli_status(agent)


def _cli_status(agent: StandaloneAgent) -> str:
    import subprocess
    import sys

    ztgpu = str(Path(sys.executable).with_name("ztgpu"))
    res = subprocess.run([ztgpu, "--config", str(agent.config_path), "status", "--node"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_collector_away_for_a_minute_then_the_spool_drains(site: tuple[Site, Any]) -> None:
    made, agent = site
    run_jobs(agent, 300, 2)
    with local(agent) as spool:
        wait_until_stored(made.auditor, "gpu01", spool.head()[0])
    made.collector.kill()
    stop_at = time.monotonic() + 60
    job = 310
    while time.monotonic() < stop_at:  # keep the node busy while the collector is gone
        run_jobs(agent, job, 1)
        job += 1
        time.sleep(1.0)
    with local(agent) as spool:
        backlog = spool.backlog()
        assert backlog["unacked"] >= 2 * (job - 310)
        head = spool.head()[0]
    made.collector.start()
    wait_until_stored(made.auditor, "gpu01", head, timeout=60)
    stored = made.stored()
    assert [e["seq"] for e in stored] == list(range(1, head + 1))
    assert verify_chain(stored).ok
    wait_for(lambda: local_acked(agent) == head, 20, "the spool to drain")


def test_full_spool_stops_grants_and_resumes_after_drain(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="ztgpu-full-"))
    base.chmod(0o755)
    made = Site(base, spool_max_events=100)
    try:
        with standalone_agent(base / "agent", node={"name": "gpu01"}, tls=made.tls,
                              audit=made.audit) as agent:
            # No collector yet: everything stays unacknowledged.
            job = 1000
            while agent.call("status")["audit"]["unacked"] < 100:
                run_jobs(agent, job, 1)
                job += 1
            refused = agent.run_hook("prolog", job_env("2000"))
            assert refused.returncode != 0, "a full spool must stop new grants"
            full = agent.wait_event("spool.full")
            assert (full["limit"], full["action"]) == (100, "stop_granting")
            refusal = agent.wait_event("job.refused", job_id="2000")
            assert "audit spool full" in refusal["reason"]
            out = _cli_status(agent)
            assert "SPOOL FULL" in out
            # Nothing was dropped to make room:
            with local(agent) as spool:
                assert spool.verify().ok and spool.unacked_count() >= 100
            made.collector.start()
            agent.wait_event("spool.drained", timeout=60)
            assert agent.run_hook("prolog", job_env("2001")).returncode == 0
            with local(agent) as spool:
                head = spool.head()[0]
            wait_until_stored(made.auditor, "gpu01", head, timeout=60)
            codes = [e["code"] for e in made.stored()]
            assert "spool.full" in codes and "spool.drained" in codes
    finally:
        made.auditor.close()
        made.collector.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_agent_sigkill_while_spooling_keeps_the_chain(site: tuple[Site, Any]) -> None:
    made, agent = site
    for round_ in range(3):
        run_jobs(agent, 400 + 10 * round_, 3)
        agent.stop(signal.SIGKILL)
        with local(agent) as spool:
            assert spool.verify().ok
        agent.start()
    run_jobs(agent, 500, 1)
    with local(agent) as spool:
        head = spool.head()[0]
    wait_until_stored(made.auditor, "gpu01", head, timeout=60)
    stored = made.stored()
    assert [e["seq"] for e in stored] == list(range(1, head + 1))
    assert verify_chain(stored).ok
    assert not made.own("audit.gap") and not made.own("audit.chain_broken")


def test_cancel_jobs_action_ends_running_jobs_when_the_spool_fills() -> None:
    base = Path(tempfile.mkdtemp(prefix="ztgpu-full-"))
    base.chmod(0o755)
    made = Site(base, spool_max_events=100, spool_full_action="cancel_jobs")
    try:
        with standalone_agent(base / "agent", node={"name": "gpu01"}, tls=made.tls,
                              audit=made.audit) as agent:
            assert agent.run_hook("prolog", job_env("77", gpus="1")).returncode == 0
            job = 1000
            while agent.call("status")["audit"]["unacked"] < 100:
                run_jobs(agent, job, 1)
                job += 1
            agent.wait_event("spool.full")
            action = agent.wait_event("job.action", job_id="77")
            assert action["action"] == "cancel_job"
            assert "audit spool is full" in action["reason"]
    finally:
        made.auditor.close()
        shutil.rmtree(base, ignore_errors=True)


def test_agent_refuses_to_forward_with_another_nodes_certificate() -> None:
    base = Path(tempfile.mkdtemp(prefix="ztgpu-cert-"))
    base.chmod(0o755)
    made = Site(base, node="gpu02")  # certificate for gpu02, agent named gpu01
    try:
        with pytest.raises(Exception, match="exited at start") as info, \
                standalone_agent(base / "agent", node={"name": "gpu01"}, tls=made.tls,
                                 audit=made.audit):
            pass
        assert "node certificate for 'gpu01'" in str(info.value)
    finally:
        made.auditor.close()
        shutil.rmtree(base, ignore_errors=True)


def test_renewed_certificates_are_used_without_restarts(site: tuple[Site, Any]) -> None:
    import base64
    import socket

    from cryptography.hazmat.primitives.serialization import Encoding

    from ztgpu.trust.pki import load_cert, renew

    made, agent = site
    run_jobs(agent, 600, 1)
    with local(agent) as spool:
        wait_until_stored(made.auditor, "gpu01", spool.head()[0])
    node_cert = Path(made.tls["cert"])
    service_cert = next((made.base / "pki" / "certs" / "service").glob("*.crt"))
    for cert in (node_cert, service_cert):
        assert renew(made.pki.ca_dir, cert, cert.with_suffix(".key"), force=True)

    # The collector serves its renewed certificate on the next handshake.
    context = made.pki.context("auditor", "renewal-check")
    host, port = made.collector.url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        served = tls.getpeercert(binary_form=True)
    assert served == load_cert(service_cert).public_bytes(Encoding.DER)

    # The node switches to its renewed certificate by itself (a new
    # connection): its next checkpoint is stored with that certificate.
    run_jobs(agent, 601, 1)
    new_node = load_cert(node_cert).public_bytes(Encoding.DER)

    def signed_with_new_cert() -> bool:
        status, body = made.auditor.get("/v1/checkpoints", node="gpu01")
        return status == 200 and any(base64.b64decode(c["cert"]) == new_node
                                     for c in body["checkpoints"])

    wait_for(signed_with_new_cert, 30, "a checkpoint over a connection with the new cert")
    assert agent.alive()
