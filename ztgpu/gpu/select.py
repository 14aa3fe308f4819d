"""Choose the GPU backend the configuration asks for."""

from __future__ import annotations

import logging
from pathlib import Path

from ztgpu.config import GpuConfig
from ztgpu.errors import GpuError
from ztgpu.gpu.backend import GpuBackend
from ztgpu.gpu.devices import driver_present
from ztgpu.gpu.nvml import NvmlBackend
from ztgpu.gpu.simulated import SimulatedBackend

log = logging.getLogger("ztgpu.gpu")


def _simulated(config: GpuConfig) -> SimulatedBackend:
    backend = SimulatedBackend(config.simulated, config.simulated_driver_params,
                               config.simulated_state, config.simulated_telemetry)
    log.warning("Using %d simulated GPUs from gpu.simulated: no real GPU device is "
                "protected by this inventory.", len(config.simulated))
    return backend


def open_backend(config: GpuConfig, *, proc_root: Path = Path("/proc")) -> GpuBackend:
    """The backend named by ``config.backend``.

    ``nvml`` and ``simulated`` are taken as given. ``auto`` picks NVML when
    the NVIDIA driver is loaded (``<proc_root>/driver/nvidia/version``
    exists), else the simulated inventory when one is declared. A node with
    the driver never falls back to simulation, even if NVML later fails.
    NVML itself is not touched here; the first ``inventory()`` initialises it.

    Raises:
        GpuError: ``auto`` found neither a driver nor simulated GPUs, or the
            simulated inventory is inconsistent.
    """
    if config.backend == "nvml":
        return NvmlBackend(config.nvml_timeout_s)
    if config.backend == "simulated":
        return _simulated(config)
    if driver_present(proc_root):
        if config.simulated:
            log.warning("The NVIDIA driver is loaded, so the %d GPUs under gpu.simulated "
                        "are ignored and NVML is used.", len(config.simulated))
        return NvmlBackend(config.nvml_timeout_s)
    if config.simulated:
        return _simulated(config)
    raise GpuError("no NVIDIA driver found (/proc/driver/nvidia/version) and no simulated "
                   "GPUs declared under gpu.simulated")
