"""Job turnaround with and without the suite, on the real private Slurm cluster.

Three variants, each on a freshly started private cluster, interleaved round
by round (baseline, suite, mfa, baseline, suite, mfa, ...) so that a machine
getting slower or faster during the run does not favour one of them:

* ``baseline``: no-op shell Prolog/Epilog, what a site has without ztgpu;
* ``suite``: the suite installed by ``ztgpu install`` (Prolog, Epilog,
  TaskProlog, the node agent forwarding its audit spool to a collector over
  mutual TLS);
* ``mfa``: the suite as a site with MFA runs it: also ztgpu-authd, the job
  gate (PrologSlurmctld asking authd) and a signed grant from authd for
  every job's Prolog; the user is enrolled and logged in.

Per round and variant it times a job array of ``--jobs`` trivial 1-GPU jobs
(Slurm runs two at a time here, so its scheduling hides part of the hooks'
cost) and then ``--serial`` ``srun --gres=gpu:1 true`` one after another
(each pays the whole hook chain). At the end it times the installed hooks
directly against the suite's agent.

Prints figures, never asserts on them. The last two lines are:

    job_serial ratio=R mfa_ratio=M per_job_ms=D mfa_per_job_ms=E serial=N
    job_turnaround ratio=R mfa_ratio=M baseline_s=B suite_s=S mfa_s=X jobs=N

(ratios of medians against the baseline; ``per_job_ms`` is what the suite
adds to one serial job, median over rounds.)

Usage (root): python bench/job_turnaround.py [--jobs 40] [--serial 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from benchlib import percentile

from ztgpu.testing.collector_process import audit_site
from ztgpu.testing.mfa_cluster import mfa_cluster
from ztgpu.testing.slurm_cluster import ClusterSpec, SlurmTestCluster, slurm_cluster
from ztgpu.testing.suite_cluster import SuiteCluster, suite_cluster

NOOP = "#!/bin/sh\nexit 0\n"
USER = "ztalice"
VARIANTS = ("baseline", "suite", "mfa")


def run_batch(cluster: SlurmTestCluster, jobs: int) -> float:
    """Submit a job array of *jobs* trivial 1-GPU jobs; seconds until all have ended."""
    start = time.monotonic()
    out = cluster.slurm(["sbatch", "--parsable", f"--array=1-{jobs}", "--gres=gpu:1", "-n1",
                         f"--chdir={cluster.work_dir}", "--output=/dev/null",
                         "--wrap=true"], user=USER)
    array_id = out.strip().split(";")[0]
    while cluster.slurm(["squeue", "-h", "-j", array_id], check=False).strip():
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    states = cluster.slurm(["scontrol", "-o", "show", "job", array_id], check=False)
    bad = [line for line in states.splitlines() if "JobState=COMPLETED" not in line]
    if bad:
        raise SystemExit(f"some jobs did not complete: {bad[0][:300]}")
    return elapsed


def run_serial(cluster: SlurmTestCluster, count: int) -> list[float]:
    """Seconds of each of *count* ``srun --gres=gpu:1 true`` run one after another."""
    times = []
    for _ in range(count):
        start = time.monotonic()
        cluster.slurm(["srun", "--gres=gpu:1", "-n1", f"--chdir={cluster.work_dir}", "true"],
                      user=USER, timeout=60)
        times.append(time.monotonic() - start)
    return times


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


@contextlib.contextmanager
def variant(name: str, noop_dir: Path) -> Iterator[tuple[SlurmTestCluster, SuiteCluster | None]]:
    """A started private cluster set up as variant *name*, torn down afterwards."""
    if name == "baseline":
        spec = ClusterSpec(extra_conf=(f"Prolog={noop_dir}/noop-prolog",
                                       f"Epilog={noop_dir}/noop-epilog",
                                       "PrologFlags=Alloc,Contain"))
        with slurm_cluster(spec) as cluster:
            yield cluster, None
    elif name == "suite":
        node = socket.gethostname().split(".")[0]
        with audit_site(node) as site, suite_cluster(**site.node_config) as suite:
            yield suite.cluster, suite
    else:
        with mfa_cluster(audit=True) as mfa:
            mfa.enroll(USER)
            login = mfa.login(USER)
            if login.returncode != 0:
                raise SystemExit(f"ztgpu login failed: {login.stderr}")
            yield mfa.suite.cluster, mfa.suite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40, help="jobs in each array (default 40)")
    parser.add_argument("--serial", type=int, default=20,
                        help="srun jobs one after another per round (default 20)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hook-runs", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (starts Slurm daemons)", file=sys.stderr)
        return 2
    if min(args.jobs, args.serial, args.rounds) < 1:
        parser.error("--jobs, --serial and --rounds must be >= 1")

    noop_dir = Path("/tmp") / f"ztgpu-bench-noop-{os.getpid()}"
    noop_dir.mkdir(mode=0o755)
    for hook in ("noop-prolog", "noop-epilog"):
        (noop_dir / hook).write_text(NOOP)
        (noop_dir / hook).chmod(0o755)

    batch: dict[str, list[float]] = {name: [] for name in VARIANTS}
    serial: dict[str, list[float]] = {name: [] for name in VARIANTS}  # median s per round
    serial_all: dict[str, list[float]] = {name: [] for name in VARIANTS}
    hooks: dict[str, list[float]] = {}
    try:
        for round_no in range(1, args.rounds + 1):
            for name in VARIANTS:
                with variant(name, noop_dir) as (cluster, suite):
                    run_batch(cluster, 4)  # warm up: daemons, caches, first connections
                    run_serial(cluster, 2)
                    batch[name].append(run_batch(cluster, args.jobs))
                    times = run_serial(cluster, args.serial)
                    serial[name].append(statistics.median(times))
                    serial_all[name].extend(times)
                    print(f"round {round_no} {name:<8}: array {batch[name][-1]:6.2f} s, "
                          f"srun p50 {serial[name][-1] * 1000:6.1f} ms", flush=True)
                    if suite is not None:
                        grants = len(suite.events("job.grant"))
                        print(f"  {name}: {grants} job.grant events recorded", flush=True)
                    if name == "suite" and round_no == args.rounds and suite is not None:
                        hooks = time_hooks(suite.base / "libexec", pwd.getpwnam(USER).pw_uid,
                                           USER, args.hook_runs)
    finally:
        for hook in ("noop-prolog", "noop-epilog"):
            (noop_dir / hook).unlink(missing_ok=True)
        noop_dir.rmdir()

    for hook, values in hooks.items():
        print(f"{hook}_latency p50_ms={percentile(values, 50):.1f} "
              f"p99_ms={percentile(values, 99):.1f} runs={len(values)}")
    for name in VARIANTS:
        ms = [t * 1000 for t in serial_all[name]]
        print(f"srun {name:<8}: p50 {percentile(ms, 50):.1f} ms  p90 {percentile(ms, 90):.1f} "
              f"ms  p99 {percentile(ms, 99):.1f} ms  ({len(ms)} jobs)")
    med = {name: statistics.median(batch[name]) for name in VARIANTS}
    smed = {name: statistics.median(serial[name]) for name in VARIANTS}
    print(f"job_serial ratio={smed['suite'] / smed['baseline']:.3f} "
          f"mfa_ratio={smed['mfa'] / smed['baseline']:.3f} "
          f"per_job_ms={(smed['suite'] - smed['baseline']) * 1000:.1f} "
          f"mfa_per_job_ms={(smed['mfa'] - smed['baseline']) * 1000:.1f} serial={args.serial}")
    print(f"job_turnaround ratio={med['suite'] / med['baseline']:.3f} "
          f"mfa_ratio={med['mfa'] / med['baseline']:.3f} baseline_s={med['baseline']:.2f} "
          f"suite_s={med['suite']:.2f} mfa_s={med['mfa']:.2f} jobs={args.jobs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
