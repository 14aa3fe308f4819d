"""The isolation probe's helper process, kept running by the agent.

``probe_child.py --serve`` answers one JSON request line with one JSON
answer line; see that module for the request and the answer. Starting an
interpreter for every probe cost each job ~10 ms of CPU on the node.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ztgpu.errors import Fault

PROBE_CHILD = Path(__file__).with_name("probe_child.py")
#: Longest answer line accepted from the probe helper.
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class ProbeHelper:
    """The probe child, started once and kept: one request line in, one answer line out.

    Starting an interpreter per probe cost every job ~10 ms of CPU. The
    helper is single-threaded (it forks per target, as before); a helper
    that timed out, died or answered garbage is killed and the next probe
    starts a new one.
    """

    def __init__(self, argv: list[str] | None = None) -> None:
        #: The helper's command line (tests give a stand-in).
        self.argv = argv or [sys.executable, "-I", "-S", str(PROBE_CHILD), "--serve"]
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._lock = threading.Lock()

    def ask(self, request: str, timeout: float) -> str:
        """The answer line to ``request``. Raises Fault (the helper is then restarted)."""
        with self._lock:
            for attempt in (1, 2):
                proc = self._ensure()
                assert proc.stdin is not None
                try:
                    proc.stdin.write(request.encode() + b"\n")
                    proc.stdin.flush()
                    return self._read_line(proc, time.monotonic() + timeout, timeout)
                except (BrokenPipeError, EOFError):
                    # It died since the last probe (or now): once more with a new one.
                    self.close()
                    if attempt == 2:
                        raise Fault("isolation probe helper exited without an answer") from None
                except Fault:
                    self.close()
                    raise
        raise AssertionError("unreachable")

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is not None:
            self.close()  # it exited since the last probe: reap it, close its pipes
        if self._proc is None:
            self._buffer = b""
            try:
                self._proc = subprocess.Popen(
                    self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                raise Fault(f"cannot start the isolation probe: {exc}") from None
        return self._proc

    def _read_line(self, proc: subprocess.Popen[bytes], deadline: float, timeout: float) -> str:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fault(f"isolation probe timed out after {timeout:g}s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError
            self._buffer += chunk
            if len(self._buffer) > MAX_ANSWER_BYTES:
                raise Fault("isolation probe answered garbage (too long)")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")

    @property
    def pid(self) -> int | None:
        """The running helper's pid, if one runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def close(self) -> None:
        """End the helper (its process group: a hung probe child too)."""
        proc, self._proc = self._proc, None
        self._buffer = b""
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


