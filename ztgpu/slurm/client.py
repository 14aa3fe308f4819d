"""The agent's narrow interface to Slurm, and its CLI implementation.

Only the daemon uses this (never a Prolog/Epilog: Slurm's high-throughput
guide forbids Slurm commands there). Every command has a deadline; on expiry
its process group is killed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Protocol

from ztgpu.errors import SlurmError

_JOB_ID = re.compile(r"[1-9][0-9]{0,9}")
#: A job as Slurm commands take it: a job id, or one array task (``201_3``).
_JOB_REF = re.compile(r"[1-9][0-9]{0,9}(?:_[0-9]{1,10})?")
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


#: Slurm states in which a cancelled job is still there to cancel (a requeue may
#: have undone the cancel, or it never arrived).
LIVE_JOB_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD",
                             "REQUEUE_FED", "SUSPENDED"})


class SlurmClient(Protocol):
    def job_ref(self, job_id: str) -> str:
        """How Slurm commands name exactly this job: ``ARRAYID_TASK`` for the
        array task whose job id is also its array's id (``scancel 201`` would
        end every task of array 201), else the job id."""
        ...

    def job_state(self, job_id: str) -> str | None:
        """The job's state, or None once Slurm no longer lists it."""
        ...

    def cancel(self, job_id: str, reason: str) -> None:
        """End *job_id*, leaving *reason* where the user can read it."""

    def drain(self, node: str, reason: str) -> None:
        """Take *node* out of scheduling, with *reason* for ``sinfo -R``."""

    def node_state(self, node: str) -> tuple[str, str]:
        """The node's state (e.g. ``IDLE+DRAIN``) and its reason ('' when none)."""
        ...

    def resume(self, node: str) -> None:
        """Put a drained *node* back into service."""

    def launch_failed_held(self) -> list[str]:
        """Jobs Slurm requeued and held because their launch failed (e.g. a Prolog)."""
        ...

    def release_held(self, job_id: str) -> None:
        """Release a job Slurm held after a failed launch, to start as soon as it can."""


