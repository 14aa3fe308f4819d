"""SlurmJobHolder: holds, releases and cancels are retried until they hold."""

from __future__ import annotations

import time

from ztgpu.authd.holder import SlurmJobHolder
from ztgpu.errors import SlurmError
from ztgpu.testing.slurm_cluster import wait_for


class FakeSlurm:
    """Records calls; the first hold fails (job not pending yet); for a cancel the job is
    first still CONFIGURING (its PrologSlurmctld being handled), then the first cancel is
    undone (as by a requeue racing it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.states = ["CONFIGURING", "PENDING", "PENDING", "PENDING", "CANCELLED"]
        self.seen: list[str | None] = []

    def hold(self, job_id: str, reason: str) -> None:
        self.calls.append(("hold", job_id))
        if len([c for c in self.calls if c[0] == "hold"]) == 1:
            raise SlurmError("Job is still configuring")

    def release(self, job_id: str) -> None:
        self.calls.append(("release", job_id))

    def cancel(self, job_id: str, reason: str) -> None:
        self.calls.append(("cancel", job_id))
        assert self.seen[-1] != "CONFIGURING", "cancelled while the requeue could undo it"

    def job_state(self, job_id: str) -> str | None:
        state = self.states.pop(0) if self.states else None
        self.seen.append(state)
        return state


def test_hold_is_retried_until_slurm_accepts_it() -> None:
    slurm = FakeSlurm()
    SlurmJobHolder(slurm, retry_s=0.01).hold("7", "ztgpu: MFA")
    wait_for(lambda: slurm.calls.count(("hold", "7")) == 2, 5, "the retried hold")
    time.sleep(0.05)
    assert slurm.calls.count(("hold", "7")) == 2  # and no more once it held


def test_cancel_waits_out_configuring_and_is_repeated_while_the_job_is_queued() -> None:
    slurm = FakeSlurm()
    SlurmJobHolder(slurm, retry_s=0.01).cancel("8", "no GPU project")
    wait_for(lambda: slurm.calls.count(("cancel", "8")) == 2, 5, "the second cancel")
    time.sleep(0.05)
    assert slurm.calls.count(("cancel", "8")) == 2
    assert slurm.seen[0] == "CONFIGURING" and slurm.seen[-1] == "CANCELLED"


def test_cancel_of_a_job_that_already_ended_does_nothing() -> None:
    slurm = FakeSlurm()
    slurm.states = ["COMPLETED"]
    holder = SlurmJobHolder(slurm, retry_s=0.01)
    holder._retry("cancel", "9", "no GPU project")
    assert ("cancel", "9") not in slurm.calls


def test_release_of_several_jobs() -> None:
    slurm = FakeSlurm()
    SlurmJobHolder(slurm, retry_s=0.01).release(["1", "2"])
    wait_for(lambda: {c for c in slurm.calls} == {("release", "1"), ("release", "2")}, 5,
             "both releases")
