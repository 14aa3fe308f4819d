"""Clients of ztgpu-authd: `ztgpu login`, the MFA part of `ztgpu status`, `ztgpu admin`.

Researchers and admins have no certificate: each request carries a fresh
munge credential made for its purpose (login, status or admin), which
proves the caller's uid to authd, over TLS 1.3 to a server whose
certificate must chain to the site CA (``tls.ca_cert``). Nodes and the
controller use their own certificates (``tls.cert``/``tls.key``).
"""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from ztgpu.config import Config
from ztgpu.errors import Denied, Fault, UsageError
from ztgpu.net.https_client import STALE, KeptAliveHttps


class AuthdError(Fault):
    """authd could not be reached or answered with a server error."""


class AuthdRefused(Denied):
    """authd refused the request; ``code`` is its stable reason code."""

    def __init__(self, message: str, code: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class AuthdClient:
    """One HTTPS connection to authd (stdlib http.client)."""

    def __init__(self, url: str, context: ssl.SSLContext, timeout_s: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise UsageError(f"authd URL must be https://host[:port], got {url!r}")
        self.url = url
        self.context = context
        self._http = KeptAliveHttps(parts.hostname, parts.port or 443, context, timeout_s)

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None) -> Any:
        """Send one request; returns the JSON reply or raises AuthdRefused/AuthdError."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        target = f"{path}?{urlencode(query)}" if query else path
        try:
            status, _, raw = self._http.exchange(method, target, data, headers)
        except STALE:
            raise AuthdError(f"authd at {self.url} closed the connection") from None
        except ssl.SSLError as exc:
            raise AuthdError(f"TLS with authd at {self.url} failed: {exc.reason or exc}; "
                             "check tls.ca_cert") from None
        except (OSError, http.client.HTTPException) as exc:
            raise AuthdError(f"cannot reach authd at {self.url}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        try:
            reply = json.loads(raw) if raw else {}
        except ValueError:
            reply = {"error": raw[:200].decode("utf-8", "replace")}
        if status >= 500:
            raise AuthdError(f"authd error {status}: {reply.get('error', '')}")
        if status >= 400:
            raise AuthdRefused(str(reply.get("error", f"refused ({status})")),
                               str(reply.get("code", "refused")), status)
        return reply

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AuthdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def user_client(config: Config, url: str | None = None) -> AuthdClient:
    """A client for a researcher or admin: verifies authd, presents no certificate."""
    from ztgpu.trust.pki import client_context

    target = url or config.auth.authd_url
    if target is None:
        raise UsageError("no authd configured: set auth.authd_url in the config or pass "
                         "--authd https://host:port")
    ca = config.tls.ca_cert
    if not Path(ca).exists():
        raise UsageError(f"site CA certificate {ca} not found: set tls.ca_cert")
    return AuthdClient(target, client_context(ca, None, None),
                       timeout_s=config.auth.request_timeout_s)


def credential(config: Config, purpose: bytes) -> str:
    """A fresh munge credential proving this process's uid, for ``purpose``."""
    from ztgpu.trust.munge import encode

    return encode(purpose, socket=config.authd.munge_socket)
