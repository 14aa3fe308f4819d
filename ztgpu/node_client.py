"""Client side of the node agent's unix-socket protocol (standard library only).

One request per connection: a single JSON object terminated by a newline,
answered by a single JSON object ``{"ok": true, "result": ...}`` or
``{"ok": false, "kind": "denied"|"bad_request"|"fault", "error": "..."}``.
The Prolog, the Epilog and the CLI use this module; it must stay cheap to
import.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from ztgpu.errors import AgentUnreachable, Denied, Fault, InputRejected

PROTOCOL_VERSION = 1
DEFAULT_TIMEOUT_S = 10.0
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


def call(socket_path: str, op: str, timeout: float = DEFAULT_TIMEOUT_S,
         **payload: Any) -> Any:
    """Send one request and return the agent's ``result``.

    Raises:
        AgentUnreachable: no agent listens on *socket_path*, or it did not
            answer within *timeout*.
        InputRejected / Denied: the agent refused the request.
        Fault: the agent failed to carry it out, or answered garbage.
    """
    request = json.dumps({"v": PROTOCOL_VERSION, "op": op, **payload},
                         separators=(",", ":")).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise Fault("the node agent's answer is too large")
                chunks.append(chunk)
    except FileNotFoundError:
        raise AgentUnreachable(f"ztgpu-noded is not running (no socket at {socket_path})") \
            from None
    except ConnectionRefusedError:
        raise AgentUnreachable(f"ztgpu-noded is not accepting connections on {socket_path}") \
            from None
    except TimeoutError:
        raise AgentUnreachable(f"ztgpu-noded did not answer within {timeout:g}s "
                               f"on {socket_path}") from None
    except PermissionError:
        raise AgentUnreachable(f"permission denied on {socket_path}: only root and the "
                               f"Slurm user may talk to ztgpu-noded") from None
    except OSError as exc:
        raise AgentUnreachable(f"cannot talk to ztgpu-noded on {socket_path}: "
                               f"{exc.strerror or exc}") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise Fault("the node agent answered something that is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise Fault("the node agent's answer has no 'ok' field")
    if answer["ok"]:
        return answer.get("result")
    error = str(answer.get("error", "unspecified error"))
    kind = answer.get("kind")
    if kind == "bad_request":
        raise InputRejected(error)
    if kind == "denied":
        raise Denied(error)
    raise Fault(error)
