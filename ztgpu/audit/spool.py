"""Durable, hash-chained audit spool for one node (SQLite, stdlib only).

Guarantees:

* An event returned by ``append``/``append_many`` is committed with
  ``synchronous=FULL`` in WAL mode: it survives a crash of the process
  (SIGKILL) and, as far as the disk honours fsync, of the machine. Appends
  from several threads that wait at the same time share one commit.
* ``seq`` is gapless per spool, starting at 1, across reopen, threads and
  processes: the last ``seq``/``hash`` is read and the new row written inside
  one ``BEGIN IMMEDIATE`` transaction.
* Nothing is silently dropped; a write that cannot be made raises
  ``SpoolError``. The only deletion is ``prune_acked``, and it removes only
  events the collector has acknowledged (``mark_acked``), always keeping the
  newest acknowledged event (the chain head the next append continues, and
  the event a checkpoint signs). The seq and hash of the last pruned event
  are kept in ``meta`` so ``verify`` still checks the first remaining link.
* The database file is mode 0600; a parent directory the spool creates is 0700.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from ztgpu.audit.events import (
    GENESIS_PREV,
    SCHEMA_VERSION,
    ChainResult,
    EventError,
    build_event,
    format_timestamp,
    validate_fields,
    verify_chain,
)
from ztgpu.errors import SpoolError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    code TEXT NOT NULL,
    job_id TEXT NULL,
    body TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job_id ON events (job_id);
CREATE INDEX IF NOT EXISTS events_code ON events (code);
"""

_BUSY_TIMEOUT_S = 30.0

# meta keys: the collector's acknowledged position, and the anchor left by pruning
_ACKED_SEQ = "acked_seq"
_PRUNED_SEQ = "pruned_seq"
_PRUNED_HASH = "pruned_hash"
#: The chain head as last written, kept beside the rows: rows deleted at the
#: end (or all of them) show as missing, and new events continue after it.
_HEAD_SEQ = "head_seq"
_HEAD_HASH = "head_hash"


class Clock(Protocol):
    """Source of event timestamps; tests pass a fake."""

    def now(self) -> datetime:
        """Return the current time as a timezone-aware datetime."""
        ...


class SystemClock:
    """The real wall clock, in UTC."""

    def now(self) -> datetime:
        """Return the current UTC time."""
        return datetime.now(UTC)


def _encode(event: Mapping[str, Any]) -> str:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _decode(body: str) -> dict[str, Any]:
    try:
        event = json.loads(body)
    except ValueError as exc:
        raise SpoolError(f"spool row is not valid JSON: {exc}") from exc
    if not isinstance(event, dict):
        raise SpoolError("spool row is not a JSON object")
    return event


def _parse_ts(ts: str) -> datetime:
    try:
        return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError as exc:
        raise SpoolError(f"spool row has a malformed timestamp {ts!r}") from exc


def _verify_after(
    anchor_seq: int, anchor_hash: str | None, events: Iterator[Mapping[str, Any]],
    head: tuple[int, str] | None = None,
) -> ChainResult:
    """``verify_chain``, checking both ends against the spool's anchors.

    The first event must be seq 1 (with the genesis ``prev``) or, after
    pruning, continue the last pruned event; the last must be the recorded
    head, so rows deleted at either end are reported.
    """
    first = next(events, None)
    if first is None:
        if head is not None and head[0] > anchor_seq:
            return ChainResult(False, 0, None, f"every event is missing: the head was seq "
                                               f"{head[0]}")
        if anchor_seq:
            return ChainResult(False, 0, None,
                               f"no events left after pruning through {anchor_seq}")
        return ChainResult(True, 0)
    seq = first.get("seq")
    found = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    if seq != anchor_seq + 1:
        problem = (f"gap: expected seq {anchor_seq + 1} after the pruned ones, found {seq}"
                   if anchor_seq else f"the first events are missing: the spool starts at "
                                      f"seq {seq}, not 1")
        return ChainResult(False, 0, found, problem)
    prev = first.get("prev")
    if anchor_seq and isinstance(prev, str) and prev != anchor_hash:
        return ChainResult(
            False, 0, seq, f"prev does not match the hash of pruned seq {anchor_seq}"
        )
    last: dict[str, Any] = {}

    def tracked() -> Iterator[Mapping[str, Any]]:
        for event in itertools.chain([first], events):
            last["event"] = event
            yield event

    result = verify_chain(tracked())
    if not result.ok or head is None:
        return result
    end = last["event"]
    if end.get("seq") != head[0] or end.get("hash") != head[1]:
        return ChainResult(False, result.checked, None,
                           f"the last events are missing: the spool ends at seq "
                           f"{end.get('seq')}, its head was seq {head[0]}")
    return result


