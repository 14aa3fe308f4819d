"""GPU telemetry tied to jobs and the allocation-aware rules, through real Slurm jobs.

The simulated backend replays the telemetry a test scripts (a JSON file the
agent reads at each look), including which processes are on a GPU: the
processes themselves are real (started here, as another user, in or out of
a job), so mapping pid -> cgroup -> job and ending a process are the real
code paths. Grants come from real jobs and the installed hooks.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import needs_slurm

from ztgpu.gpu.device_state import boot_clock_us
from ztgpu.hours import in_hours
from ztgpu.testing.collector_process import free_port
from ztgpu.testing.prometheus import (
    PrometheusServer,
    fetch_metrics,
    sample_value,
    samples,
    wait_for_series,
)
from ztgpu.testing.slurm_cluster import ClusterSpec, wait_for
from ztgpu.testing.suite_cluster import SuiteCluster, suite_cluster

pytestmark = [needs_slurm, pytest.mark.slurm]

INTERVAL_S = 0.5
GIB = 1 << 30


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuiteCluster]:
    where = tmp_path_factory.mktemp("telemetry")
    (where / "kmsg").write_text("")
    telemetry = {"interval_s": INTERVAL_S, "metrics_listen": f"127.0.0.1:{free_port()}",
                 "dcgm_job_mapping_dir": str(where / "dcgm-jobs")}
    with suite_cluster(ClusterSpec(), telemetry=telemetry,
                       gpu={"simulated_telemetry": str(where / "telemetry.json"),
                            "baseline": {"kmsg": str(where / "kmsg")}}) as running:
        yield running


@pytest.fixture(autouse=True)
def _quiet_after(suite: SuiteCluster) -> Iterator[None]:
    yield
    script(suite, {})
    suite.cluster.cancel_all()
    wait_for(lambda: suite.cluster.node_state() == "idle", 60, "idle node")


def script(suite: SuiteCluster, samples: dict[str, Any]) -> None:
    path = Path(suite.config["gpu"]["simulated_telemetry"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(samples))
    tmp.replace(path)


def uuid_of(suite: SuiteCluster, minor: int) -> str:
    return str(next(g["uuid"] for g in suite.config["gpu"]["simulated"]
                    if g["minor"] == minor))


def outside_process(user: str) -> subprocess.Popen[bytes]:
    """A process of *user* in no job (setpriv execs: the pid is the sleep's)."""
    pw = pwd.getpwnam(user)
    return subprocess.Popen(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                             "--clear-groups", "sleep", "300"])


def misuse(suite: SuiteCluster, rule: str, after: int = 0,
           timeout: float = 30) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [e for e in suite.events("gpu.misuse")
                    if e["rule"] == rule and int(e["seq"]) > after]
        return bool(found)

    wait_for(seen, timeout, f"a gpu.misuse {rule} event")
    return found[0]


def head(suite: SuiteCluster) -> int:
    events = suite.events()
    return int(events[-1]["seq"]) if events else 0


def running_job(suite: SuiteCluster, user: str = "ztalice", seconds: int = 120
                ) -> tuple[str, int]:
    job = suite.cluster.sbatch(user, f"sleep {seconds}", gpus=1)
    suite.cluster.wait_job(job, ["RUNNING"])
    suite.wait_event("isolation.verified", job)
    return job, int(suite.wait_event("job.grant", job)["gpus"][0]["minor"])


def test_a_process_of_another_user_on_a_jobs_gpu_is_ended_and_recorded(suite):
    job, minor = running_job(suite)
    intruder = outside_process("ztbob")
    try:
        start = head(suite)
        script(suite, {uuid_of(suite, minor): {"util_pct": 97, "memory_used_bytes": 30 * GIB,
                                               "power_w": 640, "pids": [intruder.pid]}})
        event = misuse(suite, "foreign_process", start)
        assert event["severity"] == "critical"
        assert event["job_id"] == job and event["user"] == "ztalice"
        assert event["processes"] == [{"pid": intruder.pid, "uid": pwd.getpwnam("ztbob").pw_uid,
                                       "command": "sleep 300", "job_id": None}], event
        assert (event["response"], event["outcome"]) == ("end_process", "ended")
        assert event["util_pct"] == 97 and event["memory_used_bytes"] == 30 * GIB
        assert intruder.wait(timeout=10) == -9
        # Recorded once while it lasts (the script still lists the dead pid).
        time.sleep(4 * INTERVAL_S)
        assert len([e for e in suite.events("gpu.misuse", job) if int(e["seq"]) > start]) == 1
        # The job itself goes on.
        assert suite.cluster.job_state(job)["JobState"] == "RUNNING"
    finally:
        intruder.kill()
        intruder.wait()


