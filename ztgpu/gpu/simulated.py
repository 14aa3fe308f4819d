"""A declared GPU inventory for nodes without NVIDIA hardware (demos, CI).

Nothing here touches a device: the inventory is exactly what the configuration
declares under ``gpu.simulated``. No real GPU is protected by it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from ztgpu.config import SimulatedGpu
from ztgpu.errors import GpuError
from ztgpu.gpu.backend import GpuInfo, slurm_order
from ztgpu.gpu.device_state import DeviceState
from ztgpu.gpu.driver_params import read_params
from ztgpu.gpu.telemetry import GpuSample, ScriptedTelemetry


class SimulatedBackend:
    """:class:`~ztgpu.gpu.backend.GpuBackend` over a declared list of GPUs."""

    name = "simulated"
    simulated = True

    def __init__(self, gpus: Sequence[SimulatedGpu], driver_params: Path | None = None,
                 state: Path | None = None, telemetry: Path | None = None) -> None:
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
        self._state = state
        self._telemetry = ScriptedTelemetry(telemetry)

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

    def sample(self, gpu: GpuInfo) -> GpuSample:
        """The scripted sample of *gpu* (an idle GPU when none is scripted).

        Raises:
            GpuError: the scripted telemetry cannot be read or is malformed.
        """
        return self._telemetry.sample(gpu.uuid)

    def _read_states(self) -> dict[str, Any]:
        if self._state is None:
            return {}
        try:
            data = json.loads(self._state.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise GpuError(f"cannot read the simulated GPU state {self._state}: {exc}") from None
        return data if isinstance(data, dict) else {}

    def device_state(self, gpu: GpuInfo) -> DeviceState:
        """The declared settings and health of *gpu* (all None when undeclared).

        Raises:
            GpuError: the declared file cannot be read.
        """
        entry = self._read_states().get(gpu.uuid)
        if not isinstance(entry, dict):
            return DeviceState()
        known = {f.name for f in fields(DeviceState)}
        values: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v)
                                  for k, v in entry.items() if k in known}
        return DeviceState(**values)

    def ecc_uncorrected(self, gpu: GpuInfo) -> int | None:
        """The declared count (``ecc_uncorrected`` in the state file).

        Raises:
            GpuError: the declared file cannot be read.
        """
        return self.device_state(gpu).ecc_uncorrected

    def restore(self, gpu: GpuInfo, setting: str, value: object) -> None:
        """Set *setting* of *gpu* in the declared file (``app_clocks``: to
        its defaults)."""
        if self._state is None:
            raise GpuError("the simulated backend declares no GPU state to change")
        states = self._read_states()
        current = self.device_state(gpu)
        if setting == "app_clocks":
            current = replace(current, app_clocks=current.default_app_clocks)
        else:
            changes: dict[str, Any] = {setting: value}
            current = replace(current, **changes)
        states[gpu.uuid] = asdict(current)
        self._state.write_text(json.dumps(states))

    def close(self) -> None:
        """Mark the backend closed; never raises."""
        self._closed = True
