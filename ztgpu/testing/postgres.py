"""A private, real PostgreSQL server for tests.

:class:`PostgresServer` runs the Debian PostgreSQL binaries (the newest
``/usr/lib/postgresql/*/bin``) on a fresh cluster in a private temporary
directory: ``initdb`` as the ``postgres`` OS user with trust authentication
on the unix socket only, then ``postgres`` listening on a socket in that
directory and on no TCP address. The system cluster (``/etc/postgresql``,
``/var/lib/postgresql``, ``/var/run/postgresql``) is never read or touched.

``fsync`` and ``synchronous_commit`` stay on: the collector tests measure
durability, so the server must behave as it does in production.

Needs root (to run the server as ``postgres``) and ``make setup`` (which
installs the ``postgresql`` package).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

from ztgpu.testing.prerequisites import PrerequisiteMissing, require

PG_ROOT = Path("/usr/lib/postgresql")
OS_USER = "postgres"
#: The database :attr:`PostgresServer.dsn` names; created by :meth:`start`.
DEFAULT_DB = "ztgpu"
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0
_INITDB_TIMEOUT_S = 120.0
_SQL_TIMEOUT_S = 30.0
_LOG_TAIL_LINES = 30


class PostgresHarnessError(RuntimeError):
    """The private PostgreSQL server could not be set up, started or driven."""


class PostgresUnavailable(PostgresHarnessError):
    """The PostgreSQL server binaries (or the postgres OS user) are missing."""


def _version_key(path: Path) -> tuple[int, ...]:
    parts = re.findall(r"[0-9]+", path.parent.name)
    return tuple(int(p) for p in parts) if parts else (-1,)


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb and postgres.

    Raises PostgresUnavailable naming ``make setup`` if there is none.
    """
    for program in ("initdb", "postgres"):
        try:
            require(program)
        except PrerequisiteMissing as exc:
            raise PostgresUnavailable(str(exc)) from None
    candidates = [
        bindir for bindir in PG_ROOT.glob("*/bin")
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file()
    ]
    if not candidates:
        raise PostgresUnavailable(
            f"no PostgreSQL server binaries under {PG_ROOT}/*/bin "
            "(run `make setup` to install the postgresql package)"
        )
    return max(candidates, key=_version_key)


def postgres_available() -> bool:
    """True when the server binaries and the ``postgres`` OS user exist."""
    try:
        find_bindir()
        pwd.getpwnam(OS_USER)
    except (PostgresUnavailable, KeyError):
        return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_stat(entry: Path) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...)."""
    try:
        stat = (entry / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def process_alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie."""
    fields = _proc_stat(Path("/proc") / str(pid))
    return fields is not None and fields[0] != "Z"


def child_pids(parent: int) -> set[int]:
    """Ids of the live (non-zombie) child processes of *parent*."""
    children: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(entry)
        if fields is not None and fields[0] != "Z" and int(fields[1]) == parent:
            children.add(int(entry.name))
    return children


def _check_db_name(name: str) -> None:
    if not _DB_NAME.fullmatch(name) or len(name) > 63:
        raise ValueError(
            f"database name {name!r} must match [a-z_][a-z0-9_]* (at most 63 characters)"
        )


