"""Learned baselines at the collector: what is usual for each user, and what is not.

Nodes send no raw samples, only one ``gpu.usage`` summary per job and GPU
at the job's end (``ztgpu.noded.telemetry``). The collector follows its
store like a SIEM sink (``ztgpu.collector.sinks``: insertion order, a saved
cursor) and, for each summary, compares a few figures with the history of
the same user:

* ``busy_hours``: time the GPU was busy;
* ``offpeak_busy_hours``: the part of it outside ``collector.anomaly.peak_hours``
  (the "GPU use far above baseline during off-peak hours" case);
* ``energy_kwh``: energy drawn;
* ``util_mean_pct``: mean utilisation while held.

**Method.** Robust statistics, per user and figure: the median of the
user's past values and their median absolute deviation (MAD, scaled by
1.4826 so that it estimates a standard deviation for normal data). A value
is anomalous when its robust z-score, ``(value - median) / scale``, exceeds
``threshold`` (default 5) *and* it exceeds the median by at least the
figure's absolute floor (so that a user whose jobs are all alike, MAD 0,
is not flagged for a minute more). The scale is never below a fraction of
the median (``min_relative_scale``) or the floor, for the same reason, and
off-peak time is judged on the scale of the user's job sizes (a fifth of
the usual busy time at least: long jobs run into the night now and then).

**False-positive control.** Nothing is judged against a baseline with
fewer than ``min_history`` past summaries (default 10). A user with less
history is judged against the first of these that has it: their Slurm
account's (the project's), the GPU's (the same node and GPU: a GPU kept for
one service has its own normal), their partition's; with none, the summary
is only learned.
A robust z of 5 would flag about 3 in 10^7 values of a normal figure; real
usage has heavier tails, which is what the floors and the relative scales
absorb. The default was chosen on the generated labelled set of
``ztgpu.testing.usage_traces`` (seeds 1 to 10: precision 0.97, recall 0.96
at 5; 0.99 and 0.90 at 6); ``bench/anomaly.py`` measures it on other seeds.
A flagged summary is **not** learned, so a burst of misuse cannot make
itself normal; everything else is. Baselines are rebuilt from
the store at start (the whole history is replayed, judging nothing already
judged), so they survive restarts and need no state of their own.

Each finding is an ``anomaly.usage`` event in the collector's own chain,
with the figure, its baseline and the score; it reaches the SIEM exports
like every other event.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

log = logging.getLogger("ztgpu.collector.anomaly")

#: Figures judged, with the absolute floor a value must exceed the median by.
FLOORS = {"busy_hours": 0.5, "offpeak_busy_hours": 0.5, "energy_kwh": 0.25,
          "util_mean_pct": 25.0}
MAD_TO_SIGMA = 1.4826
#: The scale of off-peak busy time is at least this share of the usual busy time.
OFFPEAK_SCALE_OF_BUSY = 0.2
#: Past values kept per baseline (the most recent).
WINDOW = 500


@dataclass(frozen=True)
class Settings:
    threshold: float = 5.0
    min_history: int = 10
    min_relative_scale: float = 0.1
    peak_hours: tuple[str, ...] = ("08:00-20:00",)


@dataclass
class Baseline:
    values: dict[str, deque[float]] = field(default_factory=dict)

    def count(self) -> int:
        return min((len(v) for v in self.values.values()), default=0)

    def add(self, figures: dict[str, float]) -> None:
        for name, value in figures.items():
            self.values.setdefault(name, deque(maxlen=WINDOW)).append(value)


@dataclass(frozen=True)
class Finding:
    figure: str
    value: float
    median: float
    scale: float
    score: float
    history: int
    basis: str


def figures(event: dict[str, Any], peak_hours: Sequence[str]) -> dict[str, float] | None:
    """The judged figures of one ``gpu.usage`` event (None if it lacks them)."""
    try:
        busy = float(event["busy_s"]) / 3600.0
        energy = float(event.get("energy_j", 0.0)) / 3.6e6
        util = float(event.get("util_mean_pct", 0.0))
        first = _parse(str(event["first_sample"]))
        last = _parse(str(event["last_sample"]))
    except (KeyError, TypeError, ValueError):
        return None
    return {"busy_hours": busy, "offpeak_busy_hours": busy * offpeak_share(first, last,
                                                                           peak_hours),
            "energy_kwh": energy, "util_mean_pct": util}


def offpeak_share(first: datetime, last: datetime, peak_hours: Sequence[str]) -> float:
    """The share of [first, last] (local time) outside the peak windows."""
    from ztgpu.hours import in_hours

    if last <= first:
        return 0.0 if in_hours(list(peak_hours), first.astimezone()) else 1.0
    span = (last - first).total_seconds()
    steps = max(1, min(1440, int(span // 60)))
    step = (last - first) / steps
    outside = sum(0 if in_hours(list(peak_hours), (first + step * (i + 0.5)).astimezone())
                  else 1 for i in range(steps))
    return outside / steps


#: The baselines a summary is judged against, in order: the first with
#: ``min_history`` past summaries decides.
LEVELS = ("user", "account", "gpu", "partition")


def _keys(event: dict[str, Any]) -> dict[str, str | None]:
    """The summary's baseline key at each level (None: it has none there)."""
    gpu = (event.get("gpus") or [{}])[0]
    gpu_id = gpu.get("uuid") or gpu.get("index") if isinstance(gpu, dict) else None
    account, user = event.get("account"), event.get("user")
    return {"user": user if isinstance(user, str) else None,
            "account": account if isinstance(account, str) and account else None,
            "gpu": f"{event.get('node') or '-'} {gpu_id}" if gpu_id is not None else None,
            "partition": str(event.get("partition") or "-")}


