"""Test harness: a site PKI and a real ``ztgpu-collectord`` process.

``SitePki`` makes a CA and certificates in a private directory.
``CollectorProcess`` writes a config, starts the collector as a child
process on a fixed loopback port (so a restart keeps the address), and can
stop it with SIGTERM or kill it with SIGKILL. ``CollectorClient`` speaks the
collector's HTTP API over mutual TLS with a given certificate (stdlib
``http.client``), for tests and the benchmark.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml

from ztgpu.net.https_client import KeptAliveHttps
from ztgpu.testing.service_process import ServiceProcess
from ztgpu.testing.slurm_cluster import wait_for


class SitePki:
    """A CA plus certificates, all under ``directory``."""

    def __init__(self, directory: Path) -> None:
        from ztgpu.trust.pki import init_ca

        self.directory = directory
        self.ca_dir = directory / "ca"
        self.ca_cert, self.ca_key = init_ca(self.ca_dir)
        self.certs = directory / "certs"

    def issue(self, role: str, name: str, **kwargs: Any) -> tuple[Path, Path]:
        """Issue (cert, key) for ``role``/``name``; kwargs go to ``pki.issue``."""
        from ztgpu.trust.pki import issue

        out = kwargs.pop("out_dir", self.certs / role)
        return issue(self.ca_dir, role, name, out, **kwargs)

    def context(self, role: str | None, name: str | None) -> ssl.SSLContext:
        """A client context with a fresh certificate (``role`` None: no certificate)."""
        from ztgpu.trust.pki import client_context

        if role is None or name is None:
            return client_context(self.ca_cert, None, None)
        cert, key = self.issue(role, name)
        return client_context(self.ca_cert, cert, key)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class CollectorProcess(ServiceProcess):
    """One ``ztgpu-collectord`` child process with its own config and store."""

    module = "ztgpu.collector"
    what = "the collector"

    def __init__(self, base: Path, pki: SitePki, *, store: str = "sqlite",
                 dsn: str | None = None, collector: dict[str, Any] | None = None,
                 name: str = "collector") -> None:
        self.base = base
        self.pki = pki
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        cert, key = pki.issue("service", name, dns_names=["localhost"],
                              ip_addresses=["127.0.0.1"])
        section: dict[str, Any] = {
            "name": name, "listen_host": "127.0.0.1", "listen_port": self.port,
            "store": store, "sqlite_path": str(base / "audit.db"),
        }
        if dsn is not None:
            section["postgres_dsn_file"] = str(self.write_dsn_file(base, dsn))
        section.update(collector or {})
        self.config_path = base / "ztgpu.yaml"
        self.config_path.write_text(yaml.safe_dump({
            "tls": {"ca_cert": str(pki.ca_cert), "cert": str(cert), "key": str(key)},
            "collector": section,
        }))
        super().__init__(base, self.config_path, base / "collectord.log")


class CollectorClient:
    """Minimal mTLS client of the collector API (one kept-alive connection)."""

    def __init__(self, url: str, context: ssl.SSLContext, timeout: float = 30.0) -> None:
        host, _, port = url.removeprefix("https://").rpartition(":")
        self.context = context
        self._http = KeptAliveHttps(host, int(port), context, timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """Send one request; returns (status, decoded JSON or raw text)."""
        status, _, data = self._http.exchange(method, path, body, headers)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode(errors="replace")

    def post(self, path: str, payload: Any) -> tuple[int, Any]:
        return self.request("POST", path, json.dumps(payload).encode(),
                            {"Content-Type": "application/json"})

    def get(self, path: str, **query: Any) -> tuple[int, Any]:
        qs = urlencode({k: v for k, v in query.items() if v is not None})
        return self.request("GET", f"{path}?{qs}" if qs else path)

    def close(self) -> None:
        self._http.close()


def wait_until_stored(client: CollectorClient, node: str, seq: int,
                      timeout: float = 30.0) -> None:
    """Wait until the collector's head for ``node`` reaches ``seq`` (auditor client)."""

    def reached() -> bool:
        status, body = client.get("/v1/nodes")
        return status == 200 and any(n["node"] == node and n["head_seq"] >= seq
                                     for n in body["nodes"])

    wait_for(reached, timeout, f"node {node} to reach seq {seq} in the collector")


@dataclass
class AuditSite:
    """A running collector plus what a node agent and an auditor need to use it."""

    pki: SitePki
    collector: CollectorProcess
    #: Config sections (``audit``, ``tls``) for a node agent named ``node``.
    node_config: dict[str, Any]
    #: ``ztgpu audit ...`` options that connect with an auditor certificate.
    auditor_args: list[str]


@contextlib.contextmanager
def audit_site(node: str, **audit: Any) -> Iterator[AuditSite]:
    """A private PKI and collector in a temporary directory, removed afterwards.

    ``audit`` overrides keys of the node's ``audit`` section.
    """
    base = Path(tempfile.mkdtemp(prefix="ztgpu-audit-"))
    collector: CollectorProcess | None = None
    try:
        pki = SitePki(base / "pki")
        collector = CollectorProcess(base / "collector", pki).start()
        node_cert, node_key = pki.issue("node", node)
        auditor_cert, auditor_key = pki.issue("auditor", "auditor")
        yield AuditSite(
            pki=pki, collector=collector,
            node_config={
                "audit": {"collector_url": collector.url, **audit},
                "tls": {"ca_cert": str(pki.ca_cert), "cert": str(node_cert),
                        "key": str(node_key)}},
            auditor_args=["--collector", collector.url, "--cert", str(auditor_cert),
                          "--key", str(auditor_key), "--ca-cert", str(pki.ca_cert)])
    finally:
        if collector is not None:
            collector.stop()
        shutil.rmtree(base, ignore_errors=True)
