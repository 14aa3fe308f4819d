"""The auditors' view of the central collector: trail, verify and export.

An auditor holds an ``auditor`` certificate from the site CA and reads the
collector's query API (``GET /v1/nodes``, ``/v1/events``, ``/v1/chain``,
``/v1/checkpoints``) over mutual TLS 1.3. This module provides:

* ``AuditClient``: a small blocking client (stdlib ``http.client``, one
  kept-alive connection, a deadline on every socket operation) whose
  ``events`` and ``chain`` methods are generators over pages, so a million
  events never have to be in memory at once;
* ``write_trail``: a filtered timeline across all nodes as a table, JSON or CSV;
* ``verify_collector``: every stored chain re-verified end to end, with the
  nodes' signed checkpoints, into a ``VerifyReport``;
* ``export_jsonl``: events as canonical JSON Lines, written atomically;
* ``parse_time``: the time arguments of the command line.

Errors: ``CollectorError`` (the collector answered with an error; its
``error`` text is kept), ``CollectorUnreachable`` (no TCP or TLS
connection), ``ExportError`` (the output file); bad arguments raise
``UsageError`` naming the option.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import http.client
import json
import os
import re
import ssl
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeGuard
from urllib.parse import urlencode, urlsplit

from ztgpu.errors import Fault, UsageError
from ztgpu.events import checkpoint_message, format_timestamp, verify_chain
from ztgpu.https_client import STALE, KeptAliveHttps

if TYPE_CHECKING:  # cryptography and pydantic load only when used
    from cryptography import x509

    from ztgpu.config import Config

# ---------------------------------------------------------------- errors


class CollectorError(Fault):
    """The collector answered a request with an error status (or with garbage).

    ``status`` is the HTTP status (0 for an unusable reply) and ``error`` the
    collector's own ``error`` text, which the message repeats.
    """

    def __init__(self, message: str, *, status: int = 0, error: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class CollectorUnreachable(Fault):
    """No usable connection to the collector: refused, timed out, TLS failed."""


class ExportError(Fault):
    """The export file could not be written."""


# ---------------------------------------------------------- time arguments

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,6}))?([Zz]|[+-][0-9]{2}:[0-9]{2})")
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_RELATIVE = re.compile(r"([0-9]{1,7})([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, option: str, *, now: datetime | None = None) -> str:
    """A command-line time as the collector's form, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC).

    Accepts RFC 3339 (``2026-11-26T12:00:00Z``, with 1-6 fraction digits, or
    with a ``+hh:mm``/``-hh:mm`` offset, converted to UTC), a date
    (``2026-11-26``, midnight UTC), or a time ago (``90s``, ``30m``, ``12h``,
    ``7d``, ``2w``; ago from ``now``, default the current time). Raises
    UsageError naming ``option`` for anything else.
    """
    value = text.strip()
    try:
        if match := _RFC3339.fullmatch(value):
            year, month, day, hour, minute, second, frac, zone = match.groups()
            offset = timedelta(0)
            if zone not in ("Z", "z"):
                sign = 1 if zone[0] == "+" else -1
                offset = sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            moment = datetime(int(year), int(month), int(day), int(hour), int(minute),
                              int(second), int((frac or "").ljust(6, "0")),
                              tzinfo=UTC) - offset
        elif match := _DATE.fullmatch(value):
            year, month, day = (int(part) for part in match.groups())
            moment = datetime(year, month, day, tzinfo=UTC)
        elif match := _RELATIVE.fullmatch(value):
            amount, unit = match.groups()
            base = now if now is not None else datetime.now(UTC)
            moment = base.astimezone(UTC) - timedelta(**{_UNITS[unit]: int(amount)})
        else:
            raise UsageError(f"{option} {text!r}: expected RFC 3339 (2026-11-26T12:00:00Z "
                             "or with +hh:mm), a date (2026-11-26) or a time ago "
                             "(30m, 12h, 7d)")
        if not 1970 <= moment.year <= 9999:
            raise ValueError("year out of range")
    except (ValueError, OverflowError):
        raise UsageError(f"{option} {text!r}: not a valid time") from None
    return format_timestamp(moment)


# ------------------------------------------------------------ event filters

_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIGITS = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class EventQuery:
    """Filters of ``GET /v1/events``; ``since``/``until`` in the collector's form.

    ``since`` is inclusive and ``until`` exclusive. Construct with
    ``EventQuery.from_options`` to have the values checked.
    """

    node: str | None = None
    job: str | None = None
    user: str | None = None
    code: str | None = None
    since: str | None = None
    until: str | None = None

    @classmethod
    def from_options(cls, *, node: str | None = None, job: str | None = None,
                     user: str | None = None, code: str | None = None,
                     since: str | None = None, until: str | None = None,
                     now: datetime | None = None) -> EventQuery:
        """Check command-line filter values; UsageError names the bad option."""
        if job is not None and not _DIGITS.fullmatch(job):
            raise UsageError(f"--job {job!r}: a job id is digits only")
        if node is not None and not _NODE.fullmatch(node):
            raise UsageError(f"--node {node!r}: not a node name")
        for option, value in (("--user", user), ("--code", code)):
            if value is not None and not 0 < len(value) <= 64:
                raise UsageError(f"{option}: must be 1-64 characters")
        start = parse_time(since, "--since", now=now) if since is not None else None
        end = parse_time(until, "--until", now=now) if until is not None else None
        if start is not None and end is not None and end <= start:
            raise UsageError(f"--until {until!r} is not after --since {since!r}")
        return cls(node=node, job=job, user=user, code=code, since=start, until=end)

    def params(self) -> dict[str, str]:
        """The query-string parameters (unset filters left out)."""
        pairs = (("node", self.node), ("job", self.job), ("user", self.user),
                 ("code", self.code), ("since", self.since), ("until", self.until))
        return {key: value for key, value in pairs if value is not None}

    def is_empty(self) -> bool:
        return not self.params()


# ------------------------------------------------------------ connection


@dataclass(frozen=True)
class ConnectionSettings:
    """Where the collector is and which files prove the auditor's identity."""

    url: str
    ca_cert: Path
    cert: Path
    key: Path
    timeout_s: float = 10.0

    @classmethod
    def resolve(cls, config: Config, config_file: Path, *, collector: str | None,
                cert: str | None, key: str | None, ca_cert: str | None) -> ConnectionSettings:
        """Command-line values over the config's ``audit.collector_url`` and ``tls.*``.

        Raises UsageError saying which option or config key to set when the
        URL, the certificate, its key or the CA certificate is missing, or
        when only one of ``--cert``/``--key`` is given.
        """
        url = collector or config.audit.collector_url
        if not url:
            raise UsageError("no collector URL: pass --collector https://HOST:PORT or set "
                             f"audit.collector_url in {config_file}")
        if (cert is None) != (key is None):
            raise UsageError("--cert and --key go together: pass both (the auditor "
                             "certificate and its key)")
        cert_path = Path(cert) if cert is not None else config.tls.cert
        key_path = Path(key) if key is not None else config.tls.key
        if cert_path is None or key_path is None:
            raise UsageError("no client certificate: pass --cert and --key (an auditor "
                             f"certificate) or set tls.cert and tls.key in {config_file}")
        ca_path = Path(ca_cert) if ca_cert is not None else config.tls.ca_cert
        if not ca_path.exists():
            source = "--ca-cert" if ca_cert is not None else f"tls.ca_cert in {config_file}"
            raise UsageError(f"CA certificate {ca_path} does not exist: pass --ca-cert or "
                             f"fix {source}")
        return cls(url=check_url(url, "--collector" if collector else "audit.collector_url"),
                   ca_cert=ca_path, cert=cert_path, key=key_path,
                   timeout_s=config.audit.request_timeout_s)


