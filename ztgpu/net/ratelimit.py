"""Bounded recording of repeated refusals (shared by the node agent and the collector)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class RateWindow(Generic[K]):
    """At most *per_minute* events per key in each minute (a fixed window per key)."""

    def __init__(self, per_minute: int, max_keys: int = 100_000) -> None:
        self.per_minute = per_minute
        self.max_keys = max_keys
        self.lock = threading.Lock()
        self.window: dict[K, tuple[float, int]] = {}

    def allow(self, key: K) -> bool:
        """Count one event for *key*; False when its minute's budget is spent."""
        now = time.monotonic()
        with self.lock:
            if len(self.window) >= self.max_keys and key not in self.window:
                self.window = {k: v for k, v in self.window.items() if now - v[0] < 60}
                if len(self.window) >= self.max_keys:
                    return False  # more live senders than we keep track of
            start, seen = self.window.get(key, (now, 0))
            if now - start >= 60:
                start, seen = now, 0
            if seen >= self.per_minute:
                return False
            self.window[key] = (start, seen + 1)
            return True


class RejectLimiter(Generic[K]):
    """Records refusals from parties anyone can be, at most *per_minute* per key.

    The rest are counted, and the count is recorded with the next refusal let
    through, so nothing disappears without a trace while a flood cannot fill
    the audit store. The key is whatever identifies the sender (a uid, an IP
    address).
    """

    def __init__(self, record: Callable[[K, str], None], per_minute: int = 10,
                 max_keys: int = 10_000) -> None:
        self.record = record
        self.per_minute = per_minute
        self.max_keys = max_keys
        self.lock = threading.Lock()
        self.window: dict[K, tuple[float, int, int]] = {}  # key -> (start, seen, held back)

    def __call__(self, key: K, reason: str) -> None:
        now = time.monotonic()
        with self.lock:
            if len(self.window) >= self.max_keys and key not in self.window:
                # Forget finished windows so that many senders cannot grow memory.
                self.window = {k: v for k, v in self.window.items() if now - v[0] < 60}
            start, seen, held = self.window.get(key, (now, 0, 0))
            if now - start >= 60:
                start, seen = now, 0
            if seen >= self.per_minute:
                self.window[key] = (start, seen, held + 1)
                return
            self.window[key] = (start, seen + 1, 0)
        if held:
            reason = f"{reason} (and {held} more from this sender not recorded individually)"
        self.record(key, reason)
