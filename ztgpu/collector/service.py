"""ztgpu-collectord's HTTP service (aiohttp) over mutual TLS 1.3.

Routes (every one needs a client certificate from the site CA):

* ``POST /v1/events``       role ``node``: a batch of that node's events.
* ``POST /v1/checkpoints``  role ``node``: a signed chain head.
* ``GET  /v1/nodes``, ``/v1/events``, ``/v1/chain``, ``/v1/checkpoints``
  role ``auditor``: the read-only query API.

Each request is bound to the certificate that sent it: a node may only
submit events and checkpoints for its own name. TLS handshakes are done by
this module (``loop.start_tls``) rather than by the listening socket, so
that a refused handshake (no certificate, expired, another CA, TLS 1.2) is
seen and recorded as ``audit.refused`` before the connection is dropped.
Refusals are recorded at most 10 per minute per sender address; the rest
are counted into the next record.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import Counter

from ztgpu.audit.events import (
    checkpoint_message,
    parse_json,
)
from ztgpu.collector.ingest import IngestPool, Rejected
from ztgpu.collector.store import EventFilter, Store
from ztgpu.metrics import HttpMetrics
from ztgpu.net.ratelimit import RejectLimiter
from ztgpu.net.tls_server import peer_address, peer_certificate, serve_tls

log = logging.getLogger("ztgpu.collector")

T = TypeVar("T")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIGITS = re.compile(r"[0-9]{1,20}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z")
_CHECKPOINT_KEYS = frozenset({"node", "seq", "hash", "ts", "sig"})
_CHECKPOINT_SKEW_S = 600.0
#: Who may send events: nodes, and services (authd) for their own chain.
_SENDERS = ("node", "service")


@dataclass(frozen=True)
class Peer:
    """Who sent a request: TLS identity and address."""

    role: str
    name: str
    address: str
    cert_der: bytes


def parse_checkpoint(node: str, payload: Any) -> dict[str, Any]:
    """Check a ``POST /v1/checkpoints`` body; returns it with ``sig`` decoded to bytes."""
    if not isinstance(payload, dict) or set(payload) != _CHECKPOINT_KEYS:
        raise Rejected(400, f"checkpoint must have exactly the keys {sorted(_CHECKPOINT_KEYS)}")
    if payload["node"] != node:
        raise Rejected(403, f"certificate of node {node!r} cannot sign for another node",
                       kind="refused")
    seq, digest, ts, sig = payload["seq"], payload["hash"], payload["ts"], payload["sig"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise Rejected(400, "checkpoint seq must be an int >= 1")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise Rejected(400, "checkpoint hash must be 64 lower-case hex digits")
    if not isinstance(ts, str) or not _TS.fullmatch(ts):
        raise Rejected(400, "checkpoint ts must be RFC 3339 UTC")
    if not isinstance(sig, str) or len(sig) > 512:
        raise Rejected(400, "checkpoint sig must be base64 text")
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(400, "checkpoint sig is not valid base64") from None
    return {"node": node, "seq": seq, "hash": digest, "ts": ts, "sig": raw}


def parse_filter(query: Mapping[str, str]) -> EventFilter:
    """Query-string filters of ``GET /v1/events``; Rejected(400) for bad values."""
    allowed = {"node", "job", "user", "code", "since", "until", "after", "limit"}
    unknown = set(query) - allowed
    if unknown:
        raise Rejected(400, f"unknown query parameters {sorted(unknown)[:5]}")
    for key in ("since", "until"):
        if key in query and not _TS.fullmatch(query[key]):
            raise Rejected(400, f"{key} must be RFC 3339 UTC, e.g. 2026-11-26T12:00:00Z")
    if "job" in query and not _DIGITS.fullmatch(query["job"]):
        raise Rejected(400, "job must be a job id (digits)")
    if "node" in query and not _NAME.fullmatch(query["node"]):
        raise Rejected(400, "node must be a node name")
    for key in ("user", "code"):
        if key in query and not (0 < len(query[key]) <= 64):
            raise Rejected(400, f"{key} must be 1-64 characters")
    return EventFilter(node=query.get("node"), job_id=query.get("job"),
                       user=query.get("user"), code=query.get("code"),
                       since=_normal_ts(query.get("since")), until=_normal_ts(query.get("until")))


def _normal_ts(value: str | None) -> str | None:
    """RFC 3339 UTC with 0-6 fraction digits -> the stored form (6 digits), for comparisons."""
    if value is None:
        return None
    head, _, frac = value[:-1].partition(".")
    return f"{head}.{frac.ljust(6, '0')}Z"


def encode_cursor(event: Mapping[str, Any]) -> str:
    """Opaque keyset cursor after ``event`` (ts, node, seq)."""
    raw = json.dumps([event["ts"], event["node"], event["seq"]]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(text: str) -> tuple[str, str, int]:
    """Inverse of ``encode_cursor``; Rejected(400) for anything else."""
    try:
        ts, node, seq = json.loads(base64.urlsafe_b64decode(text.encode()))
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise Rejected(400, "after is not a cursor this service issued") from None
    if not (isinstance(ts, str) and isinstance(node, str) and isinstance(seq, int)):
        raise Rejected(400, "after is not a cursor this service issued")
    return ts, node, seq


def _int_param(query: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    value = query.get(key)
    if value is None:
        return default
    if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
        raise Rejected(400, f"{key} must be an integer from {low} to {high}")
    return int(value)


def _loads(body: bytes) -> Any:
    try:
        return parse_json(body)
    except (ValueError, RecursionError):
        raise Rejected(400, "body is not valid JSON") from None


class CollectorService:
    """Request handlers plus the TLS acceptor; stores run on their own threads."""

    def __init__(self, *, writer: Store, reader: Store, ca_cert_der: bytes,
                 server_context: Callable[[], ssl.SSLContext], max_body_bytes: int,
                 max_batch_events: int, max_page_events: int,
                 store_args: dict[str, Any], ingest_processes: int = 0,
                 handshake_timeout_s: float = 10.0,
                 metrics: HttpMetrics | None = None) -> None:
        from cryptography import x509

        self.writer = writer
        self.reader = reader
        self.ca = x509.load_der_x509_certificate(ca_cert_der)
        self.server_context = server_context
        self.max_body_bytes = max_body_bytes
        self.max_batch_events = max_batch_events
        self.max_page_events = max_page_events
        self.handshake_timeout_s = handshake_timeout_s
        self._write_pool = ThreadPoolExecutor(1, thread_name_prefix="collector-write")
        self._read_pool = ThreadPoolExecutor(1, thread_name_prefix="collector-read")
        self._ingest = IngestPool(store_args, ingest_processes)
        self._limiter: RejectLimiter[str] = RejectLimiter(self._record_refusal)
        self._chain_limiter: RejectLimiter[str] = RejectLimiter(self._record_chain)
        self._bad_seq: dict[str, int] = {}
        self._pending_records: set[asyncio.Future[Any]] = set()
        self.on_stored: Callable[[], None] | None = None
        self.metrics = metrics
        self.ingested: Counter | None = None
        if metrics is not None:
            self.ingested = Counter("ztgpu_collector_ingested_events",
                                    "Events stored from each node or service.", ["node"],
                                    registry=metrics.registry)
        timing = [metrics.middleware()] if metrics is not None else []
        self.app = web.Application(client_max_size=max_body_bytes,
                                   middlewares=[*timing, self._errors])
        self.app.add_routes([
            web.get("/metrics", self.get_metrics),
            web.post("/v1/events", self.post_events),
            web.post("/v1/checkpoints", self.post_checkpoint),
            web.get("/v1/nodes", self.get_nodes),
            web.get("/v1/events", self.get_events),
            web.get("/v1/chain", self.get_chain),
            web.get("/v1/checkpoints", self.get_checkpoints),
        ])

    async def get_metrics(self, request: web.Request) -> web.Response:
        """Prometheus metrics, for a ``monitor`` or ``auditor`` certificate."""
        from ztgpu.metrics import METRIC_ROLES

        self.peer(request, METRIC_ROLES)
        if self.metrics is None:
            raise Rejected(404, "metrics are off")
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # -- plumbing ---------------------------------------------------------
    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._write_pool, fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, fn, *args)

    def _record_refusal(self, key: str, reason: str) -> None:
        kind, _, address = key.partition("|")
        code = "audit.refused" if kind == "refused" else "audit.rejected"
        self._record_later(lambda: self.writer.record(code, peer=address, reason=reason))

    def _record_chain(self, node: str, reason: str) -> None:
        seq = self._bad_seq.get(node, 0)
        self._record_later(lambda: self.writer.record(
            "audit.chain_broken", source_node=node, bad_seq=seq, reason=reason))

    def _record_later(self, fn: Callable[[], Any]) -> None:
        future = asyncio.get_running_loop().run_in_executor(self._write_pool, fn)
        self._pending_records.add(future)
        future.add_done_callback(self._record_done)

    async def _records_committed(self) -> None:
        """Wait until every refusal record queued so far is stored."""
        if self._pending_records:
            await asyncio.wait(set(self._pending_records))

    def _record_done(self, future: asyncio.Future[Any]) -> None:
        self._pending_records.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("could not record a refusal: %s", future.exception())

    def refuse(self, kind: str, address: str, reason: str) -> None:
        """Log and (rate-limited) record a refused connection or request."""
        log.warning("%s %s: %s", kind, address, reason)
        # One budget per sender host (not per connection: ports change).
        self._limiter(f"{kind}|{address.rpartition(':')[0] or address}", reason[:300])

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        peer = peer_address(request)
        try:
            return await handler(request)
        except Rejected as exc:
            if exc.kind == "chain":
                node = self.peer(request).name
                log.error("chain broken for node %s: %s", node, exc.reason)
                self._bad_seq[node] = exc.seq or 0
                self._chain_limiter(node, exc.reason[:300])
            else:
                self.refuse(exc.kind, peer, exc.reason)
            # The refusal's own record is committed before the sender hears of
            # it: a collector killed right after replying must not lose it.
            await self._records_committed()
            body: dict[str, Any] = {"error": exc.reason}
            if exc.acked_seq is not None:
                body["acked_seq"] = exc.acked_seq
            return web.json_response(body, status=exc.status)
        except web.HTTPRequestEntityTooLarge:
            self.refuse("rejected", peer, "request body too large")
            return web.json_response({"error": f"body larger than {self.max_body_bytes} "
                                      "bytes"}, status=413)

    def peer(self, request: web.Request, role: str | tuple[str, ...] | None = None) -> Peer:
        """The TLS identity of the request's sender; Rejected(403) unless its role is
        ``role`` (or one of them)."""
        from ztgpu.trust.pki import PkiError, identity_from_der

        der = peer_certificate(request)
        if not der:
            raise Rejected(403, "no client certificate", kind="refused")
        try:
            identity = identity_from_der(der)
        except PkiError as exc:
            raise Rejected(403, f"client certificate has no usable identity: {exc}",
                           kind="refused") from None
        allowed = (role,) if isinstance(role, str) else role
        if allowed is not None and identity.role not in allowed:
            article = "an" if identity.role[0] in "aeiou" else "a"
            raise Rejected(403, f"{article} {identity.role} certificate ({identity.name}) may "
                           "not use "
                           f"{request.method} {request.path}", kind="refused")
        return Peer(identity.role, identity.name, peer_address(request), der)

    async def _body(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            raise Rejected(415 if request.can_read_body else 400,
                           "body must be application/json")
        return _loads(await request.read())

    # -- node routes ------------------------------------------------------
    async def post_events(self, request: web.Request) -> web.Response:
        peer = self.peer(request, _SENDERS)
        if peer.name == self.writer.own_node:
            raise Rejected(403, f"node name {peer.name!r} is reserved for the collector",
                           kind="refused")
        if request.content_type != "application/json":
            raise Rejected(415, "body must be application/json")
        body = await request.read()
        try:
            result, refusal = await self._ingest.ingest(peer.name, body, self.max_batch_events)
        except BrokenProcessPool:
            return web.json_response({"error": "collector busy, retry"}, status=503)
        if refusal is not None:
            status, reason, kind, seq = refusal
            acked = None
            if kind == "chain":  # tell the node where its stored chain ends
                acked = (await self._read(self.reader.heads)).get(peer.name, (0, ""))[0]
            raise Rejected(status, reason, kind, seq, acked)
        assert result is not None
        if not result.ok:
            raise Rejected(409, result.problem or "chain conflict", kind="chain",
                           seq=result.bad_seq, acked_seq=result.acked_seq)
        for expected, received in result.gaps:
            log.error("gap in node %s: expected seq %d, received %d", peer.name, expected,
                      received)
        if result.accepted and self.ingested is not None:
            self.ingested.labels(peer.name).inc(result.accepted)
        if result.accepted and self.on_stored is not None:
            self.on_stored()
        return web.json_response({"acked_seq": result.acked_seq, "accepted": result.accepted,
                                  "duplicates": result.duplicates})

    async def post_checkpoint(self, request: web.Request) -> web.Response:
        from ztgpu.trust.pki import PkiError, verify_signature

        peer = self.peer(request, _SENDERS)
        cp = parse_checkpoint(peer.name, await self._body(request))
        when = datetime.strptime(cp["ts"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        if abs((datetime.now(UTC) - when).total_seconds()) > _CHECKPOINT_SKEW_S:
            raise Rejected(400, "checkpoint ts is more than 10 minutes from the collector's "
                           "clock")
        payload = {k: cp[k] for k in ("node", "seq", "hash", "ts")}
        try:
            verify_signature(peer.cert_der, self.ca, checkpoint_message(payload), cp["sig"],
                             at=when, role=peer.role, name=peer.name)
        except PkiError as exc:
            raise Rejected(400, f"checkpoint signature: {exc}") from None
        outcome = await self._write(
            self.writer.add_checkpoint, peer.name, cp["seq"], cp["hash"], cp["ts"],
            base64.b64encode(cp["sig"]).decode(), base64.b64encode(peer.cert_der).decode())
        if outcome == "unknown":
            return web.json_response({"error": f"seq {cp['seq']} is not stored yet"},
                                     status=409)
        if outcome == "mismatch":
            raise Rejected(409, f"signed head seq {cp['seq']} differs from the stored event",
                           kind="chain", seq=cp["seq"])
        return web.json_response({"ok": True})

    # -- auditor routes ---------------------------------------------------
    async def get_nodes(self, request: web.Request) -> web.Response:
        self.peer(request, "auditor")
        return web.json_response({"nodes": await self._read(self.reader.nodes)})

    async def get_events(self, request: web.Request) -> web.Response:
        self.peer(request, "auditor")
        flt = parse_filter(request.query)
        limit = _int_param(request.query, "limit", min(1000, self.max_page_events), 1,
                           self.max_page_events)
        after = decode_cursor(request.query["after"]) if "after" in request.query else None
        events = await self._read(lambda: self.reader.query(flt, after=after, limit=limit))
        cursor = encode_cursor(events[-1]) if len(events) == limit else None
        return web.json_response({"events": events, "next": cursor})

    async def get_chain(self, request: web.Request) -> web.Response:
        self.peer(request, "auditor")
        node = request.query.get("node", "")
        if not _NAME.fullmatch(node):
            raise Rejected(400, "node must be a node name")
        after = _int_param(request.query, "after_seq", 0, 0, 2**62)
        limit = _int_param(request.query, "limit", min(1000, self.max_page_events), 1,
                           self.max_page_events)
        events = await self._read(self.reader.chain, node, after, limit)
        return web.json_response({"events": events})

    async def get_checkpoints(self, request: web.Request) -> web.Response:
        self.peer(request, "auditor")
        node = request.query.get("node", "")
        if not _NAME.fullmatch(node):
            raise Rejected(400, "node must be a node name")
        return web.json_response({"checkpoints": await self._read(self.reader.checkpoints,
                                                                   node)})

    # -- serving ----------------------------------------------------------
    async def serve(self, host: str, port: int, stop: asyncio.Event,
                    ready: Callable[[int], None] | None = None) -> None:
        """Listen until ``stop`` is set; calls ``ready(port)`` once listening."""
        try:
            await serve_tls(self.app, host, port, context=self.server_context, stop=stop,
                            on_refused=lambda address, why: self.refuse("refused", address, why),
                            ready=ready, handshake_timeout_s=self.handshake_timeout_s)
        finally:
            if self._pending_records:
                await asyncio.gather(*self._pending_records, return_exceptions=True)

    def close(self) -> None:
        self._ingest.close()
        self._write_pool.shutdown(wait=True)
        self._read_pool.shutdown(wait=True)