def check_url(url: str, option: str) -> str:
    """``url`` as ``https://host[:port]`` (no trailing slash); UsageError otherwise."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise UsageError(f"{option} {url!r}: bad port")
    if (parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/")
            or parts.query or parts.fragment or parts.username or parts.password):
        raise UsageError(f"{option} {url!r}: must be https://HOST[:PORT] (TLS is mandatory)")
    return f"https://{parts.netloc}"


def open_client(settings: ConnectionSettings, *, now: datetime | None = None) -> AuditClient:
    """An ``AuditClient`` for ``settings``.

    Raises PkiError if the files cannot be loaded or the client certificate
    is not valid ``now`` (the collector would drop the connection without
    saying why, so this is checked here first).
    """
    from ztgpu.pki import PkiError, cert_not_after, client_context, load_cert

    context = client_context(settings.ca_cert, settings.cert, settings.key)
    cert = load_cert(settings.cert)
    when = now or datetime.now(UTC)
    if when > cert_not_after(cert):
        raise PkiError(f"certificate {settings.cert} expired at "
                       f"{cert_not_after(cert).isoformat()}; renew it (ztgpu pki renew)")
    if when < cert.not_valid_before_utc:
        raise PkiError(f"certificate {settings.cert} is not valid before "
                       f"{cert.not_valid_before_utc.isoformat()} (is this host's clock right?)")
    return AuditClient(settings.url, context, timeout_s=settings.timeout_s)



class AuditClient:
    """Read-only client of the collector's auditor API.

    Every socket operation has the deadline ``timeout_s``. A kept-alive
    connection the collector closed is reopened once per request (GETs are
    idempotent). Pages hold ``page_size`` events, or as many as the
    collector chooses when it is None (it refuses a ``page_size`` above its
    ``max_page_events``). ``requests`` counts the requests answered. Not
    thread-safe.
    """

    def __init__(self, url: str, context: ssl.SSLContext, *, timeout_s: float = 10.0,
                 page_size: int | None = None) -> None:
        self.url = check_url(url, "collector URL")
        parts = urlsplit(self.url)
        assert parts.hostname is not None  # check_url guarantees it
        self._host = parts.hostname
        self.timeout_s = timeout_s
        self.page_size = page_size
        self.requests = 0
        self._http = KeptAliveHttps(parts.hostname, parts.port or 443, context, timeout_s)

    def __enter__(self) -> AuditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- requests -----------------------------------------------------------
    def get(self, path: str, query: Mapping[str, str | int] | None = None) -> Any:
        """``GET path?query`` and return the decoded JSON body of a 200 reply.

        Raises CollectorUnreachable (connection, TLS, deadline) or
        CollectorError (any other status, or a body that is not JSON).
        """
        target = f"{path}?{urlencode(dict(query))}" if query else path
        status, reason, data = self._send("GET", target)
        self.requests += 1
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):
            body = None
        if status != 200:
            error = (str(body["error"]) if isinstance(body, dict) and "error" in body
                     else data[:200].decode("utf-8", "replace").strip())
            hint = ""
            if status == 403:
                hint = ("; use an auditor certificate (ztgpu pki issue --role auditor "
                        "--name YOU) with --cert/--key")
            raise CollectorError(f"the collector at {self.url} refused GET {path}: "
                                 f"{status} {reason}: {_printable(error)}{hint}",
                                 status=status, error=error)
        if body is None:
            raise CollectorError(f"the collector at {self.url} sent a reply to GET {path} "
                                 "that is not JSON", status=status)
        return body

    def _send(self, method: str, target: str) -> tuple[int, str, bytes]:
        try:
            return self._http.exchange(method, target, headers={"Accept": "application/json"})
        except STALE as exc:
            raise CollectorUnreachable(
                f"the collector at {self.url} closed the connection "
                f"({type(exc).__name__}): was the client certificate refused? "
                "check --cert/--key and --ca-cert") from exc
        except OSError as exc:
            raise CollectorUnreachable(self._describe(exc)) from exc
        except http.client.HTTPException as exc:
            raise CollectorUnreachable(f"the collector at {self.url} sent a malformed "
                                       f"HTTP reply ({type(exc).__name__})") from exc

    def _describe(self, exc: OSError) -> str:
        where = f"the collector at {self.url}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (f"TLS with {where} failed: its certificate was not accepted "
                    f"({exc.verify_message}); is --ca-cert the site CA, and does the "
                    f"collector's certificate name {self._host}?")
        if isinstance(exc, ssl.SSLError):
            reason = str(exc.reason or exc).lower().replace("_", " ")
            return (f"TLS with {where} failed: {reason} (the collector needs TLS 1.3 and a "
                    "client certificate from the site CA)")
        if isinstance(exc, ConnectionRefusedError):
            return f"cannot reach {where}: connection refused (is ztgpu-collectord running?)"
        if isinstance(exc, TimeoutError):
            return f"{where} did not answer within {self.timeout_s:g}s"
        return f"cannot reach {where}: {exc.strerror or exc}"

    def _page(self, path: str, query: dict[str, str | int],
              limit: int | None = None) -> dict[str, Any]:
        """One page of at most ``limit`` (default ``page_size``) events.

        Without either, the collector picks the page size.
        """
        size = limit or self.page_size
        body = self.get(path, query if size is None else {**query, "limit": size})
        if not isinstance(body, dict) or not isinstance(body.get("events"), list):
            raise CollectorError(f"the collector at {self.url} sent an unexpected page "
                                 f"for {path}")
        if not all(isinstance(event, dict) for event in body["events"]):
            raise CollectorError(f"the collector at {self.url} sent a page for {path} "
                                 "with an event that is not a JSON object")
        return body

    # -- API ----------------------------------------------------------------
    def nodes(self) -> list[NodeSummary]:
        """``GET /v1/nodes``: every stored chain with its head, by node name."""
        body = self.get("/v1/nodes")
        items = body.get("nodes") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise CollectorError(f"the collector at {self.url} sent an unexpected node list")
        return [NodeSummary.from_json(item, self.url) for item in items]

    def events(self, query: EventQuery) -> Iterator[dict[str, Any]]:
        """``GET /v1/events`` page by page, following ``next``: ordered by (ts, node, seq)."""
        params: dict[str, str | int] = dict(query.params())
        while True:
            body = self._page("/v1/events", params)
            yield from body["events"]
            cursor = body.get("next")
            if not body["events"] or not isinstance(cursor, str) or not cursor:
                return
            params["after"] = cursor

    def chain(self, node: str, *, after_seq: int = 0,
              until_seq: int | None = None) -> Iterator[dict[str, Any]]:
        """``GET /v1/chain``: ``node``'s events in seq order, page by page.

        Stops after ``until_seq`` (the events beyond it are not yielded). An
        event whose ``seq`` is not an int above the previous page's is
        yielded and ends the stream (the verifier flags it).
        """
        while True:
            events = self._page("/v1/chain", {"node": node, "after_seq": after_seq})["events"]
            if not events:
                return
            for event in events:
                seq = event.get("seq")
                if until_seq is not None and _is_seq(seq) and seq > until_seq:
                    return
                yield event
                if not _is_seq(seq) or seq <= after_seq:
                    return
                after_seq = seq
            if until_seq is not None and after_seq >= until_seq:
                return

    def first_event(self, node: str) -> dict[str, Any] | None:
        """The lowest-seq stored event of ``node``'s chain, or None if it has none."""
        events = self._page("/v1/chain", {"node": node, "after_seq": 0}, limit=1)["events"]
        return events[0] if events else None

    def checkpoints(self, node: str) -> list[dict[str, Any]]:
        """``GET /v1/checkpoints``: ``node``'s signed chain heads, oldest first."""
        body = self.get("/v1/checkpoints", {"node": node})
        items = body.get("checkpoints") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise CollectorError(f"the collector at {self.url} sent an unexpected "
                                 "checkpoint list")
        return items


