"""The shared SQL layer: writes that skip the fsync stay writes, and durability comes back."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztgpu.sqldb import Database, PostgresDatabase, SqliteDatabase, StoreError

TABLE = "CREATE TABLE hints (k TEXT PRIMARY KEY, v INTEGER NOT NULL)"


def _check_unsynced(db: Database) -> None:
    db.execute(TABLE)
    db.execute_unsynced("INSERT INTO hints (k, v) VALUES (?, ?)", ("job-1", 3600))
    db.execute_unsynced("INSERT INTO hints (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE "
                        "SET v = excluded.v", ("job-1", 7200))
    assert db.execute("SELECT k, v FROM hints") == [("job-1", 7200)]
    with pytest.raises(StoreError):
        db.execute_unsynced("INSERT INTO no_such_table (k) VALUES (?)", ("x",))


def test_sqlite_unsynced_write_is_stored_and_full_sync_returns(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "store.db")
    try:
        _check_unsynced(db)
        # 2 = FULL: every other write still waits for the disk, also after a failed one.
        assert db.execute("PRAGMA synchronous") == [(2,)]
    finally:
        db.close()
    reopened = SqliteDatabase(tmp_path / "store.db")
    try:
        assert reopened.execute("SELECT v FROM hints") == [(7200,)]
    finally:
        reopened.close()


def test_postgres_unsynced_write_is_stored_and_only_that_commit_is_async(
        postgres_dsn: str) -> None:
    db = PostgresDatabase(postgres_dsn)
    try:
        _check_unsynced(db)
        assert db.execute("SHOW synchronous_commit") == [("on",)]
    finally:
        db.close()
