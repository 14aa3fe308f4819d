"""A GPU's settings and health, as the agent checks them after each job.

Settings a job (or its user with root's help, or a misbehaving tool) may
have changed and that the next job must not inherit: compute mode,
persistence, accounting, application clocks. Health a job may have exposed:
volatile uncorrectable ECC errors, retired pages or remapped rows pending
(the GPU needs a reset before that memory is trustworthy), and Xid events
in the kernel log since the job started.

Backends give a :class:`DeviceState` (NVML: ``ztgpu.gpu.nvml``; simulated:
a JSON file a test edits) and restore settings; :func:`xids_since` reads the
kernel's log (``/dev/kmsg``, or the file standing in for it).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

COMPUTE_MODES = ("default", "exclusive_thread", "prohibited", "exclusive_process")
_XID = re.compile(r"NVRM: Xid \(PCI:([0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2})[^)]*\): "
                  r"(\d+)")


@dataclass(frozen=True)
class DeviceState:
    """What could be read; None where the GPU does not support the query."""

    compute_mode: str | None = None
    persistence: bool | None = None
    accounting: bool | None = None
    #: (memory MHz, SM MHz) set now, and the GPU's defaults.
    app_clocks: tuple[int, int] | None = None
    default_app_clocks: tuple[int, int] | None = None
    ecc_uncorrected: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_pending: bool | None = None
    remap_failure: bool | None = None
    #: UUIDs of the GPU's MIG devices when it is in MIG mode (() when it is
    #: not): each is wiped on its own.
    mig_devices: tuple[str, ...] | None = None


def short_bus(bus_id: str) -> str:
    """``00000000:3B:00.0`` -> ``0000:3b:00``, the form Xid lines carry."""
    domain, _, rest = bus_id.strip().lower().partition(":")
    return f"{int(domain or '0', 16):04x}:{rest.split('.')[0]}"


def xids_since(buses: set[str], since_us: int, path: Path = Path("/dev/kmsg")
               ) -> dict[str, list[int]]:
    """Xid codes logged for the GPUs at *buses* (short form) at or after
    *since_us* (microseconds since boot, the kernel log's clock).

    Raises OSError when the log cannot be read.
    """
    found: dict[str, list[int]] = {}
    for stamp, text in _records(path):
        if stamp < since_us:
            continue
        match = _XID.search(text)
        if match is None:
            continue
        bus = short_bus(match.group(1) + ".0")
        if bus in buses:
            found.setdefault(bus, []).append(int(match.group(2)))
    return found


def _records(path: Path) -> list[tuple[int, str]]:
    """(timestamp µs, message) of each kernel log record in *path*."""
    records = []
    if str(path) == "/dev/kmsg":
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            while True:
                try:
                    raw = os.read(fd, 8192)
                except OSError as exc:
                    if exc.errno == errno.EAGAIN:
                        break
                    if exc.errno == errno.EPIPE:  # overwritten while reading: go on
                        continue
                    raise
                if not raw:
                    break
                records.append(raw.decode("utf-8", "replace"))
        finally:
            os.close(fd)
    else:
        records = path.read_text(errors="replace").splitlines()
    parsed = []
    for record in records:
        head, _, text = record.partition(";")
        fields = head.split(",")
        if len(fields) >= 3 and fields[2].isdigit():
            parsed.append((int(fields[2]), text.split("\n", 1)[0]))
    return parsed


def boot_clock_us() -> int:
    """Now, on the kernel log's clock (CLOCK_MONOTONIC, µs)."""
    import time

    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