def _is_seq(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class NodeSummary:
    """One chain in ``GET /v1/nodes``: its stored head and event count."""

    node: str
    head_seq: int
    head_hash: str
    events: int

    @classmethod
    def from_json(cls, item: Any, url: str) -> NodeSummary:
        ok = (isinstance(item, dict) and isinstance(item.get("node"), str)
              and _is_seq(item.get("head_seq")) and isinstance(item.get("head_hash"), str)
              and _is_seq(item.get("events")))
        if not ok:
            raise CollectorError(f"the collector at {url} sent a malformed node entry")
        return cls(item["node"], item["head_seq"], item["head_hash"], item["events"])


# ------------------------------------------------------------------ trail

TrailFormat = Literal["table", "json", "csv"]
TRAIL_COLUMNS = ("time", "node", "event", "user", "gpus", "outcome", "reason")
_REASON_WIDTH = 60


def _printable(text: str) -> str:
    """``text`` with every non-printable character escaped (one terminal-safe line)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _gpu_indices(value: Any) -> str:
    if isinstance(value, list) and value:
        return ",".join(str(g.get("index", "?")) if isinstance(g, dict) else str(g)
                        for g in value)
    return "-"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def trail_row(event: Mapping[str, Any]) -> tuple[str, ...]:
    """The full (untruncated, unescaped) values of ``TRAIL_COLUMNS`` for one event."""
    return (_text(event.get("ts")), _text(event.get("node")), _text(event.get("code")),
            _text(event.get("user")), _gpu_indices(event.get("gpus")),
            _text(event.get("outcome")), _text(event.get("reason")))


def _table_time(ts: str) -> str:
    # 2026-11-26T12:00:00.123456Z -> 2026-11-26 12:00:00.123Z
    match = re.fullmatch(r"(\S{10})T(\S{8})(?:\.([0-9]+))?Z", ts)
    if match is None:
        return ts
    day, clock, frac = match.groups()
    return f"{day} {clock}.{(frac or '').ljust(3, '0')[:3]}Z"


def write_trail(events: Iterable[Mapping[str, Any]], fmt: TrailFormat, out: IO[str]) -> int:
    """Write ``events`` (already in timeline order) to ``out``; return how many.

    ``table``: aligned columns with a header, every cell escaped to one
    printable line and ``reason`` cut to 60 characters. ``json``: one JSON
    array of the full events (ASCII, so safe on a terminal). ``csv``: a
    header and one row per event with the full values (``csv`` module
    quoting). ``json`` and ``csv`` are streamed; ``table`` holds the rows
    to align them.
    """
    count = 0
    if fmt == "json":
        out.write("[")
        for event in events:
            out.write(",\n" if count else "\n")
            out.write(json.dumps(dict(event), sort_keys=True, ensure_ascii=True))
            count += 1
        out.write("\n]\n" if count else "]\n")
        return count
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(TRAIL_COLUMNS)
        for event in events:
            writer.writerow(trail_row(event))
            count += 1
        return count
    rows: list[tuple[str, ...]] = []
    for event in events:
        cells = [_printable(cell) for cell in trail_row(event)]
        cells[0] = _table_time(cells[0])
        if len(cells[-1]) > _REASON_WIDTH:
            cells[-1] = cells[-1][:_REASON_WIDTH - 1] + "…"
        rows.append(tuple(cells))
    header = tuple(name.upper() for name in TRAIL_COLUMNS)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                  .rstrip() + "\n")
    return len(rows)


# ----------------------------------------------------------------- export


def canonical_line(event: Mapping[str, Any]) -> bytes:
    """One JSON Lines record: canonical JSON (sorted keys, no spaces, UTF-8) and a newline."""
    return json.dumps(dict(event), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8") + b"\n"


def export_jsonl(events: Iterable[Mapping[str, Any]], path: Path | None,
                 stdout: IO[bytes]) -> int:
    """Write ``events`` as JSON Lines to ``path`` (or ``stdout``); return how many.

    A file is written to a temporary file beside it (mode 0640), flushed to
    disk and renamed over ``path``, so it is either complete or absent; on
    any failure the temporary file is removed. Raises ExportError naming the
    file; errors of ``events`` (e.g. CollectorError) pass through unchanged.
    """
    if path is None:
        count = 0
        for event in events:
            stdout.write(canonical_line(event))
            count += 1
        stdout.flush()
        return count
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                   suffix=".tmp")
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o640)
            count = 0
            for event in events:
                handle.write(canonical_line(event))
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return count


# ----------------------------------------------------------------- verify


@dataclass(frozen=True)
class RecordedGap:
    """An ``audit.gap`` event of a collector: seqs expected..received-1 never arrived."""

    source_node: str
    expected_seq: int
    received_seq: int
    #: The collector chain and seq of the ``audit.gap`` event.
    recorder: str
    recorder_seq: int

    def describe(self) -> str:
        return (f"recorded gap: {_seqs(self.expected_seq, self.received_seq - 1)} never "
                f"reached the collector (audit.gap {self.recorder} seq {self.recorder_seq})")


@dataclass(frozen=True)
class ChainProblem:
    """A finding in one chain: ``broken`` (tampering, loss) or ``gap`` (a recorded gap)."""

    kind: Literal["broken", "gap"]
    seq: int | None
    message: str


@dataclass
class ChainReport:
    """The verification of one node's chain."""

    node: str
    head_seq: int
    events: int = 0
    #: Contiguous seq runs verified, e.g. ``[(1, 40), (46, 100)]``.
    ranges: list[tuple[int, int]] = field(default_factory=list)
    checkpoints: int = 0
    last_signed_seq: int | None = None
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def broken(self) -> bool:
        return any(p.kind == "broken" for p in self.problems)

    @property
    def gaps(self) -> list[ChainProblem]:
        return [p for p in self.problems if p.kind == "gap"]

    @property
    def status(self) -> Literal["OK", "INCOMPLETE", "BROKEN"]:
        if self.broken:
            return "BROKEN"
        return "INCOMPLETE" if self.problems else "OK"

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """Human-readable lines: one per problem, then a summary unless broken."""
        out = []
        for problem in self.problems:
            if problem.kind == "gap":
                out.append(f"{self.node}: {problem.message}")
            elif problem.seq is not None and not problem.message.startswith("checkpoint"):
                out.append(f"{self.node}: BROKEN at seq {problem.seq}: {problem.message}")
            else:
                out.append(f"{self.node}: BROKEN: {problem.message}")
        if self.broken:
            return out
        runs = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in self.ranges)
        span = f" (seq {runs})" if runs else ""
        signed = (f"{self.checkpoints} checkpoint{'s' if self.checkpoints != 1 else ''} "
                  f"verified, last signed seq {self.last_signed_seq}"
                  if self.last_signed_seq is not None else "no checkpoints")
        plural = "s" if self.events != 1 else ""
        out.append(f"{self.node}: {self.status} {self.events} event{plural}{span}, {signed}")
        return out


