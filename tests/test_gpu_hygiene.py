"""GPU memory hygiene between jobs, through real Slurm jobs and the installed hooks.

The private cluster's agent wipes through ``ztgpu.gpu.cuda`` with
``wipe.libcuda`` pointing at the stand-in libcuda (host memory, same entry
points; ztgpu/testing/stand_in_libcuda.c), whose GPUs sit at the PCI buses
the simulated inventory declares, so the agent maps NVML's view to CUDA's
by bus id as on a real node. Faults are the stand-in's, set in the agent's
environment when it starts: a word that keeps its old value, memory that
cannot be allocated, a driver that did not scrub (verify mode), a wipe that
never returns (the agent is then killed).
"""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_slurm

from ztgpu.gpu.device_state import boot_clock_us
from ztgpu.testing import stand_in_cuda
from ztgpu.testing.slurm_cluster import ClusterSpec, wait_for
from ztgpu.testing.suite_cluster import SuiteCluster, suite_cluster

pytestmark = [needs_slurm, pytest.mark.slurm]

STAND_IN = {"ZTGPU_STANDIN_GPUS": "4", "ZTGPU_STANDIN_MEM_MIB": "64",
            "ZTGPU_STANDIN_CTX_MIB": "8"}

#: The stand-in's settings a test may change (cleared at each agent restart).
RESET = ("ZTGPU_STANDIN_FAULT", "ZTGPU_STANDIN_LEFTOVERS", "ZTGPU_STANDIN_MIG")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuiteCluster]:
    library = stand_in_cuda.build(tmp_path_factory.mktemp("stand-in"))
    where = tmp_path_factory.mktemp("gpu-state")
    state, kmsg = where / "state.json", where / "kmsg"
    kmsg.write_text("")
    saved = {k: os.environ.get(k) for k in [*STAND_IN, *RESET]}
    os.environ.update(STAND_IN)
    try:
        with suite_cluster(ClusterSpec(), wipe={"mode": "wipe", "libcuda": str(library)},
                           gpu={"simulated_state": str(state),
                                "baseline": {"kmsg": str(kmsg)}}) as running:
            yield running
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def restart_with(suite: SuiteCluster, sig: int = signal.SIGTERM, **env: str) -> None:
    """Restart the agent with the stand-in's faults/leftovers set as given."""
    suite.stop_agent(sig)
    for key in RESET:
        os.environ.pop(key, None)
    os.environ.update(env)
    suite.start_agent()


@pytest.fixture(autouse=True)
def _healthy_after(suite: SuiteCluster) -> Iterator[None]:
    yield
    c = suite.cluster
    c.cancel_all()
    restart_with(suite)
    if "drain" in c.node_state():
        suite.ztgpu("node", "recover", check=False)
    wait_for(lambda: c.node_state() == "idle", 60, "idle node")


def run_job(suite: SuiteCluster, gpus: int = 1) -> tuple[str, list[dict[str, object]]]:
    c = suite.cluster
    job = c.sbatch("ztalice", "sleep 1", gpus=gpus)
    grant = suite.wait_event("job.grant", job, timeout=60)
    c.wait_job(job, ["COMPLETED", "FAILED", "CANCELLED"], timeout=90)
    suite.wait_event("job.release", job, timeout=60)
    return job, list(grant["gpus"])  # type: ignore[arg-type]


def test_after_a_job_each_of_its_gpus_is_wiped_and_verified_with_the_figures(suite):
    job, gpus = run_job(suite, gpus=2)
    wipes = suite.events("gpu.wipe", job)
    assert sorted(w["gpus"][0]["uuid"] for w in wipes) == sorted(g["uuid"] for g in gpus)
    for wipe in wipes:
        assert wipe["mode"] == "wipe" and wipe["outcome"] == "clean" and wipe["ok"] is True
        assert wipe["passes"] == "pattern,verify-0xa5c35a3c,zero,verify-0x0"
        # 64 MiB GPUs: the wiper's context (8) and its result page (2) unreachable.
        assert wipe["covered_bytes"] == 54 << 20 and wipe["unreachable_bytes"] == 10 << 20
        assert wipe["mismatched_words"] == 0 and len(str(wipe["digest"])) == 64
        assert wipe["context"] == "release"
        # What an auditor reads in the trail's reason column.
        assert str(wipe["reason"]).startswith("wipe: 0.05 GiB covered, 10 MiB not reachable")
    release = suite.wait_event("job.release", job)
    assert release["outcome"] == "released"
    # The wipe came before the GPUs were free again.
    assert max(int(w["seq"]) for w in wipes) < int(release["seq"])


