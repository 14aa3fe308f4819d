"""One kept-alive HTTPS connection, for the suite's JSON clients.

The authd client, the auditors' collector client and the test harness's
clients all keep one connection open between requests. A server may close
an idle kept-alive connection at any time; a request that finds its reused
connection closed is sent once more on a new one (callers only send
requests that are safe to repeat). A fresh connection that fails is an
error: that is how a refused client certificate shows under TLS 1.3.
"""

from __future__ import annotations

import http.client
import ssl

#: What a server closing a kept-alive connection looks like to the client.
STALE = (http.client.RemoteDisconnected, ConnectionResetError, ConnectionAbortedError,
         BrokenPipeError)


class ServiceConnection(http.client.HTTPSConnection):
    """An HTTPS connection that accepts only a ``service`` certificate.

    The CA, the purpose (serverAuth) and the host name are checked by the
    SSL context; the role is checked here too, right after the handshake,
    so that no other certificate of the site CA ever passes for authd or
    the collector, whatever its extended key usage.
    """

    def connect(self) -> None:
        super().connect()
        from ztgpu.trust.pki import PkiError, identity_from_der

        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True)
        try:
            role = identity_from_der(der).role if der else "none"
        except PkiError as exc:
            self.close()
            raise ssl.SSLCertVerificationError(f"server certificate: {exc}") from None
        if role != "service":
            self.close()
            raise ssl.SSLCertVerificationError(
                f"{self.host} presented a {role} certificate, not a service's")


class KeptAliveHttps:
    """Requests over one HTTPS connection, reopened when needed. Not thread-safe."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext,
                 timeout_s: float) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPSConnection | None = None
        self._used = False

    def exchange(self, method: str, target: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        """Send one request; returns (status, reason, body bytes).

        Raises what http.client raises (OSError, ssl.SSLError,
        http.client.HTTPException) after closing the connection.
        """
        while True:
            if self._conn is None:
                self._conn = ServiceConnection(self.host, self.port, context=self.context,
                                               timeout=self.timeout_s)
                self._used = False
            reused = self._used
            response: http.client.HTTPResponse | None = None
            try:
                self._conn.request(method, target, body=body, headers=headers or {})
                response = self._conn.getresponse()
                data = response.read()
            except STALE:
                if response is not None:
                    response.close()  # it holds the TLS socket too
                self.close()
                if reused:
                    continue  # closed while idle: once more on a new connection
                raise
            except (OSError, http.client.HTTPException):
                if response is not None:
                    response.close()
                self.close()
                raise
            self._used = True
            if response.will_close:
                self.close()
            return response.status, response.reason, data

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