def test_the_jobs_own_processes_on_its_gpu_are_not_a_finding(suite):
    job, minor = running_job(suite)
    found = suite.cluster.slurm(["scontrol", "listpids", job], check=False)
    pids = [int(line.split()[0]) for line in found.splitlines()[1:]
            if line.split() and line.split()[0].isdigit()]
    assert pids, found
    start = head(suite)
    script(suite, {uuid_of(suite, minor): {"util_pct": 80, "pids": pids}})
    time.sleep(6 * INTERVAL_S)
    assert not [e for e in suite.events("gpu.misuse") if int(e["seq"]) > start]


def test_use_of_a_gpu_no_job_holds_ends_the_process_and_memory_alone_is_recorded(suite):
    squatter = outside_process("ztcarol")
    try:
        start = head(suite)
        script(suite, {uuid_of(suite, 3): {"util_pct": 100, "pids": [squatter.pid]}})
        event = misuse(suite, "unallocated_use", start)
        assert "job_id" not in event and event["outcome"] == "ended", event
        assert f"pid {squatter.pid}" in event["reason"] and "no job holds" in event["reason"]
        assert squatter.wait(timeout=10) == -9
        start = head(suite)
        script(suite, {uuid_of(suite, 3): {"util_pct": 0, "memory_used_bytes": 12 * GIB}})
        event = misuse(suite, "unallocated_use", start)
        assert event["outcome"] == "recorded" and "no process to end" in event["reason"]
        assert "12288 MiB used" in event["reason"], event["reason"]
    finally:
        squatter.kill()
        squatter.wait()


def test_root_processes_are_recorded_but_never_ended(suite):
    helper = subprocess.Popen(["sleep", "300"])
    try:
        start = head(suite)
        script(suite, {uuid_of(suite, 2): {"util_pct": 1, "pids": [helper.pid]}})
        event = misuse(suite, "unallocated_use", start)
        assert event["outcome"] == "spared" and "spared (uid 0)" in event["reason"], event
        assert helper.poll() is None
    finally:
        helper.kill()
        helper.wait()


def test_a_busy_gpu_whose_job_has_no_process_left_is_found(suite):
    """A grant that outlived its job's processes (its Epilog never came):
    the installed Prolog run by hand, as slurmd would, for a job with none."""
    prolog = suite.base / "libexec" / "prolog"
    bob = pwd.getpwnam("ztbob")
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "777001", "SLURM_JOB_UID": str(bob.pw_uid),
           "SLURM_JOB_USER": "ztbob", "SLURM_JOB_GPUS": "1", "SLURM_JOB_PARTITION": "gpu"}
    res = subprocess.run([str(prolog)], env=env, capture_output=True, text=True, timeout=30,
                         check=False)
    assert res.returncode == 0, res.stderr
    lingering = outside_process("ztbob")
    try:
        minor = int(suite.wait_event("job.grant", "777001")["gpus"][0]["minor"])
        start = head(suite)
        script(suite, {uuid_of(suite, minor): {"util_pct": 88, "pids": [lingering.pid]}})
        event = misuse(suite, "busy_without_job", start)
        assert event["job_id"] == "777001" and "has no process left" in event["reason"]
        assert event["outcome"] == "ended" and lingering.wait(timeout=10) == -9
        # The lingering process was also foreign to the job: one event each.
        assert misuse(suite, "foreign_process", start)["job_id"] == "777001"
    finally:
        lingering.kill()
        lingering.wait()
        epilog = suite.base / "libexec" / "epilog"
        subprocess.run([str(epilog)], env=env, capture_output=True, timeout=30, check=False)


def test_use_outside_the_allowed_hours_is_recorded_with_the_job(suite):
    now = datetime.now().astimezone()
    later, until = now + timedelta(hours=2), now + timedelta(hours=4)
    window = f"{later:%H:%M}-{until:%H:%M}"
    assert not in_hours([window], now)
    original = suite.config_path.read_text()
    config = yaml.safe_load(original)
    config["telemetry"]["allowed_hours"] = [window]
    suite.stop_agent()
    suite.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        suite.start_agent()
        job, minor = running_job(suite, user="ztcarol")
        start = head(suite)
        script(suite, {uuid_of(suite, minor): {"util_pct": 70}})
        event = misuse(suite, "off_hours", start)
        assert event["job_id"] == job and event["user"] == "ztcarol"
        assert (event["response"], event["outcome"]) == ("record", "recorded")
        assert window in event["reason"]
        assert suite.cluster.job_state(job)["JobState"] == "RUNNING"
    finally:
        suite.stop_agent()
        suite.config_path.write_text(original)
        suite.start_agent()


