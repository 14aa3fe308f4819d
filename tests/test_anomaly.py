"""The collector's learned baselines over the nodes' ``gpu.usage`` summaries.

First the detector's rules on synthetic histories (when it judges, what it
flags, what it learns), then through a real ``ztgpu-collectord``: summaries
posted by a node over mutual TLS, ``anomaly.usage`` events in the
collector's chain and in its JSON Lines export (the SIEM path), and
baselines that survive a restart of the collector.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ztgpu.audit.events import GENESIS_PREV, REGISTRY, build_event, format_timestamp
from ztgpu.collector.anomaly import Detector, Settings, offpeak_share
from ztgpu.testing.collector_process import CollectorClient, CollectorProcess, SitePki
from ztgpu.testing.slurm_cluster import wait_for

DAY = datetime(2026, 11, 2, tzinfo=UTC).astimezone()  # a Monday, local time


def usage(user: str, job: int, *, busy_h: float, start: datetime, util: float = 60.0,
          kwh: float | None = None, partition: str = "gpu", account: str | None = None,
          gpu: str = "GPU-0a0a0a0a-0000-4000-8000-000000000000",
          node: str | None = None) -> dict[str, Any]:
    """The fields of one gpu.usage summary (as the node agent records them;
    *node* is the envelope's, which the collector sets from the node's cert)."""
    end = start + timedelta(hours=max(busy_h, 0.01))
    return {"job_id": str(job), "uid": 1000, "user": user, "partition": partition,
            "account": account, **({"node": node} if node else {}),
            "gpus": [{"index": 0, "uuid": gpu, "minor": 0}],
            "outcome": "summarised", "samples": 100, "util_mean_pct": util,
            "util_max_pct": 100.0, "memory_max_bytes": 1 << 30,
            "energy_j": (kwh if kwh is not None else busy_h * 0.4) * 3.6e6,
            "busy_s": busy_h * 3600, "processes_max": 1,
            "first_sample": start.isoformat(), "last_sample": end.isoformat()}


def history(user: str, count: int, rng: random.Random, first_job: int = 1
            ) -> list[dict[str, Any]]:
    """Ordinary daytime jobs: 1 to 3 hours busy, starting 9:00 to 14:00."""
    return [usage(user, first_job + i, busy_h=rng.uniform(1, 3),
                  start=DAY.replace(hour=rng.randint(9, 14)) + timedelta(days=i % 5),
                  util=rng.uniform(40, 90)) for i in range(count)]


def test_nothing_is_judged_before_the_history_is_long_enough() -> None:
    detector = Detector(Settings(min_history=10))
    rng = random.Random(1)
    for event in history("alice", 9, rng):
        assert detector.observe(event) == []
    night = usage("alice", 99, busy_h=6, start=DAY.replace(hour=0))
    assert detector.observe(night) == []  # 9 past jobs: learned, not judged
    assert detector.users["alice"].count() == 10


def test_heavy_off_peak_use_far_above_the_users_usual_is_flagged_and_not_learned() -> None:
    detector = Detector(Settings())
    rng = random.Random(2)
    for event in history("alice", 30, rng):
        assert detector.observe(event) == []
    night = usage("alice", 500, busy_h=5, start=DAY.replace(hour=0), kwh=3.5)
    found = {f.figure: f for f in detector.observe(night)}
    assert "offpeak_busy_hours" in found and found["offpeak_busy_hours"].score > 5
    assert found["offpeak_busy_hours"].basis == "user alice"
    assert found["offpeak_busy_hours"].median == 0.0
    # Not learned: the same again is still flagged.
    assert detector.users["alice"].count() == 30
    assert detector.observe(dict(night, job_id="501"))
    # An ordinary job is not.
    assert detector.observe(usage("alice", 502, busy_h=2, start=DAY.replace(hour=10))) == []


def test_a_user_whose_jobs_are_all_alike_is_not_flagged_for_a_little_more() -> None:
    detector = Detector(Settings())
    for job in range(20):
        detector.observe(usage("bob", job, busy_h=1.0, start=DAY.replace(hour=10), util=50))
    # MAD is 0: the floors keep 20 minutes more from counting.
    assert detector.observe(usage("bob", 100, busy_h=1.3, start=DAY.replace(hour=10),
                                  util=55)) == []
    assert [f.figure for f in detector.observe(
        usage("bob", 101, busy_h=4.0, start=DAY.replace(hour=10), util=50))] == [
        "busy_hours", "energy_kwh"]


def test_a_new_user_is_judged_against_their_account_the_gpu_or_the_partition() -> None:
    """Below min_history a user is judged against the first baseline that has
    it: their account's, the GPU's, their partition's; then their own."""
    detector = Detector(Settings())
    rng = random.Random(3)
    for n, user in enumerate(("u1", "u2", "u3")):
        for event in history(user, 10, rng, first_job=1000 * (n + 1)):
            event.update(account="proj-a", node="gpu01",
                         gpus=[{"index": 0, "uuid": f"GPU-{user}"}])
            detector.observe(event)
    big = {"busy_h": 10, "start": DAY.replace(hour=9)}
    in_account = detector.observe(usage("new1", 1, account="proj-a", gpu="GPU-x", **big))
    assert in_account and in_account[0].basis == "account proj-a"
    on_gpu = detector.observe(usage("new2", 2, account="proj-b", gpu="GPU-u2", node="gpu01",
                                   **big))
    assert on_gpu and on_gpu[0].basis == "gpu gpu01 GPU-u2"
    elsewhere = detector.observe(usage("new3", 3, account="proj-c", gpu="GPU-y", **big))
    assert elsewhere and elsewhere[0].basis == "partition gpu"
    # An ordinary first job of a newcomer is not flagged by any of them.
    assert detector.observe(usage("new4", 4, account="proj-a", busy_h=2,
                                  start=DAY.replace(hour=10))) == []
    # With ten jobs of their own, the user's own baseline decides.
    for event in history("new5", 10, rng, first_job=9000):
        detector.observe(dict(event, account="proj-a"))
    own = detector.observe(usage("new5", 9999, account="proj-a", **big))
    assert own and own[0].basis == "user new5"


