"""The collector's event store: SQLite by default, PostgreSQL for larger sites.

Both back ends share one ingest algorithm (``Store.ingest``) and differ only
in SQL details, so they behave the same; the storage tests run against both.

Guarantees:

* ``ingest`` returns only after the batch is durably committed (SQLite WAL
  with ``synchronous=FULL``; PostgreSQL with its default synchronous commit).
  The returned ``acked_seq`` is the node's stored head: every event of that
  node up to it is in the store.
* A batch is stored whole or not at all. A batch that does not continue the
  node's chain (``prev`` of the next seq is not the stored head's hash, or a
  seq already stored with another hash) is refused and nothing of it is
  stored. Re-sent events that are already stored with the same hash are
  counted as duplicates and ignored (idempotent).
* A batch whose first new seq is beyond head + 1 is stored, and the gap is
  recorded as an ``audit.gap`` event in the collector's own chain, in the
  same transaction.
* The collector's own events (gaps, refusals, start/stop) form their own
  hash chain under the collector's name, stored like any node's.
* Several collectors may share one PostgreSQL database: a node's head row is
  locked (``SELECT ... FOR UPDATE``) for the duration of its batch.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ztgpu.audit.events import (
    GENESIS_PREV,
    build_event,
    canonical_bytes,
    format_timestamp,
    validate_fields,
)
from ztgpu.audit.spool import Clock, SystemClock
from ztgpu.sqldb import (
    Database,
    PostgresDatabase,
    SqliteDatabase,
    StoreError,
    open_database,
)


class Incoming(NamedTuple):
    """One received event, already checked (envelope, registry, hash).

    The field order is the column order of ``events``, so an Incoming is
    inserted as it is (and is cheap to send back from a checking process).
    """

    node: str
    seq: int
    ts: str
    code: str
    job_id: str | None
    user: str | None
    hash: str
    prev: str
    #: Canonical JSON of the event without ``hash`` (what the hash covers).
    body: str

    @classmethod
    def from_event(cls, event: Mapping[str, Any], body: bytes) -> Incoming:
        job_id, user = event.get("job_id"), event.get("user")
        return cls(event["node"], event["seq"], event["ts"], event["code"],
                   job_id if isinstance(job_id, str) else None,
                   user if isinstance(user, str) else None,
                   event["hash"], event["prev"], body.decode("utf-8"))


@dataclass
class IngestResult:
    """What ``Store.ingest`` did with one batch."""

    ok: bool
    acked_seq: int
    accepted: int = 0
    duplicates: int = 0
    #: ``(expected_seq, received_seq)`` for each gap found and recorded.
    gaps: list[tuple[int, int]] = field(default_factory=list)
    problem: str | None = None
    bad_seq: int | None = None


@dataclass(frozen=True)
class EventFilter:
    """Query filters; ``since``/``until`` are RFC 3339 strings (inclusive/exclusive)."""

    node: str | None = None
    job_id: str | None = None
    user: str | None = None
    code: str | None = None
    since: str | None = None
    until: str | None = None


def decode_row(body: str, digest: str) -> dict[str, Any]:
    """Rebuild a stored event from its body and hash."""
    event: dict[str, Any] = json.loads(body)
    event["hash"] = digest
    return event


_COLUMNS = "node, seq, ts, code, job_id, username, hash, prev, body"

# One schema for both back ends (``ztgpu.sqldb`` fills in the integer types).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id {id_column},
    node TEXT NOT NULL, seq {int} NOT NULL, ts TEXT NOT NULL, code TEXT NOT NULL,
    job_id TEXT, username TEXT, hash TEXT NOT NULL, prev TEXT NOT NULL, body TEXT NOT NULL,
    UNIQUE (node, seq)
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts, node, seq);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_user ON events (username) WHERE username IS NOT NULL;
CREATE TABLE IF NOT EXISTS heads (node TEXT PRIMARY KEY, seq {int} NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    node TEXT NOT NULL, seq {int} NOT NULL, hash TEXT NOT NULL, ts TEXT NOT NULL,
    sig TEXT NOT NULL, cert TEXT NOT NULL, received TEXT NOT NULL, PRIMARY KEY (node, seq)
);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, value {int} NOT NULL)
"""