@dataclass
class VerifyReport:
    """The verification of every chain the collector stores."""

    chains: list[ChainReport] = field(default_factory=list)
    #: Every trusted ``audit.gap`` record, in the collectors' order.
    recorded_gaps: list[RecordedGap] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(chain.ok for chain in self.chains)

    @property
    def events(self) -> int:
        return sum(chain.events for chain in self.chains)

    def chain(self, node: str) -> ChainReport:
        """The report of ``node``'s chain; KeyError if it was not verified."""
        for report in self.chains:
            if report.node == node:
                return report
        raise KeyError(node)

    def summary(self) -> str:
        """The final line: ``OK: N chains, M events verified`` or ``FAILED: ...``."""
        n = len(self.chains)
        if self.ok:
            return f"OK: {n} chain{'s' if n != 1 else ''}, {self.events} events verified"
        broken = [c.node for c in self.chains if c.broken]
        gapped = [c.node for c in self.chains if not c.broken and c.gaps]
        parts = []
        if broken:
            parts.append(f"{len(broken)} of {n} chains broken ({', '.join(broken)})")
        if gapped:
            parts.append(f"{len(gapped)} of {n} chains with recorded gaps "
                         f"({', '.join(gapped)})")
        return f"FAILED: {'; '.join(parts)}; {self.events} events verified"

    def lines(self) -> list[str]:
        return [line for chain in self.chains for line in chain.lines()] + [self.summary()]