def test_an_xid_during_a_job_is_a_critical_event_naming_the_job(suite):
    job, minor = running_job(suite)
    gpu = next(g for g in suite.config["gpu"]["simulated"] if g["minor"] == minor)
    short = str(gpu["pci_bus_id"]).lower()[4:-2]
    kmsg = Path(suite.config["gpu"]["baseline"]["kmsg"])
    start = head(suite)
    kmsg.write_text(f"4,9,{boot_clock_us()},-;NVRM: Xid (PCI:{short}): 31, pid=4242, "
                    f"MMU Fault\n")
    try:
        def xid() -> list[dict[str, Any]]:
            return [e for e in suite.events("gpu.xid") if int(e["seq"]) > start]

        wait_for(lambda: bool(xid()), 30, "a gpu.xid event")
        event = xid()[0]
        assert event["xids"] == [31] and event["job_id"] == job and event["severity"] == "critical"
        time.sleep(4 * INTERVAL_S)
        assert len(xid()) == 1  # a log line is one event, however often it is read
    finally:
        kmsg.write_text("")


def test_a_jobs_usage_of_each_gpu_is_summed_and_recorded_at_its_release(suite):
    c = suite.cluster
    job = c.sbatch("ztalice", "sleep 4", gpus=2)
    grant = suite.wait_event("job.grant", job)
    uuids = [str(g["uuid"]) for g in grant["gpus"]]
    script(suite, {uuids[0]: {"util_pct": 60, "memory_used_bytes": 8 * GIB, "power_w": 400},
                   uuids[1]: [{"util_pct": 0}, {"util_pct": 100, "power_w": 500}]})
    c.wait_job(job, ["COMPLETED"], timeout=60)
    suite.wait_event("job.release", job, timeout=60)
    usage = {e["gpus"][0]["uuid"]: e for e in suite.events("gpu.usage", job)}
    assert set(usage) == set(uuids), usage
    first, second = usage[uuids[0]], usage[uuids[1]]
    assert first["samples"] >= 3 and first["util_max_pct"] == 60
    assert first["memory_max_bytes"] == 8 * GIB and first["partition"] == "gpu"
    assert first["energy_j"] > 0 and first["busy_s"] > 0
    # The second GPU replayed an idle sample, then a busy one that repeats.
    assert second["util_max_pct"] == 100 and 0 < second["util_mean_pct"] < 100
    # The summary comes before the GPUs are free.
    assert int(first["seq"]) < int(suite.wait_event("job.release", job)["seq"])


def test_malformed_telemetry_is_named_once_and_sampling_goes_on(suite):
    path = Path(suite.config["gpu"]["simulated_telemetry"])
    path.write_text('{"' + uuid_of(suite, 0) + '": {"util": 5}}')
    log = Path(suite.config["paths"]["log_file"])
    wait_for(lambda: "unknown sample keys util" in log.read_text(), 30, "the warning")
    time.sleep(4 * INTERVAL_S)
    assert log.read_text().count("unknown sample keys util") == 1
    squatter = outside_process("ztbob")
    try:
        start = head(suite)
        script(suite, {uuid_of(suite, 0): {"pids": [squatter.pid]}})
        assert misuse(suite, "unallocated_use", start)["outcome"] == "ended"
    finally:
        squatter.kill()
        squatter.wait()


def test_hours_windows() -> None:
    at = datetime(2026, 12, 1, 23, 30).astimezone()
    assert in_hours([], at)
    assert in_hours(["22:00-06:00"], at) and not in_hours(["07:00-22:00"], at)
    assert in_hours(["07:00-22:00"], at.replace(hour=7, minute=0))
    assert not in_hours(["07:00-22:00"], at.replace(hour=22, minute=0))
    assert in_hours(["00:00-24:00"], at)


