"""The real GPU inventory, read through NVML (package ``nvidia-ml-py``).

Every NVML call runs on one dedicated worker thread and is waited for at most
``timeout_s`` seconds: a wedged driver makes :meth:`NvmlBackend.inventory`
raise :class:`~ztgpu.errors.GpuError` instead of hanging the agent. A call
that overran keeps the worker busy; until it returns, further calls fail at
once rather than queueing behind it.

``pynvml`` is imported only when a method needs it, so importing this module
costs nothing on nodes (or in hooks) that never use NVML.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import Any

from ztgpu.errors import GpuError
from ztgpu.gpu.backend import GpuInfo, slurm_order
from ztgpu.gpu.device_state import COMPUTE_MODES, DeviceState
from ztgpu.gpu.telemetry import GpuSample

# NVML's enum values (nvml.h): clock types, ECC counter kinds.
_CLOCK_SM, _CLOCK_MEM = 1, 2
_ERROR_UNCORRECTED, _VOLATILE_ECC = 1, 0
_MIG_ENABLED = 1

_MIB = 1024 * 1024
# nvidiactl owns minor 255 under the NVIDIA major, so a GPU's minor is below it.
_MAX_GPU_MINOR = 254


def _text(value: object, call: str) -> str:
    """NVML strings arrive as ``bytes`` or ``str`` depending on the binding version."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GpuError(f"NVML {call} returned undecodable text {value!r}") from exc
    if isinstance(value, str):
        return value
    raise GpuError(f"NVML {call} returned {type(value).__name__}, expected text")