def _seqs(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seqs {first}-{last}"


def _short(digest: Any) -> str:
    return f"{str(digest)[:8]}…"


_CHECKPOINT_TS = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?Z")


def _checkpoint_time(ts: Any) -> datetime | None:
    match = _CHECKPOINT_TS.fullmatch(ts) if isinstance(ts, str) else None
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    micro = int((match.group(7) or "").ljust(6, "0"))
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)
    except ValueError:
        return None


def check_checkpoint(cp: Mapping[str, Any], node: str, ca: x509.Certificate) -> str | None:
    """What is wrong with one stored checkpoint of ``node``, or None if its signature holds.

    Decodes ``cert`` (base64 DER) and ``sig`` (base64) and checks with
    ``pki.verify_signature`` that a ``node`` certificate named ``node``,
    issued by ``ca`` and valid at the checkpoint's ``ts``, signed
    ``checkpoint_message`` of its node, seq, hash and ts.
    """
    from ztgpu.pki import PkiError, identity_from_der, verify_signature

    if cp.get("node") != node or not _is_seq(cp.get("seq")) or not isinstance(
            cp.get("hash"), str):
        return "malformed checkpoint record"
    when = _checkpoint_time(cp.get("ts"))
    if when is None:
        return f"malformed ts {str(cp.get('ts'))[:40]!r}"
    try:
        cert_der = base64.b64decode(str(cp.get("cert")), validate=True)
        sig = base64.b64decode(str(cp.get("sig")), validate=True)
    except (binascii.Error, ValueError):
        return "cert or sig is not valid base64"
    try:
        # Nodes sign their chains; services (authd) sign their own.
        role = identity_from_der(cert_der).role
        if role not in ("node", "service"):
            return f"signed by a {role} certificate, not a node or service"
        verify_signature(cert_der, ca, checkpoint_message(cp), sig, at=when, role=role,
                         name=node)
    except PkiError as exc:
        return f"signature does not hold: {exc}"
    return None


