"""The collector's exporters against real receivers: rsyslog over TLS and JSON Lines."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ztgpu.audit.events import GENESIS_PREV, REGISTRY, build_event, format_timestamp
from ztgpu.testing.collector_process import CollectorClient, CollectorProcess, SitePki
from ztgpu.testing.rsyslog import RsyslogReceiver
from ztgpu.testing.slurm_cluster import wait_for


def chained(node: str, count: int) -> list[dict[str, Any]]:
    prev, out = GENESIS_PREV, []
    ts = format_timestamp(datetime.now(UTC))
    for seq in range(1, count + 1):
        event = build_event(REGISTRY["job.grant"], node, seq, prev, ts, {
            "job_id": str(100 + seq), "uid": 1000, "user": "alice", "outcome": "granted",
            "gpus": [{"index": 0, "uuid": "GPU-0", "minor": 0}], "reason": ""})
        prev = event["hash"]
        out.append(event)
    return out


def test_events_reach_rsyslog_and_jsonl_even_across_a_receiver_outage(tmp_path: Path) -> None:
    pki = SitePki(tmp_path / "pki")
    cert, key = pki.issue("service", "siem", dns_names=["localhost"],
                          ip_addresses=["127.0.0.1"])
    receiver = RsyslogReceiver(pki.ca_cert, cert, key)
    receiver.start()
    jsonl = tmp_path / "export" / "events.jsonl"
    collector = CollectorProcess(tmp_path / "c", pki, collector={
        "jsonl_path": str(jsonl),
        "syslog": {"target": f"127.0.0.1:{receiver.port}", "server_name": "localhost"}})
    node: CollectorClient | None = None
    try:
        collector.start()
        node = CollectorClient(collector.url, pki.context("node", "gpu01"))
        events = chained("gpu01", 300)
        assert node.post("/v1/events", {"node": "gpu01", "events": events[:200]})[0] == 200
        lines = receiver.wait_for(201, timeout=30)  # + collector.start
        grants = [line for line in lines if "job.grant" in line]
        assert len(grants) == 200
        assert all(f'seq="{e["seq"]}"' in g and e["hash"] in g
                   for e, g in zip(events[:200], grants, strict=True))

        # The receiver goes away; events keep being stored and are delivered later.
        port = receiver.port
        receiver.stop()
        assert node.post("/v1/events", {"node": "gpu01", "events": events[200:]})[0] == 200
        receiver = RsyslogReceiver(pki.ca_cert, cert, key, port=port)
        receiver.start()
        later = receiver.wait_for(100, timeout=60)
        assert {f'seq="{e["seq"]}"' for e in events[200:]} <= {
            part for line in later for part in line.split() if part.startswith('seq="')}

        def exported() -> list[dict[str, Any]]:
            if not jsonl.exists():
                return []
            return [json.loads(line) for line in jsonl.read_text().splitlines()]

        wait_for(lambda: len([e for e in exported() if e["node"] == "gpu01"]) == 300, 30,
                 "the JSON Lines export")
        assert [e for e in exported() if e["node"] == "gpu01"] == events
    finally:
        if node is not None:
            node.close()
        collector.stop()
        receiver.stop()
