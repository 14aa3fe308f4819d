"""The GPU inventory seen by the node agent, and the protocol backends satisfy.

Three numberings of the same GPU exist and must never be confused:

* ``index``: the position in NVML's enumeration (PCI bus order). CUDA uses the
  same order only under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; its default
  (fastest first) may differ.
* ``minor``: the minor number of ``/dev/nvidiaN``, fixed by the kernel driver
  when it probes the device. It decides which device file, and therefore which
  cgroup device rule, belongs to the GPU. It is not the index in general: GPUs
  probed out of PCI order, or a GPU that was removed, leave the two apart.
* the Slurm *gres index*: the position of the GPU in the node's gres list.
  ``SLURM_JOB_GPUS`` (and the job's ``CUDA_VISIBLE_DEVICES`` as Slurm sets it)
  carries gres indices. They map to GPUs through :func:`slurm_order`, never by
  assuming ``gres index == minor`` or ``gres index == NVML index``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

from ztgpu.errors import GpuError
from ztgpu.gpu.device_state import DeviceState
from ztgpu.gpu.telemetry import GpuSample


@dataclass(frozen=True)
class GpuInfo:
    """One physical GPU as the agent knows it."""

    #: NVML enumeration index (see the module docstring for CUDA's order).
    index: int
    #: Minor number of the GPU's device file ``/dev/nvidia<minor>``.
    minor: int
    #: ``GPU-…`` UUID as ``nvidia-smi -L`` prints it.
    uuid: str
    #: PCI bus id as NVML reports it, e.g. ``00000000:3B:00.0``.
    pci_bus_id: str
    #: Marketing name, e.g. ``NVIDIA H100 80GB HBM3``.
    name: str
    #: Total framebuffer memory in MiB.
    memory_mib: int

    @property
    def device_name(self) -> str:
        """The GPU's device file name under the device directory (``nvidia<minor>``)."""
        return f"nvidia{self.minor}"


class GpuBackend(Protocol):
    """Where the GPU inventory comes from: real NVML or a declared simulation."""

    @property
    def name(self) -> str:
        """``"nvml"`` or ``"simulated"``."""
        ...

    @property
    def simulated(self) -> bool:
        """True when no real GPU stands behind the inventory."""
        ...

    def inventory(self) -> tuple[GpuInfo, ...]:
        """Every GPU on the node, sorted by minor number.

        Raises:
            GpuError: the inventory could not be read (or a call timed out).
        """
        ...

    def device_state(self, gpu: GpuInfo) -> DeviceState:
        """The GPU's settings and health (``ztgpu.gpu.device_state``).

        Raises:
            GpuError: they could not be read.
        """
        ...

    def ecc_uncorrected(self, gpu: GpuInfo) -> int | None:
        """The GPU's volatile uncorrectable ECC count alone (None: not
        supported): what a grant reads, on the Prolog's path.

        Raises:
            GpuError: it could not be read.
        """
        ...

    def restore(self, gpu: GpuInfo, setting: str, value: object) -> None:
        """Put one setting of the GPU back to *value* (``app_clocks``: defaults).

        Raises:
            GpuError: it could not be changed.
        """
        ...

    def driver_params(self) -> dict[str, str] | None:
        """The kernel driver's parameters (``/proc/driver/nvidia/params``), or None
        when no driver stands behind the inventory.

        Raises:
            GpuError: the parameters could not be read.
        """
        ...

    def sample(self, gpu: GpuInfo) -> GpuSample:
        """What the GPU is doing now (``ztgpu.gpu.telemetry``).

        Raises:
            GpuError: it could not be read.
        """
        ...

    def gpu_pids(self, gpu: GpuInfo) -> set[int]:
        """Pids the driver reports as running on *gpu* (compute and graphics).

        Raises:
            GpuError: the driver could not be asked.
        """
        ...

    def close(self) -> None:
        """Release the backend; later :meth:`inventory` calls raise GpuError.

        Raises:
            GpuError: releasing the underlying library failed; the backend is
                closed regardless.
        """
        ...


def slurm_order(gpus: Iterable[GpuInfo]) -> tuple[GpuInfo, ...]:
    """The GPUs in Slurm's gres order: position *i* is gres index *i*.

    This holds when gres.conf lists the GPU device files in ascending minor
    order (``File=/dev/nvidia[0-7]``, which Slurm expands in ascending order);
    Slurm then numbers the GPUs by their position in that list, so gres index
    *i* is the GPU with the *i*-th smallest minor. Translate the indices in
    ``SLURM_JOB_GPUS`` through this tuple; do not treat them as minors or as
    NVML/CUDA indices.

    Raises:
        GpuError: two GPUs share a minor number, so the order is ambiguous.
    """
    ordered = tuple(sorted(gpus, key=lambda gpu: gpu.minor))
    for before, after in pairwise(ordered):
        if before.minor == after.minor:
            raise GpuError(f"GPUs {before.uuid} and {after.uuid} both report device minor "
                           f"{before.minor}; cannot map Slurm gres indices to devices")
    return ordered
