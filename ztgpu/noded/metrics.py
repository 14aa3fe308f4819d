"""The node agent's Prometheus metrics (``/metrics``; ``telemetry.metrics_listen``).

One prefix, ``ztgpu_``, base units (bytes, seconds, watts, hertz, ratios),
``_total`` on counters, as Prometheus' conventions ask. Per-GPU series carry
``gpu`` (NVML index), ``uuid``, ``minor`` and, while a job holds the GPU,
``hpc_job`` (the Slurm job id: dcgm-exporter's label name, and not ``job``,
which Prometheus gives the scrape job) and ``user`` (empty otherwise):
what was sampled last, read at scrape time, so an ended job's labels
disappear with it. Counters come
from the agent's own audit events (``ztgpu_events_total{code,severity}``:
grants are ``code="job.grant"``, denials ``job.refused``, probes
``isolation.*``, wipes ``gpu.wipe``, misuse ``gpu.misuse``), so a metric
never counts what the audit trail does not show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ztgpu.errors import SpoolError
from ztgpu.metrics import LATENCY_BUCKETS, Metrics

_GPU_LABELS = ["gpu", "uuid", "minor", "hpc_job", "user"]
WIPE_BUCKETS = (0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class NodeMetrics(Metrics):
    """The registry /metrics renders, and what the agent's code feeds it."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = Histogram("ztgpu_request_duration_seconds",
                                  "Time to answer a request on the agent's socket (hooks, PAM).",
                                  ["op", "outcome"], buckets=LATENCY_BUCKETS,
                                  registry=self.registry)
        self.wipes = Histogram("ztgpu_gpu_wipe_duration_seconds",
                               "Time one GPU's memory wipe (or verify) took.", ["mode", "outcome"],
                               buckets=WIPE_BUCKETS, registry=self.registry)
        self.observe_events(self._wipe)

    def attach(self, agent: Any, backlog: Callable[[], dict[str, Any]] | None) -> None:
        """Report *agent*'s state (and the forwarding *backlog*) at each scrape."""
        self.registry.register(_AgentState(agent, backlog))

    def _wipe(self, event: dict[str, Any]) -> None:
        if event.get("code") in ("gpu.wipe", "gpu.wipe_failed") and isinstance(
                event.get("total_s"), int | float):
            self.wipes.labels(str(event.get("mode", "")), str(event.get("outcome", ""))
                              ).observe(float(event["total_s"]))


class _AgentState(Collector):
    """Gauges read from the agent at scrape time."""

    def __init__(self, agent: Any, backlog: Callable[[], dict[str, Any]] | None) -> None:
        self.agent = agent
        self.backlog = backlog

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families vary with the node; nothing to check at register

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        with agent.lock:
            holding = {minor: live.record for live in agent.jobs.values()
                       for minor in live.record.minors}
            dirty, held = set(agent.dirty_gpus), set(agent.held_gpus)
            jobs, unsafe = len(agent.jobs), bool(agent.unsafe)
        samples = dict(agent.last_samples)

        def gauge(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=_GPU_LABELS)

        util = gauge("ztgpu_gpu_utilization_ratio", "GPU busy share of the last sample (0-1).")
        used = gauge("ztgpu_gpu_memory_used_bytes", "GPU memory in use.")
        total = gauge("ztgpu_gpu_memory_total_bytes", "GPU memory in all.")
        power = gauge("ztgpu_gpu_power_watts", "GPU power draw.")
        clock = gauge("ztgpu_gpu_sm_clock_hertz", "GPU SM clock.")
        procs = gauge("ztgpu_gpu_processes", "Processes with a context on the GPU.")
        allocated = gauge("ztgpu_gpu_allocated", "1 while a job holds the GPU.")
        is_dirty = gauge("ztgpu_gpu_dirty", "1 while the GPU waits for a memory wipe.")
        is_held = gauge("ztgpu_gpu_held", "1 while a process that would not die holds the GPU.")
        for gpu in agent.inventory:
            job = holding.get(gpu.minor)
            labels = [str(gpu.index), gpu.uuid, str(gpu.minor),
                      job.job_id if job else "", job.user if job else ""]
            allocated.add_metric(labels, 1.0 if job else 0.0)
            is_dirty.add_metric(labels, 1.0 if gpu.minor in dirty else 0.0)
            is_held.add_metric(labels, 1.0 if gpu.minor in held else 0.0)
            sample = samples.get(gpu.minor)
            if sample is None:
                continue
            procs.add_metric(labels, float(len(sample.pids)))
            for family, value in ((util, None if sample.util_pct is None
                                   else sample.util_pct / 100.0),
                                  (used, sample.memory_used_bytes),
                                  (total, sample.memory_total_bytes),
                                  (power, sample.power_w),
                                  (clock, None if sample.sm_clock_mhz is None
                                   else sample.sm_clock_mhz * 1e6)):
                if value is not None:
                    family.add_metric(labels, float(value))
        yield from (util, used, total, power, clock, procs, allocated, is_dirty, is_held)
        yield GaugeMetricFamily("ztgpu_jobs", "Jobs holding GPUs on this node.", value=jobs)
        yield GaugeMetricFamily("ztgpu_node_unsafe",
                                "1 while a start-up check failed (no grants).",
                                value=1.0 if unsafe else 0.0)
        yield CounterMetricFamily("ztgpu_telemetry_rounds", "Telemetry rounds over all GPUs.",
                                  value=agent.sample_rounds)
        yield CounterMetricFamily("ztgpu_telemetry_cpu_seconds",
                                  "CPU time the agent spent sampling telemetry.",
                                  value=agent.sample_cpu_s)
        yield CounterMetricFamily("ztgpu_alerts", "Telemetry findings answered with an alert.",
                                  value=agent.alerts)
        if self.backlog is not None:
            try:
                backlog = self.backlog()
            except SpoolError:  # a scrape must not fail on a busy spool
                return
            yield GaugeMetricFamily("ztgpu_spool_backlog_events",
                                    "Audit events not yet acknowledged by the collector.",
                                    value=float(backlog.get("unacked") or 0))
            age = backlog.get("oldest_unacked_age_s")
            yield GaugeMetricFamily("ztgpu_spool_oldest_unacked_age_seconds",
                                    "Age of the oldest event the collector has not acknowledged.",
                                    value=float(age or 0))
