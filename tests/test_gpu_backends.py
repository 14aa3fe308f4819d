"""GPU inventory backends: simulated, NVML (fake and real), device numbers, selection."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ztgpu.config import GpuConfig, SimulatedGpu
from ztgpu.errors import DeviceError, GpuError
from ztgpu.gpu.backend import GpuInfo, slurm_order
from ztgpu.gpu.devices import (
    NVIDIA_MAJOR_DEFAULT,
    MajorSource,
    char_device_major,
    driver_present,
    gpu_device_path,
    nvidia_major,
)
from ztgpu.gpu.nvml import NvmlBackend
from ztgpu.gpu.select import open_backend
from ztgpu.gpu.simulated import SimulatedBackend

# NVML index -> minor deliberately scrambled: index 0 is /dev/nvidia2, etc.
SIM_GPUS = [
    SimulatedGpu(index=0, minor=2, uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000",
                 pci_bus_id="00000000:1B:00.0"),
    SimulatedGpu(index=1, minor=0, uuid="GPU-bbbbbbbb-0000-0000-0000-000000000000",
                 pci_bus_id="00000000:3B:00.0"),
    SimulatedGpu(index=2, minor=3, uuid="GPU-cccccccc-0000-0000-0000-000000000000",
                 pci_bus_id="00000000:86:00.0", name="Simulated H100", memory_mib=40960),
]


def _gpu(index: int, minor: int) -> GpuInfo:
    return GpuInfo(index=index, minor=minor, uuid=f"GPU-{index}-{minor}",
                   pci_bus_id=f"00000000:{index:02X}:00.0", name="x", memory_mib=1)


# -- simulated backend and Slurm order -------------------------------------

def test_simulated_inventory_is_sorted_by_minor_and_keeps_nvml_index() -> None:
    backend = SimulatedBackend(SIM_GPUS)
    gpus = backend.inventory()
    assert backend.simulated is True
    assert backend.name == "simulated"
    assert [(g.minor, g.index) for g in gpus] == [(0, 1), (2, 0), (3, 2)]
    assert [g.device_name for g in gpus] == ["nvidia0", "nvidia2", "nvidia3"]
    assert gpus[2].name == "Simulated H100"
    assert gpus[2].memory_mib == 40960
    assert gpus[0].uuid == "GPU-bbbbbbbb-0000-0000-0000-000000000000"


def test_simulated_backend_refuses_inventory_after_close() -> None:
    backend = SimulatedBackend(SIM_GPUS)
    backend.close()
    with pytest.raises(GpuError, match="closed"):
        backend.inventory()


def test_slurm_gres_index_maps_through_minor_order_not_index() -> None:
    # SLURM_JOB_GPUS=1 means the second device file in gres.conf: /dev/nvidia2,
    # which NVML calls index 0 -- neither minor 1 nor NVML index 1.
    order = slurm_order([_gpu(0, 2), _gpu(1, 0), _gpu(2, 3)])
    assert order[1].minor == 2
    assert order[1].index == 0
    assert [g.minor for g in order] == [0, 2, 3]


def test_slurm_order_rejects_two_gpus_with_one_minor() -> None:
    with pytest.raises(GpuError, match="minor 4"):
        slurm_order([_gpu(0, 4), _gpu(1, 4)])


def test_gpu_device_path_uses_minor() -> None:
    assert gpu_device_path(Path("/dev"), _gpu(0, 5)) == Path("/dev/nvidia5")


# -- NVML backend against a fake pynvml ------------------------------------

class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


@dataclass
class FakeDevice:
    minor: int
    uuid: str | bytes
    bus_id: str | bytes
    name: str | bytes
    memory_bytes: int


@dataclass
class FakePci:
    busId: str | bytes


@dataclass
class FakeMemory:
    total: int


class FakeNvml:
    """Records calls; individual functions can be replaced per test."""

    def __init__(self, devices: list[FakeDevice]) -> None:
        self.devices = devices
        self.calls: list[str] = []
        self.overrides: dict[str, Callable[..., Any]] = {}

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
        for name in ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount",
                     "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetMinorNumber",
                     "nvmlDeviceGetUUID", "nvmlDeviceGetPciInfo", "nvmlDeviceGetName",
                     "nvmlDeviceGetMemoryInfo"):
            setattr(mod, name, self._recorder(name))
        return mod

    def _recorder(self, name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            if name in self.overrides:
                return self.overrides[name](*args)
            return getattr(self, name)(*args)
        return call

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        return self.devices[index]

    def nvmlDeviceGetMinorNumber(self, handle: FakeDevice) -> int:
        return handle.minor

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str | bytes:
        return handle.uuid

    def nvmlDeviceGetPciInfo(self, handle: FakeDevice) -> FakePci:
        return FakePci(busId=handle.bus_id)

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str | bytes:
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> FakeMemory:
        return FakeMemory(total=handle.memory_bytes)


def _devices() -> list[FakeDevice]:
    # NVML enumeration index = list position; minors deliberately differ.
    return [
        FakeDevice(minor=1, uuid=b"GPU-11111111-2222-3333-4444-555555555555",
                   bus_id=b"00000000:3B:00.0", name=b"NVIDIA H100 80GB HBM3",
                   memory_bytes=81559 * 1024 * 1024),
        FakeDevice(minor=0, uuid="GPU-66666666-7777-8888-9999-000000000000",
                   bus_id="00000000:1B:00.0", name="NVIDIA H100 80GB HBM3",
                   memory_bytes=81559 * 1024 * 1024 + 12345),
    ]


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml(_devices())
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


@pytest.fixture
def nvml_backend() -> Iterator[NvmlBackend]:
    backend = NvmlBackend(timeout_s=0.2)
    yield backend
    with contextlib.suppress(GpuError):  # tests that break NVML also break its shutdown
        backend.close()


def test_nvml_inventory_reads_minor_uuid_pci_and_decodes_bytes(
        fake_nvml: FakeNvml, nvml_backend: NvmlBackend) -> None:
    gpus = nvml_backend.inventory()
    assert nvml_backend.simulated is False
    assert nvml_backend.name == "nvml"
    assert gpus == (
        GpuInfo(index=1, minor=0, uuid="GPU-66666666-7777-8888-9999-000000000000",
                pci_bus_id="00000000:1B:00.0", name="NVIDIA H100 80GB HBM3",
                memory_mib=81559),
        GpuInfo(index=0, minor=1, uuid="GPU-11111111-2222-3333-4444-555555555555",
                pci_bus_id="00000000:3B:00.0", name="NVIDIA H100 80GB HBM3",
                memory_mib=81559),
    )


def test_nvml_is_initialised_once_and_shut_down_on_close(fake_nvml: FakeNvml) -> None:
    backend = NvmlBackend(timeout_s=0.2)
    backend.inventory()
    backend.inventory()
    backend.close()
    backend.close()
    assert fake_nvml.calls.count("nvmlInit") == 1
    assert fake_nvml.calls.count("nvmlShutdown") == 1
    with pytest.raises(GpuError, match="closed"):
        backend.inventory()


def test_nvml_call_that_hangs_raises_within_deadline_and_recovers(
        fake_nvml: FakeNvml, nvml_backend: NvmlBackend) -> None:
    release = threading.Event()

    def hang() -> int:
        release.wait(timeout=30)
        return len(fake_nvml.devices)

    fake_nvml.overrides["nvmlDeviceGetCount"] = hang
    try:
        started = time.monotonic()
        with pytest.raises(GpuError, match=r"nvmlDeviceGetCount did not return within 0\.2 s"):
            nvml_backend.inventory()
        assert time.monotonic() - started < 2.0
        # While the call is still stuck, later calls fail without queueing
        # another NVML call behind it, and name the stuck one.
        calls_before = len(fake_nvml.calls)
        with pytest.raises(GpuError, match="unresponsive: nvmlDeviceGetCount"):
            nvml_backend.inventory()
        assert len(fake_nvml.calls) == calls_before
    finally:
        release.set()
    # Once the stuck call has returned, the backend works again.
    del fake_nvml.overrides["nvmlDeviceGetCount"]
    deadline = time.monotonic() + 5
    while True:
        try:
            gpus = nvml_backend.inventory()
            break
        except GpuError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    assert [g.minor for g in gpus] == [0, 1]


def test_close_does_not_wait_for_a_stuck_call(fake_nvml: FakeNvml) -> None:
    release = threading.Event()
    fake_nvml.overrides["nvmlDeviceGetCount"] = lambda: release.wait(timeout=30)
    backend = NvmlBackend(timeout_s=0.2)
    try:
        with pytest.raises(GpuError, match="did not return"):
            backend.inventory()
        started = time.monotonic()
        with pytest.raises(GpuError, match="unresponsive"):
            backend.close()
        assert time.monotonic() - started < 1.0  # not the 30 s the call is stuck for
        assert "nvmlShutdown" not in fake_nvml.calls
        with pytest.raises(GpuError, match="closed"):
            backend.inventory()
    finally:
        release.set()


def test_nvml_error_becomes_gpu_error_naming_the_call(
        fake_nvml: FakeNvml, nvml_backend: NvmlBackend) -> None:
    def lost(handle: FakeDevice) -> str:
        raise FakeNVMLError("GPU is lost")

    fake_nvml.overrides["nvmlDeviceGetUUID"] = lost
    with pytest.raises(GpuError, match="nvmlDeviceGetUUID failed: GPU is lost") as info:
        nvml_backend.inventory()
    assert isinstance(info.value.__cause__, FakeNVMLError)


def test_failed_nvml_init_is_an_error_and_is_retried(
        fake_nvml: FakeNvml, nvml_backend: NvmlBackend) -> None:
    def no_driver() -> None:
        raise FakeNVMLError("Driver Not Loaded")

    fake_nvml.overrides["nvmlInit"] = no_driver
    with pytest.raises(GpuError, match="nvmlInit failed: Driver Not Loaded"):
        nvml_backend.inventory()
    del fake_nvml.overrides["nvmlInit"]
    assert len(nvml_backend.inventory()) == 2
    assert fake_nvml.calls.count("nvmlInit") == 2


def test_missing_libnvidia_ml_oserror_becomes_gpu_error(
        fake_nvml: FakeNvml, nvml_backend: NvmlBackend) -> None:
    def no_library() -> None:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    fake_nvml.overrides["nvmlInit"] = no_library
    with pytest.raises(GpuError, match=r"libnvidia-ml\.so\.1") as info:
        nvml_backend.inventory()
    assert isinstance(info.value.__cause__, OSError)


def test_missing_pynvml_module_becomes_gpu_error(monkeypatch: pytest.MonkeyPatch,
                                                 nvml_backend: NvmlBackend) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(GpuError, match="nvidia-ml-py") as info:
        nvml_backend.inventory()
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize("minor", [255, -1])
def test_implausible_minor_is_rejected(fake_nvml: FakeNvml, nvml_backend: NvmlBackend,
                                       minor: int) -> None:
    fake_nvml.devices[0].minor = minor
    with pytest.raises(GpuError, match=f"minor {minor}"):
        nvml_backend.inventory()


def test_duplicate_minor_from_nvml_is_rejected(fake_nvml: FakeNvml,
                                               nvml_backend: NvmlBackend) -> None:
    fake_nvml.devices[0].minor = 0
    with pytest.raises(GpuError, match="both report device minor 0"):
        nvml_backend.inventory()


# -- /proc/devices ----------------------------------------------------------

# Layout as the kernel prints it on a GPU node with the NVIDIA driver loaded.
PROC_DEVICES_NVIDIA = """\
Character devices:
  1 mem
  4 /dev/vc/0
  4 tty
  5 /dev/tty
  5 /dev/console
  5 /dev/ptmx
  7 vcs
 10 misc
 13 input