def test_a_wipe_that_fails_verification_keeps_the_gpu_out_until_a_wipe_succeeds(suite):
    restart_with(suite, ZTGPU_STANDIN_FAULT="stuck")
    job, gpus = run_job(suite)
    failed = suite.wait_event("gpu.wipe_failed", job)
    assert failed["severity"] == "critical" and failed["outcome"] == "dirty"
    # One stuck word, seen by the pattern pass and by the zero pass.
    assert "2 words did not read back as written" in str(failed["reason"])
    assert "not granted again until a wipe succeeds" in str(failed["reason"])
    assert suite.wait_event("job.release", job)["outcome"] == "dirty"
    c = suite.cluster
    wait_for(lambda: "drain" in c.node_state(), 30, "the node drained")
    minor = int(str(gpus[0]["minor"]))
    state = Path(suite.config["paths"]["state_dir"]) / "state.db"
    with sqlite3.connect(state) as db:
        assert [r[0] for r in db.execute("SELECT minor FROM dirty")] == [minor]
    # recover wipes it again (the stand-in's stuck word was the first
    # allocation only) and resumes the node; the GPU is granted again.
    res = suite.ztgpu("node", "recover", check=False)
    assert res.returncode == 0, (res.stdout, res.stderr)
    again = [w for w in suite.events("gpu.wipe") if w["gpus"][0]["minor"] == minor]
    assert again and again[-1]["context"] == "dirty at ztgpu node recover", again[-1:]
    next_job, _ = run_job(suite, gpus=4)
    assert suite.events("job.grant", next_job)


def test_a_gpu_that_cannot_allocate_is_a_failed_wipe(suite):
    restart_with(suite, ZTGPU_STANDIN_FAULT="alloc")
    job, _ = run_job(suite)
    failed = suite.wait_event("gpu.wipe_failed", job)
    assert "no GPU memory could be allocated" in str(failed["reason"])
    c = suite.cluster
    wait_for(lambda: "drain" in c.node_state(), 30, "the node drained")


def test_verify_mode_catches_a_driver_that_did_not_scrub(suite):
    suite.stop_agent()
    config = suite.config_path.read_text().replace("mode: wipe", "mode: verify")
    suite.config_path.write_text(config)
    try:
        restart_with(suite, ZTGPU_STANDIN_LEFTOVERS="1")
        job, _ = run_job(suite)
        failed = suite.wait_event("gpu.wipe_failed", job)
        assert failed["mode"] == "verify"
        assert "were not zero" in str(failed["reason"]) and "did not scrub" in str(
            failed["reason"])
        assert failed["mismatched_words"] == failed["covered_bytes"] // 4
    finally:
        suite.stop_agent()
        suite.config_path.write_text(config.replace("mode: verify", "mode: wipe"))
        suite.start_agent()


