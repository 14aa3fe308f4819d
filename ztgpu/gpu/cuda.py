"""Wiping and verifying GPU memory through the CUDA driver API (ctypes on libcuda).

No PyTorch or CuPy: the agent calls the driver library itself, the same
``libcuda.so.1`` every CUDA program loads, through a handful of entry points
(:data:`_SIGNATURES`). One wipe of one GPU:

1. a context of the wiper's own on the device (its memory is what the wiper
   cannot reach, and is reported);
2. **allocate all it can**: chunks of :data:`CHUNK_BYTES`, halved on
   ``CUDA_ERROR_OUT_OF_MEMORY`` down to :data:`MIN_CHUNK_BYTES`, until
   nothing more fits. ``cuMemGetInfo``'s free figure is where it starts, not
   what it trusts: it overstates what can be allocated (by ~35 MB in one
   report), and the difference is reported too;
3. ``wipe``: fill everything with a pattern (``cuMemsetD32``), verify it with
   the kernel in ``kernels/verify.ptx`` (every 32-bit word read back on the
   GPU; loaded with ``cuModuleLoadData``), then fill with zeros and verify
   again, so the next job finds zeros and the pattern pass proves every
   byte was written. ``verify`` only checks that what the allocation hands
   out is zero (that the driver's scrub on free happened), writing nothing;
4. report bytes covered, bytes not reachable, mismatched words with the
   first bad offset and a digest of the evidence, per-pass times and
   bandwidths.

:func:`wipe_gpus` wipes several GPUs at once, one thread each (ctypes
releases the GIL around every driver call). Which CUDA ordinal is which
GPU: the wiper sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` semantics itself by
matching each device's PCI bus id (``cuDeviceGetPCIBusId``) with the
inventory's, never by index.

**MIG.** A GPU in MIG mode is wiped instance by instance: a CUDA process
sees one MIG device at most, so :func:`wipe_instances` runs this module as
a child process per instance (``CUDA_VISIBLE_DEVICES=MIG-<uuid>``), all at
once, and merges their reports into the GPU's. Memory outside every GPU
instance cannot be allocated by anyone, the wiper included; what it covers
is the instances' memory.

The tests run all of this against ``ztgpu/testing/stand_in_libcuda.c``, a
libcuda of host memory with the same entry points (tests/test_cuda_wipe.py);
tests/gpu/ runs it on a real GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ztgpu.errors import GpuError

#: Where the driver library is found on a node with the NVIDIA driver.
LIBCUDA = "libcuda.so.1"
PATTERN = 0xA5C3_5A3C
CHUNK_BYTES = 1 << 30
MIN_CHUNK_BYTES = 2 << 20
THREADS_PER_BLOCK = 256
#: Blocks per multiprocessor for the verify kernel's grid-stride loop.
BLOCKS_PER_SM = 8
MODES = ("off", "verify", "wipe")

CUDA_SUCCESS = 0
CUDA_ERROR_OUT_OF_MEMORY = 2
_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16

_u64 = ctypes.c_uint64
_size = ctypes.c_size_t
_ptr = ctypes.c_void_p
_int = ctypes.c_int
_uint = ctypes.c_uint

#: The driver entry points used, with their argument types (the ``_v2``
#: names are those the driver's headers map the plain names to).
_SIGNATURES: dict[str, tuple[Any, ...]] = {
    "cuInit": (_uint,),
    "cuDriverGetVersion": (ctypes.POINTER(_int),),
    "cuDeviceGetCount": (ctypes.POINTER(_int),),
    "cuDeviceGet": (ctypes.POINTER(_int), _int),
    "cuDeviceGetName": (ctypes.c_char_p, _int, _int),
    "cuDeviceGetPCIBusId": (ctypes.c_char_p, _int, _int),
    "cuDeviceGetAttribute": (ctypes.POINTER(_int), _int, _int),
    "cuDeviceTotalMem_v2": (ctypes.POINTER(_size), _int),
    "cuCtxCreate_v2": (ctypes.POINTER(_ptr), _uint, _int),
    "cuCtxDestroy_v2": (_ptr,),
    "cuCtxSetCurrent": (_ptr,),
    "cuCtxSynchronize": (),
    "cuMemGetInfo_v2": (ctypes.POINTER(_size), ctypes.POINTER(_size)),
    "cuMemAlloc_v2": (ctypes.POINTER(_u64), _size),
    "cuMemFree_v2": (_u64,),
    "cuMemsetD32_v2": (_u64, _uint, _size),
    "cuMemcpyHtoD_v2": (_u64, _ptr, _size),
    "cuMemcpyDtoH_v2": (_ptr, _u64, _size),
    "cuModuleLoadData": (ctypes.POINTER(_ptr), ctypes.c_char_p),
    "cuModuleGetFunction": (ctypes.POINTER(_ptr), _ptr, ctypes.c_char_p),
    "cuModuleUnload": (_ptr,),
    "cuLaunchKernel": (_ptr, _uint, _uint, _uint, _uint, _uint, _uint, _uint, _ptr,
                       ctypes.POINTER(_ptr), ctypes.POINTER(_ptr)),
    "cuGetErrorName": (_int, ctypes.POINTER(ctypes.c_char_p)),
}


class CudaError(GpuError):
    """A driver call failed; ``code`` and ``name`` are the driver's."""

    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({code})")
        self.call = call
        self.code = code
        self.name = name