128 ptm
136 pts
195 nvidia-frontend
226 drm
234 nvidia-caps-imex-channels
235 nvidia-caps
510 nvidia-uvm

Block devices:
  7 loop
  8 sd
259 blkext
"""

# This development machine's /proc/devices (no NVIDIA driver).
PROC_DEVICES_NO_NVIDIA = """\
Character devices:
  1 mem
  4 /dev/vc/0
  4 tty
  4 ttyS
  5 /dev/tty
  5 /dev/console
  5 /dev/ptmx
  7 vcs
 10 misc
 13 input
128 ptm
136 pts
203 cpu/cpuid
245 hidraw
248 bsg
254 ndctl

Block devices:
  7 loop
253 zram
254 virtblk
259 blkext
"""

PROC_DEVICES_BLOCK_ONLY = """\
Character devices:
  1 mem
136 pts

Block devices:
  7 loop
195 nvidia-frontend
240 nvidia
"""

PROC_DEVICES_OLD_DRIVER = """\
Character devices:
  1 mem
195 nvidia
241 nvidia-uvm

Block devices:
  7 loop
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "devices"
    path.write_text(text, encoding="utf-8")
    return path


def test_proc_devices_with_nvidia_driver(tmp_path: Path) -> None:
    path = _write(tmp_path, PROC_DEVICES_NVIDIA)
    assert char_device_major("nvidia-frontend", path) == 195
    assert char_device_major("nvidia-uvm", path) == 510
    assert char_device_major("nvidia", path) is None  # exact names only
    assert nvidia_major(path) == MajorSource(major=195, from_proc=True)