def test_a_wipe_cut_short_by_a_crash_leaves_the_gpu_dirty_across_restart_and_reboot(suite):
    restart_with(suite, ZTGPU_STANDIN_FAULT="hang")
    c = suite.cluster
    job = c.sbatch("ztalice", "sleep 1", gpus=1)
    grant = suite.wait_event("job.grant", job, timeout=60)
    minor = int(str(grant["gpus"][0]["minor"]))
    state = Path(suite.config["paths"]["state_dir"]) / "state.db"

    def dirty() -> list[int]:
        with sqlite3.connect(state) as db:
            return [r[0] for r in db.execute("SELECT minor FROM dirty")]

    wait_for(lambda: dirty() == [minor], 60, "the wipe to start (GPU marked dirty)")
    suite.stop_agent(signal.SIGKILL)  # in the middle of the wipe
    assert dirty() == [minor]
    with sqlite3.connect(state) as db:  # and as if the node had rebooted
        db.execute("UPDATE meta SET value = 'another-boot' WHERE key = 'boot_id'")
    restart_with(suite, signal.SIGTERM)
    assert dirty() == [minor]  # a reboot forgets the grants, not the dirty mark
    assert not [w for w in suite.events("gpu.wipe") if w["gpus"][0]["minor"] == minor
                and w.get("job_id") == job]
    # The next job that gets that GPU has it wiped first.
    wait_for(lambda: c.job_state(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED",
                                                          None, ""), 90, "the first job gone")
    suite.ztgpu("node", "recover", check=False)
    assert dirty() == []
    wiped = [w for w in suite.events("gpu.wipe") if w["gpus"][0]["minor"] == minor]
    assert wiped and wiped[-1]["job_id"] == job, wiped[-1:]
    assert wiped[-1]["context"] == "dirty at ztgpu node recover"


def _bus(suite: SuiteCluster, uuid: str) -> str:
    gpu = next(g for g in suite.config["gpu"]["simulated"] if g["uuid"] == uuid)
    return str(gpu["pci_bus_id"])


def test_a_gpu_setting_the_job_changed_is_put_back_and_an_xid_drains_the_node(suite):
    import json

    state = Path(suite.config["gpu"]["simulated_state"])
    kmsg = Path(suite.config["gpu"]["baseline"]["kmsg"])
    baseline = {"compute_mode": "default", "app_clocks": [2619, 1980],
                "default_app_clocks": [2619, 1980], "ecc_uncorrected": 0,
                "remapped_rows_pending": False}
    state.write_text(json.dumps({g["uuid"]: baseline for g in suite.config["gpu"]["simulated"]}))
    now_us = boot_clock_us()
    try:
        c = suite.cluster
        job = c.sbatch("ztalice", "sleep 3", gpus=1)
        uuid = str(suite.wait_event("job.grant", job, timeout=60)["gpus"][0]["uuid"])
        # What the job does to its GPU (as `nvidia-smi -c 3 -ac 2619,1000` would).
        states = json.loads(state.read_text())
        states[uuid] = {**baseline, "compute_mode": "exclusive_process",
                        "app_clocks": [2619, 1000]}
        state.write_text(json.dumps(states))
        # An Xid of that GPU from before the job does not count.
        short = _bus(suite, uuid).lower()[4:-2]
        kmsg.write_text(f"3,100,{now_us - 60_000_000},-;NVRM: Xid (PCI:{short}): 13, pid=1\n")
        c.wait_job(job, ["COMPLETED"], timeout=60)
        release = suite.wait_event("job.release", job, timeout=60)
        assert release["outcome"] == "released", release
        restored = {(e["setting"], e["was"], e["now"]) for e in suite.events("gpu.state", job)}
        assert restored == {("compute_mode", "exclusive_process", "default"),
                            ("app_clocks", "(2619, 1000)", "(2619, 1980)")}, restored
        assert json.loads(state.read_text())[uuid]["compute_mode"] == "default"
        assert not suite.events("gpu.unhealthy", job)

        # An Xid during the next job, and a row remapping left pending.
        job = c.sbatch("ztalice", "sleep 3", gpus=1)
        uuid = str(suite.wait_event("job.grant", job, timeout=60)["gpus"][0]["uuid"])
        short = _bus(suite, uuid).lower()[4:-2]
        stamp = boot_clock_us()
        with kmsg.open("a") as log:
            log.write(f"4,101,{stamp},-;NVRM: Xid (PCI:{short}): 79, pid=4242, GPU has "
                      f"fallen off the bus.\n")
        states = json.loads(state.read_text())
        states[uuid] = {**baseline, "remapped_rows_pending": True}
        state.write_text(json.dumps(states))
        c.wait_job(job, ["COMPLETED"], timeout=60)
        release = suite.wait_event("job.release", job, timeout=60)
        assert release["outcome"] == "unhealthy", release
        checks = {e["check"]: e for e in suite.events("gpu.unhealthy", job)}
        assert set(checks) == {"xid", "remapped_rows"}, checks
        assert "Xid 79" in str(checks["xid"]["reason"]) and uuid in str(checks["xid"]["reason"])
        assert checks["xid"]["severity"] == "critical"
        wait_for(lambda: "drain" in c.node_state(), 30, "the node drained")
    finally:
        gpus = suite.config["gpu"]["simulated"]
        state.write_text(json.dumps({g["uuid"]: baseline for g in gpus}))
        kmsg.write_text("")


