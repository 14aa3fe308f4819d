"""Shared fixtures: a standalone node agent, and the suite on a real Slurm cluster."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztgpu.testing.agent_process import StandaloneAgent, standalone_agent
from ztgpu.testing.munge import MungeDaemon
from ztgpu.testing.postgres import PostgresServer

HAVE_ROOT = os.geteuid() == 0

# Only root is a reason to skip: a missing program fails the test, naming its
# Debian package (ztgpu.testing.prerequisites), so that a `make setup` that
# forgot a package cannot hide behind skipped tests.
needs_root = pytest.mark.skipif(not HAVE_ROOT, reason="needs root (device nodes, cgroups, chown)")
needs_slurm = pytest.mark.skipif(not HAVE_ROOT,
                                 reason="the Slurm test cluster needs root (run `make test`)")


@pytest.fixture
def agent() -> Iterator[StandaloneAgent]:
    """A real ztgpu-noded process on simulated GPUs in a private device dir.

    The directory is world-traversable (unlike pytest's tmp_path) so that
    tests can act as unprivileged users against the socket and devices.
    """
    if not HAVE_ROOT:
        pytest.skip("needs root (device nodes, cgroups, chown)")
    base = Path(tempfile.mkdtemp(prefix="ztgpu-agent-"))
    try:
        with standalone_agent(base) as running:
            yield running
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- a private PostgreSQL server (ztgpu.testing.postgres) ------------------

@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session, in a private temp dir."""
    if not HAVE_ROOT:
        pytest.skip("needs root (initdb and postgres run as the postgres OS user)")
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """DSN of a fresh, uniquely named database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex}"
    dsn = postgres_server.create_database(name)
    try:
        yield dsn
    finally:
        postgres_server.drop_database(name)


# ---- a private munged (ztgpu.testing.munge) --------------------------------

@pytest.fixture(scope="module")
def munge_daemon() -> Iterator[MungeDaemon]:
    """A real munged with a key of its own in a private directory, per test module."""
    if not HAVE_ROOT:
        pytest.skip("needs root (the private munged runs as root on a root-owned key)")
    with MungeDaemon() as daemon:
        yield daemon