def _number(value: object, call: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GpuError(f"NVML {call} returned {value!r}, expected an integer")
    return value


class NvmlBackend:
    """:class:`~ztgpu.gpu.backend.GpuBackend` over NVML.

    NVML is initialised once, on the first :meth:`inventory`, and stays
    initialised until :meth:`close`. Safe to share between threads.
    """

    name = "nvml"
    simulated = False

    def __init__(self, timeout_s: float) -> None:
        """Prepare the backend; touches neither pynvml nor the driver.

        Raises:
            ValueError: *timeout_s* is not positive (a programming error; the
                config schema already guarantees it).
        """
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self._timeout_s = timeout_s
        # Note: ThreadPoolExecutor joins its worker at interpreter exit, so a
        # call that never returns also delays process exit; the service
        # manager's stop timeout bounds that.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ztgpu-nvml")
        self._lock = threading.Lock()
        self._initialised = False
        self._closed = False
        self._overdue: tuple[str, Future[Any]] | None = None

    # -- internals --------------------------------------------------------

    @staticmethod
    def _pynvml() -> ModuleType:
        try:
            return importlib.import_module("pynvml")
        except ImportError as exc:
            raise GpuError("NVML bindings are not installed (Python package nvidia-ml-py, "
                           "module pynvml)") from exc

    def _call(self, nvml: ModuleType, call: str, *args: object) -> Any:
        """Run ``nvml.<call>(*args)`` on the worker with the deadline; caller holds the lock."""
        if self._overdue is not None:
            stuck, running = self._overdue
            if not running.done():
                raise GpuError(f"NVML is unresponsive: {stuck} has not returned after "
                               f"overrunning its {self._timeout_s:g} s deadline")
            self._overdue = None
        function = getattr(nvml, call, None)
        if function is None:
            raise GpuError(f"the installed nvidia-ml-py has no {call}; upgrade it")
        error_type: type[BaseException] = getattr(nvml, "NVMLError", OSError)
        future: Future[Any] = self._executor.submit(function, *args)
        try:
            return future.result(timeout=self._timeout_s)
        except TimeoutError as exc:
            self._overdue = (call, future)
            raise GpuError(f"NVML {call} did not return within {self._timeout_s:g} s "
                           f"(driver wedged or GPU lost?)") from exc
        except (error_type, OSError) as exc:
            raise GpuError(f"NVML {call} failed: {exc}") from exc

    def _read_gpu(self, nvml: ModuleType, index: int) -> GpuInfo:
        handle = self._call(nvml, "nvmlDeviceGetHandleByIndex", index)
        minor = _number(self._call(nvml, "nvmlDeviceGetMinorNumber", handle),
                        "nvmlDeviceGetMinorNumber")
        if not 0 <= minor <= _MAX_GPU_MINOR:
            raise GpuError(f"NVML reports device minor {minor} for GPU index {index}; "
                           f"expected 0..{_MAX_GPU_MINOR}")
        uuid = _text(self._call(nvml, "nvmlDeviceGetUUID", handle), "nvmlDeviceGetUUID")
        pci = self._call(nvml, "nvmlDeviceGetPciInfo", handle)
        bus_id = _text(getattr(pci, "busId", None), "nvmlDeviceGetPciInfo")
        name = _text(self._call(nvml, "nvmlDeviceGetName", handle), "nvmlDeviceGetName")
        memory = self._call(nvml, "nvmlDeviceGetMemoryInfo", handle)
        total = _number(getattr(memory, "total", None), "nvmlDeviceGetMemoryInfo")
        return GpuInfo(index=index, minor=minor, uuid=uuid, pci_bus_id=bus_id,
                       name=name, memory_mib=total // _MIB)

    # -- GpuBackend --------------------------------------------------------

    def inventory(self) -> tuple[GpuInfo, ...]:
        """Every GPU NVML enumerates, sorted by minor number.

        Initialises NVML on first use. ``index`` is NVML's enumeration index.
        MIG instances are not listed; a MIG-enabled GPU appears as its parent.

        Raises:
            GpuError: pynvml or libnvidia-ml is missing, an NVML call failed
                or overran ``timeout_s``, NVML returned an implausible value
                (minor outside 0..254, two GPUs with one minor), or the
                backend is closed.
        """
        with self._lock:
            if self._closed:
                raise GpuError("the NVML backend is closed")
            nvml = self._pynvml()
            if not self._initialised:
                self._call(nvml, "nvmlInit")
                self._initialised = True
            count = _number(self._call(nvml, "nvmlDeviceGetCount"), "nvmlDeviceGetCount")
            return slurm_order(self._read_gpu(nvml, index) for index in range(count))

    def driver_params(self) -> dict[str, str] | None:
        """The loaded driver's ``/proc/driver/nvidia/params``.

        Raises:
            GpuError: the file cannot be read or parsed.
        """
        from ztgpu.gpu.driver_params import read_params

        return read_params()

    @contextlib.contextmanager
    def _device(self, gpu: GpuInfo) -> Iterator[tuple[ModuleType, Any]]:
        """NVML and *gpu*'s handle, with the backend's lock held.

        Raises:
            GpuError: the backend is closed, or NVML cannot find the GPU.
        """
        with self._lock:
            if self._closed or not self._initialised:
                raise GpuError("the NVML backend is closed")
            nvml = self._pynvml()
            yield nvml, self._call(nvml, "nvmlDeviceGetHandleByUUID", gpu.uuid)

    def gpu_pids(self, gpu: GpuInfo) -> set[int]:
        """Pids with a compute or graphics context on *gpu*, as NVML lists them.

        Raises:
            GpuError: NVML failed or overran its deadline, or the backend is closed.
        """
        with self._device(gpu) as (nvml, handle):
            return self._pids(nvml, handle, self._call)

    @staticmethod
    def _pids(nvml: ModuleType, handle: Any, call: Any) -> set[int]:
        """Pids with a compute or graphics context, through *call* (``_call``
        or ``_maybe``); the caller holds the lock."""
        pids: set[int] = set()
        for name in ("nvmlDeviceGetComputeRunningProcesses",
                     "nvmlDeviceGetGraphicsRunningProcesses"):
            for proc in call(nvml, name, handle) or ():
                pid = getattr(proc, "pid", None)
                if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
                    pids.add(pid)
        return pids

    def sample(self, gpu: GpuInfo) -> GpuSample:
        """Utilisation, memory, power, SM clock and processes of *gpu* now.

        Raises:
            GpuError: NVML failed or overran its deadline, or the backend is closed.
        """
        with self._device(gpu) as (nvml, handle):
            util = self._maybe(nvml, "nvmlDeviceGetUtilizationRates", handle)
            memory = self._maybe(nvml, "nvmlDeviceGetMemoryInfo", handle)
            power_mw = self._maybe(nvml, "nvmlDeviceGetPowerUsage", handle)
            clock = self._maybe(nvml, "nvmlDeviceGetClockInfo", handle, _CLOCK_SM)
            pids = self._pids(nvml, handle, self._maybe)
        return GpuSample(
            util_pct=None if util is None else float(util.gpu),
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            power_w=None if power_mw is None else float(power_mw) / 1000.0,
            sm_clock_mhz=None if clock is None else int(clock),
            pids=tuple(sorted(pids)))

    def _maybe(self, nvml: ModuleType, call: str, *args: object) -> Any:
        """``_call``, with None where the GPU does not support the query."""
        try:
            return self._call(nvml, call, *args)
        except GpuError as exc:
            if "Not Supported" in str(exc) or "not supported" in str(exc):
                return None
            raise

    def ecc_uncorrected(self, gpu: GpuInfo) -> int | None:
        """One NVML call (a grant's ECC baseline), not the whole device state.

        Raises:
            GpuError: NVML failed or overran its deadline, or the backend is closed.
        """
        with self._device(gpu) as (nvml, handle):
            ecc = self._maybe(nvml, "nvmlDeviceGetTotalEccErrors", handle,
                              _ERROR_UNCORRECTED, _VOLATILE_ECC)
        return None if ecc is None else int(ecc)

    def device_state(self, gpu: GpuInfo) -> DeviceState:
        """Settings and health of *gpu* (None where not supported).

        Raises:
            GpuError: NVML failed or overran its deadline, or the backend is closed.
        """
        with self._device(gpu) as (nvml, handle):
            mode = self._maybe(nvml, "nvmlDeviceGetComputeMode", handle)
            clocks = [self._maybe(nvml, call, handle, kind)
                      for call in ("nvmlDeviceGetApplicationsClock",
                                   "nvmlDeviceGetDefaultApplicationsClock")
                      for kind in (_CLOCK_MEM, _CLOCK_SM)]
            ecc = self._maybe(nvml, "nvmlDeviceGetTotalEccErrors", handle,
                              _ERROR_UNCORRECTED, _VOLATILE_ECC)
            retired = self._maybe(nvml, "nvmlDeviceGetRetiredPagesPendingStatus", handle)
            remapped = self._maybe(nvml, "nvmlDeviceGetRemappedRows", handle)
            persistence = self._maybe(nvml, "nvmlDeviceGetPersistenceMode", handle)
            accounting = self._maybe(nvml, "nvmlDeviceGetAccountingMode", handle)
            mig = self._mig_devices(nvml, handle)
        return DeviceState(
            compute_mode=COMPUTE_MODES[mode] if isinstance(mode, int) and 0 <= mode < 4
            else None,
            persistence=None if persistence is None else bool(persistence),
            accounting=None if accounting is None else bool(accounting),
            app_clocks=None if None in clocks[:2] else (int(clocks[0]), int(clocks[1])),
            default_app_clocks=None if None in clocks[2:] else (int(clocks[2]), int(clocks[3])),
            ecc_uncorrected=None if ecc is None else int(ecc),
            retired_pages_pending=None if retired is None else bool(retired),
            remapped_rows_pending=None if remapped is None else bool(remapped[2]),
            remap_failure=None if remapped is None else bool(remapped[3]),
            mig_devices=mig)

    def _mig_devices(self, nvml: ModuleType, handle: Any) -> tuple[str, ...] | None:
        """The UUIDs of the GPU's MIG devices (() when MIG is off, None where
        the GPU has no MIG)."""
        modes = self._maybe(nvml, "nvmlDeviceGetMigMode", handle)
        if modes is None:
            return None
        if _number(modes[0], "nvmlDeviceGetMigMode") != _MIG_ENABLED:
            return ()
        count = _number(self._call(nvml, "nvmlDeviceGetMaxMigDeviceCount", handle),
                        "nvmlDeviceGetMaxMigDeviceCount")
        found = []
        for index in range(count):
            try:
                mig = self._call(nvml, "nvmlDeviceGetMigDeviceHandleByIndex", handle, index)
            except GpuError as exc:
                if "Not Found" in str(exc) or "not found" in str(exc):
                    continue  # no MIG device in that slot
                raise
            found.append(_text(self._call(nvml, "nvmlDeviceGetUUID", mig),
                               "nvmlDeviceGetUUID"))
        return tuple(found)

    def restore(self, gpu: GpuInfo, setting: str, value: object) -> None:
        """Put *setting* of *gpu* back (``app_clocks``: to the defaults).

        Raises:
            GpuError: NVML refused or failed.
        """
        with self._device(gpu) as (nvml, handle):
            if setting == "compute_mode":
                self._call(nvml, "nvmlDeviceSetComputeMode", handle,
                           COMPUTE_MODES.index(str(value)))
            elif setting == "persistence":
                self._call(nvml, "nvmlDeviceSetPersistenceMode", handle, int(bool(value)))
            elif setting == "accounting":
                self._call(nvml, "nvmlDeviceSetAccountingMode", handle, int(bool(value)))
            elif setting == "app_clocks":
                self._call(nvml, "nvmlDeviceResetApplicationsClocks", handle)
            else:
                raise GpuError(f"no such GPU setting {setting!r}")

    def close(self) -> None:
        """Shut NVML down (time-boxed) and stop the worker; idempotent.

        Raises:
            GpuError: nvmlShutdown failed, overran the deadline, or was skipped
                because an earlier call never returned. The backend is closed
                either way.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._initialised:
                    self._initialised = False
                    self._call(self._pynvml(), "nvmlShutdown")
            finally:
                # Never wait here: a wedged call would make close() hang too.
                self._executor.shutdown(wait=False, cancel_futures=True)