class Detector:
    """Per-user, per-account, per-GPU and per-partition baselines over
    ``gpu.usage`` summaries."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.baselines: dict[str, dict[str, Baseline]] = {level: {} for level in LEVELS}

    @property
    def users(self) -> dict[str, Baseline]:
        return self.baselines["user"]

    def observe(self, event: dict[str, Any], *, judge: bool = True) -> list[Finding]:
        """Judge one summary against its baselines, then learn it unless flagged."""
        found = figures(event, self.settings.peak_hours)
        keys = _keys(event)
        if found is None or keys["user"] is None:
            return []
        mine = [(f"{level} {key}", self.baselines[level].setdefault(key, Baseline()))
                for level, key in keys.items() if key is not None]
        findings: list[Finding] = []
        if judge:
            ready = [(basis, b) for basis, b in mine if b.count() >= self.settings.min_history]
            if ready:
                findings = self._judge(found, ready[0][1], ready[0][0])
        if not findings:
            for _, baseline in mine:
                baseline.add(found)
        return findings

    def _judge(self, found: dict[str, float], baseline: Baseline, basis: str
               ) -> list[Finding]:
        out = []
        for name, value in found.items():
            past = list(baseline.values.get(name, ()))
            if len(past) < self.settings.min_history:
                continue
            median = statistics.median(past)
            mad = statistics.median(abs(v - median) for v in past) * MAD_TO_SIGMA
            scale = max(mad, self.settings.min_relative_scale * abs(median), FLOORS[name] / 2)
            if name == "offpeak_busy_hours":
                # Off-peak time is judged on the scale of the user's job sizes:
                # whose long jobs run into the night now and then is not odd.
                busy = list(baseline.values.get("busy_hours", ()))
                if busy:
                    scale = max(scale, OFFPEAK_SCALE_OF_BUSY * statistics.median(busy))
            score = (value - median) / scale
            if score > self.settings.threshold and value - median >= FLOORS[name]:
                out.append(Finding(name, value, median, scale, score, len(past), basis))
        return out


def describe(event: dict[str, Any], finding: Finding) -> str:
    unit = {"busy_hours": "h busy", "offpeak_busy_hours": "h busy off-peak",
            "energy_kwh": "kWh", "util_mean_pct": "% mean utilisation"}[finding.figure]
    gpu = (event.get("gpus") or [{}])[0]
    return (f"job {event.get('job_id')} of {event.get('user')} on {event.get('node')} GPU "
            f"{gpu.get('index', '?')}: {finding.value:.2f} {unit}; the usual for "
            f"{finding.basis} is {finding.median:.2f} (median of {finding.history}, scale "
            f"{finding.scale:.2f}): robust z {finding.score:.1f}")


class AnomalyDestination:
    """A sink destination (``ztgpu.collector.sinks``) that learns and judges
    ``gpu.usage`` events, recording ``anomaly.usage`` through *record*."""

    name = "anomaly"

    def __init__(self, settings: Settings, record: Callable[..., Any]) -> None:
        self.detector = Detector(settings)
        self.record = record
        self.findings = 0

    def replay(self, events: Iterable[dict[str, Any]]) -> None:
        """Learn from what was judged before a restart (no findings recorded)."""
        for event in events:
            if event.get("code") == "gpu.usage":
                self.detector.observe(event, judge=False)

    def deliver(self, events: Sequence[dict[str, Any]]) -> None:
        for event in events:
            if event.get("code") != "gpu.usage":
                continue
            for finding in self.detector.observe(event):
                self.findings += 1
                gpu = (event.get("gpus") or [{}])[0]
                self.record("anomaly.usage", source_node=str(event.get("node")),
                            source_seq=int(event.get("seq", 0)),
                            job_id=str(event.get("job_id")), user=str(event.get("user")),
                            gpus=[gpu] if gpu else [], figure=finding.figure,
                            value=round(finding.value, 4), baseline=round(finding.median, 4),
                            scale=round(finding.scale, 4), score=round(finding.score, 2),
                            history=finding.history, basis=finding.basis,
                            outcome="flagged", reason=describe(event, finding)[:500])

    def close(self) -> None:
        return None


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