def test_what_the_grant_learned_outlives_an_agent_crash_during_the_job(suite):
    """The partition's wipe mode, the grant's place in the kernel log and its
    ECC counts are kept in the state: a release after a restart still wipes
    as the partition says, and counts only the job's Xid and ECC errors."""
    import json

    import yaml

    state = Path(suite.config["gpu"]["simulated_state"])
    kmsg = Path(suite.config["gpu"]["baseline"]["kmsg"])
    gpus = suite.config["gpu"]["simulated"]
    # Two uncorrectable errors on every GPU from before: not this job's.
    state.write_text(json.dumps({g["uuid"]: {"ecc_uncorrected": 2} for g in gpus}))
    suite.stop_agent()
    original = suite.config_path.read_text()
    config = yaml.safe_load(original)
    config["wipe"]["partitions"] = {"gpu": "verify"}
    suite.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        suite.start_agent()
        c = suite.cluster
        job = c.sbatch("ztalice", "sleep 6", gpus=1)
        uuid = str(suite.wait_event("job.grant", job, timeout=60)["gpus"][0]["uuid"])
        suite.wait_event("isolation.verified", job)  # its step runs (its TaskProlog ran)
        short = _bus(suite, uuid).lower()[4:-2]
        kmsg.write_text(f"4,7,{boot_clock_us()},-;NVRM: Xid (PCI:{short}): 48, pid=77, "
                        f"DBE (double bit error)\n")
        state.write_text(json.dumps({g["uuid"]: {"ecc_uncorrected": 3 if g["uuid"] == uuid
                                                 else 2} for g in gpus}))
        suite.stop_agent(signal.SIGKILL)
        suite.start_agent()  # the job still runs: its grant is restored
        end = c.wait_job(job, ["COMPLETED", "FAILED", "CANCELLED"], timeout=60)
        assert end["JobState"] == "COMPLETED"
        assert suite.wait_event("job.release", job, timeout=60)["outcome"] == "unhealthy"
        wipe = suite.wait_event("gpu.wipe", job)
        assert wipe["mode"] == "verify" and wipe["passes"] == "verify-0x0", wipe
        checks = {e["check"]: str(e["reason"]) for e in suite.events("gpu.unhealthy", job)}
        assert set(checks) == {"xid", "ecc"}, checks
        assert "Xid 48" in checks["xid"]
        assert f"1 volatile uncorrectable ECC errors during job {job} (3 since the driver " \
               f"loaded)" in checks["ecc"], checks["ecc"]
        # Errors from before a grant drain nothing: a job on all four is healthy.
        suite.ztgpu("node", "recover", check=False)
        wait_for(lambda: c.node_state() == "idle", 60, "idle node")
        other = c.sbatch("ztalice", "sleep 1", gpus=4)
        suite.wait_event("job.grant", other, timeout=60)
        c.wait_job(other, ["COMPLETED"], timeout=60)
        assert suite.wait_event("job.release", other, timeout=60)["outcome"] == "released"
    finally:
        suite.stop_agent()
        suite.config_path.write_text(original)
        state.write_text(json.dumps({g["uuid"]: {} for g in gpus}))
        kmsg.write_text("")
        suite.start_agent()