def test_proc_devices_without_nvidia_falls_back_to_default(tmp_path: Path) -> None:
    path = _write(tmp_path, PROC_DEVICES_NO_NVIDIA)
    assert char_device_major("nvidia-frontend", path) is None
    assert char_device_major("nvidia-uvm", path) is None
    assert nvidia_major(path) == MajorSource(major=NVIDIA_MAJOR_DEFAULT, from_proc=False)


def test_proc_devices_block_section_is_ignored(tmp_path: Path) -> None:
    path = _write(tmp_path, PROC_DEVICES_BLOCK_ONLY)
    assert char_device_major("nvidia-frontend", path) is None
    assert nvidia_major(path).from_proc is False


def test_proc_devices_old_driver_name(tmp_path: Path) -> None:
    path = _write(tmp_path, PROC_DEVICES_OLD_DRIVER)
    assert nvidia_major(path) == MajorSource(major=195, from_proc=True)
    assert char_device_major("nvidia-uvm", path) == 241


def test_proc_devices_unreadable_or_malformed_is_device_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="cannot read"):
        char_device_major("nvidia-frontend", tmp_path / "absent")
    path = _write(tmp_path, "Character devices:\n  1 mem\nnonsense\n")
    with pytest.raises(DeviceError, match="line 3"):
        char_device_major("nvidia-frontend", path)