def _create_private_file(path: Path) -> None:
    """Create ``path`` as 0600 if missing, force 0600 if present; refuse symlinks."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SpoolError(f"cannot create spool file {path}: {exc}") from exc


@dataclass
class _Pending:
    """One ``append_many`` waiting for its commit, and what became of it."""

    checked: list[tuple[str, Any, Mapping[str, Any]]]
    stored: list[dict[str, Any]] | None = None
    error: BaseException | None = None
    done: bool = False


class Spool:
    """A node's audit spool. Thread-safe; several processes may share one file."""

    def __init__(self, conn: sqlite3.Connection, path: Path, node: str, clock: Clock) -> None:
        """Use ``Spool.open``; this only wires an already prepared connection."""
        self._conn = conn
        self._lock = threading.Lock()
        #: Group commit: appends waiting for the next commit, and whether one is running.
        self._batch_cond = threading.Condition()
        self._waiting: list[_Pending] = []
        self._writing = False
        self.path = path
        self.node = node
        self._clock = clock

    @property
    def clock(self) -> Clock:
        """The clock that stamps this spool's events (and its backlog age)."""
        return self._clock

    @classmethod
    def open(cls, path: Path, node: str, clock: Clock | None = None) -> Spool:
        """Open (creating if needed) the spool at ``path`` for node ``node``.

        ``clock`` defaults to ``SystemClock()``. Raises SpoolError if the file
        cannot be created or opened, WAL mode cannot be enabled, or the spool
        belongs to another node or schema version.
        """
        if not node:
            raise SpoolError("spool needs a non-empty node name")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directory {path.parent}: {exc}") from exc
        _create_private_file(path)
        try:
            conn = sqlite3.connect(
                path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open spool {path}: {exc}") from exc
        try:
            cls._prepare(conn, path, node)
        except BaseException:
            conn.close()
            raise
        return cls(conn, path, node, clock or SystemClock())

    @staticmethod
    def _prepare(conn: sqlite3.Connection, path: Path, node: str) -> None:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() != "wal":
                raise SpoolError(f"spool {path}: cannot enable WAL journal (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if not meta:
                    conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [("node", node), ("schema_version", str(SCHEMA_VERSION))],
                    )
                if _HEAD_SEQ not in meta:
                    # A spool from before the head was recorded: anchor it now.
                    last = conn.execute(
                        "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
                    if last is not None:
                        conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                         [(_HEAD_SEQ, str(last[0])), (_HEAD_HASH, str(last[1]))])
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot initialise spool {path}: {exc}") from exc
        if meta and meta.get("node") != node:
            raise SpoolError(
                f"spool {path} belongs to node {meta.get('node')!r}, not {node!r}; "
                "use that node's spool or move this file aside"
            )
        if meta and meta.get("schema_version") != str(SCHEMA_VERSION):
            raise SpoolError(
                f"spool {path} has schema version {meta.get('schema_version')!r}, "
                f"this version writes {SCHEMA_VERSION}"
            )

    def append(self, code: str, **fields: Any) -> dict[str, Any]:
        """Validate, chain and durably store one event; return it as stored.

        Raises EventError for an invalid event (nothing is written) and
        SpoolError if the write fails (nothing is written either).
        """
        return self.append_many([(code, fields)])[0]

    def append_many(self, items: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """Store several events in order, in one transaction: all or none.

        Every event is validated before anything is written. Returns the
        events as stored, once they are committed. Appends from several
        threads that arrive while a commit is in progress share the next
        commit (group commit): one fsync for all of them, each still all or
        none, in arrival order. Raises EventError or SpoolError as
        ``append`` does.
        """
        checked = [(code, validate_fields(code, fields), fields) for code, fields in items]
        if not checked:
            return []
        mine = _Pending(checked)
        with self._batch_cond:
            self._waiting.append(mine)
            while not mine.done:
                if self._writing:
                    self._batch_cond.wait()
                    continue
                # Lead: write everything queued so far, this append included.
                batch, self._waiting = self._waiting, []
                self._writing = True
                self._batch_cond.release()
                try:
                    self._write_batch(batch)
                finally:
                    self._batch_cond.acquire()
                    self._writing = False
                    self._batch_cond.notify_all()
        if mine.error is not None:
            raise mine.error
        assert mine.stored is not None
        return mine.stored

    def _write_batch(self, batch: list[_Pending]) -> None:
        """Write the queued appends in one transaction and one commit; fill in each result.

        An append whose events cannot be built fails alone (nothing of it is
        written); a failed commit fails every append of the batch.
        """
        written: list[tuple[_Pending, list[dict[str, Any]]]] = []
        try:
            with self._lock, self._transaction():
                seq, prev = self._head_locked()
                ts = format_timestamp(self._clock.now())
                rows = []
                for pending in batch:
                    try:
                        stored, mine, last_seq, last_prev = self._build(pending, seq, prev, ts)
                    except EventError as exc:
                        pending.error = exc
                        continue
                    rows.extend(mine)
                    seq, prev = last_seq, last_prev
                    written.append((pending, stored))
                self._conn.executemany(
                    "INSERT INTO events (seq, ts, code, job_id, body, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?)", rows)
                if rows:
                    self._set_meta_locked(_HEAD_SEQ, str(seq))
                    self._set_meta_locked(_HEAD_HASH, prev)
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else SpoolError(
                f"spool {self.path}: write interrupted: {type(exc).__name__}")
            for pending in batch:
                if pending.error is None:
                    pending.error = failure
                pending.done = True
            if not isinstance(exc, Exception):
                raise
            return
        for pending, stored in written:
            pending.stored = stored
        for pending in batch:
            pending.done = True

    def _build(self, pending: _Pending, seq: int, prev: str, ts: str
               ) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]], int, str]:
        """One append's events chained after (seq, prev): (stored, rows, last seq, last hash)."""
        stored: list[dict[str, Any]] = []
        rows: list[tuple[Any, ...]] = []
        for code, etype, fields in pending.checked:
            seq += 1
            event = build_event(etype, self.node, seq, prev, ts, fields)
            prev = event["hash"]
            body = _encode(event)
            job_id = event.get("job_id")
            rows.append((seq, ts, code, job_id if isinstance(job_id, str) else None, body, prev))
            stored.append(_decode(body))
        return stored, rows, seq, prev

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; roll back on any error; sqlite errors -> SpoolError."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: cannot start a write: {exc}") from exc
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise SpoolError(f"spool {self.path}: write failed: {exc}") from exc
            raise

    def _head_locked(self) -> tuple[int, str]:
        recorded = self._recorded_head_locked()
        if recorded is not None:
            return recorded
        row = self._conn.execute(
            "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return (0, GENESIS_PREV) if row is None else (int(row[0]), str(row[1]))

    def _recorded_head_locked(self) -> tuple[int, str] | None:
        seq, digest = self._meta_locked(_HEAD_SEQ), self._meta_locked(_HEAD_HASH)
        if seq is None or digest is None:
            return None
        return self._meta_int_locked(_HEAD_SEQ), digest

    def _meta_locked(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _meta_int_locked(self, key: str) -> int:
        value = self._meta_locked(key)
        try:
            return 0 if value is None else int(value)
        except ValueError as exc:
            raise SpoolError(f"spool {self.path}: meta {key!r} is not an int: {value!r}") from exc

    def _set_meta_locked(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction (a consistent WAL snapshot); the caller holds the lock.

        sqlite errors become SpoolError.
        """
        try:
            self._conn.execute("BEGIN")
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: read failed: {exc}") from exc
        try:
            yield
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: read failed: {exc}") from exc
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise SpoolError(f"spool {self.path}: read failed: {exc}") from exc

    def read(
        self,
        after_seq: int = 0,
        limit: int = 1000,
        code: str | None = None,
        job_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Events with ``seq > after_seq`` (optionally one code / job), oldest first.

        Returns at most ``limit`` (>= 1) events. Raises SpoolError on a read
        failure or an undecodable row.
        """
        if limit < 1:
            raise SpoolError(f"read limit must be >= 1, got {limit}")
        where: list[str] = ["seq > ?"]
        params: list[Any] = [after_seq]
        if code is not None:
            where.append("code = ?")
            params.append(code)
        if job_id is not None:
            where.append("job_id = ?")
            params.append(job_id)
        sql = f"SELECT body FROM events WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"  # noqa: S608
        return [_decode(body) for (body,) in self._query(sql, [*params, limit])]

    def last(self, n: int) -> list[dict[str, Any]]:
        """The newest ``n`` events, oldest first (fewer if the spool is shorter)."""
        rows = self._query("SELECT body FROM events ORDER BY seq DESC LIMIT ?", [max(n, 0)])
        return [_decode(body) for (body,) in reversed(rows)]

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest event; ``(0, GENESIS_PREV)`` when empty."""
        with self._lock:
            try:
                return self._head_locked()
            except sqlite3.Error as exc:
                raise SpoolError(f"spool {self.path}: read failed: {exc}") from exc

    def count(self) -> int:
        """Number of events stored."""
        return int(self._query("SELECT count(*) FROM events")[0][0])

    # --- the collector's acknowledged position ------------------------------

    def acked_seq(self) -> int:
        """The seq up to which the collector holds every event (0 before any ack)."""
        with self._lock, self._snapshot():
            return self._meta_int_locked(_ACKED_SEQ)

    def mark_acked(self, seq: int) -> None:
        """Durably record that the collector holds every event up to ``seq``.

        Only moves forward: a ``seq`` at or below the current position changes
        nothing. Raises SpoolError (and writes nothing) for a ``seq`` beyond
        the newest event, or if the write fails.
        """
        with self._lock, self._transaction():
            head, _ = self._head_locked()
            if seq > head:
                raise SpoolError(
                    f"spool {self.path}: cannot acknowledge seq {seq}, "
                    f"the newest event is seq {head}"
                )
            if seq > self._meta_int_locked(_ACKED_SEQ):
                self._set_meta_locked(_ACKED_SEQ, str(seq))

    def unacked_count(self) -> int:
        """How many events the collector has not acknowledged yet."""
        with self._lock, self._snapshot():
            return self._head_locked()[0] - self._meta_int_locked(_ACKED_SEQ)

    def _oldest_unacked_ts_locked(self, acked: int) -> str | None:
        row = self._conn.execute("SELECT ts FROM events WHERE seq = ?", (acked + 1,)).fetchone()
        return None if row is None else str(row[0])

    def oldest_unacked_ts(self) -> str | None:
        """``ts`` of the oldest unacknowledged event; None when all are acknowledged."""
        with self._lock, self._snapshot():
            return self._oldest_unacked_ts_locked(self._meta_int_locked(_ACKED_SEQ))

    def backlog(self) -> dict[str, Any]:
        """The forwarding backlog, read in one snapshot.

        Keys: ``head_seq``, ``acked_seq``, ``unacked``, ``oldest_unacked_ts``
        (None when nothing is pending) and ``oldest_unacked_age_s`` (seconds
        from that event's ts to this spool's clock, never negative; None when
        nothing is pending). Raises SpoolError on a read failure.
        """
        with self._lock, self._snapshot():
            head, _ = self._head_locked()
            acked = self._meta_int_locked(_ACKED_SEQ)
            oldest = self._oldest_unacked_ts_locked(acked)
        age: float | None = None
        if oldest is not None:
            now = self._clock.now()
            if now.tzinfo is None or now.utcoffset() is None:
                raise SpoolError(f"spool {self.path}: the clock is not timezone-aware")
            age = max(0.0, (now - _parse_ts(oldest)).total_seconds())
        return {
            "head_seq": head,
            "acked_seq": acked,
            "unacked": head - acked,
            "oldest_unacked_ts": oldest,
            "oldest_unacked_age_s": age,
        }

    def prune_acked(self, keep: int) -> int:
        """Delete acknowledged events but the newest ``max(keep, 1)``; return how many.

        Unacknowledged events are never deleted, and neither is the newest
        acknowledged one: it may be the chain head (the next append continues
        from it) and it is the event a checkpoint signs. The seq and hash of
        the newest deleted event are recorded so ``verify`` checks the link to
        the first remaining one. Raises SpoolError for ``keep < 0`` or if the
        write fails (then nothing is deleted).
        """
        if keep < 0:
            raise SpoolError(f"prune_acked: keep must be >= 0, got {keep}")
        with self._lock, self._transaction():
            cutoff = self._meta_int_locked(_ACKED_SEQ) - max(keep, 1)
            row = self._conn.execute(
                "SELECT seq, hash FROM events WHERE seq <= ? ORDER BY seq DESC LIMIT 1", (cutoff,)
            ).fetchone()
            if row is None:
                return 0
            deleted = self._conn.execute("DELETE FROM events WHERE seq <= ?", (row[0],)).rowcount
            self._set_meta_locked(_PRUNED_SEQ, str(int(row[0])))
            self._set_meta_locked(_PRUNED_HASH, str(row[1]))
        return int(deleted)

    def verify(self) -> ChainResult:
        """Check the whole spool as one chain (see ``events.verify_chain``).

        After ``prune_acked`` the chain starts at the first remaining event,
        whose seq and ``prev`` are checked against the recorded last pruned
        event. A row whose body cannot be decoded is reported as a broken link
        at its seq. Holds this spool's lock while reading, so appends from this
        object wait; other processes keep appending (WAL snapshot).
        """
        with self._lock, self._snapshot():
            anchor_seq = self._meta_int_locked(_PRUNED_SEQ)
            anchor_hash = self._meta_locked(_PRUNED_HASH)
            head = self._recorded_head_locked()
            cursor = self._conn.execute("SELECT seq, body FROM events ORDER BY seq")
            return _verify_after(anchor_seq, anchor_hash, self._bodies(cursor), head)

    @staticmethod
    def _bodies(cursor: sqlite3.Cursor) -> Iterator[Mapping[str, Any]]:
        for seq, body in cursor:
            try:
                yield _decode(body)
            except (SpoolError, EventError):
                yield {"seq": seq}  # undecodable: verify_chain names it at this seq

    def close(self) -> None:
        """Close the database connection; later calls raise SpoolError."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
