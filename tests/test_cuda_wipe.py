"""The CUDA wiper for real down to the library boundary.

``ztgpu.gpu.cuda`` loads a libcuda through ctypes; here that library is the
stand-in built from ``ztgpu/testing/stand_in_libcuda.c`` (host memory, the
same entry points, a context that costs memory, a cuMemGetInfo that
overstates, leftovers and faults on request), so the bindings, the error
mapping, the chunked allocation, both passes of the verify kernel's
semantics and the per-GPU threads all run. Each test loads a fresh copy of
the library, as a new process would. The real GPU path: tests/gpu/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztgpu.errors import GpuError
from ztgpu.gpu import cuda
from ztgpu.testing import stand_in_cuda

MIB = 1 << 20
KERNELS = Path(cuda.__file__).with_name("kernels")


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stand_in_cuda.build(tmp_path_factory.mktemp("stand-in"))


@pytest.fixture
def driver(library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[cuda.Driver]:
    for name in ("FAULT", "LEFTOVERS", "GPUS", "MEM_MIB", "MIG"):
        monkeypatch.delenv(f"ZTGPU_STANDIN_{name}", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield cuda.Driver(str(stand_in_cuda.fresh_copy(library, tmp_path)))


def test_a_wipe_covers_all_that_can_be_allocated_and_says_what_it_could_not(driver):
    reports = cuda.wipe_gpus(driver, {"GPU-a": 0, "GPU-b": 1}, "wipe")
    assert set(reports) == {"GPU-a", "GPU-b"}
    for report in reports.values():
        assert report.ok, report
        assert report.passes == ["pattern", f"verify-{cuda.PATTERN:#x}", "zero", "verify-0x0"]
        # 256 MiB, of which the wiper's context takes 24 and the verify
        # kernel's result buffer one 2 MiB page; cuMemGetInfo said 35 more
        # than could be had.
        assert report.total_bytes == 256 * MIB
        assert report.covered_bytes == 230 * MIB and report.unreachable_bytes == 26 * MIB
        assert report.free_reported_bytes == 267 * MIB
        assert report.chunks > 1  # it halved its chunk size to fit what was left
        assert re.fullmatch(r"[0-9a-f]{64}", report.digest)
        event = report.as_event()
        assert event["ok"] is True and event["unreachable_bytes"] == 26 * MIB
    # The same memory state gives the same evidence.
    assert reports["GPU-a"].digest == reports["GPU-b"].digest


def test_the_wipes_of_several_gpus_run_at_the_same_time(driver, monkeypatch):
    monkeypatch.setenv("ZTGPU_STANDIN_FAULT", "slow")  # every memset takes 50 ms
    seen: list[tuple[str, str]] = []
    real = cuda.wipe_one

    def traced(drv: cuda.Driver, ordinal: int, mode: str, gpu: str = "") -> cuda.WipeReport:
        seen.append(("start", gpu))
        try:
            return real(drv, ordinal, mode, gpu)
        finally:
            seen.append(("end", gpu))

    monkeypatch.setattr(cuda, "wipe_one", traced)
    reports = cuda.wipe_gpus(driver, {"GPU-a": 0, "GPU-b": 1}, "wipe")
    assert all(r.ok for r in reports.values()), reports
    assert [kind for kind, _ in seen[:2]] == ["start", "start"], seen  # overlapped


def test_verify_mode_finds_what_the_last_job_left_and_writes_nothing(driver, monkeypatch):
    clean = cuda.wipe_gpus(driver, {"GPU-a": 0}, "verify")["GPU-a"]
    assert clean.ok and clean.passes == ["verify-0x0"] and clean.fill_s == 0, clean
    monkeypatch.setenv("ZTGPU_STANDIN_LEFTOVERS", "1")  # no scrub on free
    dirty = cuda.wipe_gpus(driver, {"GPU-a": 0}, "verify")["GPU-a"]
    assert not dirty.ok and dirty.error is None
    assert dirty.mismatched_words == dirty.covered_bytes // 4
    assert dirty.first_mismatch_offset == 0
    assert dirty.digest != clean.digest
    # A wipe of that memory leaves zeros behind it.
    wiped = cuda.wipe_gpus(driver, {"GPU-a": 0}, "wipe")["GPU-a"]
    assert wiped.ok, wiped


def test_a_word_that_keeps_its_old_value_fails_the_wipe_of_that_gpu_only(driver, monkeypatch):
    monkeypatch.setenv("ZTGPU_STANDIN_FAULT", "stuck@1")
    reports = cuda.wipe_gpus(driver, {"GPU-a": 0, "GPU-b": 1}, "wipe")
    assert reports["GPU-a"].ok, reports["GPU-a"]
    bad = reports["GPU-b"]
    assert not bad.ok and bad.error is None
    assert bad.mismatched_words == 2  # in the pattern pass and in the zero pass
    assert bad.first_mismatch_offset is not None and bad.first_mismatch_offset % 4 == 0
    assert bad.as_event()["ok"] is False


@pytest.mark.parametrize("fault, text", [
    ("alloc@0", "no GPU memory could be allocated"),
    ("launch@0", "cuLaunchKernel failed: CUDA_ERROR_LAUNCH_FAILED (719)"),
])
def test_a_gpu_that_fails_is_reported_and_the_other_is_still_wiped(driver, monkeypatch,
                                                                    fault, text):
    monkeypatch.setenv("ZTGPU_STANDIN_FAULT", fault)
    reports = cuda.wipe_gpus(driver, {"GPU-a": 0, "GPU-b": 1}, "wipe")
    assert not reports["GPU-a"].ok and text in str(reports["GPU-a"].error), reports["GPU-a"]
    assert reports["GPU-b"].ok, reports["GPU-b"]
    # Everything it took was given back: a second wipe gets as much as the first.
    monkeypatch.delenv("ZTGPU_STANDIN_FAULT")
    again = cuda.wipe_gpus(driver, {"GPU-a": 0}, "wipe")["GPU-a"]
    assert again.ok and again.covered_bytes == reports["GPU-b"].covered_bytes


def test_driver_errors_are_named_and_a_library_that_is_not_cuda_is_refused(
        library, tmp_path, monkeypatch):
    monkeypatch.setenv("ZTGPU_STANDIN_FAULT", "init")
    with pytest.raises(cuda.CudaError, match=r"cuInit failed: CUDA_ERROR_NO_DEVICE \(100\)"):
        cuda.Driver(str(stand_in_cuda.fresh_copy(library, tmp_path)))
    with pytest.raises(GpuError, match="has no cuInit"):
        cuda.Driver("libc.so.6")
    with pytest.raises(GpuError, match="cannot load"):
        cuda.Driver(str(tmp_path / "nothing.so"))
    with pytest.raises(ValueError, match="'verify' or 'wipe'"):
        cuda.wipe_gpus(None, {}, "off")  # type: ignore[arg-type]


def test_devices_are_matched_by_pci_bus_id_not_by_order(driver, monkeypatch):
    assert driver.devices() == {"0000:17:00.0": 0, "0000:27:00.0": 1}
    assert cuda.normalise_bus_id("00000000:3B:00.0") == "0000:3b:00.0"
    assert cuda.normalise_bus_id("0000:3b:00.0") == "0000:3b:00.0"



MIG = "MIG-0a0a0a0a-0000-4000-8000-00000000000{}"


def test_a_gpu_in_mig_mode_is_wiped_instance_by_instance(library, tmp_path, monkeypatch):
    path = str(stand_in_cuda.fresh_copy(library, tmp_path))
    for name in ("FAULT", "LEFTOVERS", "GPUS", "MEM_MIB"):
        monkeypatch.delenv(f"ZTGPU_STANDIN_{name}", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    instances = [MIG.format(k) for k in range(3)]
    monkeypatch.setenv("ZTGPU_STANDIN_MIG", ",".join(f"{m}@0" for m in instances))
    # As with the real driver, a process sees one MIG device of a MIG GPU.
    assert cuda.Driver(path).devices() == {"0000:17:00.0": 0, "0000:27:00.0": 1}
    report = cuda.wipe_instances(path, instances, "wipe", "GPU-a")
    assert report.ok, report
    assert report.instances == instances and report.as_event()["instances"] == instances
    # Each instance has 84 MiB (a third of 256, in whole pages), of which
    # its wiper's context takes 24 and the result buffer 2.
    assert report.total_bytes == 3 * 84 * MIB and report.covered_bytes == 3 * 58 * MIB
    assert report.passes == ["pattern", f"verify-{cuda.PATTERN:#x}", "zero", "verify-0x0"]
    assert re.fullmatch(r"[0-9a-f]{64}", report.digest)
    assert "instances" not in cuda.wipe_gpus(cuda.Driver(path), {"GPU-b": 1},
                                             "wipe")["GPU-b"].as_event()


def test_one_mig_device_that_fails_fails_its_gpu_and_is_named(library, tmp_path, monkeypatch):
    path = str(stand_in_cuda.fresh_copy(library, tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    instances = [MIG.format(k) for k in range(2)]
    monkeypatch.setenv("ZTGPU_STANDIN_MIG", ",".join(f"{m}@0" for m in instances))
    monkeypatch.setenv("ZTGPU_STANDIN_FAULT", f"stuck@{instances[1]}")
    report = cuda.wipe_instances(path, instances, "wipe", "GPU-a")
    assert not report.ok and report.error is None
    assert report.mismatched_words == 2  # the stuck word, seen by both passes
    monkeypatch.setenv("ZTGPU_STANDIN_FAULT", f"alloc@{instances[0]}")
    report = cuda.wipe_instances(path, instances, "wipe", "GPU-a")
    assert not report.ok
    assert report.error == f"{instances[0]}: no GPU memory could be allocated", report.error
    # A MIG device the driver does not know, and no MIG device at all.
    unknown = cuda.wipe_instances(path, [MIG.format(9)], "wipe", "GPU-a")
    assert unknown.error is not None and "shows 0 devices" in unknown.error, unknown.error
    assert "no MIG device" in str(cuda.wipe_instances(path, [], "wipe", "GPU-a").error)


def test_several_mig_devices_in_one_process_are_refused(library, tmp_path, monkeypatch):
    instances = [MIG.format(k) for k in range(2)]
    monkeypatch.setenv("ZTGPU_STANDIN_MIG", ",".join(f"{m}@0" for m in instances))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(instances))
    with pytest.raises(GpuError, match="MIG devices"):
        cuda.Driver(str(stand_in_cuda.fresh_copy(library, tmp_path))).devices()


def _code_lines(ptx: str) -> list[str]:
    return [line for line in ptx.splitlines()
            if line.strip() and not line.lstrip().startswith("//")]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
def test_the_shipped_ptx_is_what_the_cu_source_compiles_to(tmp_path):
    out = tmp_path / "verify.ptx"
    subprocess.run(["nvcc", "-ptx", "-arch=compute_75", "-O3", "-o", str(out),
                    str(KERNELS / "verify.cu")], check=True, capture_output=True, timeout=300)
    fresh = re.sub(r"^\.version [0-9.]+$", ".version 7.5", out.read_text(), flags=re.M)
    assert _code_lines(fresh) == _code_lines((KERNELS / "verify.ptx").read_text()), (
        "ztgpu/gpu/kernels/verify.ptx is not what verify.cu compiles to: rebuild it as "
        "verify.cu's header says")
    # And the shipped text assembles for a Hopper GPU (H100/H200).
    subprocess.run(["ptxas", "-arch=sm_90", "-o", str(tmp_path / "verify.cubin"),
                    str(KERNELS / "verify.ptx")], check=True, capture_output=True, timeout=300)
