"""A labelled set of per-job GPU usage summaries, for the learned detector's tests
and ``bench/anomaly.py``.

Users follow one of three patterns, each with its own working hours:

* ``training``: long jobs (4 to 20 hours busy, high utilisation and power);
* ``inference``: services and batch inference (0.5 to 3 hours, middling);
* ``interactive``: notebooks and debugging (minutes to an hour, mostly idle);

and a tenth of the users work at night as a rule (their off-peak use is
their normal). Each user's history is split in time: the first part is what
the baselines learn from, the rest is the test set, into which misuse is
injected for some users: a miner-like load (hours of full use, mostly
off-peak) or an off-peak burst three or more times the user's usual. The
test set never reaches the baselines before it is judged.

Summaries carry the fields of the node agent's ``gpu.usage`` events.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

START = datetime(2026, 9, 7, tzinfo=UTC).astimezone()  # a Monday, local time

PATTERNS = {
    # busy hours range, utilisation range, kW range while busy
    "training": ((4.0, 20.0), (80.0, 99.0), (0.45, 0.70)),
    "inference": ((0.5, 3.0), (25.0, 65.0), (0.20, 0.40)),
    "interactive": ((0.05, 1.0), (2.0, 25.0), (0.08, 0.20)),
}


@dataclass(frozen=True)
class Trace:
    #: (summary, is_misuse) in time order per user; train has no misuse.
    train: list[dict[str, Any]]
    test: list[tuple[dict[str, Any], bool]]


def generate(seed: int = 7, users: int = 40, train_jobs: int = 40, test_jobs: int = 20,
             misuse_users: float = 0.5) -> Trace:
    rng = random.Random(seed)  # noqa: S311 - a reproducible test set, not a secret
    train: list[dict[str, Any]] = []
    test: list[tuple[dict[str, Any], bool]] = []
    job = 1000
    for number in range(users):
        user = f"user{number:03d}"
        pattern = rng.choice(list(PATTERNS))
        night = rng.random() < 0.1
        first_hour = rng.choice((21, 22, 23)) if night else rng.randint(7, 11)
        partition = "gpu-long" if pattern == "training" else "gpu"
        account = f"proj{number % 6}"
        events = []
        day = START
        for _ in range(train_jobs + test_jobs):
            day += timedelta(hours=rng.uniform(4, 40))
            job += 1
            events.append(_job(rng, user, job, pattern, partition,
                               _at(day, first_hour + rng.uniform(0, 3)), account))
        train += events[:train_jobs]
        victims = rng.random() < misuse_users
        injected = set(rng.sample(range(test_jobs), k=2)) if victims else set()
        for index, event in enumerate(events[train_jobs:]):
            if index in injected:
                job += 1
                test.append((_misuse(rng, user, job, pattern, partition, event, account),
                             True))
            test.append((event, False))
    return Trace(train=train, test=test)


def _at(day: datetime, hour: float) -> datetime:
    base = day.replace(hour=0, minute=0, second=0, microsecond=0)
    return base + timedelta(hours=hour)


def _job(rng: random.Random, user: str, job: int, pattern: str, partition: str,
         start: datetime, account: str | None = None) -> dict[str, Any]:
    (busy_lo, busy_hi), (util_lo, util_hi), (kw_lo, kw_hi) = PATTERNS[pattern]
    busy = rng.uniform(busy_lo, busy_hi)
    return summary(user, job, partition, start, busy, rng.uniform(util_lo, util_hi),
                   busy * rng.uniform(kw_lo, kw_hi), account=account)


def _misuse(rng: random.Random, user: str, job: int, pattern: str, partition: str,
            normal: dict[str, Any], account: str | None = None) -> dict[str, Any]:
    (busy_lo, busy_hi), _, _ = PATTERNS[pattern]
    usual = (busy_lo + busy_hi) / 2
    # At night, after the day of an ordinary job: "usage 200% above the
    # user's baseline during off-peak hours", i.e. three to four times the
    # pattern's typical busy time (at least 3 hours).
    start = _at(datetime.fromisoformat(normal["first_sample"]), rng.uniform(22.0, 25.0))
    busy = max(3.0, usual * rng.uniform(3.0, 4.0))
    if rng.random() < 0.5:  # a miner: full utilisation and power
        return summary(user, job, partition, start, busy, 100.0, busy * 0.69, account=account)
    return summary(user, job, partition, start, busy, rng.uniform(85, 100), busy * 0.55,
                   account=account)


def summary(user: str, job: int, partition: str, start: datetime, busy_h: float,
            util: float, kwh: float, *, account: str | None = None,
            gpu: int = 0) -> dict[str, Any]:
    held = busy_h / max(0.3, util / 100.0) if util < 100 else busy_h
    end = start + timedelta(hours=max(held, busy_h))
    return {"code": "gpu.usage", "node": "gpu01", "job_id": str(job), "user": user,
            "partition": partition, "account": account,
            "gpus": [{"index": gpu, "minor": gpu, "uuid": f"GPU-{gpu:08x}-sim"}],
            "util_mean_pct": round(util, 2), "busy_s": round(busy_h * 3600, 1),
            "energy_j": round(kwh * 3.6e6, 1), "first_sample": start.isoformat(),
            "last_sample": end.isoformat(), "samples": int(held * 720) + 1}