def verify_ptx() -> bytes:
    """The verify kernel's PTX as shipped in the package (NUL-terminated)."""
    return (Path(__file__).with_name("kernels") / "verify.ptx").read_bytes() + b"\0"


class Driver:
    """The loaded driver library; every call checked and mapped to CudaError."""

    def __init__(self, path: str = LIBCUDA) -> None:
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as exc:
            raise GpuError(f"cannot load the CUDA driver library {path}: {exc}") from None
        self.path = path
        for name, argtypes in _SIGNATURES.items():
            try:
                fn = getattr(self.lib, name)
            except AttributeError:
                raise GpuError(f"{path} has no {name}: not a CUDA driver library") from None
            fn.argtypes = list(argtypes)
            fn.restype = _int
        self.call("cuInit", 0)

    def call(self, name: str, *args: Any) -> None:
        code = int(getattr(self.lib, name)(*args))
        if code != CUDA_SUCCESS:
            raise CudaError(name, code, self.error_name(code))

    def error_name(self, code: int) -> str:
        text = ctypes.c_char_p()
        if int(self.lib.cuGetErrorName(code, ctypes.byref(text))) != CUDA_SUCCESS \
                or not text.value:
            return f"CUDA error {code}"
        return text.value.decode("ascii", "replace")

    def version(self) -> int:
        value = _int()
        self.call("cuDriverGetVersion", ctypes.byref(value))
        return value.value

    def devices(self) -> dict[str, int]:
        """CUDA ordinal of each device, by normalised PCI bus id."""
        count = _int()
        self.call("cuDeviceGetCount", ctypes.byref(count))
        found: dict[str, int] = {}
        for ordinal in range(count.value):
            dev = _int()
            self.call("cuDeviceGet", ctypes.byref(dev), ordinal)
            bus = ctypes.create_string_buffer(64)
            self.call("cuDeviceGetPCIBusId", bus, len(bus), dev)
            key = normalise_bus_id(bus.value.decode())
            if key in found:  # MIG instances share their GPU's bus id
                raise GpuError(f"CUDA devices {found[key]} and {dev.value} are both at PCI "
                               f"{key}: several MIG devices of one GPU in one process "
                               f"(CUDA_VISIBLE_DEVICES?); each is wiped in a process of "
                               f"its own")
            found[key] = dev.value
        return found


def normalise_bus_id(bus: str) -> str:
    """``0000:3B:00.0`` and NVML's ``00000000:3B:00.0`` name the same device."""
    domain, _, rest = bus.strip().lower().partition(":")
    return f"{int(domain or '0', 16):04x}:{rest}"


