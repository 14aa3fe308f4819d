"""The node agent's decisions and enforcement, independent of its socket.

Guarantees, on a node where the agent runs:

* GPU device files are at their configured rest state (default
  ``root:root 0600``) unless a job holds them; a job's GPUs belong to its
  user only between its Prolog and its Epilog.
* Every process of a running job is in a devices cgroup that denies the
  GPUs the job was not given: Slurm's own (``ConstrainDevices=yes``), to
  which the agent adds its denies, or the agent's own per-job cgroup
  (``ConstrainDevices=no``).
* Isolation is probed, not assumed: once a job's processes exist the agent
  opens every GPU from inside each of the job's devices cgroups as the job's
  user and compares the outcome with the allocation. A mismatch is a
  critical event and triggers ``isolation.on_violation``.
* Every grant, release, refusal, probe result and drift is spooled before
  the request that caused it is answered.
"""

from __future__ import annotations

import logging
import threading
import time

from ztgpu.noded.confinement import Confinement
from ztgpu.noded.core import EventSink, LiveJob
from ztgpu.noded.hygiene import Hygiene
from ztgpu.noded.lifecycle import Lifecycle
from ztgpu.noded.probing import Probing
from ztgpu.noded.reconcile import Reconcile
from ztgpu.noded.ssh import SshAccess
from ztgpu.noded.telemetry import Telemetry

__all__ = ["Agent", "EventSink", "LiveJob"]

log = logging.getLogger("ztgpu.noded")

#: After a grant, look for the job's first processes this often, for this long.
FAST_SWEEP_S = 0.02
FAST_SWEEP_WINDOW_S = 15.0


class Agent(Lifecycle, SshAccess, Hygiene, Telemetry, Confinement, Probing, Reconcile):
    """State and enforcement for one node, with its background loop. Thread-safe.

    The parts: ``lifecycle`` (grants and releases), ``confinement``,
    ``probing``, ``reconcile`` (start and drift), ``ssh`` (PAM logins and
    sessions), ``hygiene`` (wipes, device state), ``telemetry`` (sampling and
    its rules), over ``core``'s state.
    """

    # ---- background loop ----------------------------------------------
    def run_background(self) -> None:
        """Start the sweep/verify/drift loop in a thread."""
        thread = threading.Thread(target=self._loop, name="ztgpu-sweep", daemon=True)
        thread.start()
        self._threads.append(thread)
        self.run_telemetry()

    def _loop(self) -> None:
        iso = self.config.isolation
        next_drift = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sweep()
                self.check_sessions()
                if self.guard is not None:
                    self.guard.check()
                if self.jobs:
                    self.verify(due_only=True)
                now = time.monotonic()
                if now >= next_drift:
                    self.check_drift()
                    next_drift = now + iso.drift_interval_s
            except Exception:
                log.exception("background check failed")
            self._stop.wait(self._interval())

    def _interval(self) -> float:
        now = time.monotonic()
        with self.lock:
            waiting = any(not j.confined and now - j.granted_mono < FAST_SWEEP_WINDOW_S
                          for j in self.jobs.values())
        return FAST_SWEEP_S if waiting else self.config.isolation.sweep_interval_s

    def stop(self, reason: str) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.probe_helper.close()
        self.spool.append("agent.stop", reason=reason, outcome="ok")
