"""The bounded audit spool: when too much is unacknowledged, stop granting.

Like auditd's ``disk_full_action``, the agent never drops an audit record to
make room. When the collector has not acknowledged ``limit`` events, the
node is no longer able to account for what happens on it, so it stops
granting GPUs to new jobs (their Prolog fails with a clear reason; Slurm
drains the node and requeues the job), and with ``cancel_jobs`` it also ends
the running ones. Events of the jobs that are still running keep being
spooled: the bound is what triggers the action, not a cap that discards.
Once the backlog falls below ``resume_fraction`` of the limit, grants
resume (an admin resumes the Slurm node).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("ztgpu.noded")


class BacklogSpool(Protocol):
    """What the guard reads from and writes to the spool."""

    def unacked_count(self) -> int: ...

    def append(self, code: str, **fields: Any) -> dict[str, Any]: ...


class SpoolGuard:
    """Tracks whether the spool is full and records each change of state."""

    def __init__(self, spool: BacklogSpool, limit: int, action: str, *,
                 on_full: Callable[[], None] | None = None,
                 resume_fraction: float = 0.9) -> None:
        self.spool = spool
        self.limit = limit
        self.action = action
        self.on_full = on_full
        self.resume_below = int(limit * resume_fraction)
        self.full = False
        self.unacked = 0
        self._lock = threading.Lock()

    def check(self) -> bool:
        """Re-read the backlog, apply a state change, return whether the spool is full."""
        unacked = self.spool.unacked_count()
        with self._lock:
            self.unacked = unacked
            if not self.full and unacked >= self.limit:
                self.full = True
                changed = "full"
            elif self.full and unacked < self.resume_below:
                self.full = False
                changed = "drained"
            else:
                return self.full
        if changed == "full":
            log.critical("audit spool full: %d events not acknowledged by the collector "
                         "(limit %d); action %s", unacked, self.limit, self.action)
            self.spool.append("spool.full", unacked=unacked, limit=self.limit,
                              action=self.action, outcome="stop_granting")
            if self.on_full is not None:
                self.on_full()
        else:
            log.warning("audit spool drained to %d events; granting GPUs again", unacked)
            self.spool.append("spool.drained", unacked=unacked, limit=self.limit,
                              outcome="granting")
        return self.full

    def refusal(self) -> str:
        """The reason a Prolog fails while the spool is full."""
        return (f"audit spool full: {self.unacked} events not acknowledged by the collector "
                f"(limit {self.limit}); no new GPU grants on this node until it drains — "
                "check the collector and `ztgpu status --node`")