@dataclass
class WipeReport:
    """What one wipe (or verify) of one GPU did and found."""

    gpu: str
    mode: str
    total_bytes: int = 0
    free_reported_bytes: int = 0
    covered_bytes: int = 0
    chunks: int = 0
    mismatched_words: int = 0
    first_mismatch_offset: int | None = None
    digest: str = ""
    fill_s: float = 0.0
    verify_s: float = 0.0
    zero_s: float = 0.0
    total_s: float = 0.0
    error: str | None = None
    passes: list[str] = field(default_factory=list)
    #: MIG devices wiped one by one (their UUIDs); empty for a whole GPU.
    instances: list[str] = field(default_factory=list)

    @property
    def unreachable_bytes(self) -> int:
        """Memory the wiper could not allocate (its own context, the driver's
        reserve, other holders)."""
        return max(0, self.total_bytes - self.covered_bytes)

    @property
    def ok(self) -> bool:
        return self.error is None and self.mismatched_words == 0 and self.covered_bytes > 0

    def gbps(self, seconds: float) -> float:
        return self.covered_bytes / seconds / 1e9 if seconds > 0 else 0.0

    def as_event(self) -> dict[str, Any]:
        """The audit event's figures."""
        fields = asdict(self)
        fields.pop("passes")
        if not self.instances:
            fields.pop("instances")
        fields.update(unreachable_bytes=self.unreachable_bytes, ok=self.ok,
                      fill_gbps=round(self.gbps(self.fill_s), 2),
                      verify_gbps=round(self.gbps(self.verify_s), 2),
                      passes=",".join(self.passes))
        for key in ("fill_s", "verify_s", "zero_s", "total_s"):
            fields[key] = round(fields[key], 4)
        return fields


class Context:
    """The wiper's context on one device, current on the calling thread."""

    def __init__(self, driver: Driver, ordinal: int) -> None:
        self.driver = driver
        self.handle = _ptr()
        dev = _int()
        driver.call("cuDeviceGet", ctypes.byref(dev), ordinal)
        self.device = dev.value
        driver.call("cuCtxCreate_v2", ctypes.byref(self.handle), 0, dev)
        self.module = _ptr()
        self.kernel = _ptr()
        try:
            driver.call("cuModuleLoadData", ctypes.byref(self.module), verify_ptx())
            driver.call("cuModuleGetFunction", ctypes.byref(self.kernel), self.module,
                        b"ztgpu_verify")
            sms = _int()
            driver.call("cuDeviceGetAttribute", ctypes.byref(sms),
                        _ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)
            self.blocks = max(1, sms.value * BLOCKS_PER_SM)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.module:
            self.driver.call("cuModuleUnload", self.module)
            self.module = _ptr()
        if self.handle:
            self.driver.call("cuCtxDestroy_v2", self.handle)
            self.handle = _ptr()


