"""``/metrics`` in Prometheus' text format, for a daemon without an HTTP stack.

The node agent serves its metrics here (the services add a route to their
aiohttp application instead): a small threaded HTTP server that answers
``GET /metrics`` only. With a TLS context the connection is TLS 1.3 and
the client must present a certificate of the site CA whose role is one of
*roles* (``monitor``: a Prometheus server; ``auditor``); the handshake runs
in the connection's own thread, so a slow client never holds up another.
Metrics carry job ids and user names: without TLS, bind to loopback.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ztgpu.metrics import METRIC_ROLES

log = logging.getLogger("ztgpu.metrics")


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], render: Callable[[], tuple[bytes, str]],
                 context: Callable[[], ssl.SSLContext] | None,
                 roles: tuple[str, ...] = METRIC_ROLES, timeout_s: float = 10.0) -> None:
        self.render = render
        self.context = context
        self.roles = roles
        self.timeout_s = timeout_s
        super().__init__(address, _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.timeout_s)
        if self.context is None:
            super().finish_request(request, client_address)
            return
        try:
            tls = self.context().wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.info("metrics: TLS handshake from %s refused: %s", client_address[0], exc)
            return  # socketserver closes the connection
        try:
            super().finish_request(tls, client_address)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def start(self) -> MetricsServer:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5},
                         name="metrics-http", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def log_message(self, format: str, *args: Any) -> None:
        return  # a scrape every few seconds is not news

    def do_GET(self) -> None:
        refusal = self._refusal()
        if refusal is not None:
            self._send(403, refusal.encode() + b"\n", "text/plain; charset=utf-8")
            return
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, b"only /metrics is served here\n", "text/plain; charset=utf-8")
            return
        body, content_type = self.server.render()
        self._send(200, body, content_type)

    def _refusal(self) -> str | None:
        if self.server.context is None:
            return None
        from ztgpu.trust.pki import PkiError, identity_from_der

        assert isinstance(self.connection, ssl.SSLSocket)
        der = self.connection.getpeercert(binary_form=True)
        if der is None:
            return "a client certificate is required"
        try:
            identity = identity_from_der(der)
        except PkiError as exc:
            return f"unusable client certificate: {exc}"
        if identity.role not in self.server.roles:
            return (f"a {identity.role} certificate ({identity.name}) may not read metrics "
                    f"(roles: {', '.join(self.server.roles)})")
        return None

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        with contextlib.suppress(OSError):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)
