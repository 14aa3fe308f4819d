"""False isolation criticals in many short jobs, on the real private Slurm cluster.

A job that ends while the node agent probes it (its Epilog taking the GPUs
back under the probe) must not be reported as an isolation violation: a
mismatch counts only once confirmed (the grant still in force, a second
probe finding the same). This bench runs many very short 1-GPU jobs, so that
the agent's probe races the jobs' ends, and counts what the agent recorded.
Nothing attacks the node, so every ``isolation.violated`` is false.

Runs on ``ztgpu.testing.suite_cluster`` (slurmctld, slurmd, 4 simulated GPUs,
the suite installed by ``ztgpu install``, its node agent with the harness's
settings: sweep every 0.2 s, probe each new job cgroup once), with Slurm's
``ConstrainDevices=no`` (``--constrain no``, the default: the agent builds
its own per-job devices cgroup, the case where the race was seen) or ``yes``.

``--jobs`` jobs of ``ztalice`` run as job arrays of ``--batch`` tasks, one
array after the other, each task ``--gres=gpu:1`` running ``sleep
--sleep`` (default 0.05 s). After each array has left squeue, every task
must have ended COMPLETED (``scontrol -o show job``; any other state is
printed), and the agent's spool is counted for the array's jobs:
``isolation.violated`` (critical; each one's reason is printed),
``isolation.verified`` (events, and jobs with at least one), job.action
``cancel_job`` (each printed with its outcome), job.grant and job.release
(releases other than "released" printed). Any other critical event in the
spool is printed too, and so are the mismatches the agent's log says it
found while a job's grant was ending and did not record (the races the
confirmation caught). The node must stay up; a drained node ends the run.

One array of 100 takes 10-14 s here (2 CPUs), so the default 1000 jobs take
about 2 minutes.

Prints figures and never asserts on them. The last line is:

    short_jobs jobs=N completed=M false_criticals=K verified=V cancels=C wall_s=W

(``K``: isolation.violated events; ``V``: isolation.verified events; ``C``:
job.action cancel_job events; all counted over the whole run after a short
settle; ``W``: from the first sbatch until the last array left squeue.)

Usage (root): python bench/short_jobs.py [--jobs 1000] [--batch 100] [--sleep 0.05]
    [--constrain no|yes]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ztgpu.testing.slurm_cluster import ClusterSpec, SlurmTestCluster
from ztgpu.testing.suite_cluster import SuiteCluster, suite_cluster

USER = "ztalice"
#: The longest an array may take to leave squeue.
BATCH_TIMEOUT_S = 900.0
#: How long after the last array the agent's background work (cancels) may take.
SETTLE_S = 3.0


def run_array(cluster: SlurmTestCluster, tasks: int, sleep: str) -> tuple[str, float]:
    """Submit one array of *tasks* short 1-GPU jobs; (array id, seconds until all left)."""
    start = time.monotonic()
    out = cluster.slurm(["sbatch", "--parsable", f"--array=1-{tasks}", "--gres=gpu:1", "-n1",
                         f"--chdir={cluster.work_dir}", "--output=/dev/null",
                         f"--wrap=sleep {sleep}"], user=USER)
    array_id = out.strip().split(";")[0]
    deadline = start + BATCH_TIMEOUT_S
    checked = start
    while cluster.slurm(["squeue", "-h", "-j", array_id], check=False).strip():
        now = time.monotonic()
        if now > deadline:
            raise SystemExit(f"array {array_id} still in squeue after {BATCH_TIMEOUT_S:.0f}s")
        if now - checked > 5:
            checked = now
            state = cluster.node_state()
            if "drain" in state:
                raise SystemExit(f"the node is {state}: {cluster.node_reason()}")
        time.sleep(0.05)
    return array_id, time.monotonic() - start


def array_tasks(cluster: SlurmTestCluster, array_id: str) -> dict[str, str]:
    """{job id: JobState} of every task of the array."""
    out = cluster.slurm(["scontrol", "-o", "show", "job", array_id], check=False)
    tasks: dict[str, str] = {}
    for line in out.splitlines():
        fields = dict(t.partition("=")[::2] for t in line.split() if "=" in t)
        if "JobId" in fields:
            tasks[fields["JobId"]] = (fields.get("JobState", "?") + " "
                                      + fields.get("Reason", "") + " "
                                      + fields.get("ExitCode", "")).strip()
    return tasks


def tally(suite: SuiteCluster, jobs: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The agent's events of interest for *jobs*."""
    def mine(code: str) -> list[dict[str, Any]]:
        return [e for e in suite.events(code) if e.get("job_id") in jobs]

    return {"violated": mine("isolation.violated"), "verified": mine("isolation.verified"),
            "cancels": [e for e in mine("job.action") if e.get("action") == "cancel_job"],
            "grants": mine("job.grant"), "releases": mine("job.release")}


