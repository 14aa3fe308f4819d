"""Local time-of-day windows (``HH:MM-HH:MM``), as the telemetry rules and the
collector's baselines use them (``telemetry.allowed_hours``,
``collector.anomaly.peak_hours``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime


def in_hours(windows: Sequence[str], now: datetime) -> bool:
    """Whether *now* (local time) falls in one of the ``HH:MM-HH:MM`` windows;
    a window whose end is before its start runs past midnight; no window at
    all means any time."""
    if not windows:
        return True
    minute = now.hour * 60 + now.minute
    for window in windows:
        start_text, end_text = window.split("-")
        start = int(start_text[:2]) * 60 + int(start_text[3:])
        end = int(end_text[:2]) * 60 + int(end_text[3:])
        if (start <= minute < end) if start <= end else (minute >= start or minute < end):
            return True
    return False
