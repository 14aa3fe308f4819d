"""Exactly once under fire: stream events while the collector is SIGKILLed."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from ztgpu.audit.events import verify_chain
from ztgpu.audit.forwarder import Forwarder
from ztgpu.audit.spool import Spool
from ztgpu.collector.store import open_store
from ztgpu.testing.collector_process import CollectorProcess, SitePki
from ztgpu.trust.pki import client_context, sign


def fill(spool: Spool, count: int) -> None:
    gpus = [{"index": i, "uuid": f"GPU-{i}", "minor": i} for i in range(4)]
    for start in range(0, count, 1000):
        spool.append_many([("job.grant", {"job_id": str(start + i), "uid": 1000,
                                          "user": "alice", "gpus": gpus,
                                          "outcome": "granted"})
                           for i in range(min(1000, count - start))])


@pytest.mark.parametrize(("store", "count"), [("sqlite", 100_000), ("postgres", 20_000)])
def test_stream_survives_collector_sigkill_exactly_once(
    tmp_path: Path, request: pytest.FixtureRequest, store: str, count: int
) -> None:
    dsn = request.getfixturevalue("postgres_dsn") if store == "postgres" else None
    pki = SitePki(tmp_path / "pki")
    collector = CollectorProcess(tmp_path / "c", pki, store=store, dsn=dsn).start()
    cert, key = pki.issue("node", "gpu01")
    spool = Spool.open(tmp_path / "spool.db", "gpu01")
    fill(spool, count)
    forwarder = Forwarder(spool, url=collector.url,
                          context=client_context(pki.ca_cert, cert, key), batch_max=1000,
                          retry_min_s=0.05, retry_max_s=0.5, timeout_s=10,
                          keep_acked=count, checkpoint_interval_s=3600,
                          sign=lambda data: sign(key, data))
    kills = 0
    rng = random.Random(7)
    forwarder.start()
    try:
        deadline = time.monotonic() + 300
        while spool.acked_seq() < count and time.monotonic() < deadline:
            if kills < 4 and spool.acked_seq() > kills * count // 5:
                time.sleep(rng.uniform(0.0, 0.3))  # land inside a batch, not between
                collector.kill()
                kills += 1
                collector.start()
            time.sleep(0.02)
        assert spool.acked_seq() == count, f"only {spool.acked_seq()} of {count} acknowledged"
    finally:
        forwarder.stop()
        collector.stop()
    assert kills == 4
    # Read the store directly: each event exactly once, chain intact, no gap.
    opened = open_store(store, own_node="collector", sqlite_path=tmp_path / "c" / "audit.db",
                        dsn=dsn)
    try:
        summary = {n["node"]: n for n in opened.nodes()}["gpu01"]
        assert (summary["events"], summary["head_seq"], summary["first_seq"]) == (count, count, 1)
        stored: list[dict[str, Any]] = []
        while len(stored) < count:
            stored.extend(opened.chain("gpu01", len(stored), 10_000))
        assert verify_chain(stored).ok
        assert stored == spool.read(limit=count)
        own = opened.chain("collector", 0, 10_000)
        assert not [e for e in own if e["code"] in ("audit.gap", "audit.chain_broken")]
        assert [e["code"] for e in own].count("collector.start") == 5
    finally:
        opened.close()
        spool.close()
