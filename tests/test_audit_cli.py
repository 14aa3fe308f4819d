"""The auditors' view: `ztgpu audit trail/verify/export` against a real collector.

A real ``ztgpu-collectord`` process (SQLite store, mutual TLS 1.3) is fed by
node clients posting real spool events; the CLI reads it back with an
auditor certificate. Tampering tests edit the collector's SQLite file
directly, as an intruder with database access would, each on its own
collector.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ztgpu.audit.client import AuditClient, CollectorError, EventQuery, parse_time
from ztgpu.audit.events import canonical_bytes, checkpoint_message, event_hash, format_timestamp
from ztgpu.audit.spool import Spool
from ztgpu.cli.main import main
from ztgpu.collector.store import Incoming, SqliteStore
from ztgpu.errors import UsageError
from ztgpu.testing.collector_process import (
    CollectorClient,
    CollectorProcess,
    SitePki,
    free_port,
)
from ztgpu.trust import pki

PAGE = 50  # the collector's largest page in these tests


class StepClock:
    """A spool clock the test sets before each append."""

    def __init__(self, now: datetime) -> None:
        self.time = now

    def now(self) -> datetime:
        return self.time


def gpu(index: int) -> dict[str, Any]:
    return {"index": index, "uuid": f"GPU-{index:08d}-0000-0000-0000-000000000000",
            "minor": index + 10}


def access(job: str, uid: int, user: str, gpus: Sequence[int]) -> dict[str, Any]:
    return {"job_id": job, "uid": uid, "user": user, "gpus": [gpu(i) for i in gpus]}


@dataclass
class Site:
    """A running collector, its PKI, node identities and what the nodes posted."""

    pki: SitePki
    collector: CollectorProcess
    base: Path
    auditor: tuple[Path, Path]
    nodes: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    posted: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def conn_args(self, cert: tuple[Path, Path] | None = None) -> list[str]:
        cert_path, key_path = cert or self.auditor
        return ["--collector", self.collector.url, "--cert", str(cert_path),
                "--key", str(key_path), "--ca-cert", str(self.pki.ca_cert)]

    def node_client(self, node: str) -> CollectorClient:
        if node not in self.nodes:
            self.nodes[node] = self.pki.issue("node", node)
        cert, key = self.nodes[node]
        return CollectorClient(self.collector.url, pki.client_context(self.pki.ca_cert, cert, key))

    def auditor_client(self, page_size: int | None = None) -> AuditClient:
        cert, key = self.auditor
        return AuditClient(self.collector.url, pki.client_context(self.pki.ca_cert, cert, key),
                           page_size=page_size)

    def spool_events(self, node: str,
                     items: Sequence[tuple[datetime, str, Mapping[str, Any]]]
                     ) -> list[dict[str, Any]]:
        """Append ``(ts, code, fields)`` to ``node``'s spool; return the new events."""
        clock = StepClock(items[0][0])
        spool = Spool.open(self.base / "spools" / f"{node}.db", node, clock)
        try:
            head, _ = spool.head()
            for when, code, fields in items:
                clock.time = when
                spool.append(code, **fields)
            return spool.read(after_seq=head, limit=1_000_000)
        finally:
            spool.close()

    def post(self, node: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        client = self.node_client(node)
        try:
            status, body = client.post("/v1/events", {"node": node, "events": events})
        finally:
            client.close()
        assert status == 200, body
        self.posted.setdefault(node, []).extend(events)
        return dict(body)

    def checkpoint(self, node: str, event: Mapping[str, Any]) -> None:
        """Sign ``event`` as ``node``'s chain head and post the checkpoint."""
        payload = {"node": node, "seq": event["seq"], "hash": event["hash"],
                   "ts": format_timestamp(datetime.now(UTC))}
        sig = pki.sign(self.nodes[node][1], checkpoint_message(payload))
        client = self.node_client(node)
        try:
            status, body = client.post("/v1/checkpoints",
                                       {**payload, "sig": base64.b64encode(sig).decode()})
        finally:
            client.close()
        assert status == 200, body

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        """The collector's SQLite file, opened as an intruder would (autocommit)."""
        conn = sqlite3.connect(self.collector.base / "audit.db", isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()


def start_site(base: Path, **collector: Any) -> Site:
    site_pki = SitePki(base / "pki")
    proc = CollectorProcess(base / "collector", site_pki, collector=collector or None).start()
    auditor = site_pki.issue("auditor", "carol")
    return Site(site_pki, proc, base, auditor)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------- shared site

T0 = (datetime.now(UTC) - timedelta(hours=2)).replace(microsecond=0)
FILLER = 130
LONG_REASON = 'uid 1002 does not own job 4243, "spoofed", header\nforged; ' + "x" * 80


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One collector with two nodes: job 4242 (alice) on both, job 4243 (bob) on gpu02,
    a refused request and 130 filler events on gpu01, and a checkpoint per node."""
    s = start_site(tmp_path_factory.mktemp("audit"), max_page_events=PAGE)
    try:
        start = {"version": "1.0", "gpu_backend": "simulated", "gpus": [gpu(i) for i in range(4)]}
        gpu01 = s.spool_events("gpu01", [
            (at(0), "agent.start", start),
            (at(10), "job.grant", {**access("4242", 1001, "alice", [0, 1]),
                                   "outcome": "granted"}),
            (at(30), "job.release", {**access("4242", 1001, "alice", [0, 1]),
                                     "outcome": "released"}),
            (at(45), "job.refused", {"job_id": "4243", "user": "mallory", "outcome": "refused",
                                     "reason": LONG_REASON}),
            *[(at(100 + i), "hook.error", {"hook": "prolog", "reason": f"filler {i}"})
              for i in range(FILLER)],
        ])
        gpu02 = s.spool_events("gpu02", [
            (at(1), "agent.start", start),
            (at(11), "job.grant", {**access("4242", 1001, "alice", [2]), "outcome": "granted"}),
            (at(20), "isolation.verified", {**access("4242", 1001, "alice", [2]),
                                            "probe": "open"}),
            (at(31), "job.release", {**access("4242", 1001, "alice", [2]),
                                     "outcome": "released"}),
            (at(40), "job.grant", {**access("4243", 1002, "bob", [0]), "outcome": "granted"}),
            (at(50), "job.release", {**access("4243", 1002, "bob", [0]),
                                     "outcome": "released"}),
        ])
        # gpu01 in two batches, as a forwarder would send them.
        s.post("gpu01", gpu01[:60])
        s.post("gpu01", gpu01[60:])
        s.post("gpu02", gpu02)
        s.checkpoint("gpu01", gpu01[-1])
        s.checkpoint("gpu02", gpu02[-1])
        yield s
    finally:
        s.collector.stop()


def timeline(events: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(events, key=lambda e: (e["ts"], e["node"], e["seq"]))


def all_posted(site: Site) -> list[dict[str, Any]]:
    return timeline([e for events in site.posted.values() for e in events])


# ------------------------------------------------------------------ trail


def test_trail_table_shows_both_nodes_of_a_job_in_time_order(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit", "trail", "--job", "4242", *site.conn_args())
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "NODE", "EVENT", "USER", "GPUS", "OUTCOME", "REASON"]
    rows = [line.split() for line in lines[1:]]
    # time is two words (date, clock): node is the third
    assert [(r[2], r[3]) for r in rows] == [
        ("gpu01", "job.grant"), ("gpu02", "job.grant"), ("gpu02", "isolation.verified"),
        ("gpu01", "job.release"), ("gpu02", "job.release")]
    assert rows[0][:2] == [at(10).strftime("%Y-%m-%d"), at(10).strftime("%H:%M:%S.000Z")]
    assert [r[4:7] for r in rows] == [["alice", "0,1", "granted"], ["alice", "2", "granted"],
                                      ["alice", "2", "-"], ["alice", "0,1", "released"],
                                      ["alice", "2", "released"]]
    # columns are aligned: every row starts its NODE column at the same offset
    offset = lines[0].index("NODE")
    assert all(line[offset:].startswith("gpu0") for line in lines[1:])


def test_trail_json_is_the_full_events_in_timeline_order(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit", "trail", "--job", "4242", "--format", "json",
                         *site.conn_args())
    assert code == 0, err
    got = json.loads(out)
    expected = [e for e in all_posted(site) if e.get("job_id") == "4242"]
    assert len(expected) == 5
    assert got == expected  # every field, hash included


def test_trail_csv_has_full_values_and_table_truncates(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit", "trail", "--job", "4243", "--format", "csv",
                         *site.conn_args())
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["node"], r["event"], r["user"], r["gpus"], r["outcome"]) for r in rows] == [
        ("gpu02", "job.grant", "bob", "0", "granted"),
        ("gpu01", "job.refused", "mallory", "-", "refused"),
        ("gpu02", "job.release", "bob", "0", "released")]
    assert rows[0]["time"] == format_timestamp(at(40))
    assert rows[1]["reason"] == LONG_REASON  # the newline and quotes survive

    code, out, _ = run(capsys, "audit", "trail", "--job", "4243", *site.conn_args())
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4  # header + 3: the newline in the reason did not split a row
    refused = next(line for line in lines if "job.refused" in line)
    assert "\\n" in refused and "\n" not in refused
    assert refused.endswith("…") and "x" * 80 not in refused


@pytest.mark.parametrize(("filters", "expected"), [
    (["--user", "bob"], [("gpu02", "job.grant"), ("gpu02", "job.release")]),
    (["--node", "gpu02", "--job", "4242"],
     [("gpu02", "job.grant"), ("gpu02", "isolation.verified"), ("gpu02", "job.release")]),
    (["--code", "job.grant"],
     [("gpu01", "job.grant"), ("gpu02", "job.grant"), ("gpu02", "job.grant")]),
    (["--since", format_timestamp(at(25)).replace(".000000", ""),
      "--until", format_timestamp(at(35))],
     [("gpu01", "job.release"), ("gpu02", "job.release")]),
    # an offset is converted to UTC: 12:00:30+01:00 is 11:00:30Z
    (["--job", "4242",
      "--since", (at(30) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+01:00")],
     [("gpu01", "job.release"), ("gpu02", "job.release")]),
    (["--job", "4242", "--since", "3h"],
     [("gpu01", "job.grant"), ("gpu02", "job.grant"), ("gpu02", "isolation.verified"),
      ("gpu01", "job.release"), ("gpu02", "job.release")]),
    (["--job", "4242", "--since", "1h"], []),
    (["--job", "4242", "--until", "1h", "--since", "1d"],
     [("gpu01", "job.grant"), ("gpu02", "job.grant"), ("gpu02", "isolation.verified"),
      ("gpu01", "job.release"), ("gpu02", "job.release")]),
])
def test_trail_filters_narrow_the_result(site: Site, capsys: pytest.CaptureFixture[str],
                                         filters: list[str],
                                         expected: list[tuple[str, str]]) -> None:
    code, out, err = run(capsys, "audit", "trail", *filters, "--format", "json",
                         *site.conn_args())
    assert code == 0, err
    assert [(e["node"], e["code"]) for e in json.loads(out)] == expected


def test_paging_follows_the_cursor_across_pages(site: Site,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    expected = [e for e in all_posted(site) if e["node"] == "gpu01"]
    assert 2 * PAGE < len(expected) < 3 * PAGE
    with site.auditor_client(page_size=PAGE) as client:
        got = list(client.events(EventQuery(node="gpu01")))
        assert client.requests == 3  # 50 + 50 + 34, the last one without a cursor
        chain = list(client.chain("gpu01"))
        assert client.requests == 3 + 4  # 50 + 50 + 34 + an empty page
    assert got == expected
    assert chain == expected
    with site.auditor_client(page_size=PAGE + 1) as client, pytest.raises(
            CollectorError, match=f"400 Bad Request: limit must be an integer from 1 to {PAGE}"):
        next(client.events(EventQuery(node="gpu01")))
    code, out, _ = run(capsys, "audit", "trail", "--node", "gpu01", "--format", "csv",
                       *site.conn_args())
    assert code == 0
    assert [r["time"] for r in csv.DictReader(io.StringIO(out))] == [e["ts"] for e in expected]


# ----------------------------------------------------------------- verify


def test_verify_ok_on_an_intact_store(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit", "verify", *site.conn_args())
    assert code == 0, out + err
    lines = out.splitlines()
    n1, n2 = len(site.posted["gpu01"]), len(site.posted["gpu02"])
    assert f"gpu01: OK {n1} events (seq 1-{n1}), 1 checkpoint verified, last signed seq {n1}" \
        in lines
    assert f"gpu02: OK {n2} events (seq 1-{n2}), 1 checkpoint verified, last signed seq {n2}" \
        in lines
    own = [line for line in lines if line.startswith("collector: OK ")]
    assert len(own) == 1 and own[0].endswith("no checkpoints")
    own_events = int(own[0].split()[2])
    assert lines[-1] == f"OK: 3 chains, {n1 + n2 + own_events} events verified"


def test_verify_reads_the_connection_from_the_config(
        site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = site.auditor
    config = tmp_path / "ztgpu.yaml"
    config.write_text(json.dumps({
        "audit": {"collector_url": site.collector.url},
        "tls": {"ca_cert": str(site.pki.ca_cert), "cert": str(cert), "key": str(key)}}))
    code, out, err = run(capsys, "--config", str(config), "audit", "verify")
    assert code == 0, err
    assert out.splitlines()[-1].startswith("OK: 3 chains, ")


def test_verify_names_an_edited_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = start_site(tmp_path)
    try:
        events = site.spool_events("gpu01", [
            (at(i), "job.grant", {**access(str(100 + i), 1001, "alice", [0]),
                                  "outcome": "granted"}) for i in range(20)])
        site.post("gpu01", events)
        code, out, _ = run(capsys, "audit", "verify", *site.conn_args())
        assert code == 0, out
        with site.db() as db:
            (body,) = db.execute("SELECT body FROM events WHERE node = 'gpu01' AND seq = 7"
                                 ).fetchone()
            edited = {**json.loads(body), "user": "bob"}
            db.execute("UPDATE events SET body = ? WHERE node = 'gpu01' AND seq = 7",
                       (canonical_bytes(edited).decode(),))
        code, out, _ = run(capsys, "audit", "verify", *site.conn_args())
        assert code == 1
        lines = out.splitlines()
        assert "gpu01: BROKEN at seq 7: hash mismatch: the event was altered" in lines
        assert any(line.startswith("collector: OK ") for line in lines)
        assert lines[-1].startswith("FAILED: 1 of 2 chains broken (gpu01)")
    finally:
        site.collector.stop()


def rehash_from(db: sqlite3.Connection, node: str, seq: int, edit: dict[str, Any]) -> str:
    """Edit ``node``'s event ``seq`` and re-chain it and every later one; returns its hash."""
    rows = db.execute("SELECT seq, body FROM events WHERE node = ? AND seq >= ? ORDER BY seq",
                      (node, seq)).fetchall()
    prev, first_hash = None, ""
    for row_seq, body in rows:
        event = json.loads(body)
        if row_seq == seq:
            event.update(edit)
        else:
            event["prev"] = prev
        prev = event_hash(event)
        first_hash = first_hash or prev
        db.execute("UPDATE events SET body = ?, hash = ?, prev = ? WHERE node = ? AND seq = ?",
                   (canonical_bytes(event).decode(), prev, event["prev"], node, row_seq))
    db.execute("UPDATE heads SET hash = ? WHERE node = ?", (prev, node))
    return first_hash


def test_verify_catches_a_consistently_rehashed_edit_by_its_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = start_site(tmp_path)
    try:
        events = site.spool_events("gpu01", [
            (at(i), "job.grant", {**access(str(100 + i), 1001, "alice", [0]),
                                  "outcome": "granted"}) for i in range(30)])
        site.post("gpu01", events)
        site.checkpoint("gpu01", events[24])  # the node vouched for seq 25
        with site.db() as db:
            db.execute("BEGIN IMMEDIATE")
            rehash_from(db, "gpu01", 12, {"user": "bob", "uid": 1002})
            (stored_25,) = db.execute("SELECT hash FROM events WHERE node = 'gpu01' AND "
                                      "seq = 25").fetchone()
            db.execute("COMMIT")
        # the chain alone is intact again: only the signature can tell
        with site.auditor_client() as client:
            from ztgpu.audit.events import verify_chain
            chain = list(client.chain("gpu01"))
        assert verify_chain(chain).ok and chain[11]["user"] == "bob"

        code, out, _ = run(capsys, "audit", "verify", *site.conn_args())
        assert code == 1
        assert (f"gpu01: BROKEN: checkpoint seq 25 signed hash {events[24]['hash'][:8]}… "
                f"but the stored event has {stored_25[:8]}…") in out.splitlines()
        assert "BROKEN at seq" not in out
    finally:
        site.collector.stop()


def test_verify_reports_deleted_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = start_site(tmp_path)
    try:
        for node in ("gpu01", "gpu02"):
            site.post(node, site.spool_events(node, [
                (at(i), "hook.error", {"hook": "prolog", "reason": f"r{i}"}) for i in range(10)]))
        with site.db() as db:
            db.execute("DELETE FROM events WHERE node = 'gpu01' AND seq = 7")
            db.execute("DELETE FROM events WHERE node = 'gpu02' AND seq = 10")
        code, out, _ = run(capsys, "audit", "verify", *site.conn_args())
        assert code == 1
        lines = out.splitlines()
        assert ("gpu01: BROKEN at seq 7: seq 7 missing and no audit.gap records it "
                "(deleted from the store?)") in lines
        assert ("gpu02: BROKEN at seq 10: seq 10 missing: the collector's head is seq 10 "
                "(deleted from the store?)") in lines
        assert lines[-1].startswith("FAILED: 2 of 3 chains broken (gpu01, gpu02)")
    finally:
        site.collector.stop()


def test_verify_reports_recorded_gaps_apart_from_broken_links(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = start_site(tmp_path)
    try:
        def filler(node: str, n: int) -> list[dict[str, Any]]:
            return site.spool_events(node, [
                (at(i), "hook.error", {"hook": "epilog", "reason": f"r{i}"}) for i in range(n)])

        gpu03 = filler("gpu03", 20)
        site.post("gpu03", gpu03[:10])
        assert site.post("gpu03", gpu03[14:])["accepted"] == 6  # seqs 11-14 lost on the node
        site.post("gpu04", filler("gpu04", 8)[3:])  # the node pruned 1-3 before sending
        # A node cannot excuse a deletion by forging an audit.gap: the collector
        # refuses such events from nodes, and verify ignores gap records that
        # are not in a collector's own chain even if one got into the store.
        site.post("gpu06", filler("gpu06", 5))
        forged = site.spool_events("gpu05", [(at(1), "audit.gap", {
            "source_node": "gpu06", "expected_seq": 3, "received_seq": 4})])
        client = site.node_client("gpu05")
        try:
            status, _ = client.post("/v1/events", {"node": "gpu05", "events": forged})
        finally:
            client.close()
        assert status == 403
        store = SqliteStore(site.collector.base / "audit.db", "collector")
        try:
            assert store.ingest("gpu05", [Incoming.from_event(e, canonical_bytes(e))
                                          for e in forged]).ok
        finally:
            store.close()
        with site.db() as db:
            db.execute("DELETE FROM events WHERE node = 'gpu06' AND seq = 3")

        with site.auditor_client() as client:
            from ztgpu.audit.collector_verify import verify_collector
            report = verify_collector(client, pki.load_cert(site.pki.ca_cert))
        assert [(g.source_node, g.expected_seq, g.received_seq) for g in report.recorded_gaps] \
            == [("gpu03", 11, 15), ("gpu04", 1, 4)]
        assert report.chain("gpu03").status == "INCOMPLETE"
        assert report.chain("gpu03").ranges == [(1, 10), (15, 20)]
        assert report.chain("gpu06").status == "BROKEN"
        assert not report.ok

        code, out, _ = run(capsys, "audit", "verify", *site.conn_args())
        assert code == 1
        lines = out.splitlines()
        assert any(line.startswith("gpu03: recorded gap: seqs 11-14 never reached the "
                                   "collector (audit.gap collector seq ") for line in lines)
        assert "gpu03: INCOMPLETE 16 events (seq 1-10, 15-20), no checkpoints" in lines
        assert any(line.startswith("gpu04: recorded gap: seqs 1-3 never") for line in lines)
        assert "gpu04: INCOMPLETE 5 events (seq 4-8), no checkpoints" in lines
        assert ("gpu06: BROKEN at seq 3: seq 3 missing and no audit.gap records it "
                "(deleted from the store?)") in lines
        assert not any(line.startswith(("gpu03: BROKEN", "gpu04: BROKEN")) for line in lines)
        assert lines[-1].startswith("FAILED: 1 of 5 chains broken (gpu06); 2 of 5 chains with "
                                    "recorded gaps (gpu03, gpu04)")
    finally:
        site.collector.stop()


# ----------------------------------------------------------------- export


def test_export_writes_a_time_range_as_json_lines(
        site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "out" / "audit.jsonl"
    out_file.parent.mkdir()
    since, until = format_timestamp(at(10)), format_timestamp(at(120))
    code, out, err = run(capsys, "audit", "export", "--since", since, "--until", until,
                         "-o", str(out_file), *site.conn_args())
    assert (code, out) == (0, ""), err
    expected = [e for e in all_posted(site) if since <= e["ts"] < until]
    assert len(expected) == 3 + 5 + 20  # job events of gpu01 and gpu02, 20 fillers
    assert err.strip() == f"exported {len(expected)} events to {out_file}"
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o640
    assert os.listdir(out_file.parent) == ["audit.jsonl"]  # no temporary file left
    raw = out_file.read_bytes().splitlines()
    assert [json.loads(line) for line in raw] == expected
    assert raw == [json.dumps(e, sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False).encode() for e in expected]

    # To stdout, through the installed command: the same bytes.
    proc = subprocess.run([sys.executable, "-m", "ztgpu.cli.main", "audit", "export",
                           "--since", since, "--until", until, *site.conn_args()],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == out_file.read_bytes()
    assert proc.stderr.decode().strip() == f"exported {len(expected)} events"


def test_export_without_a_range_has_every_event(
        site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "all.jsonl"
    with site.auditor_client() as client:
        before = sum(n.events for n in client.nodes())
        code, _, err = run(capsys, "audit", "export", "-o", str(out_file), *site.conn_args())
        after = sum(n.events for n in client.nodes())  # the collector may record meanwhile
    assert code == 0, err
    exported = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert before <= len(exported) <= after
    assert err.strip() == f"exported {len(exported)} events to {out_file}"
    nodes = {e["node"] for e in exported}
    assert nodes == {"gpu01", "gpu02", "collector"}
    assert [e for e in exported if e["node"] != "collector"] == all_posted(site)


# ------------------------------------------------------- access and errors


def test_a_node_certificate_cannot_read_the_audit_api(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit", "verify", *site.conn_args(site.nodes["gpu01"]))
    assert code == 1 and out == ""
    assert "403" in err
    assert "a node certificate (gpu01) may not use GET /v1/nodes" in err
    assert "use an auditor certificate" in err


def test_the_api_is_read_only_for_auditors(site: Site) -> None:
    cert, key = site.auditor
    client = CollectorClient(site.collector.url, pki.client_context(site.pki.ca_cert, cert, key))
    try:
        event = site.posted["gpu01"][-1]
        status, body = client.post("/v1/events", {"node": "carol", "events": [event]})
        assert status == 403
        assert "auditor certificate (carol) may not use POST /v1/events" in body["error"]
        for method in ("PUT", "DELETE"):
            for path in ("/v1/events", "/v1/chain", "/v1/checkpoints"):
                status, _ = client.request(method, path, b"{}",
                                           {"Content-Type": "application/json"})
                assert (method, path, status) == (method, path, 405)
        status, body = client.get("/v1/nodes")
        assert status == 200
        assert {n["node"]: n["head_seq"] for n in body["nodes"]}["gpu01"] == \
            len(site.posted["gpu01"])  # nothing of the above was stored
    finally:
        client.close()


def test_unreachable_collector_and_certificate_problems_are_named(
        site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = site.auditor
    url = f"https://127.0.0.1:{free_port()}"
    code, _, err = run(capsys, "audit", "trail", "--job", "1", "--collector", url,
                       "--cert", str(cert), "--key", str(key), "--ca-cert", str(site.pki.ca_cert))
    assert code == 1
    assert f"cannot reach the collector at {url}: connection refused" in err
    (tmp_path / "export").mkdir()
    code, _, err = run(capsys, "audit", "export", "-o", str(tmp_path / "export" / "x.jsonl"),
                       "--collector", url, *site.conn_args()[2:])
    assert code == 1 and f"cannot reach the collector at {url}" in err
    assert os.listdir(tmp_path / "export") == []  # the temporary file is gone

    other = SitePki(tmp_path / "other")
    code, _, err = run(capsys, "audit", "verify", *site.conn_args()[:6],
                       "--ca-cert", str(other.ca_cert))
    assert code == 1
    assert f"TLS with the collector at {site.collector.url} failed" in err
    assert "is --ca-cert the site CA" in err

    # An auditor certificate of another CA: the collector drops the connection.
    code, _, err = run(capsys, "audit", "verify",
                       *site.conn_args(other.issue("auditor", "eve")))
    assert code == 1
    assert f"the collector at {site.collector.url} closed the connection" in err
    assert "was the client certificate refused?" in err

    # An expired one is named before connecting.
    expired = site.pki.issue("auditor", "old", days=1,
                             now=datetime.now(UTC) - timedelta(days=2))
    code, _, err = run(capsys, "audit", "verify", *site.conn_args(expired))
    assert code == 1
    assert f"certificate {expired[0]} expired at " in err and "ztgpu pki renew" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["audit", "trail", "--job", "4242", "--since", "yesterday"], "--since 'yesterday'"),
    (["audit", "trail", "--job", "4242", "--until", "2026-02-30"], "--until '2026-02-30'"),
    (["audit", "export", "--since", "2026-11-26T12:00:00"], "--since"),
    (["audit", "trail", "--job", "42x"], "--job '42x'"),
    (["audit", "trail", "--since", "1h", "--until", "2h"], "is not after --since"),
    (["audit", "trail", "--format", "table"], "audit trail needs a filter"),
    (["audit", "verify", "--local", "--collector", "https://x:1"], "drop --collector"),
])
def test_bad_arguments_exit_2(site: Site, capsys: pytest.CaptureFixture[str],
                              argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv, *site.conn_args()[2:])
    assert (code, out) == (2, "")
    assert message in err


def test_missing_connection_settings_name_what_to_set(
        site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ztgpu.yaml"
    config.write_text(json.dumps({"tls": {"ca_cert": str(site.pki.ca_cert)}}))
    cert, key = site.auditor
    code, _, err = run(capsys, "--config", str(config), "audit", "verify")
    assert code == 2 and "audit.collector_url" in err and "--collector" in err
    code, _, err = run(capsys, "--config", str(config), "audit", "verify",
                       "--collector", site.collector.url)
    assert code == 2 and "tls.cert and tls.key" in err
    code, _, err = run(capsys, "--config", str(config), "audit", "export",
                       "--collector", site.collector.url, "--cert", str(cert))
    assert code == 2 and "--cert and --key go together" in err
    code, _, err = run(capsys, "--config", str(config), "audit", "verify",
                       "--collector", "http://127.0.0.1:1", "--cert", str(cert),
                       "--key", str(key))
    assert code == 2 and "TLS is mandatory" in err


def test_time_arguments() -> None:
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    assert parse_time("2026-11-26T12:00:00Z", "--since") == "2026-11-26T12:00:00.000000Z"
    assert parse_time("2026-11-26T12:00:00.5Z", "--since") == "2026-11-26T12:00:00.500000Z"
    assert parse_time("2026-11-26T13:30:00.123456+01:30", "--since") == \
        "2026-11-26T12:00:00.123456Z"
    assert parse_time("2026-11-26T00:30:00-02:00", "--until") == "2026-11-26T02:30:00.000000Z"
    assert parse_time("2026-11-26", "--since") == "2026-11-26T00:00:00.000000Z"
    assert parse_time("30m", "--since", now=now) == "2026-11-26T11:30:00.000000Z"
    assert parse_time("12h", "--since", now=now) == "2026-11-26T00:00:00.000000Z"
    assert parse_time("7d", "--since", now=now) == "2026-11-19T12:00:00.000000Z"
    for bad in ("", "now", "-5m", "5 m", "2026-11-26T25:00:00Z", "2026-11-26T12:00:00",
                "2026-11-26T12:00:00.1234567Z", "99999999d", "2026-11-26T12:00:00+1:00"):
        with pytest.raises(UsageError, match="--until"):
            parse_time(bad, "--until", now=now)


def test_cli_start_does_not_load_the_audit_client() -> None:
    code = ("import sys; from ztgpu.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('cryptography', 'ztgpu.audit.client', 'aiohttp') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_verify_local_still_checks_this_nodes_spool(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ztgpu.yaml"
    config.write_text(json.dumps({"node": {"name": "gpu09"},
                                  "paths": {"spool_dir": str(tmp_path / "spool")}}))
    spool = Spool.open(tmp_path / "spool" / "events.db", "gpu09")
    try:
        for i in range(5):
            spool.append("hook.error", hook="prolog", reason=f"r{i}")
    finally:
        spool.close()
    code, out, _ = run(capsys, "--config", str(config), "audit", "verify", "--local")
    assert (code, out) == (0, "OK: 5 events, chain intact\n")
    conn = sqlite3.connect(tmp_path / "spool" / "events.db")
    try:
        with conn:
            conn.execute("UPDATE events SET body = replace(body, 'r2', 'r9') WHERE seq = 3")
    finally:
        conn.close()
    code, out, _ = run(capsys, "--config", str(config), "audit", "verify", "--local")
    assert (code, out) == (1, "BROKEN at seq 3: hash mismatch: the event was altered\n")


def _five_event_spool(tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "ztgpu.yaml"
    config.write_text(json.dumps({"node": {"name": "gpu09"},
                                  "paths": {"spool_dir": str(tmp_path / "spool")}}))
    with Spool.open(tmp_path / "spool" / "events.db", "gpu09") as spool:
        for i in range(5):
            spool.append("hook.error", hook="prolog", reason=f"r{i}")
    return config, tmp_path / "spool" / "events.db"


def _delete_rows(db: Path, where: str) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute(f"DELETE FROM events WHERE {where}")
    finally:
        conn.close()


@pytest.mark.parametrize(("where", "message"), [
    ("seq <= 2", "BROKEN at seq 3: the first events are missing: the spool starts at seq 3, "
                 "not 1\n"),
    ("seq = 1", "BROKEN at seq 2: the first events are missing: the spool starts at seq 2, "
                "not 1\n"),
    ("seq >= 4", "BROKEN: the last events are missing: the spool ends at seq 3, its head "
                 "was seq 5\n"),
    ("1 = 1", "BROKEN: every event is missing: the head was seq 5\n"),
])
def test_verify_local_reports_rows_deleted_at_either_end(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, message: str) -> None:
    config, db = _five_event_spool(tmp_path)
    _delete_rows(db, where)
    code, out, _ = run(capsys, "--config", str(config), "audit", "verify", "--local")
    assert (code, out) == (1, message)


def test_events_after_a_truncated_end_continue_the_recorded_head(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, db = _five_event_spool(tmp_path)
    _delete_rows(db, "seq >= 4")
    with Spool.open(db, "gpu09") as spool:
        # The next event is seq 6, chained to the deleted seq 5: the hole stays visible.
        assert spool.append("hook.error", hook="epilog", reason="later")["seq"] == 6
    code, out, _ = run(capsys, "--config", str(config), "audit", "verify", "--local")
    assert code == 1 and out.startswith("BROKEN at seq 6:"), out
