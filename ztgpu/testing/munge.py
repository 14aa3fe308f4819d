"""A private, real munged for tests.

:class:`MungeDaemon` runs Debian's ``munged`` (0.5.15 here) as root on a
key of its own, in a private temporary directory, with every path it uses
(key, socket, pid, log, seed) given on its command line; the system munged,
``/etc/munge`` and ``/run/munge`` are never read or touched.

The key: ``mungekey --create --bits=1024`` when mungekey is installed
(Debian ships it in /usr/sbin; it writes 128 bytes, mode 0600), otherwise
1024 random bytes written 0600. munged wants the key owned by the user it
runs as and unreadable by group and others; with ``--force`` it only warns,
so the harness makes it right rather than relying on that.

The directory is mode 0711 and the socket's directory 0755, so that
unprivileged users (``runuser -u nobody``) can reach the socket, which
munged creates mode 0777, while the key stays private.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from ztgpu.testing.prerequisites import PREREQUISITES, PrerequisiteMissing, require

_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0
_PROBE_TIMEOUT_S = 5.0
_KEY_BYTES = 1024
_LOG_TAIL_LINES = 20


class MungeHarnessError(RuntimeError):
    """The private munged could not be set up, started or stopped."""


def munged_available() -> bool:
    """True when munged, munge and unmunge are all on PATH."""
    return all(PREREQUISITES[tool].find() for tool in ("munged", "munge", "unmunge"))


class MungeDaemon:
    """One private munged; a context manager.

    ``start()`` creates the directory and key, starts munged in the
    foreground and returns once a ``munge`` client got a credential from it.
    ``stop()`` sends SIGTERM (SIGKILL to its process group after a deadline)
    and removes the directory; it is safe to call twice. Both raise
    MungeHarnessError with the tail of munged's log.
    """

    def __init__(self, *, parent: Path | None = None) -> None:
        self._parent = parent
        self._base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ---- layout -------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        if self._base is None:
            raise MungeHarnessError("the private munged is not started")
        return self._base

    @property
    def socket(self) -> Path:
        """munged's socket (pass it as ``socket=`` to ztgpu.trust.munge)."""
        return self.base_dir / "run" / "munge.socket"

    @property
    def key_path(self) -> Path:
        return self.base_dir / "munge.key"

    @property
    def log_path(self) -> Path:
        """munged's stdout and stderr (it logs to stderr in the foreground)."""
        return self.base_dir / "munged.out"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise MungeHarnessError("the private munged is not started")
        return self._proc.pid

    # ---- lifecycle ----------------------------------------------------
    def start(self) -> None:
        """Make the directory and key, start munged and wait until it answers."""
        if self._proc is not None:
            raise MungeHarnessError("the private munged is already started")
        if os.geteuid() != 0:
            raise MungeHarnessError("the private munged runs as root (its key must be "
                                    "owned by the user munged runs as)")
        try:
            for tool in ("munged", "munge", "unmunge"):
                require(tool)
        except PrerequisiteMissing as exc:
            raise MungeHarnessError(str(exc)) from None
        self._base = Path(tempfile.mkdtemp(prefix="ztgpu-munge-", dir=self._parent))
        try:
            self._base.chmod(0o711)
            (self._base / "run").mkdir(mode=0o755)
            (self._base / "run").chmod(0o755)
            self._write_key()
            self._spawn()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _write_key(self) -> None:
        mungekey = PREREQUISITES["mungekey"].find()
        if mungekey is not None:
            res = subprocess.run([mungekey, "--create", "--bits=1024",
                                  f"--keyfile={self.key_path}"],
                                 capture_output=True, text=True, timeout=30, check=False)
            if res.returncode != 0:
                raise MungeHarnessError(f"mungekey failed ({res.returncode}): "
                                        f"{res.stderr.strip()}")
        else:
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(_KEY_BYTES))
        os.chown(self.key_path, os.geteuid(), os.getegid())
        self.key_path.chmod(0o600)

    def _spawn(self) -> None:
        base = self.base_dir
        argv = [
            "munged", "--foreground", "--force", f"--socket={self.socket}",
            f"--key-file={self.key_path}", f"--pid-file={base / 'run' / 'munged.pid'}",
            f"--log-file={base / 'munged.log'}", f"--seed-file={base / 'munged.seed'}",
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        last = "no socket yet"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MungeHarnessError(f"munged exited with status {self._proc.returncode}"
                                        f"{self._log_tail()}")
            if self.socket.exists():
                try:
                    probe = subprocess.run(["munge", "--no-input", "-S", str(self.socket)],
                                           capture_output=True, text=True, check=False,
                                           timeout=_PROBE_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    last = f"munge got no answer within {_PROBE_TIMEOUT_S:.0f}s"
                    continue
                if probe.returncode == 0 and probe.stdout.startswith("MUNGE:"):
                    return
                last = probe.stderr.strip()
            time.sleep(0.05)
        raise MungeHarnessError(f"munged did not answer within {_START_TIMEOUT_S:.0f}s "
                                f"({last}){self._log_tail()}")

    def stop(self) -> None:
        """Stop munged and remove the directory (idempotent)."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(_STOP_TIMEOUT_S)
        finally:
            base, self._base = self._base, None
            if base is not None:
                shutil.rmtree(base, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "; munged log:\n" + "\n".join(lines[-_LOG_TAIL_LINES:]) if lines else ""

    def __enter__(self) -> MungeDaemon:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