class _Walk:
    """Splits a chain stream into gapless runs for ``verify_chain``, checking as it goes.

    ``segment()`` yields events until the next one jumps ahead in seq (it is
    kept in ``pending``). Code after each ``yield`` runs only once
    ``verify_chain`` has accepted the event (it asks for the next one only
    then), so ``accepted`` sees verified events only: it counts them, checks
    their node and compares them with the checkpoints.
    """

    def __init__(self, node: str, events: Iterator[dict[str, Any]],
                 checkpoints: dict[int, Mapping[str, Any]], report: ChainReport) -> None:
        self.node = node
        self.events = events
        self.checkpoints = checkpoints
        self.report = report
        self.pending: dict[str, Any] | None = next(events, None)
        self.last: dict[str, Any] | None = None
        self.matched: set[int] = set()
        self.stopped = False

    def segment(self) -> Iterator[dict[str, Any]]:
        event, self.pending = self.pending, None
        while event is not None:
            yield event
            self.accepted(event)
            if self.stopped:
                return
            following = next(self.events, None)
            if (following is not None and _is_seq(following.get("seq"))
                    and following["seq"] > event["seq"] + 1):
                self.pending = following
                return
            event = following

    def accepted(self, event: dict[str, Any]) -> None:
        report, seq = self.report, event["seq"]
        if event.get("node") != self.node:
            self.fail(seq, f"the event belongs to node {str(event.get('node'))[:64]!r}")
            return
        report.events += 1
        if report.ranges and report.ranges[-1][1] == seq - 1:
            report.ranges[-1] = (report.ranges[-1][0], seq)
        else:
            report.ranges.append((seq, seq))
        self.last = event
        cp = self.checkpoints.get(seq)
        if cp is None:
            return
        self.matched.add(seq)
        if cp["hash"] != event.get("hash"):
            self.fail(None, f"checkpoint seq {seq} signed hash {_short(cp['hash'])} but "
                      f"the stored event has {_short(event.get('hash'))}")
            return
        report.checkpoints += 1
        report.last_signed_seq = seq

    def fail(self, seq: int | None, message: str) -> None:
        self.report.problems.append(ChainProblem("broken", seq, message))
        self.stopped = True


