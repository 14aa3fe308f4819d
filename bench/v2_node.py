"""cgroup v2: device-program cost on this host, and job turnaround on a pure-v2 VM.

1. ``program``: on this host's real cgroup2 hierarchy, the time to load and
   attach a job step's device program (what the TaskProlog waits for), to
   replace it in place (revocation) and to detach it (release), ``--programs``
   times each, p50/p99 in microseconds.
2. ``turnaround``: on a pure-v2 Debian VM under qemu (ztgpu.testing.vm;
   software emulation, so absolute times are far above a real node's), the
   same ``--serial`` ``srun --gres=gpu:1 true`` one after another and a job
   array of ``--jobs`` 1-GPU jobs, first with Slurm alone
   (ConstrainDevices=yes), then with the suite installed into the same VM
   (one order only: uninstalling the suite is not cheap under emulation, so
   a VM getting slower over the run would count against the suite).

Prints figures, never asserts on them. The last lines are:

    v2_program load_attach_p50_us=A load_attach_p99_us=B replace_p50_us=C detach_p50_us=D n=N
    v2_turnaround release=R serial_ratio=S array_ratio=T baseline_serial_s=U suite_serial_s=V

Usage (root): python bench/v2_node.py [--release bookworm] [--serial 10] [--jobs 10]
              [--programs 300] [--skip-vm]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchlib import percentile
from ztgpu.cgroups.device_bpf import DevicePolicy, DeviceRule, DevicesV2

from ztgpu.testing.cgroup2 import scratch_tree, unified_root
from ztgpu.testing.vm_cluster import VmCluster, vm_cluster

CHECKOUT = Path(__file__).resolve().parent.parent


def program_costs(count: int) -> str:
    root = unified_root()
    if root is None:
        raise SystemExit("no cgroup2 hierarchy mounted here")
    policy = DevicePolicy(guarded=(DeviceRule(195),),
                          allowed=(DeviceRule(195, 0, "rw"), DeviceRule(195, 255, "rw")))
    revoked = DevicePolicy(guarded=(DeviceRule(195),))
    devices = DevicesV2(root)
    attach: list[float] = []
    replace: list[float] = []
    detach: list[float] = []
    with scratch_tree(root, "ztgpu-bench") as top:
        for i in range(count):
            step = top / f"step_{i}"
            step.mkdir()
            t0 = time.perf_counter()
            devices.restrict(step, policy, "bench")
            t1 = time.perf_counter()
            devices.restrict(step, revoked, "bench")
            t2 = time.perf_counter()
            devices.release(step)
            t3 = time.perf_counter()
            step.rmdir()
            attach.append((t1 - t0) * 1e6)
            replace.append((t2 - t1) * 1e6)
            detach.append((t3 - t2) * 1e6)
    return (f"v2_program load_attach_p50_us={percentile(attach, 50):.0f} "
            f"load_attach_p99_us={percentile(attach, 99):.0f} "
            f"replace_p50_us={percentile(replace, 50):.0f} "
            f"detach_p50_us={percentile(detach, 50):.0f} n={count}")


def serial(c: VmCluster, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.monotonic()
        c.slurm(["srun", "--gres=gpu:1", "-n1", "true"], user="ztalice", timeout=300)
        times.append(time.monotonic() - start)
    return times


def array(c: VmCluster, jobs: int) -> float:
    start = time.monotonic()
    out = c.slurm(["sbatch", "--parsable", f"--array=1-{jobs}", "--gres=gpu:1", "-n1",
                   "--output=/dev/null", "--wrap=true"], user="ztalice")
    array_id = out.strip().split(";")[0]
    while c.slurm(["squeue", "-h", "-j", array_id], check=False).strip():
        time.sleep(0.5)
    return time.monotonic() - start


def turnaround(release: str, count: int, jobs: int) -> str:
    with vm_cluster(release, CHECKOUT, constrain_devices=True) as c:
        serial(c, 2)  # warm caches
        base = statistics.median(serial(c, count))
        base_array = array(c, jobs)
        c.install_suite()
        serial(c, 2)
        suite = statistics.median(serial(c, count))
        suite_array = array(c, jobs)
        print(f"  Slurm alone: serial median {base:.2f} s, array {base_array:.1f} s")
        print(f"  suite:       serial median {suite:.2f} s, array {suite_array:.1f} s")
    return (f"v2_turnaround release={release} serial_ratio={suite / base:.2f} "
            f"array_ratio={suite_array / base_array:.2f} baseline_serial_s={base:.2f} "
            f"suite_serial_s={suite:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default="bookworm", choices=["bookworm", "trixie"])
    parser.add_argument("--serial", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--programs", type=int, default=300)
    parser.add_argument("--skip-vm", action="store_true")
    args = parser.parse_args()
    print(program_costs(args.programs), flush=True)
    if not args.skip_vm:
        print(turnaround(args.release, args.serial, args.jobs), flush=True)


if __name__ == "__main__":
    main()
