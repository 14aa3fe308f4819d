"""What wiping GPU memory between jobs costs.

Part 1, the wipe itself (``ztgpu.gpu.cuda``), on every GPU the driver shows,
all at once as the agent does it: bytes covered, fill (pattern) and verify
bandwidth, the whole wipe+verify time without context creation, and the
fill's bandwidth as a fraction of one plain ``cuMemsetD32`` over the largest
single allocation on the same device. On a node with the NVIDIA driver this
is the real ``libcuda.so.1``; elsewhere (or with ``--stand-in``) the
stand-in libcuda of host memory (ztgpu/testing/stand_in_libcuda.c), and the
figures say SIMULATED: they measure this machine's RAM, not a GPU.

Part 2, what the Epilog pays: the installed Prolog/Epilog hooks of a
standalone agent (simulated inventory, the stand-in libcuda) with
``wipe.mode`` off and wipe, alternating, one GPU per job.

The last line is::

    gpu_wipe gib=G wipe_gbps=W verify_gbps=V fraction_of_memset=F total_ms=T

    python bench/gpu_wipe.py [--stand-in] [--runs 20]   (root, for part 2)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pwd
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import percentile

from ztgpu.gpu import cuda
from ztgpu.testing import stand_in_cuda
from ztgpu.testing.agent_process import standalone_agent

STAND_IN_ENV = {"ZTGPU_STANDIN_GPUS": "4", "ZTGPU_STANDIN_MEM_MIB": "256",
                "ZTGPU_STANDIN_CTX_MIB": "24"}


def plain_memset_gbps(driver: cuda.Driver, ordinal: int) -> float:
    """One cuMemsetD32 over the largest single allocation (after a warm-up)."""
    ctx = cuda.Context(driver, ordinal)
    try:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        driver.call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
        size = free.value // cuda.MIN_CHUNK_BYTES * cuda.MIN_CHUNK_BYTES
        ptr = ctypes.c_uint64()
        while size >= cuda.MIN_CHUNK_BYTES:
            if int(driver.lib.cuMemAlloc_v2(ctypes.byref(ptr), size)) == 0:
                break
            size = size * 7 // 8 // cuda.MIN_CHUNK_BYTES * cuda.MIN_CHUNK_BYTES
        try:
            driver.call("cuMemsetD32_v2", ptr.value, 0, size // 4)
            driver.call("cuCtxSynchronize")
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                driver.call("cuMemsetD32_v2", ptr.value, 0x1234_5678, size // 4)
                driver.call("cuCtxSynchronize")
                best = min(best, time.perf_counter() - start)
        finally:
            driver.call("cuMemFree_v2", ptr.value)
        return size / best / 1e9
    finally:
        ctx.close()


def part_one(library: str, simulated: bool) -> tuple[float, float, float, float, float]:
    driver = cuda.Driver(library)
    devices = sorted(driver.devices().items(), key=lambda item: item[1])
    print(f"driver {library} version {driver.version()}: {len(devices)} device(s)"
          + (" — SIMULATED (stand-in libcuda on host memory)" if simulated else ""))
    reports = cuda.wipe_gpus(driver, {bus: ordinal for bus, ordinal in devices}, "wipe")
    bad = [r for r in reports.values() if not r.ok]
    if bad:
        raise SystemExit(f"wipe failed: {bad[0]}")
    memset = plain_memset_gbps(driver, devices[0][1])
    for bus, report in sorted(reports.items()):
        print(f"  {bus}: covered {report.covered_bytes / 2**30:.2f} GiB of "
              f"{report.total_bytes / 2**30:.2f} (unreachable {report.unreachable_bytes >> 20} "
              f"MiB; cuMemGetInfo said {report.free_reported_bytes >> 20} MiB free), "
              f"{report.chunks} chunks; fill {report.gbps(report.fill_s):.1f} GB/s, verify "
              f"{report.covered_bytes * 2 / report.verify_s / 1e9:.1f} GB/s, "
              f"wipe+verify {(report.fill_s + report.verify_s + report.zero_s) * 1000:.1f} ms, "
              f"with context {report.total_s * 1000:.1f} ms")
    first = reports[devices[0][0]]
    gib = first.covered_bytes / 2**30
    fill = first.gbps(first.fill_s)
    verify = first.covered_bytes * 2 / first.verify_s / 1e9  # two verify passes
    work_ms = (first.fill_s + first.verify_s + first.zero_s) * 1000
    print(f"plain cuMemsetD32 on device 0: {memset:.1f} GB/s")
    return gib, fill, verify, fill / memset, work_ms


def part_two(library: Path, runs: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="ztgpu-bench-wipe-"))
    nobody = pwd.getpwnam("nobody")
    try:
        times: dict[str, list[float]] = {"off": [], "wipe": []}
        for mode in ("off", "wipe"):
            with standalone_agent(base / mode, wipe={"mode": mode,
                                                     "libcuda": str(library)}) as agent:
                for i in range(runs + 2):
                    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": str(200000 + i),
                           "SLURM_JOB_UID": str(nobody.pw_uid), "SLURM_JOB_USER": "nobody",
                           "SLURM_JOB_GPUS": str(i % 4), "SLURM_JOB_PARTITION": "gpu",
                           "SLURM_SCRIPT_CONTEXT": "prolog_slurmd"}
                    if agent.run_hook("prolog", env).returncode != 0:
                        raise SystemExit(f"prolog failed ({mode})")
                    start = time.perf_counter()
                    done = agent.run_hook("epilog", env)
                    took = (time.perf_counter() - start) * 1000
                    if done.returncode != 0:
                        raise SystemExit(f"epilog failed ({mode}): {done.stderr[-300:]}")
                    if i >= 2:
                        times[mode].append(took)
                wipes = len(agent.events("gpu.wipe"))
                if mode == "wipe" and wipes != runs + 2:
                    raise SystemExit(f"expected {runs + 2} wipes, the agent recorded {wipes}")
        off, on = times["off"], times["wipe"]
        print(f"epilog with wipe.mode off: p50 {statistics.median(off):.1f} ms, p99 "
              f"{percentile(off, 99):.1f} ms; with wipe: p50 {statistics.median(on):.1f} ms, "
              f"p99 {percentile(on, 99):.1f} ms (one {STAND_IN_ENV['ZTGPU_STANDIN_MEM_MIB']} "
              f"MiB stand-in GPU per job)")
        print(f"epilog added by the wipe: p50 "
              f"{statistics.median(on) - statistics.median(off):.1f} ms")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stand-in", action="store_true",
                        help="use the stand-in libcuda even where a real one exists")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    os.environ.update(STAND_IN_ENV)
    built = stand_in_cuda.build(Path(tempfile.gettempdir()) / "ztgpu-bench-stand-in")
    real = None
    if not args.stand_in:
        try:
            ctypes.CDLL(cuda.LIBCUDA)
            real = cuda.LIBCUDA
        except OSError:
            real = None
    gib, fill, verify, fraction, total_ms = part_one(real or str(built), real is None)
    if os.geteuid() == 0:
        part_two(built, args.runs)
    else:
        print("epilog part skipped: needs root (it starts a node agent)")
    label = "" if real else " SIMULATED"
    print(f"gpu_wipe gib={gib:.2f} wipe_gbps={fill:.1f} verify_gbps={verify:.1f} "
          f"fraction_of_memset={fraction:.2f} total_ms={total_ms:.1f}{label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