def verify_chain_of(client: AuditClient, ca: x509.Certificate, summary: NodeSummary,
                    gaps: Mapping[tuple[int, int], RecordedGap]) -> ChainReport:
    """Verify one node's chain up to its head in ``summary``.

    Streams ``GET /v1/chain`` through ``events.verify_chain`` in gapless
    runs. A seq jump is a recorded gap if ``gaps`` holds exactly
    ``(expected_seq, received_seq)`` for it, otherwise the chain is broken.
    Checks every checkpoint's signature and that the stored event at its seq
    has the signed hash; that the chain ends at the stored head with its
    hash; and that every recorded gap appears in the chain.
    """
    node, head = summary.node, summary.head_seq
    report = ChainReport(node=node, head_seq=head)
    checkpoints: dict[int, Mapping[str, Any]] = {}
    for cp in client.checkpoints(node):
        seq = cp.get("seq")
        if _is_seq(seq) and seq > head:
            continue  # signed after the head was read: the next run checks it
        problem = check_checkpoint(cp, node, ca)
        if problem is not None or not _is_seq(seq):
            report.problems.append(ChainProblem("broken", seq if _is_seq(seq) else None,
                                                f"checkpoint seq {seq}: {problem}"))
        else:
            checkpoints[seq] = cp
    walk = _Walk(node, client.chain(node, until_seq=head), checkpoints, report)
    expected, seen_gaps = 1, set()
    while walk.pending is not None:
        first = walk.pending
        seq = first.get("seq")
        if _is_seq(seq) and seq > expected:
            gap = gaps.get((expected, seq))
            if gap is None:
                walk.fail(expected, f"{_seqs(expected, seq - 1)} missing and no audit.gap "
                          "records it (deleted from the store?)")
                break
            seen_gaps.add((expected, seq))
            report.problems.append(ChainProblem("gap", expected, gap.describe()))
        result = verify_chain(walk.segment())
        if not result.ok:
            walk.fail(result.first_bad_seq, result.problem or "broken link")
        if walk.stopped:
            break
        assert walk.last is not None
        expected = walk.last["seq"] + 1
    if walk.stopped:
        return report
    last_seq = walk.last["seq"] if walk.last is not None else 0
    if last_seq < head:
        walk.fail(last_seq + 1, f"{_seqs(last_seq + 1, head)} missing: the collector's head "
                  f"is seq {head} (deleted from the store?)")
    elif walk.last is not None and walk.last.get("hash") != summary.head_hash:
        walk.fail(head, f"the collector's head records hash {_short(summary.head_hash)} "
                  f"but the stored event has {_short(walk.last.get('hash'))}")
    for seq in sorted(set(checkpoints) - walk.matched):
        walk.fail(None, f"checkpoint seq {seq} signed hash {_short(checkpoints[seq]['hash'])} "
                  "but the chain has no event at that seq")
    for (expected_seq, received_seq), gap in sorted(gaps.items()):
        if (expected_seq, received_seq) not in seen_gaps and received_seq <= head:
            walk.fail(expected_seq, f"{gap.describe()}, but the stored chain has no gap there")
    return report