def show(found: dict[str, list[dict[str, Any]]], prefix: str) -> None:
    for event in found["violated"]:
        print(f"{prefix}FALSE CRITICAL isolation.violated job {event.get('job_id')} at "
              f"{event.get('ts')} cgroup {event.get('probe', {}).get('cgroup')}: "
              f"{event.get('reason')}", flush=True)
    for event in found["cancels"]:
        print(f"{prefix}cancel_job job {event.get('job_id')} at {event.get('ts')}: "
              f"{event.get('outcome')} ({event.get('reason')})", flush=True)
    for event in found["releases"]:
        if event.get("outcome") != "released":
            print(f"{prefix}job.release job {event.get('job_id')}: {event.get('outcome')} "
                  f"({event.get('reason')})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="short jobs in all "
                        "(default 1000)")
    parser.add_argument("--batch", type=int, default=100,
                        help="tasks per job array (default 100)")
    parser.add_argument("--sleep", default="0.05",
                        help="what each job sleeps, in seconds (default 0.05)")
    parser.add_argument("--constrain", choices=("no", "yes"), default="no",
                        help="Slurm's ConstrainDevices (default no)")
    args = parser.parse_args()
    if args.jobs < 1 or not 1 <= args.batch <= 1000:
        parser.error("--jobs must be >= 1 and --batch 1 to 1000")
    try:
        if float(args.sleep) < 0:
            raise ValueError
    except ValueError:
        parser.error("--sleep must be a non-negative number")
    if os.geteuid() != 0:
        print("needs root (starts Slurm daemons)", file=sys.stderr)
        return 2

    started = time.monotonic()
    spec = ClusterSpec(constrain_devices=args.constrain == "yes")
    all_jobs: set[str] = set()
    states: Counter[str] = Counter()
    wall = 0.0
    with suite_cluster(spec) as suite:
        cluster = suite.cluster
        print(f"cluster up in {time.monotonic() - started:.1f}s; ConstrainDevices="
              f"{args.constrain}; {args.jobs} jobs of `sleep {args.sleep}` in arrays of "
              f"{args.batch}; agent isolation settings {suite.config['isolation']}; "
              f"{os.cpu_count()} CPUs", flush=True)
        t0 = time.monotonic()
        left, number = args.jobs, 0
        while left > 0:
            number += 1
            size = min(args.batch, left)
            left -= size
            array_id, took = run_array(cluster, size, args.sleep)
            tasks = array_tasks(cluster, array_id)
            jobs = set(tasks)
            all_jobs |= jobs
            batch_states = Counter(s.split()[0] for s in tasks.values())
            states.update(batch_states)
            found = tally(suite, jobs)
            verified_jobs = {e.get("job_id") for e in found["verified"]}
            print(f"array {number:2d} ({array_id}, {len(tasks)} tasks): {took:6.1f}s "
                  f"({took / max(1, len(tasks)) * 100:.1f}s per 100); states "
                  f"{dict(batch_states)}; false_criticals={len(found['violated'])} "
                  f"verified={len(found['verified'])} events / {len(verified_jobs)} jobs; "
                  f"cancels={len(found['cancels'])}; grants={len(found['grants'])} "
                  f"releases={len(found['releases'])}; node {cluster.node_state()}",
                  flush=True)
            for job_id, state in sorted(tasks.items()):
                if not state.startswith("COMPLETED"):
                    print(f"    job {job_id} ended {state}", flush=True)
            if len(tasks) != size:
                print(f"    scontrol listed {len(tasks)} tasks, {size} were submitted",
                      flush=True)
            show(found, "    ")
        wall = time.monotonic() - t0
        time.sleep(SETTLE_S)
        found = tally(suite, all_jobs)
        verified_jobs = {e.get("job_id") for e in found["verified"]}
        everything = suite.events()
        codes = Counter(str(e.get("code")) for e in everything)
        critical = [e for e in everything if e.get("severity") == "critical"
                    and e.get("code") != "isolation.violated"]
        node = cluster.node_state()
        log_file = Path(suite.config["paths"]["log_file"])
        log_text = log_file.read_text(errors="replace") if log_file.exists() else ""
        dismissed = [line for line in log_text.splitlines() if "not a violation" in line]

    print(f"{len(all_jobs)} jobs in {wall:.1f}s ({wall / max(1, len(all_jobs)) * 100:.1f}s per "
          f"100); {time.monotonic() - started:.1f}s with start and teardown; node at the "
          f"end: {node}", flush=True)
    print(f"final states: {dict(states)}", flush=True)
    print("agent's spool, by code: " + ", ".join(f"{c}={n}" for c, n in sorted(codes.items())),
          flush=True)
    print(f"jobs with at least one isolation.verified: {len(verified_jobs)} of "
          f"{len(all_jobs)}; job.grant {len(found['grants'])}, job.release "
          f"{len(found['releases'])}", flush=True)
    print(f"agent log: {len(dismissed)} probe mismatch(es) found while the job's grant "
          "ended, not recorded as violations", flush=True)
    for line in dismissed[:5]:
        print(f"    {line[-220:]}", flush=True)
    show(found, "")
    for event in critical:
        print(f"other critical event {event.get('code')} job {event.get('job_id')}: "
              f"{event.get('reason')}", flush=True)
    print(f"short_jobs jobs={len(all_jobs)} completed={states.get('COMPLETED', 0)} "
          f"false_criticals={len(found['violated'])} verified={len(found['verified'])} "
          f"cancels={len(found['cancels'])} wall_s={wall:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
