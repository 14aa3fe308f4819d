"""Forward the node's audit spool to ztgpu-collectord over mutual TLS.

A ``Forwarder`` is one daemon thread in the agent. It sends the spool's
unacknowledged events, oldest first, in batches over one persistent HTTPS
connection, and moves the spool's acknowledged position to what the
collector reports as durably stored. Guarantees:

* Every event reaches the collector at least once and in seq order; after
  any failure the same range is sent again from ``spool.acked_seq()`` (the
  collector drops duplicates by seq). The acknowledged position never moves
  beyond the last event sent, nor beyond what the collector acknowledged.
* Only acknowledged events are pruned (``Spool.prune_acked``), so a collector
  that is down or refusing makes the backlog grow; the agent's full-spool
  action, not this thread, decides what happens then.
* Transient failures (connection refused or reset, TLS failure, timeout,
  5xx, a reply that makes no progress) are retried with capped exponential
  backoff and full jitter: after the n-th consecutive failure (n = 0, 1, ...)
  the thread sleeps ``uniform(retry_min_s / 2, min(retry_max_s, retry_min_s *
  2**n))`` seconds: the floor of half the minimum keeps a fleet of nodes from
  hammering a collector that just came back, the cap bounds the wait.
* A refusal (409 chain conflict, any other 4xx, an unexpected 3xx) does not
  heal by retrying: it is logged at ERROR with the collector's text and
  retried every ``retry_max_s``.
* Each change of state (working, failing for a reason, refused for a reason)
  is logged once, not once per retry.

Every request has a deadline: ``timeout_s`` bounds the connect and each
socket read or write of one request.

The wire contract (``POST /v1/events``, ``POST /v1/checkpoints``) is
described on ``Forwarder``; ``ztgpu.audit.events.checkpoint_message`` defines the
signed bytes of a checkpoint, shared with the collector and the auditor.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from ztgpu.audit.events import checkpoint_message, format_timestamp
from ztgpu.audit.spool import Spool
from ztgpu.config import Config
from ztgpu.errors import ConfigError, SpoolError
from ztgpu.net.https_client import ServiceConnection

log = logging.getLogger("ztgpu.forwarder")

EVENTS_PATH = "/v1/events"
CHECKPOINTS_PATH = "/v1/checkpoints"
#: Domain separation for checkpoint signatures: version 1 of the format.
#: The fields a checkpoint signature covers (other keys, e.g. ``sig``, are not).

#: Longest wait for wake() while caught up (bounds the delay of a missed wake).
_IDLE_WAIT_S = 1.0
#: Largest collector reply read; anything longer is a protocol error.
_MAX_REPLY_BYTES = 1 << 20
#: Errors that mean the peer closed a kept-alive connection before our request.
_STALE_CONNECTION = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


class _Transient(Exception):
    """The collector could not be reached or failed; retry with backoff."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Refused(Exception):
    """The collector answered with a refusal that retrying at once will not cure."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Forwarder:
    """Sends a spool's events to the collector from a daemon thread.

    Wire contract (``url`` is ``https://host[:port]``):

    * ``POST {url}/v1/events`` with ``{"node": ..., "events": [...]}`` (the
      events exactly as stored). 200 answers ``{"acked_seq": int, ...}``, the
      collector's durable head for this node; 400/403/413 refuse the batch;
      409 is a chain conflict (nothing stored); 5xx means try again.
    * ``POST {url}/v1/checkpoints`` with ``{"node", "seq", "hash", "ts",
      "sig"}``, where ``sig`` is base64 of ``sign(checkpoint_message(...))``
      over the newest acknowledged event. 200 answers ``{"ok": true}``; 409
      means the collector does not hold that seq yet.

    ``context`` is the TLS client context, or a callable giving the one to
    use for each new connection (``pki.ReloadingContext.get``: renewed
    certificates are used without a restart).

    ``sleep(seconds)`` waits between retries and returns True when the thread
    should stop (default: wait on ``stop()``); ``clock`` is monotonic seconds
    for the retry and checkpoint schedule.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        url: str,
        context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        batch_max: int,
        retry_min_s: float,
        retry_max_s: float,
        timeout_s: float,
        keep_acked: int,
        checkpoint_interval_s: float,
        sign: Callable[[bytes], bytes] | None,
        on_progress: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        """Prepare (but do not start) forwarding; raises ConfigError for a bad url or value."""
        parts = urlsplit(url)
        try:
            port = parts.port or 443
        except ValueError as exc:
            raise ConfigError(f"collector url {url!r}: {exc}") from exc
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"collector url {url!r} must be https://host[:port]")
        if batch_max < 1 or keep_acked < 0 or timeout_s <= 0 or checkpoint_interval_s <= 0:
            raise ConfigError("forwarder: batch_max >= 1, keep_acked >= 0 and positive "
                              "timeout_s and checkpoint_interval_s are required")
        if not 0 < retry_min_s <= retry_max_s:
            raise ConfigError("forwarder: need 0 < retry_min_s <= retry_max_s")
        self._spool = spool
        self._url = url.rstrip("/")
        self._host = parts.hostname
        self._port = port
        self._prefix = parts.path.rstrip("/")
        self._context = context
        self._conn_context: ssl.SSLContext | None = None
        self._batch_max = batch_max
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._timeout_s = timeout_s
        self._keep_acked = keep_acked
        self._checkpoint_interval_s = checkpoint_interval_s
        self._sign = sign
        self._on_progress = on_progress
        self._clock = clock
        self._stop = threading.Event()
        self._sleep = sleep if sleep is not None else self._stop.wait
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._rng = random.Random()  # noqa: S311 - retry jitter; nothing secret depends on it
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPSConnection | None = None
        # worker-thread state
        self._failures = 0
        self._failure_key: tuple[str, str] | None = None
        self._checkpoint_due = clock() + checkpoint_interval_s
        # shared with status(), under _status_lock
        self._status_lock = threading.Lock()
        self._connected = False
        self._last_error: str | None = None
        self._last_success_ts: str | None = None
        self._retry_at: float | None = None
        self._sent_batches = 0
        self._checkpoint_seq = 0

    # --- control ------------------------------------------------------------

    def start(self) -> None:
        """Start the forwarding thread (once)."""
        if self._thread is not None:
            raise RuntimeError("forwarder already started")
        self._thread = threading.Thread(target=self._run, name="ztgpu-forwarder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        """Ask the thread to stop and wait up to ``timeout`` seconds for it.

        A request in flight finishes or times out first (``timeout_s``); the
        connection is closed by the thread as it exits.
        """
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            self._close()
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("audit forwarder did not stop within %.1f s", timeout)

    def wake(self) -> None:
        """Tell the thread new events were spooled, so it sends them promptly."""
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until every event spooled before this call is acknowledged.

        Returns False if that did not happen within ``timeout`` seconds.
        Meant for tests and orderly shutdown.
        """
        target, _ = self._spool.head()
        self.wake()
        deadline = time.monotonic() + timeout
        with self._progress:
            while self._spool.acked_seq() < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(min(remaining, 0.1))
        return True

    def status(self) -> dict[str, Any]:
        """A snapshot for the agent's status report.

        ``connected`` is True when the last request got an HTTP answer from
        the collector; ``retry_in_s`` is the time left in the current backoff
        (0 when not backing off); ``checkpoint_seq`` is the last seq the
        collector accepted a checkpoint for.
        """
        with self._status_lock:
            retry_in = 0.0 if self._retry_at is None else max(0.0, self._retry_at - self._clock())
            return {
                "url": self._url,
                "connected": self._connected,
                "last_error": self._last_error,
                "last_success_ts": self._last_success_ts,
                "retry_in_s": retry_in,
                "sent_batches": self._sent_batches,
                "checkpoint_seq": self._checkpoint_seq,
            }

    # --- the thread -----------------------------------------------------------

    def _run(self) -> None:
        log.info("forwarding audit events to %s", self._url)
        try:
            while not self._stop.is_set():
                self._wake.clear()  # a wake() from now on ends the idle wait below
                self._maybe_checkpoint()
                delay = self._forward_once()
                if delay is None:
                    continue  # more to send right away
                if delay == 0:
                    self._wake.wait(self._idle_wait())
                    continue
                with self._status_lock:
                    self._retry_at = self._clock() + delay
                stopped = self._sleep(delay)
                with self._status_lock:
                    self._retry_at = None
                if stopped:
                    break
        finally:
            self._close()

    def _idle_wait(self) -> float:
        if self._sign is None:
            return _IDLE_WAIT_S
        return min(_IDLE_WAIT_S, max(0.0, self._checkpoint_due - self._clock()))

    def _forward_once(self) -> float | None:
        """Send one batch. None: send the next at once; 0: caught up; else back off."""
        try:
            more = self._send_batch()
        except _Transient as exc:
            delay = self._backoff_delay()
            self._failed((exc.kind, ""), f"{exc}; retrying with backoff", logging.WARNING)
            return delay
        except _Refused as exc:
            self._failed(
                ("refused", f"{exc.status} {exc}"),
                f"{exc}; retrying every {self._retry_max_s:g} s",
                logging.ERROR,
            )
            return self._retry_max_s
        except SpoolError as exc:
            delay = self._backoff_delay()
            self._failed(("spool", ""), f"audit spool: {exc}; retrying", logging.ERROR)
            return delay
        except Exception as exc:  # a bug must not end forwarding silently
            log.exception("audit forwarder: unexpected error")
            self._failed(("bug", type(exc).__name__), f"unexpected error: {exc!r}", logging.ERROR)
            return self._retry_max_s
        self._recovered()
        return None if more else 0

    def _backoff_delay(self) -> float:
        ceiling = min(self._retry_max_s, self._retry_min_s * 2.0 ** min(self._failures, 64))
        return self._rng.uniform(min(self._retry_min_s / 2, ceiling), ceiling)

    def _failed(self, key: tuple[str, str], message: str, level: int) -> None:
        self._failures += 1
        with self._status_lock:
            self._last_error = message
        if key != self._failure_key:
            log.log(level, "audit forwarding to %s: %s", self._url, message)
            self._failure_key = key
        else:
            log.debug("audit forwarding to %s: %s (attempt %d)", self._url, message,
                      self._failures)

    def _recovered(self) -> None:
        if self._failure_key is not None:
            log.info("audit forwarding to %s works again after %d failed attempts",
                     self._url, self._failures)
        self._failure_key = None
        self._failures = 0
        with self._status_lock:
            self._last_error = None

    def _send_batch(self) -> bool:
        """POST the next unacknowledged events; return whether more are waiting."""
        acked = self._spool.acked_seq()
        events = self._spool.read(after_seq=acked, limit=self._batch_max)
        if not events:
            return False
        first, last = int(events[0]["seq"]), int(events[-1]["seq"])
        status, reply, text = self._post(EVENTS_PATH, {"node": self._spool.node, "events": events})
        if status != 200:
            self._raise_for(status, text, f"batch of seq {first}..{last}")
        collector_head = reply.get("acked_seq")
        if not isinstance(collector_head, int) or isinstance(collector_head, bool):
            raise _Transient("protocol", f"collector answered 200 without an int acked_seq: "
                                         f"{text[:200]!r}")
        new = min(collector_head, last)
        if new <= acked:
            raise _Transient("no-progress", f"collector acknowledged seq {collector_head} after "
                                            f"receiving seq {first}..{last}")
        self._spool.mark_acked(new)
        with self._status_lock:
            self._sent_batches += 1
            self._last_success_ts = format_timestamp(self._spool.clock.now())
        log.debug("collector acknowledged seq %d (sent %d..%d)", new, first, last)
        self._maybe_prune(new)
        if self._on_progress is not None:
            try:
                self._on_progress()
            except Exception:  # the agent's callback must not stop forwarding
                log.exception("audit forwarder: on_progress callback failed")
        with self._progress:
            self._progress.notify_all()
        return self._spool.head()[0] > new

    def _raise_for(self, status: int, text: str, what: str) -> None:
        if status >= 500 or status < 300:
            raise _Transient(f"http-{status}", f"collector answered {status} to {what}: {text}")
        raise _Refused(status, f"collector refused {what} with {status}: {text}")

    def _maybe_prune(self, acked: int) -> None:
        """Prune once the acknowledged events exceed ``keep_acked`` by over 10%."""
        oldest = self._spool.read(after_seq=0, limit=1)
        if not oldest:
            return
        retained = acked - int(oldest[0]["seq"]) + 1
        if retained - max(self._keep_acked, 1) > max(1, self._keep_acked // 10):
            deleted = self._spool.prune_acked(self._keep_acked)
            log.debug("pruned %d acknowledged events from the spool", deleted)

    def _maybe_checkpoint(self) -> None:
        """Sign and post the newest acknowledged event, when due and it moved."""
        if self._sign is None or self._clock() < self._checkpoint_due:
            return
        self._checkpoint_due = self._clock() + self._checkpoint_interval_s
        try:
            acked = self._spool.acked_seq()
            if acked <= self._checkpoint_seq:
                return
            rows = self._spool.read(after_seq=acked - 1, limit=1)
            if not rows or rows[0].get("seq") != acked:
                log.error("checkpoint: acknowledged event seq %d is missing from the spool", acked)
                return
            payload = {"node": self._spool.node, "seq": acked, "hash": rows[0]["hash"],
                       "ts": format_timestamp(self._spool.clock.now())}
            sig = self._sign(checkpoint_message(payload))
            body = {**payload, "sig": base64.b64encode(sig).decode("ascii")}
            status, reply, text = self._post(CHECKPOINTS_PATH, body)
        except (_Transient, SpoolError) as exc:
            log.warning("checkpoint not posted: %s; retrying in %g s", exc,
                        self._checkpoint_interval_s)
            return
        except Exception:  # e.g. the signing key is unreadable
            log.exception("checkpoint not signed or posted; retrying in %g s",
                          self._checkpoint_interval_s)
            return
        if status == 200 and reply.get("ok") is True:
            with self._status_lock:
                self._checkpoint_seq = acked
            log.debug("checkpoint at seq %d accepted", acked)
        elif status == 409:
            log.info("checkpoint at seq %d: collector does not hold it yet (%s); retrying in %g s",
                     acked, text, self._checkpoint_interval_s)
        else:
            log.error("checkpoint at seq %d refused with %d: %s; retrying in %g s",
                      acked, status, text, self._checkpoint_interval_s)

    # --- HTTP -------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPSConnection:
        context = (self._context if isinstance(self._context, ssl.SSLContext)
                   else self._context())
        if self._conn is not None and context is not self._conn_context:
            # Renewed certificate: reconnect with it, so that the connection
            # and the checkpoint signatures (made with the key on disk) agree.
            self._conn.close()
            self._conn = None
        if self._conn is None:
            self._conn = ServiceConnection(self._host, self._port, timeout=self._timeout_s,
                                           context=context)
            self._conn_context = context
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        with self._status_lock:
            self._connected = False

    def _post(self, path: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any], str]:
        """POST JSON; return (status, reply object or {}, error text for logs).

        Raises _Transient for a transport failure. A kept-alive connection
        the collector closed while idle is reopened once without counting as
        a failure (events and checkpoints are idempotent).
        """
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        for attempt in (1, 2):
            conn = self._connection()
            reused = conn.sock is not None
            response: http.client.HTTPResponse | None = None
            try:
                conn.request("POST", self._prefix + path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read(_MAX_REPLY_BYTES + 1)
                complete = response.isclosed()
            except _STALE_CONNECTION as exc:
                _close_response(response)
                self._close()
                if reused and attempt == 1:
                    continue
                raise _Transient("unreachable", f"cannot reach the collector: {exc!r}") from exc
            except (OSError, http.client.HTTPException) as exc:
                _close_response(response)
                self._close()
                raise _Transient("unreachable", f"cannot reach the collector: {exc!r}") from exc
            if not complete or len(raw) > _MAX_REPLY_BYTES:
                _close_response(response)
                self._close()
                if len(raw) > _MAX_REPLY_BYTES:
                    raise _Transient("protocol", f"collector reply over {_MAX_REPLY_BYTES} bytes")
            with self._status_lock:
                self._connected = True
            return response.status, *self._parse_reply(raw)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _parse_reply(raw: bytes) -> tuple[dict[str, Any], str]:
        try:
            reply = json.loads(raw) if raw else {}
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            return {}, raw[:200].decode("utf-8", "replace")
        error = reply.get("error")
        return reply, str(error) if error is not None else raw[:200].decode("utf-8", "replace")


def start_forwarder(config: Config, spool: Spool, *, role: str, name: str,
                    on_progress: Callable[[], object] | None = None) -> Forwarder | None:
    """Start forwarding ``spool`` if ``audit.collector_url`` is set; None otherwise.

    ``tls.cert`` must be a certificate of ``role`` named ``name`` (the
    spool's node name): the collector accepts a chain only from its own
    certificate, so a mismatch is refused here, at start, not at spool-full
    time.
    """
    from ztgpu.trust.pki import ReloadingContext, client_context, identity_of, load_cert, sign

    audit = config.audit
    if audit.collector_url is None:
        log.warning("audit.collector_url is not set: audit events stay in the local spool")
        return None
    cert, key, ca_cert = config.tls.cert, config.tls.key, config.tls.ca_cert
    if cert is None or key is None:
        raise ConfigError(f"audit.collector_url needs tls.cert and tls.key (a {role} "
                          f"certificate for {name!r}: ztgpu pki issue --role {role} "
                          f"--name {name})")
    identity = identity_of(load_cert(cert))
    if identity.role != role or identity.name != name:
        raise ConfigError(f"tls.cert {cert} is a {identity.role} certificate for "
                          f"{identity.name!r}; forwarding needs a {role} certificate for "
                          f"{name!r} (ztgpu pki issue --role {role} --name {name})")
    context = ReloadingContext(lambda: client_context(ca_cert, cert, key), [cert, key, ca_cert])
    forwarder = Forwarder(
        spool, url=audit.collector_url, context=context.get,
        batch_max=audit.batch_max_events, retry_min_s=audit.retry_min_s,
        retry_max_s=audit.retry_max_s, timeout_s=audit.request_timeout_s,
        keep_acked=audit.keep_acked_events, checkpoint_interval_s=audit.checkpoint_interval_s,
        sign=lambda data: sign(key, data), on_progress=on_progress)
    forwarder.start()
    return forwarder


def _close_response(response: http.client.HTTPResponse | None) -> None:
    """Close a half-read reply: it holds a reference to the TLS socket, which
    closing the connection alone does not release."""
    if response is not None:
        response.close()
