"""Checking and storing one batch of events; runs in the collector's ingest processes.

Parsing a batch (JSON), checking every event (registry, types, SHA-256 of
its canonical form, links within the batch) and writing it to the store is
the costly part of ingestion and is pure Python, so it runs in worker
processes, one per CPU: the service process only terminates TLS, moves
bytes and answers. Each worker has its own store connection; the store's
transactions (SQLite ``BEGIN IMMEDIATE``, PostgreSQL row locks on the node's
head) keep concurrent batches of one node in order.

Nothing here imports aiohttp, so workers start quickly.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ztgpu.audit.events import EventError, canonical_bytes, check_envelope, parse_json
from ztgpu.collector.store import Incoming, IngestResult, Store, open_store

log = logging.getLogger("ztgpu.collector")

Refusal = tuple[int, str, str, int | None]

#: Event categories that only a collector records.
COLLECTOR_ONLY = ("collector.", "audit.", "anomaly.")


class Rejected(Exception):
    """A request that gets a 4xx; ``kind`` picks the audit event recorded for it."""

    def __init__(self, status: int, reason: str, kind: str = "rejected",
                 seq: int | None = None, acked_seq: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind
        self.seq = seq
        self.acked_seq = acked_seq


def prepare_batch(node: str, payload: Any, max_events: int) -> list[Incoming]:
    """Check a ``POST /v1/events`` body (as returned by ``events.parse_json``) of node ``node``.

    Returns the events as ``Incoming`` (seq ascending) or raises Rejected:
    400 for malformed data, 403 for events of another node, 409
    (kind ``chain``) when an event's hash does not recompute or consecutive
    events in the batch do not link.
    """
    if not isinstance(payload, dict) or set(payload) != {"node", "events"}:
        raise Rejected(400, 'body must be {"node": str, "events": [...]}')
    if payload["node"] != node:
        raise Rejected(403, f"certificate of node {node!r} cannot submit events of "
                       f"{str(payload['node'])[:64]!r}", kind="refused")
    events = payload["events"]
    if not isinstance(events, list) or not events:
        raise Rejected(400, "events must be a non-empty list")
    if len(events) > max_events:
        raise Rejected(413, f"at most {max_events} events per request")
    items: list[Incoming] = []
    before: Incoming | None = None
    for index, event in enumerate(events):
        problem = check_envelope(event, parsed_json=True)
        if problem:
            raise Rejected(400, f"event {index}: {problem}"[:300])
        if event["node"] != node:
            raise Rejected(403, f"event {index} belongs to node {event['node'][:64]!r}",
                           kind="refused")
        if event["code"].startswith(COLLECTOR_ONLY):
            # Only a collector writes these (into its own chain); a node that
            # sends one tries to forge a gap record or a collector's word.
            raise Rejected(403, f"event {index}: a node may not send {event['code']!r} events",
                           kind="refused")
        digest = event.pop("hash")
        try:
            body = canonical_bytes(event)
        except EventError as exc:
            raise Rejected(400, f"event {index}: {exc}"[:300]) from None
        if hashlib.sha256(body).hexdigest() != digest:
            raise Rejected(409, f"seq {event['seq']}: hash does not match the event's "
                           "content (altered in transit or at the source)",
                           kind="chain", seq=event["seq"])
        seq, prev = event["seq"], event["prev"]
        if before is not None:
            if seq <= before.seq:
                raise Rejected(400, f"event {index}: seqs must increase within a batch")
            if seq == before.seq + 1 and prev != before.hash:
                raise Rejected(409, f"seq {seq}: prev is not the hash of seq {before.seq}",
                               kind="chain", seq=seq)
        job_id, user = event.get("job_id"), event.get("user")
        before = Incoming(node, seq, event["ts"], event["code"], job_id,
                          user if isinstance(user, str) else None, digest, prev,
                          body.decode("utf-8"))
        items.append(before)
    return items


def check_batch(node: str, body: bytes, max_events: int
                ) -> tuple[list[Incoming] | None, Refusal | None]:
    """Parse and check a request body.

    Returns ``(items, None)`` or ``(None, (status, reason, kind, seq))``:
    plain data, so that it crosses the process boundary cheaply.
    """
    try:
        try:
            payload = parse_json(body)
        except (ValueError, RecursionError):
            raise Rejected(400, "body is not valid JSON") from None
        return prepare_batch(node, payload, max_events), None
    except Rejected as exc:
        return None, (exc.status, exc.reason, exc.kind, exc.seq)


_STORE: Store | None = None


def _init_worker(store_args: dict[str, Any]) -> None:
    global _STORE
    _STORE = open_store(**store_args)


def ingest_body(node: str, body: bytes, max_events: int
                ) -> tuple[IngestResult | None, Refusal | None]:
    """Check and store one request body in a worker (see the module docstring)."""
    items, refusal = check_batch(node, body, max_events)
    if refusal is not None:
        return None, refusal
    assert _STORE is not None and items is not None
    return _STORE.ingest(node, items), None


class IngestPool:
    """The worker processes; a pool that broke (a worker died) is replaced."""

    def __init__(self, store_args: dict[str, Any], processes: int = 0) -> None:
        self.store_args = store_args
        self.processes = processes or os.cpu_count() or 1
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes,
                                   mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=_init_worker, initargs=(self.store_args,))

    async def ingest(self, node: str, body: bytes, max_events: int
                     ) -> tuple[IngestResult | None, Refusal | None]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, ingest_body, node, body, max_events)
        except BrokenProcessPool:
            log.error("an ingest worker died; starting new ones")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
