"""Does the next process on a GPU see what the last one left? (real GPU only)

Process A fills all the memory it can allocate with a marker and exits
without freeing; process B then allocates all it can, reads it without
initialising it (the verify kernel, expecting the marker) and counts the
marker words it finds. Run twice: with the driver's scrub on free as the
node has it, and with the suite's wipe (``ztgpu.gpu.cuda``, mode wipe)
between A and B. The last line is::

    gpu_remanence scrub_markers=N after_wipe_markers=M gib=G

    python bench/gpu_remanence.py [--device ORDINAL]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys

from ztgpu.errors import GpuError
from ztgpu.gpu import cuda

MARKER = 0x5EC2_E7A5


def _fill(ordinal: int, done: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    driver = cuda.Driver(cuda.LIBCUDA)
    cuda.Context(driver, ordinal)  # left to the driver at exit, as a job's is
    import ctypes

    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    driver.call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
    chunks = cuda.allocate_all(driver, free.value)
    for ptr, size in chunks:
        driver.call("cuMemsetD32_v2", ptr, MARKER, size // 4)
    driver.call("cuCtxSynchronize")
    done.put(sum(size for _, size in chunks))


def _count(ordinal: int, done: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import ctypes

    driver = cuda.Driver(cuda.LIBCUDA)
    ctx = cuda.Context(driver, ordinal)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    driver.call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
    chunks = cuda.allocate_all(driver, free.value)
    last_ptr, _ = chunks.pop()  # room for the kernel's result
    driver.call("cuMemFree_v2", last_ptr)
    bad, _, _ = cuda.verify_chunks(ctx, chunks, MARKER)
    covered = sum(size for _, size in chunks)
    done.put((covered // 4 - bad, covered))


def _run(target: object, ordinal: int) -> object:
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Queue()
    proc = ctx.Process(target=target, args=(ordinal, done))
    proc.start()
    result = done.get(timeout=600)
    proc.join(600)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args()
    try:
        driver = cuda.Driver(cuda.LIBCUDA)
    except GpuError as exc:
        print(f"needs a real GPU and the CUDA driver: {exc}")
        return 0
    filled = _run(_fill, args.device)
    scrub, covered = _run(_count, args.device)  # type: ignore[misc]
    print(f"driver scrub as configured: A filled {int(filled) / 2**30:.2f} GiB "  # type: ignore[call-overload]
          f"with the marker; B found {scrub} marker words in {covered / 2**30:.2f} GiB")
    _run(_fill, args.device)
    report = cuda.wipe_one(driver, args.device, "wipe")
    print(f"the suite's wipe between A and B: ok={report.ok} covered "
          f"{report.covered_bytes / 2**30:.2f} GiB in {report.total_s * 1000:.0f} ms")
    after, _ = _run(_count, args.device)  # type: ignore[misc]
    print(f"gpu_remanence scrub_markers={scrub} after_wipe_markers={after} "
          f"gib={covered / 2**30:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
