"""A ztgpu service (collector, authd) run as a child process for tests, demo and benchmarks.

The service is started with ``--port-file`` and counts as ready once it has
written the port it listens on; it runs in its own session so that
``kill()`` takes its worker processes down with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Self

from ztgpu.testing.slurm_cluster import wait_for


class ServiceProcess:
    """``python -m <module> --config <config_path>`` as a child process."""

    #: The service's module, e.g. ``ztgpu.collector``; set by subclasses.
    module = ""
    #: Its name in messages.
    what = "the service"

    def __init__(self, base: Path, config_path: Path, log_path: Path) -> None:
        self.base = base
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def write_dsn_file(base: Path, dsn: str) -> Path:
        """The 0600 file a service reads its PostgreSQL connection string from."""
        path = base / "postgres.dsn"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(dsn + "\n")
        return path

    def start(self, timeout: float = 20.0) -> Self:
        port_file = self.base / "port"
        port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--config", str(self.config_path),
                 "--port-file", str(port_file)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited with {proc.returncode}:\n{self.log()}")
            return port_file.exists()

        wait_for(ready, timeout, f"{self.what} to listen")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL to the whole service (its worker processes too): no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 15 s); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
