"""The /metrics endpoints and the shipped Prometheus alerting rules.

The node agent's metrics server is reached over real TLS with real site
certificates (only a ``monitor`` or ``auditor`` may read); the rules are
checked and unit-tested by the Debian package's ``promtool``. The agent's
metrics through real jobs, and a real Prometheus scraping them:
tests/test_gpu_telemetry.py.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztgpu.net.metrics_http import MetricsServer
from ztgpu.testing.collector_process import SitePki
from ztgpu.testing.prerequisites import require
from ztgpu.testing.prometheus import fetch_metrics
from ztgpu.trust.pki import server_context

RULES = Path(__file__).resolve().parent.parent / "configs" / "prometheus"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SitePki:
    return SitePki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(pki: SitePki) -> Iterator[MetricsServer]:
    # What telemetry.metrics_cert names: a service certificate for the node's name.
    cert, key = pki.issue("service", "gpu01", dns_names=["localhost"])

    def render() -> tuple[bytes, str]:
        return b"ztgpu_jobs 2\n", "text/plain; version=0.0.4; charset=utf-8"

    running = MetricsServer(("127.0.0.1", 0), render,
                            lambda: server_context(pki.ca_cert, cert, key)).start()
    yield running
    running.stop()


def get(server: MetricsServer, context: ssl.SSLContext, path: str = "/metrics"
        ) -> tuple[int, bytes]:
    status, text = fetch_metrics(f"https://localhost:{server.port}", context, path)
    return status, text.encode()


def test_a_monitor_certificate_reads_the_metrics(server, pki):
    status, body = get(server, pki.context("monitor", "prometheus"))
    assert status == 200 and body == b"ztgpu_jobs 2\n"
    assert get(server, pki.context("auditor", "carol"))[0] == 200


def test_other_certificates_and_paths_are_refused(server, pki):
    status, body = get(server, pki.context("node", "gpu02"))
    assert status == 403 and b"a node certificate (gpu02) may not read metrics" in body
    assert get(server, pki.context("monitor", "prometheus"), "/")[0] == 404


def test_no_certificate_or_plain_http_gets_no_metrics_and_the_server_lives_on(server, pki):
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        get(server, pki.context(None, None))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
        plain.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        try:
            answer = plain.recv(4096)
        except ConnectionResetError:  # the server drops what is not a TLS handshake
            answer = b""
        assert b"ztgpu_jobs" not in answer
    assert get(server, pki.context("monitor", "prometheus"))[0] == 200


def test_the_shipped_alerting_rules_pass_promtool():
    promtool = str(require("promtool"))
    checked = subprocess.run([promtool, "check", "rules", "ztgpu-alerts.yml"], cwd=RULES,
                             capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "9 rules found" in checked.stdout
    tested = subprocess.run([promtool, "test", "rules", "ztgpu-alerts.test.yml"], cwd=RULES,
                            capture_output=True, text=True, timeout=60, check=False)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_a_broken_rule_fails_promtool(tmp_path):
    """The check above can fail: a rule on a misspelt function does."""
    bad = (RULES / "ztgpu-alerts.yml").read_text().replace("increase(", "increse(", 1)
    (tmp_path / "bad.yml").write_text(bad)
    checked = subprocess.run([str(require("promtool")), "check", "rules", "bad.yml"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             check=False)
    assert checked.returncode != 0