def _proc_with_driver(tmp_path: Path) -> Path:
    version = tmp_path / "proc" / "driver" / "nvidia" / "version"
    version.parent.mkdir(parents=True)
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15\n")
    return tmp_path / "proc"


def test_driver_present(tmp_path: Path) -> None:
    assert driver_present(_proc_with_driver(tmp_path)) is True
    assert driver_present(tmp_path / "empty") is False


# -- backend selection ------------------------------------------------------

def test_auto_uses_nvml_when_driver_present_even_with_simulated_gpus(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ztgpu.gpu")
    backend = open_backend(GpuConfig(simulated=SIM_GPUS), proc_root=_proc_with_driver(tmp_path))
    try:
        assert isinstance(backend, NvmlBackend)
        assert backend.simulated is False
    finally:
        backend.close()
    assert "ignored" in caplog.text


def test_auto_without_driver_uses_declared_simulation_and_warns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ztgpu.gpu")
    backend = open_backend(GpuConfig(simulated=SIM_GPUS), proc_root=tmp_path)
    assert isinstance(backend, SimulatedBackend)
    assert backend.simulated is True
    assert len(backend.inventory()) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no real GPU device is protected" in warnings[0].getMessage()


def test_auto_without_driver_or_simulation_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GpuError, match=r"no NVIDIA driver found .* no simulated GPUs"):
        open_backend(GpuConfig(), proc_root=tmp_path)


def test_explicit_backends_are_honoured(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    nvml = open_backend(GpuConfig(backend="nvml", nvml_timeout_s=3.0), proc_root=tmp_path)
    try:
        assert isinstance(nvml, NvmlBackend)
    finally:
        nvml.close()
    caplog.set_level(logging.WARNING, logger="ztgpu.gpu")
    sim = open_backend(GpuConfig(backend="simulated", simulated=SIM_GPUS),
                       proc_root=_proc_with_driver(tmp_path))
    assert isinstance(sim, SimulatedBackend)
    assert "simulated" in caplog.text


# -- real hardware ----------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/driver/nvidia/version").exists(),
                    reason="no NVIDIA driver on this machine (/proc/driver/nvidia/version absent)")
def test_real_nvml_minors_match_device_files() -> None:
    backend = NvmlBackend(timeout_s=30.0)
    try:
        gpus = backend.inventory()
    finally:
        backend.close()
    assert gpus, "the driver is loaded but NVML lists no GPU"
    major = nvidia_major()
    assert [g.minor for g in gpus] == sorted(g.minor for g in gpus)
    assert sorted(g.index for g in gpus) == list(range(len(gpus)))
    for gpu in gpus:
        rdev = os.stat(gpu_device_path(Path("/dev"), gpu)).st_rdev
        assert (os.major(rdev), os.minor(rdev)) == (major.major, gpu.minor), gpu
        assert gpu.uuid.startswith(("GPU-", "MIG-"))
        assert gpu.memory_mib > 0


