"""SIEM export: audit events as RFC 5424 syslog over TLS (RFC 5425), or JSON lines.

* :func:`format_rfc5424` turns one audit event into one RFC 5424 message:
  facility 13 (log audit), the event's severity, its timestamp, node and code
  in the header, the chain position (``seq``, ``hash``) and the job's
  who/what in one structured-data element ``[ztgpu@32473 ...]``, and the
  whole event as canonical JSON (the chain's encoding, ``hash`` included) as
  the UTF-8 message body, so a SIEM can re-verify the chain.
* :func:`frame` applies RFC 5425 octet-counting framing.
* :class:`SyslogTlsSender` sends framed batches over one TLS connection,
  opened on demand and reopened after the receiver went away.
* :class:`JsonlWriter` appends the same canonical JSON, one event per line,
  to a file a SIEM agent tails, with one fsync per batch.

Delivery: RFC 5425 has no application-level acknowledgement, so a
successful :meth:`SyslogTlsSender.send` means "handed to the kernel on a
connection the receiver had accepted", not "stored by the SIEM". Two cases
that would otherwise lose batches silently are caught:

* a receiver that closed the connection since the last batch (restart,
  idle timeout) is noticed before the next batch is written, and the
  sender reconnects;
* under TLS 1.3 the server checks the client certificate *after* the
  client considers the handshake complete, so a refused client certificate
  shows up only as an alert (rsyslog ``ossl``) or a bare close (rsyslog
  ``gtls``) just after the handshake. The sender waits up to
  ``verdict_wait_s`` for that verdict on every new connection and raises
  SiemError if the receiver hung up.

Receiver tested against (``tests/test_siem.py``): rsyslog 8.2302 (Debian 12)
``imtcp`` with the ``gtls`` stream driver (rsyslog-gnutls, GnuTLS 3.7),
``StreamDriver.Mode="1"``, ``StreamDriver.AuthMode="x509/certvalid"``, with
ECDSA P-256 certificates and a TLS 1.3-only client context presenting a
client certificate. ``gtls`` is rsyslog's default TLS driver and does TLS
1.3 with ECDSA here, so it is the one the suite documents; the ``ossl``
driver (rsyslog-openssl) passes the same delivery test and reports a
refused client certificate with an explicit TLS alert instead of a bare
close. ``gtls`` also enforces ``x509/name`` in time for the verdict wait;
``ossl``'s ``x509/name`` check in 8.2302 runs after the session tickets
(so the sender cannot see it) and was erratic, so use ``gtls`` there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import socket
import ssl
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from ztgpu.errors import Fault

#: RFC 5424 facility 13, "log audit".
FACILITY_LOG_AUDIT = 13
#: Event severity -> RFC 5424 severity (6 informational, 4 warning, 2 critical).
SEVERITY_CODES: Mapping[str, int] = {"info": 6, "warning": 4, "critical": 2}
#: Used for an event whose severity is missing or unknown: an event that
#: cannot say how urgent it is deserves a look rather than being filed as info.
UNKNOWN_SEVERITY_CODE = 4
#: The structured-data element's id (enterprise number 32473 is IANA's
#: documentation example; a site with its own number may change it).
SD_ID = "ztgpu@32473"
#: Event fields copied into the structured data, in this order, when present.
SD_PARAMS = ("seq", "hash", "job_id", "user", "uid", "outcome")
BOM = b"\xef\xbb\xbf"
NILVALUE = "-"
MAX_HOSTNAME = 255
MAX_APP_NAME = 48
MAX_MSGID = 32

_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})"
)


class SiemError(Fault):
    """The SIEM export could not deliver (connection, TLS, file); retry later."""


# ---- formatting ---------------------------------------------------------


def _is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code < 0xA0


def _text(value: object) -> str:
    """*value* as text without control characters or lone surrogates."""
    text = value if isinstance(value, str) else str(value)
    text = "".join(ch for ch in text if not _is_control(ch))
    return text.encode("utf-8", "replace").decode("utf-8")


def _printusascii(value: object, max_len: int) -> str:
    """A header token: PRINTUSASCII only (others become ``_``), at most *max_len*."""
    if value is None:
        return NILVALUE
    text = "".join(ch if 33 <= ord(ch) <= 126 else "_" for ch in _text(value))
    return text[:max_len] or NILVALUE


def _hostname(value: object) -> str:
    """The node name if it is a valid HOSTNAME token, else NILVALUE (never a guess)."""
    if value is None:
        return NILVALUE
    text = _text(value)
    if not text or len(text) > MAX_HOSTNAME or any(not 33 <= ord(ch) <= 126 for ch in text):
        return NILVALUE
    return text


def _timestamp(value: object) -> str:
    """The event's ``ts`` if it is a valid RFC 5424 TIMESTAMP, else NILVALUE."""
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        return NILVALUE
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:  # digits in the right places but not a real date or time
        return NILVALUE
    return value