def recorded_gaps(client: AuditClient) -> list[RecordedGap]:
    """The ``audit.gap`` events of the collectors' own chains.

    Only chains whose seq 1 is ``collector.start`` count as a collector's:
    no node can post into such a chain (the collector refuses its own name),
    so a node cannot excuse a gap by forging an ``audit.gap`` in its own.
    """
    found: list[RecordedGap] = []
    collectors: dict[str, bool] = {}
    for event in client.events(EventQuery(code="audit.gap")):
        recorder = event.get("node")
        if not isinstance(recorder, str):
            continue
        if recorder not in collectors:
            first = client.first_event(recorder)
            collectors[recorder] = (first is not None and first.get("seq") == 1
                                    and first.get("code") == "collector.start")
        source, expected, received = (event.get("source_node"), event.get("expected_seq"),
                                      event.get("received_seq"))
        if (collectors[recorder] and isinstance(source, str) and _is_seq(expected)
                and _is_seq(received) and _is_seq(event.get("seq"))):
            found.append(RecordedGap(source, expected, received, recorder, event["seq"]))
    return found


def verify_collector(client: AuditClient, ca: x509.Certificate, *,
                     on_chain: Callable[[ChainReport], None] | None = None) -> VerifyReport:
    """Verify every chain in ``GET /v1/nodes`` (the collectors' own included).

    ``ca`` is the site CA certificate the checkpoint signers must chain to.
    ``on_chain`` is called with each chain's report as soon as it is done.
    Raises CollectorError/CollectorUnreachable if the collector cannot be
    read; findings are in the returned report, never raised.
    """
    nodes = client.nodes()
    report = VerifyReport(recorded_gaps=recorded_gaps(client))
    by_node: dict[str, dict[tuple[int, int], RecordedGap]] = {}
    for gap in report.recorded_gaps:
        by_node.setdefault(gap.source_node, {})[(gap.expected_seq, gap.received_seq)] = gap
    for summary in nodes:
        chain = verify_chain_of(client, ca, summary, by_node.get(summary.node, {}))
        report.chains.append(chain)
        if on_chain is not None:
            on_chain(chain)
    return report