def test_off_peak_share_follows_the_peak_windows() -> None:
    start = DAY.replace(hour=6)
    assert offpeak_share(start, start + timedelta(hours=4), ["08:00-20:00"]) == pytest.approx(
        0.5, abs=0.01)
    assert offpeak_share(start, start, ["08:00-20:00"]) == 1.0
    assert offpeak_share(DAY.replace(hour=9), DAY.replace(hour=10), ["08:00-20:00"]) == 0.0


# --------------------------------------------------------------- collector


NODE = "gpu31"


class Poster:
    """A node posting chained gpu.usage events."""

    def __init__(self, client: CollectorClient) -> None:
        self.client = client
        self.seq, self.prev = 0, GENESIS_PREV

    def post(self, items: list[dict[str, Any]]) -> None:
        events, ts = [], format_timestamp(datetime.now(UTC))
        for fields in items:
            self.seq += 1
            event = build_event(REGISTRY["gpu.usage"], NODE, self.seq, self.prev, ts, fields)
            self.prev = event["hash"]
            events.append(event)
        status, body = self.client.post("/v1/events", {"node": NODE, "events": events})
        assert status == 200 and body["acked_seq"] == self.seq, body


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[SitePki, CollectorProcess, Path]]:
    pki = SitePki(tmp_path / "pki")
    export = tmp_path / "export.jsonl"
    proc = CollectorProcess(tmp_path / "c", pki, collector={"jsonl_path": str(export)})
    proc.start()
    yield pki, proc, export
    proc.stop()


def anomalies(auditor: CollectorClient) -> list[dict[str, Any]]:
    status, body = auditor.get("/v1/events", code="anomaly.usage", limit=1000)
    assert status == 200, body
    return list(body["events"])


def test_the_collector_flags_a_summary_far_from_the_users_baseline_and_exports_it(
        collector: tuple[SitePki, CollectorProcess, Path]) -> None:
    pki, proc, export = collector
    node = CollectorClient(proc.url, pki.context("node", NODE))
    auditor = CollectorClient(proc.url, pki.context("auditor", "carol"))
    try:
        poster = Poster(node)
        poster.post(history("alice", 25, random.Random(4)))
        time.sleep(1.5)
        assert anomalies(auditor) == []
        night = usage("alice", 900, busy_h=5, start=DAY.replace(hour=0), kwh=3.0)
        poster.post([night])
        wait_for(lambda: bool(anomalies(auditor)), 30, "an anomaly.usage event")
        found = anomalies(auditor)
        figures = {e["figure"] for e in found}
        assert "offpeak_busy_hours" in figures, found
        event = next(e for e in found if e["figure"] == "offpeak_busy_hours")
        assert (event["user"], event["job_id"], event["source_node"]) == ("alice", "900", NODE)
        assert event["severity"] == "warning" and event["baseline"] == 0.0
        assert "the usual for user alice is 0.00" in event["reason"]
        assert event["node"] == "collector"  # in the collector's own chain
        # The SIEM export has it like every other event.
        wait_for(lambda: "anomaly.usage" in export.read_text(), 30, "the JSON Lines export")
        exported = [json.loads(line) for line in export.read_text().splitlines()]
        assert any(e["code"] == "anomaly.usage" and e["job_id"] == "900" for e in exported)

        # Baselines are relearned after a restart; nothing is judged twice.
        before = len(anomalies(auditor))
        proc.stop()
        proc.start()
        node.close()
        auditor.close()
        node = CollectorClient(proc.url, pki.context("node", NODE))
        auditor = CollectorClient(proc.url, pki.context("auditor", "carol"))
        poster.client = node
        poster.post([usage("alice", 901, busy_h=2, start=DAY.replace(hour=11))])
        time.sleep(1.5)
        assert len(anomalies(auditor)) == before
        poster.post([usage("alice", 902, busy_h=6, start=DAY.replace(hour=1), kwh=3.0)])
        wait_for(lambda: any(e["job_id"] == "902" for e in anomalies(auditor)), 30,
                 "the anomaly after the restart")
    finally:
        node.close()
        auditor.close()


def test_a_node_cannot_send_anomaly_events(
        collector: tuple[SitePki, CollectorProcess, Path]) -> None:
    pki, proc, _ = collector
    node = CollectorClient(proc.url, pki.context("node", NODE))
    try:
        fields = {"source_node": NODE, "job_id": "1", "user": "alice", "figure": "busy_hours",
                  "value": 1.0, "baseline": 1.0, "score": 0.0, "reason": "forged"}
        event = build_event(REGISTRY["anomaly.usage"], NODE, 1, GENESIS_PREV,
                            format_timestamp(datetime.now(UTC)), fields)
        status, body = node.post("/v1/events", {"node": NODE, "events": [event]})
        assert status in (400, 403), body
    finally:
        node.close()
