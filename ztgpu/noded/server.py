"""The agent's unix socket: peer-credential check, size cap, one JSON request.

Only root and the configured Slurm user may talk to the agent; the kernel
tells us who is on the other end (SO_PEERCRED), so this does not depend on
the socket file's permissions alone. Each connection carries one request
(see :mod:`ztgpu.node_client`); anything malformed gets a ``bad_request``
answer, is recorded, and the agent keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztgpu.errors import Denied, InputRejected, ZtgpuError

log = logging.getLogger("ztgpu.noded")

MAX_CONNECTIONS = 64
#: Connections one uid may hold open at once (root and trusted uids are exempt):
#: a local user cannot take the slots other users' tasks need.
MAX_PER_UID = 4
#: A client must send its first byte within this long; the whole request
#: within ``timeout_s``. An idle connection holds a slot this long at most.
FIRST_BYTE_S = 2.0


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, as the kernel reports it (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


Handler = Callable[[str, dict[str, Any], Peer], Any]


def peer_of(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid=int(pid), uid=int(uid), gid=int(gid))


class _Late(Exception):
    """The request did not arrive within its deadline."""


class _RequestHandler(socketserver.BaseRequestHandler):
    server: AgentSocketServer

    def handle(self) -> None:
        srv = self.server
        sock: socket.socket = self.request
        peer = peer_of(sock)
        if not srv.enter(peer.uid):
            srv.reject(peer.uid, f"more than {MAX_PER_UID} connections at once")
            self._answer(sock, {"ok": False, "kind": "busy",
                                "error": "too many connections from this user"})
            return
        try:
            if not srv.slots.acquire(blocking=False):
                self._answer(sock, {"ok": False, "kind": "busy", "error": "agent busy"})
                return
            try:
                self._serve(sock, peer)
            finally:
                srv.slots.release()
        finally:
            srv.leave(peer.uid)

    def _serve(self, sock: socket.socket, peer: Peer) -> None:
        srv = self.server
        uid = peer.uid
        if srv.allowed_uids is not None and uid not in srv.allowed_uids:
            srv.reject(uid, "peer uid not allowed on the agent socket")
            self._answer(sock, {"ok": False, "kind": "denied",
                                "error": "only root and the Slurm user may use this socket"})
            return
        try:
            raw = self._read(sock)
            request = json.loads(raw)
        except _Late as exc:
            # Too slow: an idle connection, or a client starved of CPU. Not a
            # malformed request: the answer says to retry.
            srv.reject(uid, str(exc))
            self._answer(sock, {"ok": False, "kind": "busy", "error": str(exc)})
            return
        except InputRejected as exc:
            srv.reject(uid, str(exc))
            self._answer(sock, {"ok": False, "kind": "bad_request", "error": str(exc)})
            self._drain(sock)
            return
        except (ValueError, UnicodeDecodeError, RecursionError):
            srv.reject(uid, "request is not valid JSON")
            self._answer(sock, {"ok": False, "kind": "bad_request",
                                "error": "request is not valid JSON"})
            return
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            srv.reject(uid, "request is not an object with an 'op'")
            self._answer(sock, {"ok": False, "kind": "bad_request",
                                "error": "request must be a JSON object with an 'op' string"})
            return
        op = request.pop("op")
        request.pop("v", None)
        try:
            result = srv.handler(op, request, peer)
            answer: dict[str, Any] = {"ok": True, "result": result}
        except InputRejected as exc:
            answer = {"ok": False, "kind": "bad_request", "error": str(exc)}
        except Denied as exc:
            answer = {"ok": False, "kind": "denied", "error": str(exc)}
        except ZtgpuError as exc:  # Fault and anything else the suite raised
            log.error("%s failed: %s", op, exc)
            answer = {"ok": False, "kind": "fault", "error": str(exc)}
        except Exception as exc:
            log.exception("internal error handling %s", op)
            answer = {"ok": False, "kind": "fault",
                      "error": f"internal error: {type(exc).__name__}"}
        self._answer(sock, answer)

    def _read(self, sock: socket.socket) -> bytes:
        limit = self.server.max_bytes
        started = time.monotonic()
        deadline = started + self.server.timeout_s
        buf = bytearray()
        try:
            while b"\n" not in buf:
                # The deadline covers the whole request, so a client that
                # trickles bytes cannot hold a worker slot for long; one that
                # sends nothing at all is dropped sooner still.
                remaining = deadline - time.monotonic()
                if not buf:
                    remaining = min(remaining, started + self.server.first_byte_s
                                    - time.monotonic())
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > limit:
                    raise InputRejected(f"request larger than {limit} bytes")
        except TimeoutError:
            raise _Late("request not received in time") from None
        line = bytes(buf).split(b"\n", 1)[0]
        if not line.strip():
            raise InputRejected("empty request")
        return line

    @staticmethod
    def _drain(sock: socket.socket, limit: int = 16 * 1024 * 1024) -> None:
        """Read and discard what the client still sends (bounded), so that
        closing does not reset the connection before it reads our answer."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(1.0)
            seen = 0
            while seen < limit and (chunk := sock.recv(65536)):
                seen += len(chunk)

    @staticmethod
    def _answer(sock: socket.socket, answer: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the client went away; nothing to tell it
            sock.sendall(json.dumps(answer, separators=(",", ":")).encode() + b"\n")


class AgentSocketServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: Path, handler: Handler, *, allowed_uids: set[int] | None,
                 max_bytes: int, timeout_s: float,
                 on_reject: Callable[[int, str], None], mode: int = 0o600) -> None:
        """Listen on *path*. ``allowed_uids=None`` admits every uid (the
        handler must then check the peer itself)."""
        self.handler = handler
        self.allowed_uids = allowed_uids
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.on_reject = on_reject
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.first_byte_s = min(FIRST_BYTE_S, timeout_s)
        #: Open connections per uid; uids in ``unlimited_uids`` are not counted.
        self.active: dict[int, int] = {}
        self.active_lock = threading.Lock()
        self.unlimited_uids = {0} | (allowed_uids or set())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.exists() or path.is_symlink():
            path.unlink()
        old = os.umask(0o177)
        try:
            super().__init__(str(path), _RequestHandler)
        finally:
            os.umask(old)
        os.chmod(path, mode)

    def enter(self, uid: int) -> bool:
        """Count a connection of ``uid``; False when it already holds its share."""
        if uid in self.unlimited_uids:
            return True
        with self.active_lock:
            if self.active.get(uid, 0) >= MAX_PER_UID:
                return False
            self.active[uid] = self.active.get(uid, 0) + 1
            return True

    def leave(self, uid: int) -> None:
        if uid in self.unlimited_uids:
            return
        with self.active_lock:
            left = self.active.get(uid, 0) - 1
            if left > 0:
                self.active[uid] = left
            else:
                self.active.pop(uid, None)

    def reject(self, uid: int, reason: str) -> None:
        log.warning("rejected request from uid %d: %s", uid, reason)
        try:
            self.on_reject(uid, reason)
        except Exception:
            log.exception("could not record a rejected request")
