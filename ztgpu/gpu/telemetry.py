"""What a GPU is doing right now: one telemetry sample.

Backends give a :class:`GpuSample` per GPU (NVML: utilisation, memory,
power, SM clock and the processes with a context on it; simulated: a JSON
file a test or a drill scripts, replayed sample by sample). The agent ties
each sample to the job that holds the GPU (``ztgpu.noded.telemetry``).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ztgpu.errors import GpuError


@dataclass(frozen=True)
class GpuSample:
    """One look at one GPU; None where the GPU does not report a figure."""

    #: Share of the last sample period the GPU was busy, 0 to 100 (NVML's
    #: ``utilization.gpu``).
    util_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_w: float | None = None
    sm_clock_mhz: int | None = None
    #: Processes with a compute or graphics context on the GPU.
    pids: tuple[int, ...] = ()

    def busy(self, util_pct: float, memory_bytes: int) -> bool:
        """Whether the GPU is in use by these thresholds (or has processes)."""
        return bool(self.pids) or (self.util_pct or 0) > util_pct or (
            self.memory_used_bytes or 0) > memory_bytes


_KNOWN = {f.name for f in fields(GpuSample)}


def sample_from(entry: Any, source: str) -> GpuSample:
    """A sample from a JSON object (unknown keys are an error: a typo in a
    scripted drill must not pass silently as an idle GPU)."""
    if not isinstance(entry, dict):
        raise GpuError(f"{source}: a sample must be an object, not {type(entry).__name__}")
    unknown = set(entry) - _KNOWN
    if unknown:
        raise GpuError(f"{source}: unknown sample keys {', '.join(sorted(unknown))} "
                       f"(known: {', '.join(sorted(_KNOWN))})")
    values = dict(entry)
    pids = values.get("pids", [])
    if not isinstance(pids, list) or not all(isinstance(p, int) and not isinstance(p, bool)
                                             and p > 0 for p in pids):
        raise GpuError(f"{source}: pids must be a list of positive integers")
    values["pids"] = tuple(pids)
    for key in ("util_pct", "power_w"):
        if values.get(key) is not None and not isinstance(values[key], int | float):
            raise GpuError(f"{source}: {key} must be a number")
    for key in ("memory_used_bytes", "memory_total_bytes", "sm_clock_mhz"):
        if values.get(key) is not None and (not isinstance(values[key], int)
                                            or isinstance(values[key], bool)):
            raise GpuError(f"{source}: {key} must be an integer")
    return GpuSample(**values)


class ScriptedTelemetry:
    """The simulated backend's telemetry: a JSON file mapping each GPU's
    UUID to a sample, or to a list of samples given one per look (the last
    one repeats). Rewriting the file starts every list again."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._data: dict[str, Any] = {}
        self._next: dict[str, int] = {}

    def sample(self, uuid: str) -> GpuSample:
        if self._path is None:
            return GpuSample()
        with self._lock:
            self._reload()
            entry = self._data.get(uuid)
            if entry is None:
                return GpuSample()
            if isinstance(entry, list):
                if not entry:
                    return GpuSample()
                position = self._next.get(uuid, 0)
                self._next[uuid] = position + 1
                entry = entry[min(position, len(entry) - 1)]
            return sample_from(entry, f"{self._path} [{uuid}]")

    def _reload(self) -> None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            self._data, self._stamp = {}, None
            return
        except OSError as exc:
            raise GpuError(f"cannot read the scripted telemetry {self._path}: {exc}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self._path.read_text())
        except (OSError, ValueError) as exc:
            raise GpuError(f"cannot read the scripted telemetry {self._path}: {exc}") from None
        if not isinstance(data, dict):
            raise GpuError(f"{self._path}: must map GPU UUIDs to samples")
        self._data, self._stamp, self._next = data, stamp, {}
