"""Serving an aiohttp application on a local unix socket, callers known by uid.

For a client on the same host (the job gate beside authd on the controller)
TLS proves nothing the kernel does not already know: the peer's uid comes
from ``SO_PEERCRED`` and cannot be forged by the caller. The socket file is
made 0660 before the server listens (so no connection can arrive while its
mode is still the umask's), a stale socket left by a crash is replaced, and
anything else at the path is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ztgpu.errors import ConfigError
from ztgpu.net.tls_server import serve_app

log = logging.getLogger("ztgpu.net")

_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of the request's unix socket."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              _UCRED.size))
    return int(uid)


def _bind(path: Path) -> socket.socket:
    """A bound (not yet listening) unix socket at ``path``, mode 0660."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket; move it away")
        path.unlink()  # left by a previous run
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


async def serve_unix(app: web.Application, path: Path, *, stop: asyncio.Event,
                     ready: Callable[[Path], None] | None = None) -> None:
    """Serve ``app`` on the unix socket ``path`` until ``stop`` is set; removes it after."""

    async def listen(factory: Any) -> asyncio.Server:
        sock = _bind(path)
        try:
            return await asyncio.get_running_loop().create_unix_server(
                factory, sock=sock, backlog=128)
        except BaseException:
            sock.close()
            raise

    def announce(server: asyncio.Server) -> None:
        log.info("listening on %s (unix socket)", path)
        if ready is not None:
            ready(path)

    try:
        await serve_app(app, listen, announce, stop)
    finally:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                path.unlink()