class CliSlurmClient:
    """Slurm through its command-line tools (works with any Slurm version)."""

    def __init__(self, bin_dir: Path, conf: Path | None, timeout_s: float) -> None:
        self.bin_dir = bin_dir
        self.conf = conf
        self.timeout_s = timeout_s

    def _run(self, argv: list[str]) -> str:
        return self.run(argv)

    def run(self, argv: list[str], timeout_s: float | None = None) -> str:
        """Run Slurm command ``argv[0]`` (from ``bin_dir``) with its deadline
        (*timeout_s*, default the client's); its stdout.

        Raises:
            SlurmError: it could not start, overran (its process group is
                killed) or exited non-zero.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        env = dict(os.environ)
        if self.conf is not None:
            env["SLURM_CONF"] = str(self.conf)
        try:
            proc = subprocess.Popen([str(self.bin_dir / argv[0]), *argv[1:]], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True,
                                    start_new_session=True)
        except OSError as exc:
            raise SlurmError(f"cannot run {argv[0]}: {exc.strerror}") from exc
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise SlurmError(f"{argv[0]} did not finish within {timeout:g}s") from None
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(argv[:2])} failed ({proc.returncode}): {err.strip()}")
        return out

    def job_ref(self, job_id: str) -> str:
        if not _JOB_ID.fullmatch(job_id):
            raise SlurmError(f"refusing to look up malformed job id {job_id!r}")
        try:
            out = self._run(["scontrol", "-o", "show", "job", job_id])
        except SlurmError:
            return job_id  # gone, or slurmctld away: the id is all there is
        for line in out.splitlines():
            fields = dict(token.partition("=")[::2] for token in line.split() if "=" in token)
            task = fields.get("ArrayTaskId", "")
            if fields.get("JobId") == job_id and task.isdigit() and fields.get("ArrayJobId"):
                return f"{fields['ArrayJobId']}_{task}"
        return job_id

    def cancel(self, job_id: str, reason: str) -> None:
        if not _JOB_REF.fullmatch(job_id):
            raise SlurmError(f"refusing to cancel malformed job id {job_id!r}")
        # AdminComment can only be set by an operator, so the user can trust
        # it; it shows in `scontrol show job`.
        comment = "ztgpu: " + re.sub(r"[^\w .,:;()/+=-]", "_", reason)[:200]
        try:
            self._run(["scontrol", "update", f"JobId={job_id}", f"AdminComment={comment}"])
        finally:
            self._run(["scancel", job_id])

    def drain(self, node: str, reason: str) -> None:
        if not _NODE.fullmatch(node):
            raise SlurmError(f"refusing to drain malformed node name {node!r}")
        text = "ztgpu: " + re.sub(r"[^\w .,:;()/+=-]", "_", reason)[:200]
        self._run(["scontrol", "update", f"NodeName={node}", "State=DRAIN",
                   f"Reason={text}"])

    def resume(self, node: str) -> None:
        if not _NODE.fullmatch(node):
            raise SlurmError(f"refusing to resume malformed node name {node!r}")
        self._run(["scontrol", "update", f"NodeName={node}", "State=RESUME"])

    def node_state(self, node: str) -> tuple[str, str]:
        if not _NODE.fullmatch(node):
            raise SlurmError(f"refusing to query malformed node name {node!r}")
        out = self._run(["scontrol", "-o", "show", "node", node])
        state = re.search(r"(?:^|\s)State=(\S+)", out)
        reason = re.search(r"(?:^|\s)Reason=(.*?)(?:\s+\w+=|$)", out.strip())
        if state is None:
            raise SlurmError(f"scontrol show node {node}: no State= in its answer")
        return state.group(1), reason.group(1).strip() if reason else ""

    def launch_failed_held(self) -> list[str]:
        out = self._run(["squeue", "-h", "-t", "PENDING", "-o", "%i|%r"])
        return [line.split("|", 1)[0].strip() for line in out.splitlines()
                if line.partition("|")[2].strip() == "launch failed requeued held"]

    def release_held(self, job_id: str) -> None:
        if not _JOB_ID.fullmatch(job_id):
            raise SlurmError(f"refusing to release malformed job id {job_id!r}")
        self._run(["scontrol", "release", job_id])
        # A requeued job waits ~2 minutes (BeginTime) after a release otherwise.
        self._run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def hold(self, job_id: str, reason: str) -> None:
        """Hold a pending job with a reason its user can read (AdminComment)."""
        if not _JOB_ID.fullmatch(job_id):
            raise SlurmError(f"refusing to hold malformed job id {job_id!r}")
        comment = re.sub(r"[^\w .,:;()/+=`-]", "_", reason)[:200]
        self._run(["scontrol", "hold", job_id])
        self._run(["scontrol", "update", f"JobId={job_id}", f"AdminComment={comment}"])

    def release(self, job_id: str) -> None:
        """Release a job this suite held, clearing its AdminComment."""
        if not _JOB_ID.fullmatch(job_id):
            raise SlurmError(f"refusing to release malformed job id {job_id!r}")
        self._run(["scontrol", "update", f"JobId={job_id}", "AdminComment="])
        self._run(["scontrol", "release", job_id])
        # A job requeued by a failed PrologSlurmctld waits ~2 minutes
        # (BeginTime) after a release; a login should start it now.
        self._run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def job_user(self, job_id: str) -> str | None:
        """The user who owns the job, or None once Slurm no longer lists it."""
        if not _JOB_REF.fullmatch(job_id):
            raise SlurmError(f"refusing to query malformed job id {job_id!r}")
        out = self._squeue_job(job_id, "%u")
        return out.splitlines()[0].strip() if out else None

    def _squeue_job(self, job_id: str, fmt: str) -> str:
        """``squeue -j`` for one job; '' once slurmctld no longer knows it (after
        MinJobAge squeue fails with "Invalid job id specified")."""
        try:
            return self._run(["squeue", "-h", "-j", job_id, "-o", fmt]).strip()
        except SlurmError as exc:
            if "Invalid job id" in str(exc):
                return ""
            raise

    def job_state(self, job_id: str) -> str | None:
        """The job's state (e.g. ``PENDING``), or None once Slurm no longer lists it."""
        if not _JOB_REF.fullmatch(job_id):
            raise SlurmError(f"refusing to query malformed job id {job_id!r}")
        out = self._squeue_job(job_id, "%T")
        return out.splitlines()[0].strip() if out else None

