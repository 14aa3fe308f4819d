"""A declared GPU inventory for nodes without NVIDIA hardware (demos, CI).

Nothing here touches a device: the inventory is exactly what the configuration
declares under ``gpu.simulated``. No real GPU is protected by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ztgpu.config import SimulatedGpu
from ztgpu.errors import GpuError
from ztgpu.gpu.backend import GpuInfo, slurm_order
from ztgpu.gpu.driver_params import read_params


class SimulatedBackend:
    """:class:`~ztgpu.gpu.backend.GpuBackend` over a declared list of GPUs."""

    name = "simulated"
    simulated = True

    def __init__(self, gpus: Sequence[SimulatedGpu], driver_params: Path | None = None) -> None:
        """Take the declared GPUs as they are (the config schema has validated them).

        *driver_params* is a file standing in for ``/proc/driver/nvidia/params``
        (read at each :meth:`driver_params` call, so a test can change it).

        Raises:
            GpuError: two GPUs share a minor number.
        """
        self._gpus = slurm_order(
            GpuInfo(index=gpu.index, minor=gpu.minor, uuid=gpu.uuid,
                    pci_bus_id=gpu.pci_bus_id, name=gpu.name, memory_mib=gpu.memory_mib)
            for gpu in gpus
        )
        self._closed = False
        self._params = driver_params

    def inventory(self) -> tuple[GpuInfo, ...]:
        """The declared GPUs, sorted by minor number.

        Raises:
            GpuError: the backend was closed.
        """
        if self._closed:
            raise GpuError("the simulated GPU backend is closed")
        return self._gpus

    def driver_params(self) -> dict[str, str] | None:
        """The declared driver parameters, or None when none are declared.

        Raises:
            GpuError: the declared file cannot be read or parsed.
        """
        return None if self._params is None else read_params(self._params)

    def gpu_pids(self, gpu: GpuInfo) -> set[int]:
        """Nothing runs on a simulated GPU as far as a driver knows; the agent's
        /proc scan finds processes that hold its device file."""
        return set()

    def close(self) -> None:
        """Mark the backend closed; never raises."""
        self._closed = True
