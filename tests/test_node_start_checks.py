"""Start-up checks that stop every grant on a node where the agent could not keep
its promises: a driver that may reopen GPUs behind it, a Slurm that numbers
the GPUs differently from the agent.

A real ztgpu-noded and its installed hooks on simulated GPUs; the driver's
parameters come from the simulated backend's stand-in file.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import needs_root
from test_node_agent import job_env, owner_mode

from ztgpu.testing.agent_process import standalone_agent

pytestmark = needs_root


# ---- the NVIDIA driver's device-file parameters ------------------------------

def params_text(modify: int, mode: int, uid: int = 0, gid: int = 0) -> str:
    return (f"ResmanDebugLevel: 4294967295\nModifyDeviceFiles: {modify}\n"
            f"DeviceFileUID: {uid}\nDeviceFileGID: {gid}\nDeviceFileMode: {mode}\n")


@pytest.mark.parametrize(("params", "safe"), [
    (params_text(1, 0o666), False),   # the driver default: 0666 root:root
    (params_text(1, 0o660, gid=44), False),
    (params_text(1, 0o600), True),    # recreated exactly as the rest state
    (params_text(0, 0o666), True),    # the driver leaves the files alone
    ("ModifyDeviceFiles 1\n", False),  # unreadable: not taken as safe
])
def test_a_driver_that_could_reopen_gpus_stops_every_grant(tmp_path, params, safe):
    base = Path(tempfile.mkdtemp(prefix="ztgpu-params-"))
    params_file = base / "driver-params"
    base.mkdir(exist_ok=True)
    params_file.write_text(params)
    try:
        with standalone_agent(base, gpus=2,
                              gpu={"simulated_driver_params": str(params_file)}) as agent:
            res = agent.run_hook("prolog", job_env("71", gpus="0"))
            start = agent.events("agent.start")[-1]
            if safe:
                assert res.returncode == 0, res.stderr
                assert start["outcome"] == "ok" and not agent.events("node.unsafe")
                return
            assert res.returncode == 1
            unsafe = agent.events("node.unsafe")[-1]
            assert unsafe["check"] == "driver_params" and start["outcome"] == "degraded"
            if "ModifyDeviceFiles: 1" in params:
                assert "NVreg_DeviceFileMode=0600" in res.stderr
                assert "/etc/modprobe.d/" in unsafe["reason"]
            else:
                assert "cannot tell" in unsafe["reason"]
            assert agent.events("job.refused", "71")[-1]["outcome"] == "node_unsafe"
            assert owner_mode(agent.dev_dir / "nvidia0") == (0, 0, 0o600)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- Slurm's GPU order (gres.conf File=) -----------------------------------

@pytest.mark.parametrize(("files", "safe"), [
    ("nvidia[0-3]", True),
    ("nvidia0,nvidia1,nvidia2,nvidia3", True),
    ("nvidia1,nvidia0,nvidia2,nvidia3", False),   # Slurm's gres 0 would be minor 1
    ("nvidia0,nvidia1,nvidia9,nvidia3", False),   # a file slurmd would skip
])
def test_a_slurm_that_numbers_the_gpus_differently_stops_every_grant(files, safe):
    base = Path(tempfile.mkdtemp(prefix="ztgpu-gres-"))
    try:
        dev = base / "dev"
        listed = ",".join(str(dev / name) for name in files.split(",")) \
            if "[" not in files else str(dev / files)
        base.joinpath("gres.conf").write_text(
            "# as an admin wrote it\nAutoDetect=off\n"
            f"NodeName=othernode Name=gpu File={dev}/nvidia[0-1]\n"
            f"NodeName=testnode Name=gpu File={listed}\n")
        with standalone_agent(base, gpus=4) as agent:
            res = agent.run_hook("prolog", job_env("91", gpus="0"))
            if safe:
                assert res.returncode == 0, res.stderr
                assert not agent.events("node.unsafe")
                return
            assert res.returncode == 1
            unsafe = agent.events("node.unsafe")[-1]
            assert unsafe["check"] == "gres_order"
            if "nvidia9" in files:
                assert "nvidia9" in unsafe["reason"]
            else:
                # Both mappings, side by side, so the admin sees what to fix.
                assert "gres index -> 0=minor 1, 1=minor 0" in unsafe["reason"]
                assert "agent -> 0=minor 0, 1=minor 1" in unsafe["reason"]
            assert owner_mode(agent.dev_dir / "nvidia0") == (0, 0, 0o600)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_an_unreadable_gres_conf_stops_grants_rather_than_guessing():
    base = Path(tempfile.mkdtemp(prefix="ztgpu-gres-"))
    try:
        base.mkdir(exist_ok=True)
        base.joinpath("gres.conf").write_text("NodeName=testnode Name=gpu MultipleFiles="
                                              "/dev/nvidia0,/dev/nvidia1\n")
        with standalone_agent(base, gpus=2) as agent:
            assert agent.run_hook("prolog", job_env("92", gpus="0")).returncode == 1
            reason = agent.events("node.unsafe")[-1]["reason"]
            assert reason.startswith("cannot check Slurm's GPU order") and "line 1" in reason
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- GPU memory wipes ------------------------------------------------------

def test_wipes_on_without_a_usable_cuda_driver_stop_every_grant(tmp_path_factory):
    """With wipe.mode on, a node whose libcuda cannot be loaded (or shows
    fewer GPUs than the inventory) could never clean a GPU: it grants none."""
    from ztgpu.testing import stand_in_cuda

    library = stand_in_cuda.build(tmp_path_factory.mktemp("stand-in"))
    for libcuda, gpus, problem in (("/nonexistent/libcuda.so.1", "4", "cannot load"),
                                   (str(library), "2", "shows no device at PCI")):
        base = Path(tempfile.mkdtemp(prefix="ztgpu-wipe-"))
        try:
            with pytest.MonkeyPatch.context() as env:
                env.setenv("ZTGPU_STANDIN_GPUS", gpus)
                with standalone_agent(base, gpus=4, wipe={"mode": "wipe",
                                                          "libcuda": libcuda}) as agent:
                    res = agent.run_hook("prolog", job_env("72", gpus="0"))
                    assert res.returncode == 1, res
                    unsafe = agent.events("node.unsafe")[-1]
                    assert unsafe["check"] == "wipe" and problem in unsafe["reason"], unsafe
                    assert agent.events("job.refused", "72")[-1]["outcome"] == "node_unsafe"
        finally:
            shutil.rmtree(base, ignore_errors=True)
    # With the stand-in showing all four GPUs, the same agent grants.
    base = Path(tempfile.mkdtemp(prefix="ztgpu-wipe-"))
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ZTGPU_STANDIN_GPUS", "4")
            env.setenv("ZTGPU_STANDIN_MEM_MIB", "32")
            env.setenv("ZTGPU_STANDIN_CTX_MIB", "4")
            with standalone_agent(base, gpus=4, wipe={"mode": "wipe",
                                                      "libcuda": str(library)}) as agent:
                assert agent.run_hook("prolog", job_env("73", gpus="1")).returncode == 0
                assert agent.run_hook("epilog", job_env("73", gpus="1")).returncode == 0
                wipe = agent.events("gpu.wipe", "73")
                assert [w["outcome"] for w in wipe] == ["clean"], wipe
    finally:
        shutil.rmtree(base, ignore_errors=True)
