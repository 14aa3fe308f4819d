"""The private PostgreSQL harness: a real server, isolated databases, clean stop."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psycopg
import pytest

from ztgpu.testing.postgres import (
    PostgresServer,
    child_pids,
    process_alive,
)

HAVE_ROOT = os.geteuid() == 0
needs_postgres = pytest.mark.skipif(
    not HAVE_ROOT, reason="needs root (initdb and postgres run as the postgres OS user)")


def _processes_mentioning(text: str) -> set[int]:
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.add(int(entry.name))
    return found


@needs_postgres
def test_table_round_trip(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("CREATE TABLE events (seq bigint PRIMARY KEY, code text NOT NULL)")
        conn.execute("INSERT INTO events VALUES (%s, %s), (%s, %s)",
                     (1, "job.grant", 2, "job.release"))
        conn.commit()
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute("SELECT seq, code FROM events ORDER BY seq").fetchall()
        settings = conn.execute(
            "SELECT current_setting('fsync'), current_setting('listen_addresses')"
        ).fetchone()
    assert rows == [(1, "job.grant"), (2, "job.release")]
    # Durability is what the collector tests measure; no TCP listener.
    assert settings == ("on", "")


@needs_postgres
def test_fresh_databases_are_isolated(postgres_server: PostgresServer) -> None:
    first = postgres_server.create_database("iso_first")
    second = postgres_server.create_database("iso_second")
    try:
        with psycopg.connect(first) as conn:
            conn.execute("CREATE TABLE only_here (x int)")
            conn.execute("INSERT INTO only_here VALUES (42)")
            conn.commit()
        with psycopg.connect(second) as conn:
            found = conn.execute("SELECT to_regclass('only_here')").fetchone()
        with psycopg.connect(first) as conn:
            kept = conn.execute("SELECT x FROM only_here").fetchall()
    finally:
        postgres_server.drop_database("iso_first")
        postgres_server.drop_database("iso_second")
    assert found == (None,)
    assert kept == [(42,)]
    with psycopg.connect(postgres_server.dsn_for("postgres")) as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert "iso_first" not in names
    assert "iso_second" not in names


@needs_postgres
def test_database_names_are_validated(postgres_server: PostgresServer) -> None:
    for bad in ("Upper", "1abc", "a-b", "x; DROP DATABASE ztgpu", ""):
        with pytest.raises(ValueError, match="must match"):
            postgres_server.create_database(bad)


@needs_postgres
def test_stop_leaves_no_process_and_no_directory() -> None:
    server = PostgresServer()
    server.start()
    try:
        base, data_dir, pid = server.base_dir, server.data_dir, server.pid
        with psycopg.connect(server.dsn) as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert backend is not None
            children = child_pids(pid)
            # checkpointer, walwriter, ... and this session's backend
            assert backend[0] in children
            assert len(children) >= 3
            assert pid in _processes_mentioning(str(data_dir))
            # Runs as the postgres OS user, never as root.
            assert (Path("/proc") / str(pid)).stat().st_uid != 0
    finally:
        server.stop()
    assert not base.exists()
    assert not process_alive(pid)
    assert not any(process_alive(child) for child in children)
    assert _processes_mentioning(str(data_dir)) == set()
    server.stop()  # idempotent


@needs_postgres
def test_stop_kills_a_server_that_ignores_fast_shutdown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ztgpu.testing import postgres

    monkeypatch.setattr(postgres, "_STOP_TIMEOUT_S", 1.0)
    server = PostgresServer()
    server.start()
    base, pid = server.base_dir, server.pid
    children = child_pids(pid)
    assert children
    os.kill(pid, signal.SIGSTOP)  # a hung postmaster: SIGINT stays pending
    server.stop()
    assert not base.exists()
    assert not process_alive(pid)
    assert not any(process_alive(child) for child in children)


def test_missing_binaries_name_make_setup(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from ztgpu.testing import postgres

    monkeypatch.setattr(postgres, "PG_ROOT", tmp_path)
    assert not postgres.postgres_available()
    with pytest.raises(postgres.PostgresUnavailable, match="make setup"):
        PostgresServer().start()
