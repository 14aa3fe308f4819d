"""The collector's store: same behaviour on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ztgpu.audit.events import canonical_bytes, verify_chain
from ztgpu.audit.spool import Spool
from ztgpu.collector.store import (
    EventFilter,
    Incoming,
    PostgresStore,
    SqliteStore,
    Store,
    StoreError,
    open_store,
)


class StepClock:
    """A clock that advances one millisecond per reading."""

    def __init__(self) -> None:
        self.t = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        self.t += timedelta(milliseconds=1)
        return self.t


def node_events(tmp: Path, node: str, count: int, tag: str = "r",
                **fields: Any) -> list[dict[str, Any]]:
    """``count`` chained events of ``node`` made by a real spool."""
    with Spool.open(tmp / f"{node}-{count}-{tag}.db", node, StepClock()) as spool:
        for i in range(count):
            extra = fields or {"reason": f"{tag}{i}"}
            spool.append("agent.stop" if not fields else "job.grant", **extra)
        return spool.read(limit=count)


def incoming(events: list[dict[str, Any]]) -> list[Incoming]:
    return [Incoming.from_event(e, canonical_bytes(e)) for e in events]


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        opened: Store = SqliteStore(tmp_path / "audit.db", "collector", StepClock())
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        opened = PostgresStore(dsn, "collector", StepClock())
    yield opened
    opened.close()


def test_batch_is_stored_and_acked_at_the_head(store: Store, tmp_path: Path) -> None:
    events = node_events(tmp_path, "gpu01", 10)
    result = store.ingest("gpu01", incoming(events))
    assert (result.ok, result.acked_seq, result.accepted, result.duplicates) == (True, 10, 10, 0)
    assert store.heads()["gpu01"] == (10, events[-1]["hash"])
    assert store.chain("gpu01") == events
    assert verify_chain(store.chain("gpu01")).ok


def test_resent_events_are_idempotent(store: Store, tmp_path: Path) -> None:
    events = node_events(tmp_path, "gpu01", 10)
    store.ingest("gpu01", incoming(events[:6]))
    again = store.ingest("gpu01", incoming(events))
    assert (again.ok, again.acked_seq, again.accepted, again.duplicates) == (True, 10, 4, 6)
    assert store.count() == 10


def test_same_seq_with_another_hash_is_refused_and_nothing_stored(
    store: Store, tmp_path: Path
) -> None:
    events = node_events(tmp_path, "gpu01", 5)
    store.ingest("gpu01", incoming(events[:3]))
    other = node_events(tmp_path, "gpu01", 5, tag="x")  # a different history, same node
    result = store.ingest("gpu01", incoming(other))
    assert not result.ok
    assert result.bad_seq == 1 and "different hash" in (result.problem or "")
    assert result.acked_seq == 3
    assert store.count() == 3


def test_next_event_must_link_to_the_stored_head(store: Store, tmp_path: Path) -> None:
    events = node_events(tmp_path, "gpu01", 5)
    store.ingest("gpu01", incoming(events[:2]))
    forged = dict(events[2], prev="ab" * 32)
    result = store.ingest("gpu01", [Incoming.from_event(forged, canonical_bytes(forged))])
    assert not result.ok and result.bad_seq == 3
    assert "not the hash of stored seq 2" in (result.problem or "")
    assert store.heads()["gpu01"][0] == 2


def test_gap_is_stored_and_recorded_in_the_collectors_chain(store: Store, tmp_path: Path) -> None:
    events = node_events(tmp_path, "gpu01", 10)
    store.ingest("gpu01", incoming(events[:3]))
    result = store.ingest("gpu01", incoming(events[6:]))
    assert result.ok and result.gaps == [(4, 7)] and result.acked_seq == 10
    gaps = store.query(EventFilter(code="audit.gap"))
    assert [(g["source_node"], g["expected_seq"], g["received_seq"]) for g in gaps] == [
        ("gpu01", 4, 7)]
    assert gaps[0]["node"] == "collector"
    assert verify_chain(store.chain("collector")).ok
    # Filling the gap later is a conflict (those seqs were never stored).
    late = store.ingest("gpu01", incoming(events[3:6]))
    assert not late.ok and "never stored" in (late.problem or "")


def test_collector_records_form_their_own_chain(store: Store) -> None:
    store.record("collector.start", version="1", store="x")
    store.record("audit.refused", peer="10.0.0.1", reason="no client certificate")
    own = store.chain("collector")
    assert [e["seq"] for e in own] == [1, 2]
    assert verify_chain(own).ok


def test_query_filters_and_keyset_paging(store: Store, tmp_path: Path) -> None:
    gpu = [{"index": 0, "uuid": "GPU-1", "minor": 0}]
    a = node_events(tmp_path, "gpu01", 30, job_id="7", uid=1000, user="alice", gpus=gpu,
                    outcome="granted")
    b = node_events(tmp_path, "gpu02", 30, job_id="8", uid=1001, user="bob", gpus=gpu,
                    outcome="granted")
    store.ingest("gpu01", incoming(a))
    store.ingest("gpu02", incoming(b))
    assert len(store.query(EventFilter(job_id="7"), limit=1000)) == 30
    assert {e["user"] for e in store.query(EventFilter(user="bob"))} == {"bob"}
    seen: list[dict[str, Any]] = []
    after = None
    while True:
        page = store.query(EventFilter(), after=after, limit=7)
        seen.extend(page)
        if len(page) < 7:
            break
        after = (page[-1]["ts"], page[-1]["node"], page[-1]["seq"])
    keys = [(e["ts"], e["node"], e["seq"]) for e in seen]
    assert keys == sorted(keys) and len(keys) == 60
    since = a[10]["ts"]
    assert all(e["ts"] >= since for e in store.query(EventFilter(node="gpu01", since=since)))
    assert len(store.query(EventFilter(node="gpu01", since=since))) == 20


def test_checkpoints_must_match_a_stored_event(store: Store, tmp_path: Path) -> None:
    events = node_events(tmp_path, "gpu01", 5)
    store.ingest("gpu01", incoming(events))
    ts = "2026-11-26T12:00:00.000000Z"
    assert store.add_checkpoint("gpu01", 9, "0" * 64, ts, "c2ln", "Y2VydA==") == "unknown"
    assert store.add_checkpoint("gpu01", 5, "1" * 64, ts, "c2ln", "Y2VydA==") == "mismatch"
    assert store.add_checkpoint("gpu01", 5, events[4]["hash"], ts, "c2ln", "Y2VydA==") == "ok"
    assert store.add_checkpoint("gpu01", 5, events[4]["hash"], ts, "c2ln", "Y2VydA==") == "ok"
    assert [c["seq"] for c in store.checkpoints("gpu01")] == [5]


def test_exporter_cursor_and_insertion_order(store: Store, tmp_path: Path) -> None:
    events = node_events(tmp_path, "gpu01", 5)
    store.ingest("gpu01", incoming(events))
    rows = store.after_id(0, 3)
    assert [e["seq"] for _, e in rows] == [1, 2, 3]
    store.set_cursor("sink:x", rows[-1][0])
    assert store.get_cursor("sink:x") == rows[-1][0]
    assert [e["seq"] for _, e in store.after_id(store.get_cursor("sink:x"), 10)] == [4, 5]


def test_concurrent_batches_of_one_node_never_interleave(store: Store, tmp_path: Path) -> None:
    """Two writers resending overlapping ranges: every event once, chain intact."""
    events = node_events(tmp_path, "gpu01", 200)
    batches = [incoming(events[i:i + 50]) for i in range(0, 200, 25)]
    errors: list[BaseException] = []

    def send(order: list[list[Incoming]]) -> None:
        try:
            for batch in order:
                store.ingest("gpu01", batch)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(batches,)),
               threading.Thread(target=send, args=(batches,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.count() == 200
    assert verify_chain(store.chain("gpu01", limit=1000)).ok


def test_sqlite_store_file_is_private(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "sub" / "audit.db", "collector").close()
    assert (tmp_path / "sub" / "audit.db").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o700


def test_open_store_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="needs a path"):
        open_store("sqlite", own_node="c")
    with pytest.raises(StoreError, match="connection string"):
        open_store("postgres", own_node="c")
    with pytest.raises(StoreError, match="unknown store kind"):
        open_store("mysql", own_node="c")


def test_postgres_error_does_not_leak_the_password(postgres_server: Any) -> None:
    dsn = postgres_server.dsn.replace("dbname=", "password=s3cret-value dbname=nope_") + "x"
    with pytest.raises(StoreError) as info:
        PostgresStore(dsn, "collector")
    assert "s3cret-value" not in str(info.value)