class PostgresServer:
    """One private PostgreSQL server; a context manager.

    ``start()`` creates and starts the cluster and the ``ztgpu`` database;
    ``stop()`` shuts it down (fast shutdown, SIGKILL after a deadline) and
    removes every file it created. Both raise PostgresHarnessError on failure;
    the error carries the tail of the server log.
    """

    def __init__(self, bindir: Path | None = None) -> None:
        self._bindir = bindir
        self._base: Path | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ---- layout -------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        """The private directory holding data, socket and log (while started)."""
        if self._base is None:
            raise PostgresHarnessError("the PostgreSQL server is not started")
        return self._base

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "run"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    @property
    def port(self) -> int:
        if self._port is None:
            raise PostgresHarnessError("the PostgreSQL server is not started")
        return self._port

    @property
    def pid(self) -> int:
        """The postmaster's process id (its children are its backends and helpers)."""
        if self._proc is None:
            raise PostgresHarnessError("the PostgreSQL server is not started")
        return self._proc.pid

    @property
    def dsn(self) -> str:
        """libpq conninfo for the ``ztgpu`` database as the ``postgres`` role."""
        return self.dsn_for(DEFAULT_DB)

    def dsn_for(self, dbname: str) -> str:
        _check_db_name(dbname)
        return f"host={self.socket_dir} port={self.port} dbname={dbname} user={OS_USER}"

    # ---- lifecycle ----------------------------------------------------
    def start(self) -> None:
        """Create the cluster, start the server and wait until it accepts connections."""
        if self._proc is not None:
            raise PostgresHarnessError("the PostgreSQL server is already started")
        bindir = self._bindir or find_bindir()
        try:
            account = pwd.getpwnam(OS_USER)
        except KeyError as exc:
            raise PostgresUnavailable(
                f"no {OS_USER!r} OS user (run `make setup` to install the postgresql package)"
            ) from exc
        if os.geteuid() != 0:
            raise PostgresHarnessError("the private PostgreSQL server needs root "
                                       f"(initdb and postgres run as {OS_USER!r})")
        self._base = Path(tempfile.mkdtemp(prefix="ztgpu-pg-"))
        try:
            self._port = _free_port()
            for sub in (self.data_dir, self.socket_dir):
                sub.mkdir(mode=0o700)
            for path in (self.base_dir, self.data_dir, self.socket_dir):
                os.chown(path, account.pw_uid, account.pw_gid)
            self._initdb(bindir)
            self._launch(bindir)
            self._wait_ready()
            self._create_default_db()
        except BaseException:
            self.stop()
            raise

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8", HOME=str(self.base_dir))
        return env

    def _initdb(self, bindir: Path) -> None:
        cmd = [
            str(bindir / "initdb"), "-D", str(self.data_dir), "--username", OS_USER,
            "--auth-local=trust", "--auth-host=reject", "--encoding=UTF8",
            "--locale=C.UTF-8", "--no-instructions",
        ]
        try:
            done = subprocess.run(cmd, user=OS_USER, group=OS_USER, extra_groups=[],
                                  cwd=self.base_dir, env=self._child_env(),
                                  capture_output=True, timeout=_INITDB_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PostgresHarnessError(f"initdb timed out after {_INITDB_TIMEOUT_S:.0f}s") from exc
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")
            raise PostgresHarnessError(f"initdb failed (exit {done.returncode}):\n{out[-4000:]}")

    def _launch(self, bindir: Path) -> None:
        cmd = [
            str(bindir / "postgres"), "-D", str(self.data_dir), "-k", str(self.socket_dir),
            "-p", str(self.port),
            "-c", "listen_addresses=",
            "-c", "fsync=on",
            "-c", "synchronous_commit=on",
            "-c", "full_page_writes=on",
            "-c", "logging_collector=off",
            "-c", f"unix_socket_directories={self.socket_dir}",
        ]
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            self._proc = subprocess.Popen(cmd, user=OS_USER, group=OS_USER, extra_groups=[],
                                          cwd=self.base_dir, env=self._child_env(),
                                          stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                          start_new_session=True)
        except OSError as exc:
            raise PostgresHarnessError(f"could not start {cmd[0]}: {exc}") from exc
        finally:
            os.close(fd)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last *lines* lines of the server log ('' when there is none)."""
        if self._base is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        last_error = "no attempt"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise PostgresHarnessError(
                    f"postgres exited with status {code} during startup; log tail:\n"
                    f"{self.log_tail()}"
                )
            try:
                with psycopg.connect(self.dsn_for("postgres"), connect_timeout=5):
                    return
            except psycopg.Error as exc:
                last_error = str(exc).strip()
            time.sleep(0.1)
        raise PostgresHarnessError(
            f"postgres did not accept connections within {_START_TIMEOUT_S:.0f}s "
            f"(last error: {last_error}); log tail:\n{self.log_tail()}"
        )

    def _admin(self, statement: sql.Composed) -> None:
        try:
            with psycopg.connect(self.dsn_for("postgres"), autocommit=True,
                                 connect_timeout=int(_SQL_TIMEOUT_S)) as conn:
                conn.execute(statement)
        except psycopg.Error as exc:
            raise PostgresHarnessError(
                f"{statement.as_string()} failed: {exc}; log tail:\n{self.log_tail()}"
            ) from exc

    def _create_default_db(self) -> None:
        self.create_database(DEFAULT_DB)

    def create_database(self, name: str) -> str:
        """Create database *name* and return its DSN.

        Raises ValueError for a name outside ``[a-z_][a-z0-9_]*`` and
        PostgresHarnessError if the server refuses (e.g. it already exists).
        """
        _check_db_name(name)
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database *name*, disconnecting any sessions still using it."""
        _check_db_name(name)
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL to the process group after a deadline,
        then remove the private directory. Safe to call more than once."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._shutdown(proc)
        base, self._base = self._base, None
        self._port = None
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
            if base.exists():
                raise PostgresHarnessError(f"could not remove {base}")

    @staticmethod
    def _shutdown(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)  # "fast shutdown"
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            pass
        # Still running after the deadline. Every postgres child calls
        # setsid(), so the postmaster's process group holds only itself:
        # kill its children by parent id first (it is not reaped yet, so
        # the id is still ours), then the postmaster, and wait until all
        # of them are gone.
        children = child_pids(proc.pid)
        for child in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=_STOP_TIMEOUT_S)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while any(process_alive(child) for child in children):
            if time.monotonic() > deadline:
                raise PostgresHarnessError(
                    f"postgres processes {sorted(children)} survived SIGKILL")
            time.sleep(0.05)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
