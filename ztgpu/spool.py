"""Durable, hash-chained audit spool for one node (SQLite, stdlib only).

Guarantees:

* An event returned by ``append``/``append_many`` is committed with
  ``synchronous=FULL`` in WAL mode: it survives a crash of the process
  (SIGKILL) and, as far as the disk honours fsync, of the machine.
* ``seq`` is gapless per spool, starting at 1, across reopen, threads and
  processes: the last ``seq``/``hash`` is read and the new row written inside
  one ``BEGIN IMMEDIATE`` transaction.
* Nothing is ever deleted or silently dropped; a write that cannot be made
  raises ``SpoolError``.
* The database file is mode 0600; a parent directory the spool creates is 0700.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from ztgpu.errors import SpoolError
from ztgpu.events import (
    GENESIS_PREV,
    SCHEMA_VERSION,
    ChainResult,
    EventError,
    event_hash,
    format_timestamp,
    validate_fields,
    verify_chain,
)

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


class Spool:
    """A node's audit spool. Thread-safe; several processes may share one file."""

    def __init__(self, conn: sqlite3.Connection, path: Path, node: str, clock: Clock) -> None:
        """Use ``Spool.open``; this only wires an already prepared connection."""
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self.node = node
        self._clock = clock

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
        events as stored. Raises EventError or SpoolError as ``append`` does.
        """
        checked = [(code, validate_fields(code, fields), fields) for code, fields in items]
        if not checked:
            return []
        stored: list[dict[str, Any]] = []
        with self._lock, self._transaction():
            seq, prev = self._head_locked()
            ts = format_timestamp(self._clock.now())
            rows = []
            for code, etype, fields in checked:
                seq += 1
                event: dict[str, Any] = {
                    "v": SCHEMA_VERSION,
                    "code": code,
                    "severity": etype.severity.value,
                    "node": self.node,
                    "seq": seq,
                    "ts": ts,
                    "prev": prev,
                    **fields,
                }
                event["hash"] = prev = event_hash(event)
                body = _encode(event)
                job_id = event.get("job_id")
                rows.append(
                    (seq, ts, code, job_id if isinstance(job_id, str) else None, body, prev)
                )
                stored.append(_decode(body))
            self._conn.executemany(
                "INSERT INTO events (seq, ts, code, job_id, body, hash) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
        return stored

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
        row = self._conn.execute(
            "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return (0, GENESIS_PREV) if row is None else (int(row[0]), str(row[1]))

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

    def verify(self) -> ChainResult:
        """Check the whole spool as one chain (see ``events.verify_chain``).

        A row whose body cannot be decoded is reported as a broken link at
        its seq. Holds this spool's lock while reading, so appends from this
        object wait; other processes keep appending (WAL snapshot).
        """
        with self._lock:
            try:
                cursor = self._conn.execute("SELECT seq, body FROM events ORDER BY seq")
                return verify_chain(self._bodies(cursor))
            except sqlite3.Error as exc:
                raise SpoolError(f"spool {self.path}: read failed: {exc}") from exc

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
