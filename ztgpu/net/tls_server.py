"""Serving an aiohttp application over TLS 1.3 with refusals that are seen.

Both ztgpu services terminate TLS here rather than in the listening socket:
each accepted TCP connection is upgraded with ``loop.start_tls``, so a
refused handshake (no client certificate, an expired one, another CA, TLS
1.2, plain HTTP) reaches ``on_refused`` with its reason before the
connection is dropped, and the service can record it. The SSL context is
asked for on every handshake, so a renewed certificate is used at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger("ztgpu.tls")


async def serve_tls(app: web.Application, host: str, port: int, *,
                    context: Callable[[], ssl.SSLContext], stop: asyncio.Event,
                    on_refused: Callable[[str, str], None],
                    ready: Callable[[int], None] | None = None,
                    handshake_timeout_s: float = 10.0) -> None:
    """Serve ``app`` until ``stop`` is set; ``ready(port)`` once listening."""

    async def listen(factory: Any) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(
            lambda: _TlsAcceptor(factory, context, on_refused, handshake_timeout_s),
            host, port, reuse_address=True, backlog=512)

    def announce(server: asyncio.Server) -> None:
        bound = server.sockets[0].getsockname()[1]
        log.info("listening on %s:%d (TLS 1.3)", host, bound)
        if ready is not None:
            ready(bound)

    await serve_app(app, listen, announce, stop)


async def serve_app(app: web.Application,
                    listen: Callable[[Any], Awaitable[asyncio.Server]],
                    announce: Callable[[asyncio.Server], None],
                    stop: asyncio.Event) -> None:
    """Run ``app`` on the server ``listen(factory)`` makes until ``stop`` is set.

    ``announce(server)`` runs once it listens; on the way out the server
    stops accepting, open requests finish (aiohttp's cleanup) and it closes.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    factory = runner.server
    assert factory is not None
    server = await listen(factory)
    announce(server)
    try:
        await stop.wait()
    finally:
        server.close()
        await runner.cleanup()
        await server.wait_closed()


def peer_address(request: web.Request) -> str:
    """``ip:port`` of the request's sender."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return format_address(peer)


def peer_certificate(request: web.Request) -> bytes | None:
    """The DER client certificate of the request's TLS connection, if any."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return der or None


def format_address(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "unknown"


class _TlsAcceptor(asyncio.Protocol):
    """Accepts TCP, performs the TLS handshake itself, then hands over to aiohttp."""

    def __init__(self, factory: Callable[[], Any], context: Callable[[], ssl.SSLContext],
                 on_refused: Callable[[str, str], None], timeout_s: float) -> None:
        self.factory = factory
        self.context = context
        self.on_refused = on_refused
        self.timeout_s = timeout_s
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self._upgrade(transport))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        address = format_address(transport.get_extra_info("peername"))
        protocol = self.factory()
        started = time.monotonic()
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, protocol, self.context(), server_side=True,
                ssl_handshake_timeout=self.timeout_s)
        except (ssl.SSLError, OSError, ConnectionError, TimeoutError) as exc:
            transport.abort()
            self.on_refused(address, f"TLS handshake failed: {tls_reason(exc)}")
            return
        if tls is None:
            transport.abort()
            return
        log.debug("TLS from %s in %.1f ms", address, (time.monotonic() - started) * 1000)
        protocol.connection_made(tls)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()


def tls_reason(exc: BaseException) -> str:
    """A short, human reason for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        hints = {
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
            "UNSUPPORTED_PROTOCOL": "client does not offer TLS 1.3",
            "TLSV1_ALERT_PROTOCOL_VERSION": "client does not offer TLS 1.3",
            "WRONG_VERSION_NUMBER": "not a TLS 1.3 client",
            "HTTP_REQUEST": "plain HTTP sent to the TLS port",
        }
        return hints.get(str(reason), str(reason).lower().replace("_", " "))
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return f"connection closed during handshake ({type(exc).__name__})"


def run_until_stopped(coro_factory: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a service coroutine until SIGTERM/SIGINT sets its stop event."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await coro_factory(stop)

    asyncio.run(main())


def port_file_writer(port_file: Path | None) -> Callable[[int], None]:
    """A ``ready(port)`` callback that writes the listening port to ``port_file``."""

    def ready(port: int) -> None:
        if port_file is not None:
            tmp = port_file.with_suffix(".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(port_file)

    return ready


def service_main(prog: str, description: str | None,
                 serve: Callable[[str | None, Path | None], int],
                 argv: list[str] | None = None) -> int:
    """The command line every ztgpu service shares: --config, --log-level."""
    import argparse
    import sys

    from ztgpu.errors import ZtgpuError

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="config file (default: $ZTGPU_CONFIG or "
                        "/etc/ztgpu/ztgpu.yaml)")
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return serve(args.config, args.port_file)
    except ZtgpuError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code