def test_allowed_hours_and_metrics_address_are_checked_in_the_config(tmp_path) -> None:
    from ztgpu.config import load_config
    from ztgpu.errors import ConfigError

    path = tmp_path / "ztgpu.yaml"
    for bad, what in ((["7-22"], "HH:MM-HH:MM"), (["25:00-26:00"], "HH:MM-HH:MM")):
        path.write_text(yaml.safe_dump({"telemetry": {"allowed_hours": bad}}))
        with pytest.raises(ConfigError, match=what):
            load_config(str(path))
    path.write_text(yaml.safe_dump({"telemetry": {"metrics_listen": "9402"}}))
    with pytest.raises(ConfigError, match="host:port"):
        load_config(str(path))
    path.write_text(yaml.safe_dump({"telemetry": {"responses": {"xid": "panic"}}}))
    with pytest.raises(ConfigError, match="xid"):
        load_config(str(path))
    assert os.path.exists(path)


def scrape(suite: SuiteCluster) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The agent's /metrics, parsed: samples by name."""
    status, text = fetch_metrics(f"http://{suite.config['telemetry']['metrics_listen']}")
    assert status == 200, text
    return samples(text)


def test_metrics_show_each_gpu_with_the_job_and_user_holding_it(suite):
    job, minor = running_job(suite)
    uuid = uuid_of(suite, minor)
    script(suite, {uuid: {"util_pct": 75, "memory_used_bytes": 6 * GIB, "power_w": 420.5,
                          "sm_clock_mhz": 1980, "memory_total_bytes": 141 * GIB}})
    wait_for(lambda: sample_value(scrape(suite), "ztgpu_gpu_utilization_ratio", uuid=uuid) == 0.75,
             30, "the sample in /metrics")
    metrics = scrape(suite)
    labels = {"uuid": uuid, "hpc_job": job, "user": "ztalice", "minor": str(minor)}
    assert sample_value(metrics, "ztgpu_gpu_utilization_ratio", **labels) == 0.75
    assert sample_value(metrics, "ztgpu_gpu_memory_used_bytes", **labels) == 6 * GIB
    assert sample_value(metrics, "ztgpu_gpu_power_watts", **labels) == 420.5
    assert sample_value(metrics, "ztgpu_gpu_sm_clock_hertz", **labels) == 1980e6
    assert sample_value(metrics, "ztgpu_gpu_allocated", **labels) == 1
    # The other GPUs are free: no job or user on their series.
    free = [have for have, _ in metrics["ztgpu_gpu_allocated"] if have["uuid"] != uuid]
    assert len(free) == 3 and all(h["hpc_job"] == "" and h["user"] == "" for h in free)
    grants = sample_value(metrics, "ztgpu_events_total", code="job.grant", severity="info")
    assert (grants or 0) >= 1
    assert (sample_value(metrics, "ztgpu_request_duration_seconds_count", op="prolog",
                         outcome="ok") or 0) >= 1
    assert (sample_value(metrics, "ztgpu_telemetry_rounds_total") or 0) >= 1
    assert sample_value(metrics, "ztgpu_jobs") == 1
    assert sample_value(metrics, "ztgpu_node_unsafe") == 0
    # dcgm-exporter's job mapping: a file named by the GPU's NVML index.
    index = next(g["index"] for g in suite.config["gpu"]["simulated"] if g["uuid"] == uuid)
    mapping = Path(suite.config["telemetry"]["dcgm_job_mapping_dir"])
    assert sorted(p.name for p in mapping.iterdir()) == [str(index)]
    assert (mapping / str(index)).read_text() == f"{job}\n"
    suite.cluster.slurm(["scancel", job])
    suite.wait_event("job.release", job, timeout=60)
    assert list(mapping.iterdir()) == []
    assert sample_value(scrape(suite), "ztgpu_gpu_allocated", uuid=uuid, hpc_job="") == 0


def test_a_real_prometheus_scrapes_the_agent_and_sees_a_misuse(suite):
    listen = suite.config["telemetry"]["metrics_listen"]
    with PrometheusServer([{"job_name": "ztgpu-noded",
                            "static_configs": [{"targets": [listen]}]}]) as prometheus:
        job, minor = running_job(suite)
        uuid = uuid_of(suite, minor)
        intruder = outside_process("ztbob")
        try:
            script(suite, {uuid: {"util_pct": 55, "pids": [intruder.pid]}})
            found = wait_for_series(
                prometheus, f'ztgpu_gpu_utilization_ratio{{hpc_job="{job}",user="ztalice"}}')
            assert float(found[0]["value"][1]) == 0.55
            assert found[0]["metric"]["job"] == "ztgpu-noded"  # the scrape job's own label
            misuse_count = wait_for_series(
                prometheus, 'ztgpu_events_total{code="gpu.misuse"} > 0')
            assert misuse_count[0]["metric"]["severity"] == "critical"
            up = prometheus.query('up{job="ztgpu-noded"}')
            assert [float(u["value"][1]) for u in up] == [1.0]
        finally:
            intruder.kill()
            intruder.wait()


