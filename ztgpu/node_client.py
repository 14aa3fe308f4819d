"""Client side of the node agent's unix-socket protocol (standard library only).

One request per connection: a single JSON object terminated by a newline,
answered by a single JSON object ``{"ok": true, "result": ...}`` or
``{"ok": false, "kind": "denied"|"bad_request"|"fault"|"busy", "error": "..."}``.
``busy`` (no room for the request: the agent's slots, this uid's share, or a
request that came too slowly) is retried here, with backoff, within the
caller's timeout, so that no hook fails because another user floods a socket.

The Prolog, Epilog and TaskProlog use this module on every job, so it is
written for interpreter start-up time: it talks to ``_socket`` directly
(``socket.py`` pulls in ``enum``) and never imports ``json`` (which pulls in
``re`` and ``enum``: ~15 ms): requests are written by :func:`_dumps` and
answers read by the C scanner ``json`` itself uses (:func:`_loads`). The
hooks' requests carry only fields already checked to be digits or plain
user names, which :func:`send_checked` writes by hand. The PAM module uses
:func:`call` on every SSH login.
"""

from __future__ import annotations

import _socket

from ztgpu.errors import AgentBusy, AgentUnreachable, Denied, Fault, InputRejected

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

PROTOCOL_VERSION = 1
DEFAULT_TIMEOUT_S = 10.0
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
_OK_PREFIX = b'{"ok":true'
_BUSY_PREFIX = b'{"ok":false,"kind":"busy"'


def _exchange(socket_path: str, request: bytes, timeout: float) -> bytes:
    """Send *request*, return the raw answer, trying again while the agent is busy.

    Raises AgentUnreachable or Fault; AgentBusy once *timeout* is spent.
    """
    import time

    deadline = time.monotonic() + timeout
    pause = 0.02
    while True:
        try:
            raw = _exchange_once(socket_path, request, max(0.1, deadline - time.monotonic()))
        except AgentBusy:
            if time.monotonic() + pause >= deadline:
                raise
        else:
            if not raw.startswith(_BUSY_PREFIX) or time.monotonic() + pause >= deadline:
                return raw
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def _exchange_once(socket_path: str, request: bytes, timeout: float) -> bytes:
    """Send *request* once, return the raw answer. Raises AgentUnreachable or Fault."""
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(request)
            sock.shutdown(_socket.SHUT_WR)
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
        finally:
            sock.close()
    except FileNotFoundError:
        raise AgentUnreachable(f"ztgpu-noded is not running (no socket at {socket_path})") \
            from None
    except BlockingIOError:  # EAGAIN: the agent's listen backlog is full (a flood)
        raise AgentBusy(f"ztgpu-noded's socket {socket_path} is full") from None
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
    return b"".join(chunks)


class _ScanContext:
    """What ``_json.make_scanner`` reads from a decoder: strict JSON, no hooks,
    no NaN/Infinity."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: ClassVar[dict[str, str]] = {}

    @staticmethod
    def parse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")


def _loads(raw: bytes) -> Any:
    """One JSON value (surrounding whitespace allowed). Raises ValueError."""
    try:
        import _json
    except ImportError:  # an interpreter without the accelerator
        import json

        return json.loads(raw)
    text = raw.decode("utf-8").strip(" \t\r\n")
    try:
        scanner: Any = _json.make_scanner  # typeshed types it as the class itself
        value, end = scanner(_ScanContext())(text, 0)
    except (StopIteration, RecursionError):
        raise ValueError("not JSON") from None
    except Exception as exc:  # noqa: BLE001 - the scanner's JSONDecodeError is a ValueError
        raise ValueError(str(exc)) from None
    if end != len(text):
        raise ValueError("extra data after the JSON value")
    return value


def _dumps(value: Any) -> str:
    """Compact JSON for the request values the clients send (objects, lists,
    strings, numbers, booleans, null). Raises TypeError for anything else."""
    import _json

    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise TypeError("NaN and infinities are not JSON")
        return repr(value)
    if isinstance(value, str):
        return str(_json.encode_basestring_ascii(value))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("object keys must be strings")
        return "{" + ",".join(f"{_dumps(k)}:{_dumps(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"{type(value).__name__} is not sent to the agent")


def _result(raw: bytes) -> Any:
    """The ``result`` of an answer, or the error it carries, raised."""
    try:
        answer = _loads(raw)
    except (ValueError, UnicodeDecodeError):
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
    if kind == "busy":
        raise AgentBusy(f"the node agent is busy ({error}); gave up retrying")
    raise Fault(error)


def call(socket_path: str, op: str, timeout: float = DEFAULT_TIMEOUT_S,
         **payload: Any) -> Any:
    """Send one request and return the agent's ``result``.

    Raises:
        AgentUnreachable: no agent listens on *socket_path*, or it did not
            answer within *timeout*.
        InputRejected / Denied: the agent refused the request.
        Fault: the agent failed to carry it out, or answered garbage.
    """
    request = _dumps({"v": PROTOCOL_VERSION, "op": op, **payload}).encode() + b"\n"
    return _result(_exchange(socket_path, request, timeout))


def send_checked(socket_path: str, op: str, timeout: float, *, job_id: str | None = None,
                 uid: int | None = None, user: str | None = None,
                 gpus: tuple[int, ...] | None = None, partition: str | None = None,
                 account: str | None = None) -> None:
    """The hooks' fast path: like :func:`call` for requests whose fields were
    already validated (``op`` and ``job_id`` digits/identifiers, ``user`` a
    plain user name, numbers), so they need no escaping. Success is read off
    the answer's first bytes; anything else is parsed and raised as by
    :func:`call`.
    """
    fields = [f'"v":{PROTOCOL_VERSION}', f'"op":"{op}"']
    if job_id is not None:
        job = [f'"job_id":"{job_id}"']
        if uid is not None:  # the Epilog sends the job id alone
            job += [f'"uid":{int(uid)}', f'"user":"{user}"',
                    f'"gpus":[{",".join(str(int(g)) for g in gpus or ())}]']
        # partition/account passed slurm_env.parse_word: no escaping needed.
        job += [f'"{k}":"{v}"' for k, v in (("partition", partition), ("account", account))
                if v is not None]
        fields.append('"job":{' + ",".join(job) + "}")
    raw = _exchange(socket_path, ("{" + ",".join(fields) + "}\n").encode(), timeout)
    if not raw.startswith(_OK_PREFIX):
        _result(raw)  # raises unless it is a success spelled differently
