"""GPU misuse detection on a live node agent: the allocation-aware rules' recall,
their false positives, time to detect, and what telemetry sampling costs.

A real ``ztgpu-noded`` (``standalone_agent``: no Slurm, 8 simulated GPUs,
telemetry at the default 5 s) gets grants through its installed Prolog hook
as slurmd would, with the job's processes placed in a freezer cgroup where
Slurm's ``proctrack/cgroup`` puts them (``slurm_ztgpubench/uid_U/job_J``), so
the pid -> cgroup -> job mapping is the real one. The GPUs' telemetry is
scripted (the simulated backend's replay file) and names real processes.

A labelled case set is generated with a fixed seed (``--seed``): per round,
each of the 8 GPUs gets one case, drawn from

* normal: a job's own process busy on its GPU; an idle GPU no job holds;
* misuse: another user's process on a job's GPU (``foreign_process``); a
  process, or memory in use, on a GPU no job holds (``unallocated_use``); a
  busy GPU whose job has no process left (``busy_without_job``).

Grants and processes are set up first (a job whose processes are gone has
been so for longer than two sampling intervals, as on a node), then all 8
GPUs' telemetry changes at once at ``t0``, at a random phase of the agent's
sampling; the bench watches the agent's
spool for ``gpu.misuse`` events until every misuse case was seen or three
intervals passed. Time to detect is the event's own timestamp minus ``t0``.
A rule event on a normal case is a false positive; a misuse case without
its rule's event is a miss. Off-hours use is left out: ``allowed_hours`` is
one node-wide setting, tried in tests/test_gpu_telemetry.py.

Sampling cost: the agent's own ``ztgpu_telemetry_cpu_seconds_total`` over
the run (``/metrics``), as a share of one core, and per GPU per sample. On
the simulated backend a sample reads a file; NVML's calls cost more, and
that figure needs a real GPU.

The learned, central detector (``ztgpu.collector.anomaly``: per-user robust
baselines over the per-job summaries) is measured on the labelled usage
traces of ``ztgpu.testing.usage_traces``: 40 users of three patterns (a
tenth of them working at night as a rule), 40 jobs each to learn from and
20 to judge, misuse injected for about half of them (a miner-like load or
an off-peak burst, 3 to 4 times the pattern's usual busy time). The seeds
judged (``--learn-seeds``, default 11 to 30) are not those its threshold
was chosen on (1 to 10). A summary counts as flagged when any of its figures
is; precision and recall are over all seeds together.

Prints per-round and overall figures, never asserts. The last line is:

    anomaly rule_recall=A precision=P recall=R detect_p50_s=D detect_p99_s=E agent_cpu_pct=C

Usage (root): python bench/anomaly.py [--rounds 10] [--seed 7] [--learn-seeds 11-30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import percentile

from ztgpu.testing.agent_process import CGROUP_ROOT, StandaloneAgent, standalone_agent
from ztgpu.testing.collector_process import free_port
from ztgpu.testing.prometheus import fetch_metrics, sample_value, samples

GPUS = 8
INTERVAL_S = 5.0
GIB = 1 << 30
FREEZER = CGROUP_ROOT / "freezer" / "slurm_ztgpubench"
#: Case kinds, with how often the generator draws each.
KINDS = {"normal_job": 0.35, "idle": 0.2, "foreign_process": 0.15,
         "unallocated_process": 0.1, "unallocated_memory": 0.05, "busy_without_job": 0.15}
RULE = {"foreign_process": "foreign_process", "unallocated_process": "unallocated_use",
        "unallocated_memory": "unallocated_use", "busy_without_job": "busy_without_job"}


@dataclass
class Case:
    kind: str
    gpu: int
    job_id: str | None = None
    sample: dict[str, Any] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def misuse(self) -> bool:
        return self.kind in RULE


def generate(rng: random.Random, rounds: int) -> list[list[str]]:
    kinds, weights = list(KINDS), list(KINDS.values())
    return [rng.choices(kinds, weights, k=GPUS) for _ in range(rounds)]


def sleeper(user: str, cgroup: Path | None = None) -> subprocess.Popen[bytes]:
    pw = pwd.getpwnam(user)
    proc = subprocess.Popen(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                             "--clear-groups", "sleep", "600"])
    if cgroup is not None:
        (cgroup / "cgroup.procs").write_text(str(proc.pid))
    return proc


def job_cgroup(uid: int, job_id: str) -> Path:
    path = FREEZER / f"uid_{uid}" / f"job_{job_id}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def hook(agent: StandaloneAgent, name: str, job_id: str, user: str, gpu: int) -> None:
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job_id,
           "SLURM_JOB_UID": str(pwd.getpwnam(user).pw_uid), "SLURM_JOB_USER": user,
           "SLURM_JOB_GPUS": str(gpu), "SLURM_JOB_PARTITION": "gpu"}
    res = agent.run_hook(name, env)
    if res.returncode != 0:
        raise SystemExit(f"{name} for job {job_id} failed: {res.stderr.strip()}")


def set_up(agent: StandaloneAgent, round_no: int, kinds: list[str], rng: random.Random
           ) -> list[Case]:
    user, other = "nobody", "daemon"
    uid = pwd.getpwnam(user).pw_uid
    cases = []
    for gpu, kind in enumerate(kinds):
        case = Case(kind, gpu)
        if kind in ("normal_job", "foreign_process", "busy_without_job"):
            case.job_id = str(700000 + round_no * 100 + gpu)
            hook(agent, "prolog", case.job_id, user, gpu)
            if kind != "busy_without_job":
                case.procs.append(sleeper(user, job_cgroup(uid, case.job_id)))
            if kind == "foreign_process":
                case.procs.append(sleeper(other))
            case.sample = {"util_pct": rng.randint(30, 100),
                           "memory_used_bytes": rng.randint(1, 60) * GIB,
                           "power_w": rng.randint(150, 700),
                           "pids": [p.pid for p in case.procs]}
        elif kind == "unallocated_process":
            case.procs.append(sleeper(other))
            case.sample = {"util_pct": rng.randint(50, 100), "pids": [case.procs[0].pid]}
        elif kind == "unallocated_memory":
            case.sample = {"util_pct": 0, "memory_used_bytes": rng.randint(2, 40) * GIB}
        else:  # idle
            case.sample = {"util_pct": 0, "memory_used_bytes": rng.randint(0, 200) << 20}
        cases.append(case)
    return cases


def tear_down(agent: StandaloneAgent, cases: list[Case], script: Path) -> None:
    for case in cases:
        for proc in case.procs:
            proc.kill()
            proc.wait()
        if case.job_id is not None:
            hook(agent, "epilog", case.job_id, "nobody", case.gpu)
    script.write_text("{}")
    for directory in sorted(FREEZER.glob("uid_*/job_*"), reverse=True):
        directory.rmdir()


def uuid_by_minor(agent: StandaloneAgent) -> dict[int, str]:
    return {int(g["minor"]): str(g["uuid"]) for g in agent.config["gpu"]["simulated"]}


def cpu_seconds(listen: str) -> tuple[float, float]:
    status, text = fetch_metrics(f"http://{listen}")
    if status != 200:
        raise SystemExit(f"/metrics answered {status}")
    found = samples(text)
    return (sample_value(found, "ztgpu_telemetry_cpu_seconds_total") or 0.0,
            sample_value(found, "ztgpu_telemetry_rounds_total") or 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--learn-seeds", default="11-30")
    args = parser.parse_args()
    first, _, last = args.learn_seeds.partition("-")
    precision, recall = learned(range(int(first), int(last or first) + 1))
    if os.geteuid() != 0:
        raise SystemExit("run as root (the agent changes device files and cgroups)")
    rng = random.Random(args.seed)
    plan = generate(rng, args.rounds)
    base = Path(tempfile.mkdtemp(prefix="ztgpu-bench-anomaly-"))
    script = base / "telemetry.json"
    script.write_text("{}")
    listen = f"127.0.0.1:{free_port()}"
    detections: list[float] = []
    misses = false_positives = misuse_cases = normal_cases = 0
    by_rule: dict[str, list[int]] = {}
    try:
        with standalone_agent(base / "agent", gpus=GPUS,
                              telemetry={"interval_s": INTERVAL_S, "metrics_listen": listen},
                              gpu={"simulated_telemetry": str(script)}) as agent:
            uuids = uuid_by_minor(agent)
            cpu0, rounds0 = cpu_seconds(listen)
            wall0 = time.monotonic()
            for number, kinds in enumerate(plan, 1):
                cases = set_up(agent, number, kinds, rng)
                time.sleep(2 * INTERVAL_S + 0.5)  # grants older than two samples
                # At a random phase of the agent's sampling: misuse starts
                # whenever it starts, not just after a look.
                time.sleep(rng.uniform(0.0, INTERVAL_S))
                head = _head(agent)
                t0 = time.time()
                _write(script, {uuids[c.gpu]: c.sample for c in cases})
                wanted = {c.gpu for c in cases if c.misuse}
                seen: dict[int, dict[str, Any]] = {}
                deadline = time.monotonic() + 3 * INTERVAL_S
                extra: list[dict[str, Any]] = []
                while time.monotonic() < deadline and not wanted <= set(seen):
                    time.sleep(0.05)
                    for event in agent.events("gpu.misuse"):
                        if int(event["seq"]) <= head:
                            continue
                        gpu = int(event["gpus"][0]["minor"])
                        case = cases[gpu]
                        if case.misuse and event["rule"] == RULE[case.kind]:
                            seen.setdefault(gpu, event)
                        elif event not in extra:
                            extra.append(event)
                time.sleep(0.5)  # a late false positive still counts
                for event in agent.events("gpu.misuse"):
                    gpu = int(event["gpus"][0]["minor"])
                    if int(event["seq"]) > head and not cases[gpu].misuse \
                            and event not in extra:
                        extra.append(event)
                round_times = []
                for case in cases:
                    if case.misuse:
                        misuse_cases += 1
                        hits = by_rule.setdefault(RULE[case.kind], [0, 0])
                        hits[1] += 1
                        if case.gpu in seen:
                            hits[0] += 1
                            at = datetime.fromisoformat(
                                str(seen[case.gpu]["ts"]).replace("Z", "+00:00")).timestamp()
                            round_times.append(max(0.0, at - t0))
                        else:
                            misses += 1
                    else:
                        normal_cases += 1
                fp = [e for e in extra if not cases[int(e["gpus"][0]["minor"])].misuse]
                false_positives += len(fp)
                detections += round_times
                times = ", ".join(f"{t:.2f}" for t in sorted(round_times))
                print(f"round {number}: {' '.join(kinds)}; detected {len(seen)}/{len(wanted)}"
                      f"{' in ' + times + ' s' if times else ''}; false positives {len(fp)}",
                      flush=True)
                tear_down(agent, cases, script)
                time.sleep(1.5 * INTERVAL_S)  # findings clear before the next round
            cpu1, rounds1 = cpu_seconds(listen)
            wall = time.monotonic() - wall0
    finally:
        shutil.rmtree(base, ignore_errors=True)
        # cgroup directories go with rmdir, deepest first (rmtree cannot).
        for directory in sorted(FREEZER.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
    cpu_pct = 100.0 * (cpu1 - cpu0) / wall
    per_sample_ms = 1000.0 * (cpu1 - cpu0) / max(1.0, rounds1 - rounds0) / GPUS
    rule_recall = (misuse_cases - misses) / misuse_cases if misuse_cases else float("nan")
    for rule, (hit, total) in sorted(by_rule.items()):
        print(f"rule {rule}: {hit}/{total} detected")
    print(f"cases: {misuse_cases} misuse, {normal_cases} normal; {misses} missed, "
          f"{false_positives} false positives (rule precision "
          f"{(misuse_cases - misses) / max(1, misuse_cases - misses + false_positives):.3f})")
    p50 = percentile(detections, 50) if detections else float("nan")
    p99 = percentile(detections, 99) if detections else float("nan")
    print(f"time to detect at interval {INTERVAL_S:g} s: p50 {p50:.2f} s, p99 {p99:.2f} s "
          f"(n={len(detections)})")
    print(f"sampling: {cpu1 - cpu0:.3f} CPU s over {wall:.0f} s with {GPUS} GPUs = "
          f"{cpu_pct:.3f}% of one core; {per_sample_ms:.3f} ms per GPU per sample "
          f"(simulated backend)")
    print(f"anomaly rule_recall={rule_recall:.3f} precision={precision:.3f} recall={recall:.3f} "
          f"detect_p50_s={p50:.2f} detect_p99_s={p99:.2f} agent_cpu_pct={cpu_pct:.3f}")
    return 0


def learned(seeds: range) -> tuple[float, float]:
    """Precision and recall of the collector's detector on the labelled traces."""
    from ztgpu.collector.anomaly import Detector, Settings
    from ztgpu.testing.usage_traces import generate

    tp = fp = fn = 0
    for seed in seeds:
        trace = generate(seed)
        detector = Detector(Settings())
        for event in trace.train:
            detector.observe(event, judge=False)
        for event, misuse in trace.test:
            flagged = bool(detector.observe(event))
            tp += flagged and misuse
            fp += flagged and not misuse
            fn += misuse and not flagged
    print(f"learned baselines on {len(seeds)} labelled trace sets: {tp} misuse summaries "
          f"flagged, {fn} missed, {fp} normal ones flagged")
    return tp / max(1, tp + fp), tp / max(1, tp + fn)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _head(agent: StandaloneAgent) -> int:
    events = agent.events()
    return int(events[-1]["seq"]) if events else 0


if __name__ == "__main__":
    sys.exit(main())