def test_nvml_device_state_reads_settings_health_and_mig_devices(
        fake_nvml: FakeNvml, nvml_backend: NvmlBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = nvml_backend.inventory()[0]
    mod = sys.modules["pynvml"]
    migs = {0: FakeDevice(minor=0, uuid=b"MIG-aaaaaaaa-0000-4000-8000-000000000000",
                          bus_id="", name="", memory_bytes=0),
            2: FakeDevice(minor=0, uuid="MIG-bbbbbbbb-0000-4000-8000-000000000000",
                          bus_id="", name="", memory_bytes=0)}

    def not_supported(*_: Any) -> Any:
        raise FakeNVMLError("Not Supported")

    def mig_handle(_: Any, index: int) -> FakeDevice:
        if index not in migs:
            raise FakeNVMLError("Not Found")  # an empty MIG slot
        return migs[index]

    calls = {
        "nvmlDeviceGetHandleByUUID": lambda uuid: next(
            d for d in fake_nvml.devices if d.uuid in (uuid, uuid.encode())),
        "nvmlDeviceGetComputeMode": lambda _: 3,
        "nvmlDeviceGetApplicationsClock": lambda _, kind: {1: 1980, 2: 2619}[kind],
        "nvmlDeviceGetDefaultApplicationsClock": lambda _, kind: {1: 1980, 2: 2619}[kind],
        "nvmlDeviceGetTotalEccErrors": lambda _, error, counter: 4,
        "nvmlDeviceGetRetiredPagesPendingStatus": not_supported,
        "nvmlDeviceGetRemappedRows": lambda _: (0, 1, 1, 0),
        "nvmlDeviceGetPersistenceMode": lambda _: 1,
        "nvmlDeviceGetAccountingMode": lambda _: 0,
        "nvmlDeviceGetMigMode": lambda _: [1, 1],
        "nvmlDeviceGetMaxMigDeviceCount": lambda _: 4,
        "nvmlDeviceGetMigDeviceHandleByIndex": mig_handle,
    }
    for name, fn in calls.items():
        monkeypatch.setattr(mod, name, fn, raising=False)
    state = nvml_backend.device_state(gpu)
    assert state.compute_mode == "exclusive_process"
    assert (state.app_clocks, state.default_app_clocks) == ((2619, 1980), (2619, 1980))
    assert state.ecc_uncorrected == 4 and state.retired_pages_pending is None
    # A grant reads the ECC count alone, with the same arguments (uncorrected, volatile).
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(mod, "nvmlDeviceGetTotalEccErrors",
                        lambda _, error, counter: asked.append((error, counter)) or 6)
    assert nvml_backend.ecc_uncorrected(gpu) == 6 and asked == [(1, 0)]
    monkeypatch.setattr(mod, "nvmlDeviceGetTotalEccErrors", not_supported)
    assert nvml_backend.ecc_uncorrected(gpu) is None
    assert (state.remapped_rows_pending, state.remap_failure) == (True, False)
    assert (state.persistence, state.accounting) == (True, False)
    assert state.mig_devices == ("MIG-aaaaaaaa-0000-4000-8000-000000000000",
                                 "MIG-bbbbbbbb-0000-4000-8000-000000000000")
    monkeypatch.setattr(mod, "nvmlDeviceGetMigMode", lambda _: [0, 0])
    assert nvml_backend.device_state(gpu).mig_devices == ()
    monkeypatch.setattr(mod, "nvmlDeviceGetMigMode", not_supported)  # a GPU without MIG
    assert nvml_backend.device_state(gpu).mig_devices is None

    def broken(*_: Any) -> Any:
        raise FakeNVMLError("Unknown Error")

    monkeypatch.setattr(mod, "nvmlDeviceGetMigMode", lambda _: [1, 0])
    monkeypatch.setattr(mod, "nvmlDeviceGetMigDeviceHandleByIndex", broken)
    with pytest.raises(GpuError, match="nvmlDeviceGetMigDeviceHandleByIndex failed"):
        nvml_backend.device_state(gpu)
