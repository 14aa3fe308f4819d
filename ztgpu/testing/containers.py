"""The central services in containers, for tests: a private docker daemon,
the images of a checkout's ``containers/`` and its compose file, run with a site's files.

:class:`DockerDaemon` runs its own ``dockerd`` (no bridge, no iptables: the
containers use the host's network) on a socket of its own; its image store
lives under ``/var/cache/ztgpu-tests/docker`` so that the base image and the
build layers outlive a test run. It never talks to a system docker.

:class:`ContainerSite` writes what a site supplies to ``containers/compose.yaml``
(configs, certificates from a :class:`~ztgpu.testing.collector_process.SitePki`,
keys and database passwords 0600 and owned by the containers' users), starts
PostgreSQL, the collector and authd with ``docker-compose``, and removes them
and their volumes afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from ztgpu.testing.collector_process import SitePki, free_port
from ztgpu.testing.prerequisites import require
from ztgpu.testing.slurm_cluster import ClusterError, wait_for

CACHE = Path("/var/cache/ztgpu-tests/docker")
#: The containers' users (containers/Dockerfile, containers/Dockerfile.postgres).
SERVICE_UID, POSTGRES_UID = 10001, 10002


class DockerDaemon:
    """A private ``dockerd``; ``env`` points docker and docker-compose at it."""

    def __init__(self, base: Path, data_root: Path = CACHE / "data") -> None:
        self.base = base
        self.data_root = data_root
        self.socket = base / "docker.sock"
        self.docker = str(require("docker"))
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}",
                    "PATH": f"{Path(self.docker).parent}:{os.environ.get('PATH', '')}"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> DockerDaemon:
        self.base.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        log = open(self.base / "dockerd.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [str(require("dockerd")), "--iptables=false", "--bridge=none",
                 "--data-root", str(self.data_root), "--exec-root", str(self.base / "exec"),
                 "--pidfile", str(self.base / "dockerd.pid"), "-H", f"unix://{self.socket}",
                 "--log-level", "warn",
                 # Should a system containerd serve it, keep apart from a system dockerd.
                 "--containerd-namespace", "ztgpu-tests",
                 "--containerd-plugins-namespace", "ztgpu-tests-plugins"],
                stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        try:
            wait_for(lambda: self.run("version", check=False).returncode == 0, timeout,
                     "the private dockerd", interval=0.5)
        except ClusterError:
            self.stop()
            raise ClusterError(f"dockerd did not start: {self.log_tail()}") from None
        return self

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "dockerd.log").read_text(errors="replace")[-2000:]
        return ""

    def run(self, *args: str, check: bool = True, timeout: float = 120,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([self.docker, *args], env=self.env, capture_output=True,
                             text=True, timeout=timeout, check=False, input=stdin)
        if check and res.returncode != 0:
            raise ClusterError(f"docker {' '.join(args)}: {res.stderr.strip()[-2000:]}")
        return res

    def build_images(self, containers: Path, timeout: float = 1200,
                     wheelhouse: Path | None = None) -> str:
        """Run *containers*/build against this daemon (keeping its wheels in
        *wheelhouse*, if given); returns its output."""
        keep = ["--wheelhouse", str(wheelhouse)] if wheelhouse is not None else []
        res = subprocess.run([sys.executable, str(containers / "build"),
                              "--base-cache", str(CACHE / "base"), "--docker", self.docker,
                              *keep],
                             env=self.env, capture_output=True, text=True, timeout=timeout,
                             check=False)
        if res.returncode != 0:
            raise ClusterError(f"containers/build failed:\n{res.stdout[-3000:]}"
                               f"\n{res.stderr[-3000:]}")
        return res.stdout

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
        # dockerd leaves its default network namespace mounted under exec-root.
        for mount in _mounts_under(self.base):
            subprocess.run(["umount", "--lazy", mount], capture_output=True, check=False)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as handle:
        points = [line.split()[1] for line in handle]
    return sorted((p for p in points if p.startswith(prefix)), reverse=True)


def _owned_secret(path: Path, data: bytes, uid: int) -> Path:
    """A new 0600 file owned by a container's user (whose uid has no name here)."""
    from ztgpu.trust.private_files import create_exclusive

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    create_exclusive(path, data, (uid, uid), ClusterError)
    return path


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class ContainerSite:
    """PostgreSQL, ztgpu-collectord and ztgpu-authd from ``containers/compose.yaml``."""

    def __init__(self, daemon: DockerDaemon, base: Path, compose_file: Path,
                 munge_socket: Path, policy: str, version: str) -> None:
        from ztgpu.trust.kek import KeyRing

        self.daemon = daemon
        self.base = base
        self.compose_file = compose_file
        self.site = base / "site"
        self.site.mkdir(parents=True, exist_ok=True)
        self.site.chmod(0o755)
        self.pki = SitePki(base / "pki")
        self.project = f"ztgpu-test-{secrets.token_hex(3)}"
        self.version = version
        self.pg_port, self.authd_port, self.collector_port = (free_port() for _ in range(3))
        self.authd_url = f"https://127.0.0.1:{self.authd_port}"
        self.collector_url = f"https://127.0.0.1:{self.collector_port}"
        shutil.copy(self.pki.ca_cert, self.site / "ca.crt")
        keys = self.site / "secrets"
        for name in ("authd", "collector"):
            cert, key = self.pki.issue("service", name, dns_names=["localhost"],
                                       ip_addresses=["127.0.0.1"])
            shutil.copy(cert, self.site / f"{name}.crt")
            _owned_secret(keys / f"{name}.key", key.read_bytes(), SERVICE_UID)
            password = secrets.token_urlsafe(24)
            _owned_secret(keys / f"{name}_db_password", password.encode(), POSTGRES_UID)
            dsn = f"postgresql://{name}:{password}@127.0.0.1:{self.pg_port}/{name}\n"
            _owned_secret(keys / f"{name}.dsn", dsn.encode(), SERVICE_UID)
        kek = keys / "authd.kek"
        KeyRing.create(kek)
        os.chown(kek, SERVICE_UID, SERVICE_UID)
        keys.chmod(0o755)  # the files themselves are 0600, each its container user's
        (self.site / "policy.yaml").write_text(policy)
        tls = {"ca_cert": "/etc/ztgpu/ca.crt"}
        self._config("collectord.yaml", {
            "tls": {**tls, "cert": "/etc/ztgpu/collector.crt",
                    "key": "/run/secrets/collector_key"},
            "paths": {"spool_dir": "/var/spool/ztgpu"},
            "collector": {"name": "collector", "listen_host": "127.0.0.1",
                          "listen_port": self.collector_port, "store": "postgres",
                          "postgres_dsn_file": "/run/secrets/collector_dsn"}})
        self._config("authd.yaml", {
            "tls": {**tls, "cert": "/etc/ztgpu/authd.crt", "key": "/run/secrets/authd_key"},
            "paths": {"spool_dir": "/var/spool/ztgpu"},
            "auth": {"authd_url": self.authd_url},
            "audit": {"collector_url": self.collector_url},
            "slurm": {"bin_dir": "/nonexistent"},
            "authd": {"listen_host": "127.0.0.1", "listen_port": self.authd_port,
                      "store": "postgres", "postgres_dsn_file": "/run/secrets/authd_dsn",
                      "kek_file": "/run/secrets/authd_kek",
                      "policy_file": "/etc/ztgpu/policy.yaml",
                      "munge_socket": f"/run/munge/{munge_socket.name}",
                      # No Slurm beside this authd: nothing to ask whose a job is.
                      "gate_checks_job_owner": False}})
        self.env = {**daemon.env, "ZTGPU_SITE": str(self.site),
                    "ZTGPU_MUNGE_DIR": str(munge_socket.parent),
                    "ZTGPU_PG_PORT": str(self.pg_port), "ZTGPU_VERSION": version}

    def _config(self, name: str, values: Mapping[str, Any]) -> None:
        (self.site / name).write_text(yaml.safe_dump(dict(values)))
        (self.site / name).chmod(0o644)

    def compose(self, *args: str, check: bool = True, timeout: float = 300,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(require("docker-compose")), "--project-name", self.project,
                "--file", str(self.compose_file), *args]
        res = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                             timeout=timeout, check=False, input=stdin)
        if check and res.returncode != 0:
            raise ClusterError(f"docker-compose {' '.join(args)}: "
                               f"{(res.stdout + res.stderr).strip()[-3000:]}")
        return res

    def up(self, timeout: float = 180) -> None:
        self.compose("up", "--detach", "--no-build")
        try:
            wait_for(lambda: listening(self.collector_port) and listening(self.authd_port),
                     timeout, "the collector and authd containers", interval=1)
        except ClusterError as exc:
            raise ClusterError(f"{exc}\n{self.logs()}") from None

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", check=False).stdout[-6000:]

    def exec(self, service: str, *argv: str, stdin: str | None = None
             ) -> subprocess.CompletedProcess[str]:
        """Run a command in a running service's container (as its user)."""
        return self.compose("exec", "-T", service, *argv, check=False, stdin=stdin)

    def inspect(self, service: str) -> dict[str, Any]:
        import json

        cid = self.compose("ps", "-q", service).stdout.strip()
        found: list[dict[str, Any]] = json.loads(self.daemon.run("inspect", cid).stdout)
        return found[0]

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)


@contextlib.contextmanager
def container_site(containers: Path, munge_socket: Path, policy: str
                   ) -> Iterator[ContainerSite]:
    """Build the images of *containers* (a checkout's ``containers/``; cached
    layers), start its compose file's services, remove everything after."""
    import importlib.metadata

    base = Path(tempfile.mkdtemp(prefix="ztgpu-containers-"))
    base.chmod(0o755)
    daemon = DockerDaemon(base / "docker")
    try:
        daemon.start()
        daemon.build_images(containers)
        site = ContainerSite(daemon, base, containers / "compose.yaml", munge_socket, policy,
                             importlib.metadata.version("ztgpu"))
        try:
            site.up()
            yield site
        finally:
            site.down()
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
