"""``ztgpu install --check``: are the hooks written, and are they live?

Three things must agree before a node's jobs are protected:

1. slurm.conf names the suite's hooks (what ``ztgpu install`` writes);
2. slurmctld runs with that slurm.conf (``scontrol show config``): a
   controller still on the old file starts jobs whose nodes run no Prolog;
3. slurmd on this node runs them: one short probe job is sent to the node
   and the agent's own spool must show its grant and its release.

Each finding says what to restart or rerun.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ztgpu.errors import SlurmError
from ztgpu.slurm.client import CliSlurmClient

#: How long the probe job may take, queueing included.
PROBE_JOB_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Finding:
    """One check: ``problem`` None means it holds."""

    check: str
    problem: str | None
    detail: str = ""


def parse_show_config(text: str) -> dict[str, str]:
    """``scontrol show config`` as a mapping (keys as Slurm prints them)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            found[key.strip()] = value.strip()
    return found


def controller_findings(shown: Mapping[str, str], wanted: Mapping[str, str],
                        flags: tuple[str, ...]) -> list[Finding]:
    """Compare slurmctld's running settings with the hooks the suite writes."""
    findings = []
    stale = []
    for key, path in wanted.items():
        running = shown.get(key, "(null)")
        if running != path:
            stale.append(f"{key} is {running}, slurm.conf says {path}")
    have = {f.strip().lower() for f in shown.get("PrologFlags", "").split(",")}
    missing = [f for f in flags if f.lower() not in have]
    if missing:
        stale.append(f"PrologFlags lacks {','.join(missing)}")
    findings.append(Finding(
        "slurmctld", "; ".join(stale) + ": restart slurmctld (then slurmd on every node) so "
        "that it reads this slurm.conf" if stale else None,
        "slurmctld runs " + ", ".join(f"{k}={shown.get(k, '(null)')}" for k in wanted)))
    if shown.get("HASH_VAL", "").startswith("Different"):
        findings.append(Finding("slurm.conf", "this node's slurm.conf differs from "
                                "slurmctld's (HASH_VAL Different): copy it everywhere, restart "
                                "slurmctld, then slurmd"))
    return findings


def show_config(slurm: CliSlurmClient) -> dict[str, str]:
    """What slurmctld runs with.

    Raises:
        SlurmError: scontrol failed or timed out (slurmctld down, say).
    """
    return parse_show_config(slurm.run(["scontrol", "show", "config"]))


def probe_job(slurm: CliSlurmClient, node: str,
              timeout: float = PROBE_JOB_TIMEOUT_S) -> tuple[str, str]:
    """Run one 1-GPU job on *node* (as the caller, root) until Slurm no longer
    lists it: (job id, how it ended, as ``scontrol show job`` last showed it).

    Raises:
        SlurmError: it could not be submitted, or did not end in time.
    """
    out = slurm.run(["sbatch", "--parsable", "-N1", "-n1", f"-w{node}", "--gres=gpu:1", "-t1",
                     "-Jztgpu-install-check", "--output=/dev/null", "--wrap=true"], 30)
    match = re.match(r"\s*([0-9]+)", out)
    if match is None:
        raise SlurmError(f"sbatch gave no job id: {out.strip()[:200]!r}")
    job = match.group(1)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            shown = slurm.run(["scontrol", "-o", "show", "job", job], 30)
        except SlurmError:
            return job, last or "ended"  # purged: it is over
        fields = dict(t.partition("=")[::2] for t in shown.split() if "=" in t)
        state = fields.get("JobState", "")
        last = f"{state} (reason {fields.get('Reason', '?')}, exit {fields.get('ExitCode', '?')})"
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL",
                     "OUT_OF_MEMORY", "DEADLINE", "PREEMPTED"):
            return job, last
        if fields.get("Reason") == "launch_failed_requeued_held":
            slurm.run(["scancel", job], 30)
            return job, last
        time.sleep(0.5)
    slurm.run(["scancel", job], 30)
    raise SlurmError(f"probe job {job} did not end within {timeout:g} s (last: {last}); "
                     "cancelled")


def job_findings(job_id: str, ended: str, codes: list[str]) -> Finding:
    """Whether the agent saw the probe job's Prolog and Epilog."""
    missing = [c for c in ("job.grant", "job.release") if c not in codes]
    if "isolation.violated" in codes:
        return Finding("slurmd", f"probe job {job_id} ({ended}): the agent recorded an "
                       "isolation violation: see `ztgpu audit tail --local --job "
                       f"{job_id}`")
    if not missing:
        return Finding("slurmd", None, f"probe job {job_id} ({ended}): the agent granted and "
                       "released its GPU (the Prolog and Epilog are live)")
    return Finding("slurmd", f"probe job {job_id} ({ended}) ran without "
                   f"{' and '.join(missing)} in the agent's spool: slurmd on this node does "
                   "not run the suite's hooks (or the agent refused the job: see `ztgpu audit "
                   f"tail --local --job {job_id}`); restart slurmd (after slurmctld), then "
                   "check again")
