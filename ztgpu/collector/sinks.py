"""Exporters that follow the store: SIEM (RFC 5424 over TLS) and JSON Lines.

Each sink runs on its own thread with its own store connection and reads
events in insertion order after a cursor that is saved in the store only
after the events were delivered. Delivery is therefore at least once: after
a crash or an unreachable receiver the sink resends from its cursor, never
skips. (A receiver may see an event twice after a crash; ``node``+``seq``+
``hash`` identify duplicates.) Nothing waits in memory: the store is the
queue, so a SIEM that is down for a day only delays its feed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ztgpu.collector.store import Store
from ztgpu.config import Config
from ztgpu.errors import ZtgpuError

log = logging.getLogger("ztgpu.collector.sinks")

_BATCH = 1000


class Destination(Protocol):
    """Where a sink delivers; ``deliver`` raises ZtgpuError to be retried later."""

    name: str

    def deliver(self, events: Sequence[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class SyslogDestination:
    """RFC 5424 messages, RFC 5425 framing, over TLS 1.3."""

    name = "syslog"

    def __init__(self, config: Config) -> None:
        from ztgpu.collector.siem import SyslogTlsSender
        from ztgpu.trust.pki import client_context

        sc = config.collector.syslog
        assert sc.target is not None
        host, _, port = sc.target.rpartition(":")
        host = host.strip("[]")
        cert = config.tls.cert if sc.client_cert else None
        key = config.tls.key if sc.client_cert else None
        context = client_context(sc.ca_cert or config.tls.ca_cert, cert, key)
        self.app_name = sc.app_name
        self.sender = SyslogTlsSender(host, int(port), context,
                                      server_name=sc.server_name or host)

    def deliver(self, events: Sequence[dict[str, Any]]) -> None:
        from ztgpu.collector.siem import format_rfc5424

        self.sender.send([format_rfc5424(e, app_name=self.app_name) for e in events])

    def close(self) -> None:
        self.sender.close()


class JsonlDestination:
    """One canonical JSON object per line, fsync'ed per batch."""

    name = "jsonl"

    def __init__(self, config: Config) -> None:
        from ztgpu.collector.siem import JsonlWriter

        assert config.collector.jsonl_path is not None
        self.writer = JsonlWriter(config.collector.jsonl_path)

    def deliver(self, events: Sequence[dict[str, Any]]) -> None:
        self.writer.write(events)

    def close(self) -> None:
        self.writer.close()


class SinkThread(threading.Thread):
    """Follows the store after the destination's saved cursor and delivers."""

    def __init__(self, store: Store, destination: Destination, *,
                 retry_min_s: float = 1.0, retry_max_s: float = 30.0) -> None:
        super().__init__(name=f"sink-{destination.name}", daemon=True)
        self.store = store
        self.destination = destination
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.delivered = 0
        self.last_error: str | None = None

    @property
    def cursor_name(self) -> str:
        return f"sink:{self.destination.name}"

    def run(self) -> None:
        cursor = self.store.get_cursor(self.cursor_name)
        delay = self.retry_min_s
        while not self.stopping.is_set():
            try:
                batch = self.store.after_id(cursor, _BATCH)
                if batch:
                    self.destination.deliver([event for _, event in batch])
                    cursor = batch[-1][0]
                    self.store.set_cursor(self.cursor_name, cursor)
                    self.delivered += len(batch)
                    if self.last_error is not None:
                        log.info("%s: delivering again", self.destination.name)
                    self.last_error, delay = None, self.retry_min_s
                    continue
                self.wakeup.wait(1.0)
                self.wakeup.clear()
            except ZtgpuError as exc:
                if str(exc) != self.last_error:
                    log.error("%s: delivery failed, will retry from the store: %s",
                              self.destination.name, exc)
                self.last_error = str(exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, self.retry_max_s)

    def stop(self) -> None:
        self.stopping.set()
        self.wakeup.set()
        self.join(10)
        self.destination.close()
        self.store.close()


class Sinks:
    """The running sinks of one collector."""

    def __init__(self, threads: list[SinkThread]) -> None:
        self.threads = threads

    def wake(self) -> None:
        for thread in self.threads:
            thread.wakeup.set()

    def stop(self) -> None:
        for thread in self.threads:
            thread.stop()


class AnomalySink(SinkThread):
    """The learned baselines (``ztgpu.collector.anomaly``) as a sink: at start
    it relearns everything up to its cursor (judging nothing twice), then
    judges and learns what comes after, recording findings in the store."""

    def __init__(self, store: Store, config: Config) -> None:
        from ztgpu.collector.anomaly import AnomalyDestination, Settings

        ac = config.collector.anomaly
        settings = Settings(threshold=ac.threshold, min_history=ac.min_history,
                            min_relative_scale=ac.min_relative_scale,
                            peak_hours=tuple(ac.peak_hours))
        self.anomaly = AnomalyDestination(settings, store.record)
        super().__init__(store, self.anomaly)

    def run(self) -> None:
        cursor, done = self.store.get_cursor(self.cursor_name), 0
        try:
            while done < cursor:
                batch = [(i, e) for i, e in self.store.after_id(done, _BATCH) if i <= cursor]
                if not batch:
                    break
                self.anomaly.replay(event for _, event in batch)
                done = batch[-1][0]
        except ZtgpuError as exc:
            log.error("anomaly: cannot relearn the baselines from the store: %s", exc)
        super().run()


def start_sinks(config: Config, make_store: Callable[[], Store]) -> Sinks:
    """Start the sinks the config enables (the SIEM exports: none by default;
    the learned baselines: on by default)."""
    destinations: list[Destination] = []
    if config.collector.syslog.target is not None:
        destinations.append(SyslogDestination(config))
    if config.collector.jsonl_path is not None:
        destinations.append(JsonlDestination(config))
    threads = [SinkThread(make_store(), d) for d in destinations]
    if config.collector.anomaly.enabled:
        threads.append(AnomalySink(make_store(), config))
    for thread in threads:
        thread.start()
    return Sinks(threads)
