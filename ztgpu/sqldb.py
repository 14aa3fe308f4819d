"""One small database layer for the services: SQLite by default, PostgreSQL for larger sites.

The services write their SQL once, with ``?`` placeholders and a schema
template, and run it on either back end with the same behaviour:

* ``transaction()`` is a write transaction: SQLite ``BEGIN IMMEDIATE`` (one
  writer at a time, across processes), PostgreSQL ``BEGIN``; ``for_update``
  is appended to a SELECT that must lock its rows until the commit (on
  SQLite the immediate transaction already excludes other writers).
* Commits are durable: SQLite in WAL mode with ``synchronous=FULL``;
  PostgreSQL with its default synchronous commit.
* Errors become ``StoreError`` naming what failed; a PostgreSQL connection
  string (which may hold a password) never appears in a message.
* A SQLite file is created 0600 in a 0700 directory.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from ztgpu.errors import Fault


class StoreError(Fault):
    """The store could not be opened, read or written."""


class Database:
    """A connection to one store; thread-safe (calls are serialised)."""

    kind = "abstract"
    placeholder = "?"
    for_update = ""
    #: Types substituted into schema templates.
    types: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def __init__(self) -> None:
        self.lock = threading.RLock()

    def q(self, sql: str) -> str:
        """``sql`` with this back end's placeholders."""
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def insert_rows(self, table: str, columns: str, rows: Sequence[Sequence[Any]]) -> None:
        """Insert many rows fast (``executemany`` / ``COPY``)."""
        raise NotImplementedError

    def execute_unsynced(self, sql: str, params: Sequence[Any] = ()) -> None:
        """One write committed without waiting for the disk.

        For hints with a safe fallback only, never for audit records or
        decisions: a crash of the process loses nothing, a crash of the host
        may lose the last such writes (the next durable commit flushes them).
        """
        raise NotImplementedError

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        raise NotImplementedError
        yield  # pragma: no cover

    def create_schema(self, template: str) -> None:
        """Run ``;``-separated statements with ``{id_column}``, ``{int}`` filled in."""
        with self.lock, self.transaction():
            for statement in template.format(**self.types).split(";"):
                if statement.strip():
                    self.execute(statement)

    def close(self) -> None:
        raise NotImplementedError


class SqliteDatabase(Database):
    kind = "sqlite"
    types: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"id_column": "INTEGER PRIMARY KEY", "int": "INTEGER"})

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
            self.conn = sqlite3.connect(path, timeout=30, isolation_level=None,
                                        check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            # Fewer, larger WAL checkpoints and a bigger page cache for the
            # indexes: the services write batches.
            self.conn.execute("PRAGMA wal_autocheckpoint=10000")
            self.conn.execute("PRAGMA cache_size=-65536")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store {path}: {exc}") from exc

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc

    def insert_rows(self, table: str, columns: str, rows: Sequence[Sequence[Any]]) -> None:
        marks = ", ".join("?" * len(columns.split(",")))
        with self.lock:
            try:
                self.conn.executemany(
                    f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)  # noqa: S608
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: insert failed: {exc}") from exc

    def execute_unsynced(self, sql: str, params: Sequence[Any] = ()) -> None:
        # WAL with synchronous=NORMAL: the commit is in the WAL (safe from a
        # process crash) but not fsynced until the next FULL commit.
        with self.lock:
            try:
                self.conn.execute("PRAGMA synchronous=NORMAL")
                try:
                    self.conn.execute(sql, params)
                finally:
                    self.conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.lock:
            self.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self.lock:
            self.conn.close()


class PostgresDatabase(Database):
    kind = "postgres"
    placeholder = "%s"
    for_update = " FOR UPDATE"
    types: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"id_column": "BIGSERIAL PRIMARY KEY", "int": "BIGINT"})

    def __init__(self, dsn: str) -> None:
        super().__init__()
        import psycopg

        self._psycopg = psycopg
        try:
            self.conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the PostgreSQL store: {pg_reason(exc)}") from None

    def create_schema(self, template: str) -> None:
        with self.lock, self.transaction():
            # Serialise schema creation between services starting together.
            self.execute("SELECT pg_advisory_xact_lock(4242001)")
            for statement in template.format(**self.types).split(";"):
                if statement.strip():
                    self.execute(statement)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            try:
                cursor = self.conn.execute(self.q(sql), params)
                return cursor.fetchall() if cursor.description is not None else []
            except self._psycopg.Error as exc:
                raise StoreError(f"PostgreSQL store: {pg_reason(exc)}") from None

    def insert_rows(self, table: str, columns: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.lock:
            try:
                with self.conn.cursor() as cursor, cursor.copy(
                    f"COPY {table} ({columns}) FROM STDIN"
                ) as copy:
                    for row in rows:
                        copy.write_row(row)
            except self._psycopg.Error as exc:
                raise StoreError(f"PostgreSQL store: insert failed: {pg_reason(exc)}") from None

    def execute_unsynced(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self.lock, self.transaction():
            self.execute("SET LOCAL synchronous_commit TO OFF")
            self.execute(sql, params)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.lock:
            try:
                with self.conn.transaction():
                    yield
            except self._psycopg.Error as exc:
                raise StoreError(f"PostgreSQL store: {pg_reason(exc)}") from None

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def pg_reason(exc: BaseException) -> str:
    """PostgreSQL's own message for ``exc`` (never the connection string)."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    return str(primary or type(exc).__name__)


def open_database(kind: str, *, sqlite_path: Path | None = None,
                  dsn: str | None = None) -> Database:
    """Open the configured store (``kind`` "sqlite" or "postgres")."""
    if kind == "sqlite":
        if sqlite_path is None:
            raise StoreError("sqlite store needs a path")
        return SqliteDatabase(sqlite_path)
    if kind == "postgres":
        if not dsn:
            raise StoreError("postgres store needs a connection string")
        return PostgresDatabase(dsn)
    raise StoreError(f"unknown store kind {kind!r}")
