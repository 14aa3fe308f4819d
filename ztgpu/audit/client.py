"""The auditors' client of the central collector's query API.

An auditor holds an ``auditor`` certificate from the site CA and reads the
collector's query API (``GET /v1/nodes``, ``/v1/events``, ``/v1/chain``,
``/v1/checkpoints``) over mutual TLS 1.3. This module provides:

* ``AuditClient``: a small blocking client (stdlib ``http.client``, one
  kept-alive connection, a deadline on every socket operation) whose
  ``events`` and ``chain`` methods are generators over pages, so a million
  events never have to be in memory at once;
* ``ConnectionSettings``/``open_client``: where the collector is and which
  files prove the auditor's identity;
* ``EventQuery`` and ``parse_time``: the filters of a trail or an export.

Verifying what the collector stores is ``ztgpu.audit.collector_verify``;
printing and exporting it is ``ztgpu.cli.audit``.

Errors: ``CollectorError`` (the collector answered with an error; its
``error`` text is kept), ``CollectorUnreachable`` (no TCP or TLS
connection); bad arguments raise ``UsageError`` naming the option.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard
from urllib.parse import urlencode, urlsplit

from ztgpu.audit.events import format_timestamp
from ztgpu.audit.view import printable_line
from ztgpu.errors import Fault, UsageError
from ztgpu.net.https_client import STALE, KeptAliveHttps

if TYPE_CHECKING:  # pydantic loads only when used
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
    from ztgpu.trust.pki import PkiError, cert_not_after, client_context, load_cert

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
                                 f"{status} {reason}: {printable_line(error)}{hint}",
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
