"""What the agent's search for processes still holding a GPU costs.

At every Epilog, revocation and drift repair the agent reads ``/proc`` for
processes holding the GPUs it takes back (``ztgpu.noded.holders``); that
scan is on the Epilog's path. This starts ``--users`` processes of the user
``nobody`` (each holding ``--fds`` extra descriptors, as a busy job's
leftovers or many SSH sessions would), then times the scan, with root's
processes exempt as in the agent, over ``--runs`` scans.

Prints figures only; the last line is:

    holder_scan procs=P user_procs=U p50_ms=A p99_ms=B per_user_proc_us=C

Usage (root): python bench/holder_scan.py [--users 0,200,1000] [--fds 8] [--runs 50]
"""

from __future__ import annotations

import argparse
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

from benchlib import percentile

from ztgpu.noded import holders

HOLD = ("import os, sys, time\n"
        "fds = [os.open('/dev/full', os.O_RDONLY) for _ in range(int(sys.argv[1]))]\n"
        "print('up', flush=True)\ntime.sleep(3600)\n")


#: (st_dev, st_ino) of GPU device nodes, as the agent passes them: the real
#: files where a driver is loaded, else stand-ins that match no mapping.
NODES = holders.device_nodes(Path(f"/dev/nvidia{m}") for m in range(4)) or {(0, 2**40)}


def scan_times(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        holders.find_holders(195, [0, 1, 2, 3], nodes=NODES, exempt_uids={0})
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="0,200,1000",
                        help="comma-separated counts of user processes to try")
    parser.add_argument("--fds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (it reads every process's descriptors)", file=sys.stderr)
        return 2
    nobody = pwd.getpwnam("nobody")
    last = ""
    for count in (int(c) for c in args.users.split(",")):
        procs: list[subprocess.Popen[str]] = []
        try:
            for _ in range(count):
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", HOLD, str(args.fds)], user=nobody.pw_uid,
                    group=nobody.pw_gid, extra_groups=[], stdout=subprocess.PIPE, text=True)
                procs.append(proc)
            for proc in procs:
                assert proc.stdout is not None
                proc.stdout.readline()
            total = sum(1 for e in os.scandir("/proc") if e.name.isdigit())
            times = scan_times(args.runs)
            p50, p99 = percentile(times, 50) * 1000, percentile(times, 99) * 1000
            per = (p50 / count * 1000) if count else 0.0
            print(f"procs={total} user_procs={count}: scan p50 {p50:.2f} ms, p99 {p99:.2f} ms")
            last = (f"holder_scan procs={total} user_procs={count} p50_ms={p50:.2f} "
                    f"p99_ms={p99:.2f} per_user_proc_us={per:.1f}")
        finally:
            for proc in procs:
                proc.kill()
            for proc in procs:
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
