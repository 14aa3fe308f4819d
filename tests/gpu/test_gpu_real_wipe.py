"""The wiper on a real NVIDIA GPU: the real libcuda.so.1, the shipped PTX
JIT-compiled by the real driver, real device memory. Skipped where no CUDA
driver and GPU are (the stand-in runs the same code: tests/test_cuda_wipe.py).
"""

from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path

import pytest

from ztgpu.errors import GpuError
from ztgpu.gpu import cuda


def _driver() -> cuda.Driver | None:
    try:
        driver = cuda.Driver(cuda.LIBCUDA)
    except GpuError:
        return None
    return driver if driver.devices() else None


DRIVER = _driver()
pytestmark = pytest.mark.skipif(DRIVER is None, reason="no CUDA driver with a GPU here")


def test_a_real_wipe_covers_nearly_all_memory_and_verifies_clean():
    assert DRIVER is not None
    targets = {bus: ordinal for bus, ordinal in DRIVER.devices().items()}
    reports = cuda.wipe_gpus(DRIVER, targets, "wipe")
    for bus, report in reports.items():
        assert report.ok, (bus, report)
        # What the wiper cannot reach: its own context and the driver's reserve.
        assert report.covered_bytes > 0.9 * report.total_bytes, report
        print(f"{bus}: covered {report.covered_bytes / 2**30:.2f} of "
              f"{report.total_bytes / 2**30:.2f} GiB; cuMemGetInfo overstated by "
              f"{(report.free_reported_bytes - report.covered_bytes) >> 20} MiB")


def test_the_verify_kernel_finds_a_single_planted_word_on_the_gpu():
    assert DRIVER is not None
    ordinal = min(DRIVER.devices().values())
    ctx = cuda.Context(DRIVER, ordinal)
    ptr = ctypes.c_uint64()
    size = 64 << 20
    try:
        DRIVER.call("cuMemAlloc_v2", ctypes.byref(ptr), size)
        DRIVER.call("cuMemsetD32_v2", ptr.value, 0, size // 4)
        word = ctypes.c_uint32(0xDEADBEEF)
        offset = 12345 * 4
        DRIVER.call("cuMemcpyHtoD_v2", ptr.value + offset, ctypes.cast(ctypes.byref(word),
                                                                       ctypes.c_void_p), 4)
        bad, first, digest = cuda.verify_chunks(ctx, [(ptr.value, size)], 0)
        assert (bad, first) == (1, offset) and digest != 0
        assert cuda.verify_chunks(ctx, [(ptr.value, size)], 0) == (bad, first, digest)
    finally:
        if ptr.value:
            DRIVER.call("cuMemFree_v2", ptr.value)
        ctx.close()


def test_nvml_minor_numbers_are_the_device_files_minors():
    from ztgpu.gpu.nvml import NvmlBackend

    assert DRIVER is not None
    cuda_buses = DRIVER.devices()
    for gpu in NvmlBackend(timeout_s=10).inventory():
        st = os.stat(Path("/dev") / gpu.device_name)
        assert stat.S_ISCHR(st.st_mode) and os.minor(st.st_rdev) == gpu.minor, gpu
        # The wiper finds NVML's GPU in CUDA's numbering by its PCI bus id.
        assert cuda.normalise_bus_id(gpu.pci_bus_id) in cuda_buses, (gpu, cuda_buses)
