"""Holding jobs that wait for MFA, and releasing them after a login (Slurm CLI).

A job the policy can never allow is cancelled with the reason instead.

The gate's PrologSlurmctld exits non-zero for a job that lacks MFA; Slurm
then requeues a batch job (it never drains a node for this). Once the job
is pending again, authd holds it and writes the reason into its
AdminComment, where ``scontrol show job`` shows it to the user. Holding is
retried in the background until the job is pending (or a deadline passes),
because the requeue happens only after the PrologSlurmctld has exited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from ztgpu.errors import SlurmError
from ztgpu.slurm.client import LIVE_JOB_STATES

log = logging.getLogger("ztgpu.authd")


class HoldingSlurm(Protocol):
    def hold(self, job_id: str, reason: str) -> None: ...

    def release(self, job_id: str) -> None: ...

    def cancel(self, job_id: str, reason: str) -> None: ...

    def job_state(self, job_id: str) -> str | None: ...

    def job_user(self, job_id: str) -> str | None: ...




class SlurmJobHolder:
    """``JobHolder`` on top of ``scontrol hold/release`` with retries in the background."""

    def __init__(self, slurm: HoldingSlurm, *, retry_s: float = 0.5,
                 deadline_s: float = 120.0) -> None:
        self.slurm = slurm
        self.retry_s = retry_s
        self.deadline_s = deadline_s

    def hold(self, job_id: str, reason: str) -> None:
        threading.Thread(target=self._retry, args=("hold", job_id, reason),
                         name=f"hold-{job_id}", daemon=True).start()

    def release(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            threading.Thread(target=self._retry, args=("release", job_id, ""),
                             name=f"release-{job_id}", daemon=True).start()

    def job_user(self, job_id: str) -> str | None:
        """Whose job it is, asked now (the gate waits for it)."""
        return self.slurm.job_user(job_id)

    def cancel(self, job_id: str, reason: str) -> None:
        threading.Thread(target=self._retry, args=("cancel", job_id, reason),
                         name=f"cancel-{job_id}", daemon=True).start()

    def _retry(self, action: str, job_id: str, reason: str) -> None:
        deadline = time.monotonic() + self.deadline_s
        last = ""
        while time.monotonic() < deadline:
            try:
                if action == "hold":
                    self.slurm.hold(job_id, reason)
                elif action == "cancel":
                    # A cancel that lands while the failed PrologSlurmctld is
                    # still being handled is undone by the requeue that
                    # follows it: wait until the job is out of CONFIGURING,
                    # then cancel until it is really gone.
                    before = self.slurm.job_state(job_id)
                    if before == "CONFIGURING":
                        raise SlurmError(f"job {job_id} is still in its PrologSlurmctld")
                    if before is None or before not in LIVE_JOB_STATES:
                        log.info("job %s already ended (%s)", job_id, before or "gone")
                        return
                    self.slurm.cancel(job_id, reason)
                    if self.slurm.job_state(job_id) in LIVE_JOB_STATES:
                        raise SlurmError(f"job {job_id} is still queued after scancel")
                else:
                    self.slurm.release(job_id)
                log.info("%s job %s", action, job_id)
                return
            except SlurmError as exc:
                if not last:
                    log.warning("could not %s job %s yet (retrying): %s", action, job_id, exc)
                last = str(exc)
            time.sleep(self.retry_s)
        log.error("could not %s job %s: %s", action, job_id, last)