class Store:
    """Storage-independent logic; subclasses supply connections and a few SQL details.

    Thread-safety: every public method takes the store's lock, so one Store
    may be shared by threads (the service gives writes and reads their own
    Store objects so that queries do not wait for ingestion).
    """

    def __init__(self, db: Database, own_node: str, clock: Clock | None = None) -> None:
        self.db = db
        db.create_schema(_SCHEMA)
        self.own_node = own_node
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self.db.execute(sql, params)

    def _lock_head(self, node: str) -> tuple[int, str]:
        """The node's head, locked until the transaction ends (created if new)."""
        self.db.execute("INSERT INTO heads (node, seq, hash) VALUES (?, 0, ?) "
                        "ON CONFLICT (node) DO NOTHING", (node, GENESIS_PREV))
        rows = self.db.execute("SELECT seq, hash FROM heads WHERE node = ?"  # noqa: S608
                               + self.db.for_update, (node,))
        return int(rows[0][0]), str(rows[0][1])

    def _upsert_head(self, node: str, seq: int, digest: str) -> None:
        self.db.execute("UPDATE heads SET seq = ?, hash = ? WHERE node = ?", (seq, digest, node))

    def _insert_events(self, rows: Sequence[Sequence[Any]]) -> None:
        self.db.insert_rows("events", _COLUMNS, rows)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- ingestion --------------------------------------------------------
    def ingest(self, node: str, items: Sequence[Incoming]) -> IngestResult:
        """Store one node's batch (seq ascending) as described in the module docstring.

        A refused batch comes back with ``ok=False``, ``problem`` and
        ``bad_seq``; nothing of it was stored.
        """
        try:
            with self._lock, self.db.transaction():
                return self._ingest_locked(node, items)
        except _Conflict as conflict:
            return conflict.result

    def _ingest_locked(self, node: str, items: Sequence[Incoming]) -> IngestResult:
        head_seq, head_hash = self._lock_head(node)
        result = IngestResult(ok=True, acked_seq=head_seq)
        if not items:
            return result
        stored = self._stored_hashes(node, items, head_seq)
        rows: list[tuple[Any, ...]] = []
        gap_events: list[dict[str, Any]] = []
        for item in items:
            if item.seq <= head_seq:
                known = stored.get(item.seq)
                if known == item.hash:
                    result.duplicates += 1
                    continue
                why = ("was never stored (inside a recorded gap)" if known is None
                       else "is already stored with a different hash")
                return self._conflict(result, item.seq, f"seq {item.seq} {why}")
            if item.seq == head_seq + 1:
                if item.prev != head_hash:
                    return self._conflict(
                        result, item.seq,
                        f"prev of seq {item.seq} is not the hash of stored seq {head_seq}")
            else:
                result.gaps.append((head_seq + 1, item.seq))
                gap_events.append({"source_node": node, "expected_seq": head_seq + 1,
                                   "received_seq": item.seq})
            if item.node != node:
                raise StoreError(f"batch of node {node!r} holds an event of {item.node!r}")
            rows.append(item)
            head_seq, head_hash = item.seq, item.hash
        if rows:
            self._insert_events(rows)
            self._upsert_head(node, head_seq, head_hash)
        if gap_events:
            self._append_own_locked([("audit.gap", f) for f in gap_events])
        result.accepted = len(rows)
        result.acked_seq = head_seq
        return result

    @staticmethod
    def _conflict(result: IngestResult, seq: int, problem: str) -> IngestResult:
        # Raising rolls the transaction back; the caller sees ok=False.
        raise _Conflict(IngestResult(ok=False, acked_seq=result.acked_seq, problem=problem,
                                     bad_seq=seq))

    def _stored_hashes(
        self, node: str, items: Sequence[Incoming], head_seq: int
    ) -> dict[int, str]:
        low = items[0].seq
        if low > head_seq:
            return {}
        rows = self.db.execute(
            ("SELECT seq, hash FROM events WHERE node = ? AND seq >= ? AND seq <= ?"),
            (node, low, min(head_seq, items[-1].seq)),
        )
        return {int(seq): str(digest) for seq, digest in rows}

    def record(self, code: str, **fields: Any) -> dict[str, Any]:
        """Append one event to the collector's own chain, durably."""
        with self._lock, self.db.transaction():
            return self._append_own_locked([(code, fields)])[-1]

    def _append_own_locked(
        self, items: Iterable[tuple[str, Mapping[str, Any]]]
    ) -> list[dict[str, Any]]:
        seq, prev = self._lock_head(self.own_node)
        ts = format_timestamp(self._clock.now())
        rows, stored = [], []
        for code, fields in items:
            etype = validate_fields(code, fields)
            event = build_event(etype, self.own_node, seq + 1, prev, ts, fields)
            seq, prev = event["seq"], event["hash"]
            rows.append(Incoming.from_event(event, canonical_bytes(event)))
            stored.append(event)
        if rows:
            self._insert_events(rows)
            self._upsert_head(self.own_node, seq, prev)
        return stored

    # -- checkpoints ------------------------------------------------------
    def add_checkpoint(
        self, node: str, seq: int, digest: str, ts: str, sig: str, cert: str
    ) -> str:
        """Store a node-signed chain head; returns "ok", "unknown" or "mismatch".

        "unknown": that seq is not stored yet; "mismatch": the stored event
        at that seq has another hash (nothing is stored then). Re-sending the
        same checkpoint is harmless.
        """
        with self._lock, self.db.transaction():
            rows = self.db.execute(("SELECT hash FROM events WHERE node = ? AND seq = ?"),
                                 (node, seq))
            if not rows:
                return "unknown"
            if rows[0][0] != digest:
                return "mismatch"
            self.db.execute((
                "INSERT INTO checkpoints (node, seq, hash, ts, sig, cert, received) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node, seq) DO NOTHING"),
                (node, seq, digest, ts, sig, cert, format_timestamp(self._clock.now())))
            return "ok"

    def checkpoints(self, node: str) -> list[dict[str, Any]]:
        """A node's checkpoints, oldest first."""
        rows = self._rows("SELECT node, seq, hash, ts, sig, cert, received FROM checkpoints "
                          "WHERE node = ? ORDER BY seq", (node,))
        keys = ("node", "seq", "hash", "ts", "sig", "cert", "received")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # -- queries ----------------------------------------------------------
    def heads(self) -> dict[str, tuple[int, str]]:
        """Every chain's stored head: node -> (seq, hash)."""
        return {str(n): (int(s), str(h))
                for n, s, h in self._rows("SELECT node, seq, hash FROM heads")}

    def nodes(self) -> list[dict[str, Any]]:
        """One summary per chain: head, event count, first and last timestamps."""
        rows = self._rows(
            "SELECT h.node, h.seq, h.hash, count(e.id), min(e.seq), min(e.ts), max(e.ts) "
            "FROM heads h LEFT JOIN events e ON e.node = h.node "
            "GROUP BY h.node, h.seq, h.hash ORDER BY h.node")
        return [{"node": n, "head_seq": int(s), "head_hash": h, "events": int(c),
                 "first_seq": first, "first_ts": t0, "last_ts": t1}
                for n, s, h, c, first, t0, t1 in rows]

    def query(
        self, flt: EventFilter, *, after: tuple[str, str, int] | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Events matching ``flt`` ordered by (ts, node, seq), after a keyset cursor."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("node", flt.node), ("job_id", flt.job_id),
                              ("username", flt.user), ("code", flt.code)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if flt.since is not None:
            where.append("ts >= ?")
            params.append(flt.since)
        if flt.until is not None:
            where.append("ts < ?")
            params.append(flt.until)
        if after is not None:
            where.append("(ts > ? OR (ts = ? AND (node > ? OR (node = ? AND seq > ?))))")
            params.extend([after[0], after[0], after[1], after[1], after[2]])
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._rows(
            f"SELECT body, hash FROM events {clause} ORDER BY ts, node, seq LIMIT ?",  # noqa: S608
            [*params, limit])
        return [decode_row(body, digest) for body, digest in rows]

    def chain(self, node: str, after_seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """A node's events in seq order (for verification)."""
        rows = self._rows("SELECT body, hash FROM events WHERE node = ? AND seq > ? "
                          "ORDER BY seq LIMIT ?", (node, after_seq, limit))
        return [decode_row(body, digest) for body, digest in rows]

    def after_id(self, last_id: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Events in insertion order after ``last_id`` (for exporters)."""
        rows = self._rows("SELECT id, body, hash FROM events WHERE id > ? ORDER BY id LIMIT ?",
                          (last_id, limit))
        return [(int(i), decode_row(body, digest)) for i, body, digest in rows]

    def get_cursor(self, name: str) -> int:
        rows = self._rows("SELECT value FROM cursors WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    def set_cursor(self, name: str, value: int) -> None:
        with self._lock, self.db.transaction():
            self.db.execute(("INSERT INTO cursors (name, value) VALUES (?, ?) "
                                  "ON CONFLICT (name) DO UPDATE SET value = excluded.value"),
                          (name, value))

    def count(self) -> int:
        return int(self._rows("SELECT count(*) FROM events")[0][0])


class _Conflict(Exception):
    def __init__(self, result: IngestResult) -> None:
        super().__init__(result.problem)
        self.result = result


class SqliteStore(Store):
    """The default store: one SQLite file in WAL mode, fsync on every commit."""

    def __init__(self, path: Path, own_node: str, clock: Clock | None = None) -> None:
        self.path = path
        super().__init__(SqliteDatabase(path), own_node, clock)


class PostgresStore(Store):
    """PostgreSQL (psycopg 3) store; several collectors may share one database."""

    def __init__(self, dsn: str, own_node: str, clock: Clock | None = None) -> None:
        super().__init__(PostgresDatabase(dsn), own_node, clock)


def open_store(kind: str, *, own_node: str, sqlite_path: Path | None = None,
               dsn: str | None = None, clock: Clock | None = None) -> Store:
    """Open the configured store (``kind`` "sqlite" or "postgres")."""
    return Store(open_database(kind, sqlite_path=sqlite_path, dsn=dsn), own_node, clock)
