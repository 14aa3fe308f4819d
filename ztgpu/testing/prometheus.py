"""A private Prometheus server for the tests: its own config, data and port.

Started from the Debian package's binary with a scrape config the test
writes (``--web.listen-address`` on loopback, data in a temporary
directory), queried over its HTTP API, stopped and removed afterwards. The
system's Prometheus service, if any, is never touched.
"""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from ztgpu.testing.collector_process import free_port
from ztgpu.testing.prerequisites import require
from ztgpu.testing.slurm_cluster import ClusterError, wait_for


class PrometheusServer:
    """One Prometheus scraping *targets* every *interval_s*."""

    def __init__(self, jobs: list[dict[str, Any]], interval_s: float = 1.0) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="ztgpu-prometheus-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        every = f"{round(interval_s * 1000)}ms"  # Prometheus durations take no fractions
        config = {"global": {"scrape_interval": every, "evaluation_interval": every},
                  "scrape_configs": jobs}
        (self.base / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = self.base / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrometheusServer:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(require("prometheus")), f"--config.file={self.base / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.base / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, f"Prometheus on port {self.port}\n{self.log_text()}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}: "
                               f"{self.log_text()}")
        try:
            return self._get("/-/ready")[0] == 200
        except OSError:
            return False

    def _get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            res = conn.getresponse()
            return res.status, res.read()
        finally:
            conn.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def api(self, path: str, **query: str) -> Any:
        _, raw = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(query)}")
        body = json.loads(raw)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def wait_for_series(server: PrometheusServer, expr: str, timeout: float = 60
                    ) -> list[dict[str, Any]]:
    """The result of *expr* once it is not empty."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = server.query(expr)
        return bool(found)

    try:
        wait_for(seen, timeout, f"Prometheus to have {expr}")
    except ClusterError as exc:
        raise AssertionError(f"{exc}; targets: {server.targets()}") from None
    return found


def fetch_metrics(url: str, context: ssl.SSLContext | None = None, path: str = "/metrics"
                  ) -> tuple[int, str]:
    """GET *path* of a service at *url* (``https://host:port`` with *context*,
    or ``http://host:port``): (status, body)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 443
    conn: http.client.HTTPConnection = (
        http.client.HTTPSConnection(host, port, context=context, timeout=10)
        if parts.scheme == "https" else http.client.HTTPConnection(host, port, timeout=10))
    try:
        conn.request("GET", path)
        res = conn.getresponse()
        return res.status, res.read().decode("utf-8", "replace")
    finally:
        conn.close()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A /metrics body parsed with prometheus-client's parser: samples by name."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def sample_value(found: dict[str, list[tuple[dict[str, str], float]]], name: str,
                 **labels: str) -> float | None:
    """The first sample of *name* whose labels include *labels*."""
    for have, number in found.get(name, []):
        if all(have.get(k) == v for k, v in labels.items()):
            return number
    return None
