"""A private sshd for the PAM tests: its own config, host key, port on
127.0.0.1 and PAM service; the system's sshd and its configuration are never
touched.

sshd names its PAM service after the name it was started by, so the
harness starts ``/usr/sbin/sshd`` through a symlink called
``ztgpu-test-sshd-<random>`` and writes ``/etc/pam.d/<that name>`` (the one
directory PAM reads services from), which it removes again, with the
symlink, the keys and ``/run/sshd`` if it made it. Logins use the real
``ssh`` client with a key made for the run; ``StrictModes no`` lets
sshd read the authorized keys from the run's directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ztgpu.testing.prerequisites import require
from ztgpu.testing.slurm_cluster import ClusterError, wait_for

PAM_DIR = Path("/etc/pam.d")
PRIVSEP_DIR = Path("/run/sshd")

#: A node's sshd stack before any module of ours (Debian's, without the
#: includes): key logins, nologin, pam_unix's account and session, and a
#: session keyring of its own for every login (pam_keyinit).
BASE_STACK = """\
# private test sshd stack (ztgpu.testing.sshd)
auth       required     pam_unix.so
account    required     pam_nologin.so
account    required     pam_unix.so
session    optional     pam_keyinit.so force revoke
session    required     pam_unix.so
session    optional     pam_env.so
"""

#: A login node's stack for key plus TOTP: the base stack without pam_unix's
#: password in the auth phase (the ztgpu auth line is the second factor).
TOTP_STACK = BASE_STACK.replace("auth       required     pam_unix.so\n", "")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateSshd:
    """One private sshd; see the module docs."""

    base: Path
    service: str = field(default_factory=lambda: f"ztgpu-test-sshd-{secrets.token_hex(4)}")
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None
    made_privsep: bool = False
    #: Key and then keyboard-interactive (PAM's auth phase: the TOTP prompt).
    totp: bool = False

    @property
    def pam_file(self) -> Path:
        return PAM_DIR / self.service

    @property
    def key(self) -> Path:
        return self.base / "id_ed25519"

    @property
    def log_path(self) -> Path:
        return self.base / "sshd.log"

    def prepare(self, stack: str = BASE_STACK) -> None:
        """Keys, config and the PAM service file (the daemon is not started)."""
        self.base.mkdir(parents=True, exist_ok=True, mode=0o755)
        (self.base / "keys").mkdir(mode=0o755, exist_ok=True)
        keygen = str(require("ssh-keygen"))
        for path in (self.base / "host_ed25519", self.key):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "ztgpu-test",
                            "-f", str(path)], check=True, capture_output=True, timeout=30)
        link = self.base / self.service
        link.symlink_to(require("sshd"))
        (self.base / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1",
            f"HostKey {self.base / 'host_ed25519'}", f"PidFile {self.base / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.base / 'keys'}/%u", "UsePAM yes",
            "PasswordAuthentication no",
            *(["KbdInteractiveAuthentication yes",
                "AuthenticationMethods publickey,keyboard-interactive"] if self.totp
              else ["KbdInteractiveAuthentication no"]),
            "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
            "StrictModes no", "UseDNS no", "PrintMotd no", "PrintLastLog no",
            "LogLevel VERBOSE", "MaxStartups 100:30:200", "MaxSessions 50",
            "AcceptEnv none", ""]))
        self.write_stack(stack)

    def write_stack(self, stack: str) -> None:
        self.pam_file.write_text(stack)
        self.pam_file.chmod(0o644)

    def stack(self) -> str:
        return self.pam_file.read_text()

    def authorize(self, *users: str) -> None:
        """Let *users* log in with the run's key."""
        public = (self.key.with_suffix(".pub")).read_text()
        for user in users:
            path = self.base / "keys" / user
            path.write_text(public)
            path.chmod(0o644)

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start the daemon; *env* is added to its environment (PAM modules in
        it see that, e.g. SLURM_CONF for pam_slurm_adopt)."""
        if not PRIVSEP_DIR.exists():
            PRIVSEP_DIR.mkdir(mode=0o755)
            self.made_privsep = True
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.base / self.service), "-D", "-e", "-f",
                 str(self.base / "sshd_config")], stdout=log, stderr=log,
                start_new_session=True, env={**os.environ, **(env or {})})
        wait_for(self._listening, 20, f"the private sshd on port {self.port}")

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise ClusterError(f"the private sshd exited ({self.process.returncode}): "
                               f"{self.log()[-2000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ssh_argv(self, user: str, command: str, *options: str) -> list[str]:
        return [str(require("ssh")), "-F", "/dev/null", "-i", str(self.key), "-p",
                str(self.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=INFO", "-o", "ConnectTimeout=20", *options,
                f"{user}@127.0.0.1", "--", command]

    def ssh(self, user: str, command: str, *options: str, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        """Log in as *user* with the run's key and run *command* (not checked)."""
        return subprocess.run(self.ssh_argv(user, command, *options), capture_output=True,
                              text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)

    def ssh_with_code(self, user: str, command: str, code: str, *, timeout: float = 60
                      ) -> subprocess.CompletedProcess[str]:
        """Log in with the key, answering the keyboard-interactive prompt (the
        PAM auth phase's TOTP question) with *code* through SSH_ASKPASS, as a
        researcher types it; the prompts asked are in ``askpass.log``."""
        askpass = self.base / "askpass"
        askpass.write_text("#!/bin/sh\n"
                           f"echo \"$1\" >> {self.base / 'askpass.log'}\n"
                           f"cat {self.base / 'askpass.code'}\n")
        askpass.chmod(0o700)
        (self.base / "askpass.code").write_text(code + "\n")
        argv = ["BatchMode=no" if word == "BatchMode=yes" else word
                for word in self.ssh_argv(
                    user, command, "-o", "NumberOfPasswordPrompts=1", "-o",
                    "PreferredAuthentications=publickey,keyboard-interactive")]
        env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
               "DISPLAY": ":0"}
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False, stdin=subprocess.DEVNULL, env=env,
                              start_new_session=True)

    def ssh_background(self, user: str, command: str) -> subprocess.Popen[str]:
        """A login that stays open while *command* runs."""
        return subprocess.Popen(self.ssh_argv(user, command), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)

    def stop(self) -> None:
        """Stop the listener and every session process below it (sshd puts each
        connection in a session of its own, so its process group is not enough)."""
        if self.process is None or self.process.poll() is not None:
            return
        tree = _descendants(self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            self.pam_file.unlink()
        if self.made_privsep:
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.rmdir()


def pids_running(needle: bytes) -> list[int]:
    """Processes whose command line (NUL-separated) contains *needle*."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


@contextlib.contextmanager
def private_sshd(stack: str = BASE_STACK, base: Path | None = None,
                 start: bool = True, totp: bool = False) -> Iterator[PrivateSshd]:
    """A private sshd (started unless ``start`` is false; key plus
    keyboard-interactive with ``totp``); removed afterwards."""
    made = base is None
    where = Path(tempfile.mkdtemp(prefix="ztgpu-sshd-")) if base is None else base
    where.chmod(0o755)
    sshd = PrivateSshd(base=where, totp=totp)
    try:
        sshd.prepare(stack)
        if start:
            sshd.start()
        yield sshd
    finally:
        sshd.cleanup()
        if made:
            shutil.rmtree(where, ignore_errors=True)
