"""Prometheus metrics shared by the suite's daemons (prometheus-client).

Every daemon counts the audit events it records
(``ztgpu_events_total{code,severity}``) through a :class:`CountingSink` in
front of its spool, so what a dashboard counts is what the audit trail
shows. The services (authd, the collector) also time every HTTP request
by route (``ztgpu_http_request_duration_seconds``: authd's decisions are
``/v1/grant``, ``/v1/gate``, ``/v1/login``) and serve ``GET /metrics`` to
``monitor`` and ``auditor`` certificates. The node agent's own families:
``ztgpu.noded.metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

#: Who may read /metrics: a Prometheus server, or an auditor.
METRIC_ROLES = ("monitor", "auditor")
#: Seconds: hook round trips and service decisions are milliseconds to seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """A registry with the event counter every daemon has."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter("ztgpu_events", "Audit events this daemon recorded.",
                              ["code", "severity"], registry=self.registry)
        self._observers: list[Callable[[dict[str, Any]], None]] = []

    def observe_events(self, observer: Callable[[dict[str, Any]], None]) -> None:
        """Also hand every recorded event to *observer* (e.g. a histogram of its figures)."""
        self._observers.append(observer)

    def count(self, event: dict[str, Any]) -> None:
        self.events.labels(str(event.get("code", "")), str(event.get("severity", ""))).inc()
        for observer in self._observers:
            observer(event)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountingSink:
    """An event sink (the spool, or what wraps it) that counts what it records."""

    def __init__(self, inner: Any, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def append(self, code: str, **fields: Any) -> dict[str, Any]:
        event: dict[str, Any] = self.inner.append(code, **fields)
        self.metrics.count(event)
        return event

    def __getattr__(self, name: str) -> Any:  # the rest of the spool's interface
        return getattr(self.inner, name)


class HttpMetrics(Metrics):
    """A service's metrics: events plus request timings by route."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = Histogram("ztgpu_http_request_duration_seconds",
                                  "Time to answer an HTTP request, by route and status.",
                                  ["route", "method", "status"], buckets=LATENCY_BUCKETS,
                                  registry=self.registry)

    def middleware(self) -> Any:
        """An aiohttp middleware timing every request (its route's pattern, so
        that a client cannot grow the label set with made-up paths)."""
        from aiohttp import web

        @web.middleware
        async def timed(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
            began, status = time.monotonic(), 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                resource = request.match_info.route.resource
                route = resource.canonical if resource is not None else "unmatched"
                self.requests.labels(route, request.method, str(status)).observe(
                    time.monotonic() - began)

        return timed