def test_a_gpu_in_mig_mode_is_wiped_device_by_device_and_a_failure_names_the_device(suite):
    """NVML (here the simulated state) lists the GPU's MIG devices; the stand-in
    gives each its share of the GPU's memory, one per process."""
    import json

    state = Path(suite.config["gpu"]["simulated_state"])
    gpu = suite.config["gpu"]["simulated"][0]
    mig = [f"MIG-5e5e5e5e-0000-4000-8000-00000000000{k}" for k in range(2)]
    state.write_text(json.dumps({gpu["uuid"]: {"mig_devices": mig}}))
    try:
        restart_with(suite, ZTGPU_STANDIN_MIG=",".join(f"{m}@0" for m in mig))
        job, _ = run_job(suite, gpus=4)
        wipes = {w["gpus"][0]["uuid"]: w for w in suite.events("gpu.wipe", job)}
        assert len(wipes) == 4, wipes
        by_device = wipes[gpu["uuid"]]
        assert by_device["instances"] == mig and by_device["ok"] is True
        # 64 MiB split in two: 32 each, of which each wiper's context takes 8
        # and its result buffer 2.
        assert by_device["covered_bytes"] == 2 * 22 << 20, by_device
        assert str(by_device["reason"]).startswith("wipe of 2 MIG devices: 0.04 GiB covered")
        assert all("instances" not in w for u, w in wipes.items() if u != gpu["uuid"])

        restart_with(suite, ZTGPU_STANDIN_MIG=",".join(f"{m}@0" for m in mig),
                     ZTGPU_STANDIN_FAULT=f"alloc@{mig[1]}")
        job, _ = run_job(suite, gpus=4)
        failed = suite.wait_event("gpu.wipe_failed", job)
        assert failed["gpus"][0]["uuid"] == gpu["uuid"]  # type: ignore[index]
        assert f"{mig[1]}: no GPU memory could be allocated" in str(failed["reason"])
        assert suite.wait_event("job.release", job)["outcome"] == "dirty"

        # Whether a GPU is in MIG mode cannot be told: no wipe of it is trusted.
        state.write_text(json.dumps({}))  # MIG off again: recover wipes it whole
        restart_with(suite)
        assert suite.ztgpu("node", "recover", check=False).returncode == 0
        wait_for(lambda: suite.cluster.node_state() == "idle", 60, "idle node")
        state.write_text("{not json")
        job, _ = run_job(suite, gpus=1)
        failed = suite.wait_event("gpu.wipe_failed", job)
        assert "cannot tell whether it is in MIG mode" in str(failed["reason"]), failed
    finally:
        state.write_text(json.dumps({}))


def test_the_audit_trail_of_a_job_at_the_collector_shows_its_wipes(suite):
    """What an auditor runs: ``ztgpu audit trail --job J`` against the
    collector the agent forwards to lists the wipe of each of the job's GPUs."""
    import yaml

    from ztgpu.testing.collector_process import audit_site

    original = suite.config_path.read_text()
    with audit_site(str(suite.config["node"]["name"])) as site:
        config = yaml.safe_load(original)
        config.update(site.node_config)
        suite.stop_agent()
        suite.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        try:
            restart_with(suite)
            job, _ = run_job(suite, gpus=2)
            out = ""

            def listed() -> bool:
                nonlocal out
                res = suite.ztgpu("audit", "trail", "--job", job, *site.auditor_args,
                                  check=False)
                out = res.stdout
                return "job.release" in out

            wait_for(listed, 60, f"job {job}'s release at the collector")
            rows = [line for line in out.splitlines() if "gpu.wipe" in line]
            assert len(rows) == 2, out
            assert all("wipe: 0.05 GiB covered, 10 MiB not reachable" in r for r in rows), out
            lines = out.splitlines()
            grant = next(i for i, line in enumerate(lines) if "job.grant" in line)
            release = next(i for i, line in enumerate(lines) if "job.release" in line)
            assert all(grant < lines.index(r) < release for r in rows), out
        finally:
            suite.stop_agent()
            suite.config_path.write_text(original)
            suite.start_agent()
