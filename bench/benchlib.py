"""Small helpers shared by the benchmarks (run as scripts from this directory)."""

from __future__ import annotations

import functools
import queue
import time
from collections.abc import Callable
from typing import Any


def percentile(values: list[Any], pct: float) -> Any:
    """The ``pct`` percentile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def wait_for_workers(workers: list[Any], results: Any, kind: str,
                     timeout: float | None) -> list[Any]:
    """Collect one ``kind`` message per worker; SystemExit on an error or a lost worker."""
    got: dict[int, Any] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(got) < len(workers):
        try:
            what, index, payload = results.get(timeout=1.0)
        except queue.Empty:
            lost = [w.name for i, w in enumerate(workers)
                    if i not in got and w.exitcode is not None]
            if lost:
                raise SystemExit(f"client process {lost[0]} exited without a result") from None
            if deadline is not None and time.monotonic() > deadline:
                raise SystemExit(f"client processes not {kind} after {timeout:.0f}s") from None
            continue
        if what == "error":
            raise SystemExit(f"client process {index} failed: {payload}")
        if what == kind:
            got[index] = payload
    return [got[i] for i in range(len(workers))]


def reports_to_parent(body: Callable[..., Any]) -> Callable[..., None]:
    """A client process's entry point ``body(index, *args, results)``.

    Its return value reaches the parent as ``("done", index, value)`` on
    ``results`` (the last argument) and any failure as ``("error", index,
    text)``, which ``wait_for_workers`` turns into an aborted run.
    """

    @functools.wraps(body)
    def worker(index: int, *args: Any) -> None:
        results = args[-1]
        try:
            results.put(("done", index, body(index, *args)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which aborts
            results.put(("error", index, f"{type(exc).__name__}: {exc}"))

    return worker