def test_ztgpu_drill_shows_each_breach_detected_answered_and_recorded(suite):
    job, _ = running_job(suite)
    res = suite.ztgpu("drill", check=False, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "drill miner: a miner-like load" in out and "held by no job" in out
    assert "drill foreign: another user's process on GPU" in out and f"of job {job}" in out
    assert out.count("response: end_process -> ended") == 2, out
    assert out.count("the process was ended") == 2
    assert "rule=unallocated_use" in out and "rule=foreign_process" in out
    assert "drill off_hours: skipped: telemetry.allowed_hours (any time) allows now" in out
    assert "drills: 3 of 3 as expected" in out
    # What the drills did is in the audit spool like any misuse.
    rules = {e["rule"] for e in suite.events("gpu.misuse")}
    assert {"unallocated_use", "foreign_process"} <= rules
    # The scripted telemetry is as it was before the drills.
    assert json.loads(Path(suite.config["gpu"]["simulated_telemetry"]).read_text()) == {}


def test_ztgpu_drill_refuses_where_telemetry_is_not_scripted(suite, tmp_path):
    config = yaml.safe_load(suite.config_path.read_text())
    config["gpu"]["simulated_telemetry"] = None
    other = tmp_path / "ztgpu.yaml"
    other.write_text(yaml.safe_dump(config, sort_keys=False))
    res = suite.ztgpu("--config", str(other), "drill", check=False)
    assert res.returncode == 2 and "run only where the agent's GPUs are simulated" in res.stderr
    res = suite.ztgpu("drill", "--user", "root", check=False)
    assert res.returncode == 2 and "spared_uids" in res.stderr


def test_misuse_reaches_the_siem_exports_through_the_collector(suite, tmp_path):
    """Node agent -> collector (mutual TLS) -> RFC 5424 over TLS to a real
    rsyslog, and JSON Lines: a gpu.misuse arrives like every other event."""
    from ztgpu.testing.collector_process import CollectorProcess, SitePki
    from ztgpu.testing.rsyslog import RsyslogReceiver

    pki = SitePki(tmp_path / "pki")
    syslog_cert, syslog_key = pki.issue("service", "siem", dns_names=["localhost"],
                                        ip_addresses=["127.0.0.1"])
    export = tmp_path / "export.jsonl"
    node_cert, node_key = pki.issue("node", str(suite.config["node"]["name"]))
    original = suite.config_path.read_text()
    with RsyslogReceiver(pki.ca_cert, syslog_cert, syslog_key) as receiver:
        collector = CollectorProcess(tmp_path / "collector", pki, collector={
            "jsonl_path": str(export),
            "syslog": {"target": f"{receiver.address}:{receiver.port}",
                       "server_name": "localhost"}})
        collector.start()
        config = yaml.safe_load(original)
        config["audit"] = {"collector_url": collector.url}
        config["tls"] = {"ca_cert": str(pki.ca_cert), "cert": str(node_cert),
                         "key": str(node_key)}
        suite.stop_agent()
        suite.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        squatter = None
        try:
            suite.start_agent()
            squatter = outside_process("ztbob")
            start = head(suite)
            script(suite, {uuid_of(suite, 1): {"util_pct": 99, "pids": [squatter.pid]}})
            event = misuse(suite, "unallocated_use", start)
            def delivered() -> list[str]:
                return [line for line in receiver.messages()
                        if " gpu.misuse " in line and f'hash="{event["hash"]}"' in line]

            wait_for(lambda: bool(delivered()), 60, "the RFC 5424 message at rsyslog")
            assert f'seq="{event["seq"]}"' in delivered()[0]
            wait_for(lambda: export.exists() and "gpu.misuse" in export.read_text(), 60,
                     "the JSON Lines export")
            exported = [json.loads(line) for line in export.read_text().splitlines()]
            # The whole spool is forwarded: earlier tests' events are there too.
            [same] = [e for e in exported if e["code"] == "gpu.misuse"
                      and e["hash"] == event["hash"]]
            assert same["processes"][0]["pid"] == squatter.pid
        finally:
            if squatter is not None:
                squatter.kill()
                squatter.wait()
            suite.stop_agent()
            suite.config_path.write_text(original)
            suite.start_agent()
            collector.stop()