def severity_code(severity: object) -> int:
    """RFC 5424 severity for an event severity (unknown -> warning)."""
    if isinstance(severity, str):
        return SEVERITY_CODES.get(severity, UNKNOWN_SEVERITY_CODE)
    return UNKNOWN_SEVERITY_CODE


def _sd_value(value: object) -> str:
    """PARAM-VALUE escaping (RFC 5424 6.3.3): ``"``, ``\\`` and ``]`` get a backslash."""
    text = _text(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _structured_data(event: Mapping[str, Any]) -> str:
    params = "".join(
        f' {name}="{_sd_value(event[name])}"'
        for name in SD_PARAMS
        if event.get(name) is not None
    )
    return f"[{SD_ID}{params}]"


def _jsonable(value: Any) -> Any:
    """*value* as plain JSON data: odd types become strings, never an exception."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def event_json(event: Mapping[str, Any]) -> bytes:
    """The whole event (``hash`` included) as canonical UTF-8 JSON.

    Same encoding as the chain (sorted keys, ``(",", ":")``, no ASCII
    escaping). Never raises: values that are not JSON data are rendered with
    ``str()``, and a lone surrogate is written as a ``\\udcXX`` JSON escape.
    """
    text = json.dumps(_jsonable(event), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8", "backslashreplace")


def format_rfc5424(event: Mapping[str, Any], *, app_name: str = "ztgpu") -> bytes:
    """One RFC 5424 message for one audit event. Never raises for odd field values.

    ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID [ztgpu@32473 ...] BOM JSON`` with
    PRI = 13 * 8 + severity, TIMESTAMP = ``ts`` (NILVALUE if not RFC 5424),
    HOSTNAME = ``node`` (NILVALUE if not 1-255 printable ASCII), MSGID =
    ``code`` (printable ASCII, truncated to 32). Control characters are
    removed from header fields and structured-data values.
    """
    pri = FACILITY_LOG_AUDIT * 8 + severity_code(event.get("severity"))
    header = " ".join((
        f"<{pri}>1",
        _timestamp(event.get("ts")),
        _hostname(event.get("node")),
        _printusascii(app_name, MAX_APP_NAME),
        NILVALUE,
        _printusascii(event.get("code"), MAX_MSGID),
    ))
    head = f"{header} {_structured_data(event)} ".encode()
    return head + BOM + event_json(event)


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d " % len(message) + message


# ---- syslog over TLS ----------------------------------------------------


def _peer_problem(sock: ssl.SSLSocket, wait_s: float) -> str | None:
    """Why the receiver is no longer talking to us, or None if it still is.

    A syslog receiver never sends application data, so anything readable is
    either TLS housekeeping (session tickets: fine), an alert or a close.
    Waits up to *wait_s* for something to become readable.
    """
    try:
        readable, _, _ = select.select([sock], [], [], wait_s)
    except (OSError, ValueError) as exc:  # ValueError: the socket is already closed
        return f"socket unusable: {exc}"
    if not readable and not sock.pending():
        return None
    previous = sock.gettimeout()
    try:
        sock.setblocking(False)
        data = sock.recv(1)
    except ssl.SSLWantReadError:
        return None
    except OSError as exc:
        return f"receiver ended the session: {exc}"
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)
    if not data:
        return "receiver closed the connection"
    return "receiver sent unexpected data"


class SyslogTlsSender:
    """Blocking RFC 5425 sender over one persistent TLS connection.

    *context* is a client context (CA verification, optionally a client
    certificate and a minimum TLS version); *server_name* is the name (or IP
    address) the receiver's certificate must carry, *host* by default.
    *timeout_s* bounds connecting, the TLS handshake and each write that
    makes no progress. *verdict_wait_s* is how long a new connection waits
    for a TLS 1.3 server to refuse the client certificate (0 disables).
    """

    def __init__(self, host: str, port: int, context: ssl.SSLContext, *,
                 server_name: str | None = None, timeout_s: float = 10.0,
                 verdict_wait_s: float = 0.5) -> None:
        self.host = host
        self.port = port
        self._context = context
        self._server_name = server_name or host
        self._timeout_s = timeout_s
        self._verdict_wait_s = verdict_wait_s
        self._sock: ssl.SSLSocket | None = None

    @property
    def _where(self) -> str:
        return f"syslog receiver {self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        """True while a connection is open (it may still turn out to be stale)."""
        return self._sock is not None

    @property
    def tls_version(self) -> str | None:
        """The open connection's TLS version (e.g. ``"TLSv1.3"``), or None."""
        return None if self._sock is None else self._sock.version()

    def _connect(self) -> ssl.SSLSocket:
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self._timeout_s)
        except OSError as exc:
            raise SiemError(f"cannot connect to {self._where}: {exc}") from exc
        try:
            tls = self._context.wrap_socket(raw, server_hostname=self._server_name)
        except OSError as exc:  # ssl.SSLError and certificate errors are OSErrors
            raw.close()
            raise SiemError(f"TLS handshake with {self._where} failed: {exc}") from exc
        if self._verdict_wait_s > 0:
            problem = _peer_problem(tls, self._verdict_wait_s)
            if problem is not None:
                tls.close()
                raise SiemError(
                    f"{self._where} refused the session right after the TLS handshake "
                    f"({problem}); is the client certificate accepted there?"
                )
        return tls

    def _connection(self) -> ssl.SSLSocket:
        if self._sock is not None and _peer_problem(self._sock, 0) is not None:
            # The receiver went away since the last batch (restart, idle
            # timeout): nothing of this batch is written yet, reconnect.
            self.close()
        if self._sock is None:
            self._sock = self._connect()
        return self._sock

    def send(self, messages: Sequence[bytes]) -> None:
        """Frame and send *messages* in order; connects on demand.

        Raises SiemError (after closing the connection; the next call
        reconnects) if the receiver cannot be reached, the TLS handshake
        fails or a write fails. Some of the batch may then have arrived:
        the caller resends the whole batch later (at-least-once).
        """
        if not messages:
            return
        payload = b"".join(frame(message) for message in messages)
        sock = self._connection()
        try:
            sock.sendall(payload)
        except OSError as exc:
            self.close()
            raise SiemError(
                f"sending {len(messages)} message(s) to {self._where} failed: {exc}"
            ) from exc

    def close(self) -> None:
        """Close the connection (if any). Safe to call more than once."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> SyslogTlsSender:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---- JSON lines ---------------------------------------------------------


class JsonlWriter:
    """Appends audit events as canonical JSON lines, one fsync per batch.

    Creates the file (mode 0640) and its directory on first write. A line
    left torn by an earlier failed write is closed off with a newline before
    new lines are appended, so every later line stays parseable.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._torn_tail = False

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            fd = os.open(self.path, flags)
        else:
            os.fchmod(fd, 0o640)  # exact mode whatever the umask
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)  # the new file's name is durable too
            finally:
                os.close(dir_fd)
        size = os.fstat(fd).st_size
        self._torn_tail = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        self._fd = fd
        return fd

    def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Append one line per event and fsync. Raises SiemError on any I/O failure."""
        if not events:
            return
        data = b"".join(event_json(event) + b"\n" for event in events)
        try:
            fd = self._open()
            if self._torn_tail:
                data = b"\n" + data
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
            self._torn_tail = False
        except OSError as exc:
            self.close()
            raise SiemError(f"cannot append {len(events)} event(s) to {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the file (if open). Safe to call more than once."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