def allocate_all(driver: Driver, start: int) -> list[tuple[int, int]]:
    """(pointer, bytes) chunks covering all the memory that can be allocated."""
    chunks: list[tuple[int, int]] = []
    size = max(MIN_CHUNK_BYTES, min(CHUNK_BYTES, start) // MIN_CHUNK_BYTES * MIN_CHUNK_BYTES)
    while size >= MIN_CHUNK_BYTES:
        ptr = _u64()
        code = int(driver.lib.cuMemAlloc_v2(ctypes.byref(ptr), size))
        if code == CUDA_SUCCESS:
            chunks.append((ptr.value, size))
        elif code == CUDA_ERROR_OUT_OF_MEMORY:
            size //= 2
            size = size // MIN_CHUNK_BYTES * MIN_CHUNK_BYTES
        else:
            raise CudaError("cuMemAlloc_v2", code, driver.error_name(code))
    return chunks


def verify_chunks(ctx: Context, chunks: list[tuple[int, int]], expect: int) -> tuple[int, int, int]:
    """Mismatched words, lowest mismatching offset (bytes, over all chunks as
    one range) and the xor digest, as the kernel computes them."""
    driver = ctx.driver
    result = _u64()
    driver.call("cuMemAlloc_v2", ctypes.byref(result), 24)
    try:
        bad_total, first_total, digest_total, base = 0, -1, 0, 0
        for ptr, size in chunks:
            host = (_u64 * 3)(0, 2**64 - 1, 0)
            driver.call("cuMemcpyHtoD_v2", result.value, ctypes.cast(host, _ptr), 24)
            words, n4, want, out = _u64(ptr), _u64(size // 16), _uint(expect), _u64(result.value)
            params = (_ptr * 4)(*(ctypes.cast(ctypes.byref(v), _ptr)
                                  for v in (words, n4, want, out)))
            driver.call("cuLaunchKernel", ctx.kernel, ctx.blocks, 1, 1, THREADS_PER_BLOCK, 1, 1,
                        0, None, params, None)
            driver.call("cuCtxSynchronize")
            driver.call("cuMemcpyDtoH_v2", ctypes.cast(host, _ptr), result.value, 24)
            if host[0]:
                bad_total += host[0]
                if first_total < 0:
                    first_total = base + host[1] * 4
                digest_total ^= host[2]
            base += size
        return bad_total, first_total, digest_total
    finally:
        driver.call("cuMemFree_v2", result.value)


def _fill(driver: Driver, chunks: list[tuple[int, int]], value: int) -> float:
    started = time.perf_counter()
    for ptr, size in chunks:
        driver.call("cuMemsetD32_v2", ptr, value, size // 4)
    driver.call("cuCtxSynchronize")
    return time.perf_counter() - started


def wipe_one(driver: Driver, ordinal: int, mode: str, gpu: str = "") -> WipeReport:
    """Wipe (or verify) one device; never raises: failures are in the report."""
    report = WipeReport(gpu=gpu or f"cuda{ordinal}", mode=mode)
    began = time.perf_counter()
    ctx: Context | None = None
    chunks: list[tuple[int, int]] = []
    try:
        ctx = Context(driver, ordinal)
        free, total = _size(), _size()
        driver.call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
        report.total_bytes, report.free_reported_bytes = total.value, free.value
        chunks = allocate_all(driver, free.value)
        # The verify kernel's result buffer needs a page of its own: give one back.
        if chunks:
            ptr, size = chunks.pop()
            driver.call("cuMemFree_v2", ptr)
            if size > MIN_CHUNK_BYTES:
                keep = _u64()
                driver.call("cuMemAlloc_v2", ctypes.byref(keep), size - MIN_CHUNK_BYTES)
                chunks.append((keep.value, size - MIN_CHUNK_BYTES))
        report.chunks = len(chunks)
        report.covered_bytes = sum(size for _, size in chunks)
        if not chunks:
            raise GpuError("no GPU memory could be allocated")
        evidence = hashlib.sha256()
        if mode == "wipe":
            report.fill_s = _fill(driver, chunks, PATTERN)
            report.passes.append("pattern")
            _record(report, evidence, *_timed_verify(ctx, chunks, PATTERN, report))
            report.zero_s = _fill(driver, chunks, 0)
            report.passes.append("zero")
        _record(report, evidence, *_timed_verify(ctx, chunks, 0, report))
        report.digest = evidence.hexdigest()
    except (GpuError, OSError) as exc:
        report.error = str(exc)
    finally:
        for ptr, _ in chunks:
            try:
                driver.call("cuMemFree_v2", ptr)
            except CudaError as exc:
                report.error = report.error or str(exc)
        if ctx is not None:
            try:
                ctx.close()
            except CudaError as exc:
                report.error = report.error or str(exc)
        report.total_s = time.perf_counter() - began
    return report


def _timed_verify(ctx: Context, chunks: list[tuple[int, int]], expect: int,
                  report: WipeReport) -> tuple[int, int, int, int]:
    started = time.perf_counter()
    bad, first, digest = verify_chunks(ctx, chunks, expect)
    report.verify_s += time.perf_counter() - started
    report.passes.append(f"verify-{expect:#x}")
    return expect, bad, first, digest


def _record(report: WipeReport, evidence: Any, expect: int, bad: int, first: int,
            digest: int) -> None:
    evidence.update(f"{expect:08x}:{report.covered_bytes}:{bad}:{first}:{digest:016x};".encode())
    report.mismatched_words += bad
    if bad and report.first_mismatch_offset is None:
        report.first_mismatch_offset = first


def wipe_gpus(driver: Driver, targets: dict[str, int], mode: str) -> dict[str, WipeReport]:
    """Wipe several devices at once (one thread each); *targets* maps a
    name (the GPU's UUID) to its CUDA ordinal."""
    if mode not in MODES or mode == "off":
        raise ValueError(f"mode must be 'verify' or 'wipe', not {mode!r}")
    reports: dict[str, WipeReport] = {}

    def run(name: str, ordinal: int) -> None:
        reports[name] = wipe_one(driver, ordinal, mode, name)

    threads = [threading.Thread(target=run, args=item, name=f"ztgpu-wipe-{item[0]}")
               for item in targets.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return reports


#: How long one MIG instance's wipe may take in its child process.
INSTANCE_TIMEOUT_S = 600.0


def wipe_instances(libcuda: str, instances: list[str], mode: str, gpu: str,
                   timeout_s: float = INSTANCE_TIMEOUT_S) -> WipeReport:
    """Wipe (or verify) every MIG device of one GPU, one child process each,
    all at once; the GPU's report merges theirs. Never raises."""
    if mode not in MODES or mode == "off":
        raise ValueError(f"mode must be 'verify' or 'wipe', not {mode!r}")
    reports: dict[str, WipeReport] = {}

    def run(instance: str) -> None:
        reports[instance] = _wipe_in_child(libcuda, instance, mode, timeout_s)

    threads = [threading.Thread(target=run, args=(uuid,), name=f"ztgpu-wipe-{uuid}")
               for uuid in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return merge_reports(gpu, mode, [reports[uuid] for uuid in instances])


def _wipe_in_child(libcuda: str, instance: str, mode: str, timeout_s: float) -> WipeReport:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": instance}
    argv = [sys.executable, "-I", "-m", "ztgpu.gpu.cuda", "--libcuda", libcuda, "--mode", mode,
            "--name", instance]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return WipeReport(gpu=instance, mode=mode,
                          error=f"the wipe did not finish within {timeout_s:.0f} s")
    except OSError as exc:
        return WipeReport(gpu=instance, mode=mode, error=f"cannot start the wiper: {exc}")
    try:
        data = json.loads(done.stdout.strip().splitlines()[-1])
        known = {f for f in WipeReport.__dataclass_fields__}
        return WipeReport(**{k: v for k, v in data.items() if k in known})
    except (ValueError, IndexError, TypeError):
        why = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return WipeReport(gpu=instance, mode=mode,
                          error=f"the wiper exited with {done.returncode}: {why}")


def merge_reports(gpu: str, mode: str, parts: list[WipeReport]) -> WipeReport:
    """One GPU's report from its instances' (sizes summed, times the longest,
    the digest over theirs; the first error or mismatch named by instance)."""
    merged = WipeReport(gpu=gpu, mode=mode, instances=[p.gpu for p in parts])
    evidence = hashlib.sha256()
    errors = []
    for part in parts:
        merged.total_bytes += part.total_bytes
        merged.free_reported_bytes += part.free_reported_bytes
        merged.covered_bytes += part.covered_bytes
        merged.chunks += part.chunks
        merged.mismatched_words += part.mismatched_words
        if part.first_mismatch_offset is not None and merged.first_mismatch_offset is None:
            merged.first_mismatch_offset = part.first_mismatch_offset
            errors.append(f"{part.gpu}: {part.mismatched_words} words did not read back "
                          f"(first at byte {part.first_mismatch_offset} of the instance)")
        for name in ("fill_s", "verify_s", "zero_s", "total_s"):
            setattr(merged, name, max(getattr(merged, name), getattr(part, name)))
        merged.passes = merged.passes or list(part.passes)
        if part.error:
            errors.append(f"{part.gpu}: {part.error}")
        evidence.update(f"{part.gpu}:{part.digest};".encode())
    if not parts:
        errors.append("the GPU is in MIG mode with no MIG device: nothing could be wiped")
    if any(p.error for p in parts) or not parts:
        merged.error = "; ".join(errors)[:1000]
    merged.digest = evidence.hexdigest()
    return merged


def _main(argv: list[str]) -> int:
    """The child process of :func:`wipe_instances`: wipe the one device
    CUDA_VISIBLE_DEVICES shows and print the report as JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ztgpu.gpu.cuda")
    parser.add_argument("--libcuda", default=LIBCUDA)
    parser.add_argument("--mode", choices=("verify", "wipe"), required=True)
    parser.add_argument("--name", default="")
    args = parser.parse_args(argv)
    try:
        driver = Driver(args.libcuda)
        count = len(driver.devices())
        if count != 1:
            raise GpuError(f"the CUDA driver shows {count} devices for "
                           f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}, "
                           f"not one")
        report = wipe_one(driver, 0, args.mode, args.name)
    except GpuError as exc:
        report = WipeReport(gpu=args.name, mode=args.mode, error=str(exc))
    print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
