"""Job turnaround with and without the suite, on the real private Slurm cluster.

Runs the same batch of trivial 1-GPU jobs (a job array) twice per round:
once with no-op shell Prolog/Epilog (the baseline a site has without ztgpu)
and once with the suite installed (Prolog, Epilog, TaskProlog and the node
agent forwarding its audit events to a collector over mutual TLS). Also
times the installed hooks directly against the running agent.

Prints figures, never asserts on them. The last line is:

    job_turnaround ratio=R baseline_s=B suite_s=S jobs=N

Usage (root): python bench/job_turnaround.py [--jobs 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import percentile

from ztgpu.testing.collector_process import audit_site
from ztgpu.testing.slurm_cluster import ClusterSpec, SlurmTestCluster, slurm_cluster
from ztgpu.testing.suite_cluster import suite_cluster

NOOP = "#!/bin/sh\nexit 0\n"


def run_batch(cluster: SlurmTestCluster, jobs: int) -> float:
    """Submit a job array of *jobs* trivial 1-GPU jobs; seconds until all have ended."""
    start = time.monotonic()
    out = cluster.slurm(["sbatch", "--parsable", f"--array=1-{jobs}", "--gres=gpu:1", "-n1",
                         f"--chdir={cluster.work_dir}", "--output=/dev/null",
                         "--wrap=true"], user="ztalice")
    array_id = out.strip().split(";")[0]
    while cluster.slurm(["squeue", "-h", "-j", array_id], check=False).strip():
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    states = cluster.slurm(["scontrol", "-o", "show", "job", array_id], check=False)
    bad = [line for line in states.splitlines() if "JobState=COMPLETED" not in line]
    if bad:
        raise SystemExit(f"some jobs did not complete: {bad[0][:300]}")
    return elapsed




def time_hooks(hooks_dir: Path, uid: int, user: str, count: int) -> dict[str, list[float]]:
    """Wall time of the installed prolog/epilog run as slurmd would, against the agent."""
    timings: dict[str, list[float]] = {"prolog": [], "epilog": []}
    for i in range(count):
        env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": str(900000 + i),
               "SLURM_JOB_UID": str(uid), "SLURM_JOB_USER": user,
               "SLURM_JOB_GPUS": str(i % 4), "SLURM_SCRIPT_CONTEXT": "prolog_slurmd"}
        for hook in ("prolog", "epilog"):
            start = time.perf_counter()
            res = subprocess.run([str(hooks_dir / hook)], env=env, capture_output=True,
                                 timeout=30, check=False)
            timings[hook].append((time.perf_counter() - start) * 1000)
            if res.returncode != 0:
                raise SystemExit(f"{hook} failed: {res.stderr.decode()[-300:]}")
    return timings


def baseline_spec(root: Path) -> ClusterSpec:
    return ClusterSpec(extra_conf=(f"Prolog={root}/noop-prolog", f"Epilog={root}/noop-epilog",
                                   "PrologFlags=Alloc,Contain"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hook-runs", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (starts Slurm daemons)", file=sys.stderr)
        return 2

    noop_dir = Path("/tmp") / f"ztgpu-bench-noop-{os.getpid()}"
    noop_dir.mkdir(mode=0o755)
    for hook in ("noop-prolog", "noop-epilog"):
        (noop_dir / hook).write_text(NOOP)
        (noop_dir / hook).chmod(0o755)

    baseline: list[float] = []
    suite_times: list[float] = []
    hooks: dict[str, list[float]] = {}
    try:
        with slurm_cluster(baseline_spec(noop_dir)) as cluster:
            run_batch(cluster, 4)  # warm up
            for _ in range(args.rounds):
                baseline.append(run_batch(cluster, args.jobs))
                print(f"baseline round: {baseline[-1]:.2f}s", flush=True)
        node = socket.gethostname().split(".")[0]
        # The suite as deployed: the agent forwards its spool to a collector.
        with audit_site(node) as site, suite_cluster(**site.node_config) as suite:
            run_batch(suite.cluster, 4)
            for _ in range(args.rounds):
                suite_times.append(run_batch(suite.cluster, args.jobs))
                print(f"suite round:    {suite_times[-1]:.2f}s", flush=True)
            import pwd

            alice = pwd.getpwnam("ztalice")
            hooks = time_hooks(suite.base / "libexec", alice.pw_uid, "ztalice",
                               args.hook_runs)
            grants = len(suite.events("job.grant"))
            print(f"suite recorded {grants} job.grant events", flush=True)
            status = suite.call("status")["audit"]
            print(f"forwarded to the collector: acknowledged seq {status['acked_seq']} of "
                  f"{status['head_seq']}", flush=True)
    finally:
        for hook in ("noop-prolog", "noop-epilog"):
            (noop_dir / hook).unlink(missing_ok=True)
        noop_dir.rmdir()

    for name, values in hooks.items():
        print(f"{name}_latency p50_ms={percentile(values, 50):.1f} "
              f"p99_ms={percentile(values, 99):.1f} runs={len(values)}")
    b = statistics.median(baseline)
    s = statistics.median(suite_times)
    print(f"job_turnaround ratio={s / b:.3f} baseline_s={b:.2f} suite_s={s:.2f} jobs={args.jobs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
