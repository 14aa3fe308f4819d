"""The job gate (PrologSlurmctld): env and squeue parsing, the authd exchange, the
installer, and the whole path on a real Slurm cluster with a stub authd.

The stub authd is a small TLS 1.3 server (certificates from a private site
CA) that answers ``POST /v1/gate`` as authd does and, like authd, holds the
jobs it denies for MFA through ``scontrol`` (``SlurmJobHolder`` over
``CliSlurmClient``).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import needs_slurm
from ztgpu.slurm_plugins import gate
from ztgpu.slurm_plugins.gate import (
    EXIT_ALLOW,
    EXIT_DENY,
    GateFault,
    GateSettings,
    gpus_in_alloc,
    gpus_in_tres,
    parse_gate_env,
    parse_squeue,
    parse_time_limit,
    run_gate,
    verdict_from_reply,
)

from ztgpu.config import Config, parse_config
from ztgpu.errors import ConfigError, InputRejected, UsageError
from ztgpu.slurm.conf import gate_changes
from ztgpu.slurm.conf import install as install_slurm_conf
from ztgpu.slurm.hooks_install import gate_path, render_gate, write_gate
from ztgpu.testing.collector_process import SitePki, free_port

ME = pwd.getpwuid(os.getuid())
MFA_REASON = "MFA session required \u2014 run `ztgpu login`"
ZTGPU = str(Path(sys.executable).with_name("ztgpu"))


# ---- a stub authd -----------------------------------------------------------------

class StubAuthd:
    """``POST /v1/gate`` over mutual TLS 1.3; denies (mfa_required) until ``allow(user)``."""

    def __init__(self, pki: SitePki, port: int | None = None) -> None:
        from ztgpu.trust.pki import server_context

        self.port = port or free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        cert, key = pki.issue("service", "authd", dns_names=["localhost"],
                              ip_addresses=["127.0.0.1"])
        self.context = server_context(pki.ca_cert, cert, key)
        self.allowed: set[str] = set()
        #: user -> (code, reason) for denials other than the default MFA one.
        self.denials: dict[str, tuple[str, str]] = {}
        self.requests: list[dict[str, Any]] = []
        self.holder: Any = None
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def allow(self, user: str) -> None:
        with self.lock:
            self.allowed.add(user)

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        user = body["user"]
        with self.lock:
            if user in self.allowed:
                return {"allow": True, "code": "allowed", "reason": "allowed", "rule": "r"}
            code, reason = self.denials.get(user, ("mfa_required", MFA_REASON))
        if code in ("mfa_required", "mfa_too_old") and self.holder is not None:
            self.holder.hold(body["job_id"], f"ztgpu: {reason}")
        return {"allow": False, "code": code, "reason": reason, "rule": "r"}

    def requests_for(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["job_id"] == job_id]

    def start(self) -> None:
        from ztgpu.authd.service import HttpRefusal, job_request
        from ztgpu.trust.pki import identity_from_der

        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                assert isinstance(self.connection, ssl.SSLSocket)
                der = self.connection.getpeercert(binary_form=True)
                role = identity_from_der(der).role if der else None
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                try:
                    if self.path != "/v1/gate" or role != "controller":
                        raise HttpRefusal(403, "a controller certificate is required", "forbidden")
                    job_request(body)  # authd's own validation of the contract
                    status, reply = 200, stub.answer(body)
                except HttpRefusal as exc:
                    status, reply = exc.status, {"error": exc.message, "code": exc.code}
                with stub.lock:
                    stub.requests.append({**body, "_status": status, "_reply": reply})
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.socket = self.context.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.server = server

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture(scope="module")
def pki() -> Iterator[SitePki]:
    base = Path(tempfile.mkdtemp(prefix="ztgpu-gate-pki-"))
    try:
        yield SitePki(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def stub(pki: SitePki) -> Iterator[StubAuthd]:
    server = StubAuthd(pki)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---- the environment --------------------------------------------------------------

def gate_env(**over: str | None) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_UID": str(ME.pw_uid), "SLURM_JOB_USER": ME.pw_name,
           "SLURM_JOB_PARTITION": "gpu", "SLURM_JOB_ACCOUNT": "(null)",
           "SLURM_SCRIPT_CONTEXT": "prolog_slurmctld"}
    for key, value in over.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def test_env_is_read_and_slurms_null_account_is_none() -> None:
    job = parse_gate_env(gate_env())
    assert (job.job_id, job.uid, job.user) == ("42", ME.pw_uid, ME.pw_name)
    assert job.partition == "gpu" and job.account is None
    job = parse_gate_env(gate_env(SLURM_JOB_ACCOUNT="physics", SLURM_JOB_PARTITION=None))
    assert job.account == "physics" and job.partition is None


@pytest.mark.parametrize("over, names", [
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID"),
    ({"SLURM_JOB_ID": ""}, "SLURM_JOB_ID"),
    ({"SLURM_JOB_ID": "0"}, "SLURM_JOB_ID"),
    ({"SLURM_JOB_ID": "12a"}, "SLURM_JOB_ID"),
    ({"SLURM_JOB_ID": "-5"}, "SLURM_JOB_ID"),
    ({"SLURM_JOB_ID": "\uff11\uff12"}, "SLURM_JOB_ID"),  # full-width digits
    ({"SLURM_JOB_ID": "99999999999"}, "SLURM_JOB_ID"),
    ({"SLURM_JOB_ID": "42 --help"}, "SLURM_JOB_ID"),
    ({"SLURM_JOB_UID": None}, "SLURM_JOB_UID"),
    ({"SLURM_JOB_UID": "root"}, "SLURM_JOB_UID"),
    ({"SLURM_JOB_UID": "-1"}, "SLURM_JOB_UID"),
    ({"SLURM_JOB_UID": "007"}, "SLURM_JOB_UID"),
    ({"SLURM_JOB_USER": None}, "SLURM_JOB_USER"),
    ({"SLURM_JOB_USER": "Bad User"}, "SLURM_JOB_USER"),
    ({"SLURM_JOB_USER": "ztgpu-no-such-user"}, "SLURM_JOB_USER"),
    ({"SLURM_JOB_PARTITION": "gpu;reboot"}, "SLURM_JOB_PARTITION"),
    ({"SLURM_JOB_ACCOUNT": "a" * 65}, "SLURM_JOB_ACCOUNT"),
])
def test_malformed_env_is_rejected_naming_the_variable(over: dict[str, str | None],
                                                       names: str) -> None:
    with pytest.raises(InputRejected, match=names):
        parse_gate_env(gate_env(**over))


def test_array_tasks_and_het_components_are_selected_exactly() -> None:
    assert parse_gate_env(gate_env()).selector == "42"
    task = parse_gate_env(gate_env(SLURM_ARRAY_JOB_ID="40", SLURM_ARRAY_TASK_ID="2"))
    assert (task.job_id, task.selector) == ("42", "40_2")
    het = parse_gate_env(gate_env(SLURM_HET_JOB_ID="41", SLURM_HET_JOB_OFFSET="1"))
    assert het.selector == "41+1"


@pytest.mark.parametrize("over", [
    {"SLURM_ARRAY_JOB_ID": "40"}, {"SLURM_ARRAY_TASK_ID": "2"},
    {"SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "2,3"},
    {"SLURM_ARRAY_JOB_ID": "4 0", "SLURM_ARRAY_TASK_ID": "2"},
    {"SLURM_HET_JOB_ID": "41", "SLURM_HET_JOB_OFFSET": "-1"},
])
def test_half_or_garbled_array_variables_are_rejected(over: dict[str, str]) -> None:
    with pytest.raises(InputRejected, match=r"SLURM_(ARRAY|HET)"):
        parse_gate_env(gate_env(**over))


def test_user_must_match_uid() -> None:
    other = ME.pw_uid + 1 if ME.pw_uid < 60000 else 1
    with pytest.raises(InputRejected, match="has uid"):
        parse_gate_env(gate_env(SLURM_JOB_UID=str(other)))


# ---- counting GPUs from squeue (lines recorded from Slurm 22.05.8) -------------------

RECORDED = [
    # (sbatch options, squeue line, GPUs, time limit)
    ("--gres=gpu:2", "1|1|*|N/A|gres:gpu:2|N/A|N/A|cpu=1,node=1,billing=1|UNLIMITED|(null)|\n",
     2, None),
    ("--gres=gpu", "1|1|*|N/A|gres:gpu|N/A|N/A|cpu=1,node=1,billing=1|UNLIMITED|(null)|\n",
     1, None),
    ("--gpus=3", "1|1|*|gres:gpu:3|N/A|N/A|N/A|cpu=1,node=1,billing=1|UNLIMITED|(null)|\n",
     3, None),
    ("--gpus-per-task=1 -n2",
     "1|2|*|N/A|N/A|N/A|gres:gpu:1|cpu=2,node=1,billing=2|UNLIMITED|(null)|\n", 2, None),
    ("--gpus-per-socket=1 --sockets-per-node=1",
     "1|1|1|N/A|N/A|gres:gpu:1|N/A|cpu=1,node=1,billing=1|UNLIMITED|(null)|\n", 1, None),
    ("--gres=gpu:1 --time=1-02:03:04",
     "1|1|*|N/A|gres:gpu:1|N/A|N/A|cpu=1,node=1,billing=1|1-02:04:00|(null)|\n", 1, 93840.0),
    ("--gpus=1 --gres=gpu:1 --time=5",
     "1|1|*|gres:gpu:1|gres:gpu:1|N/A|N/A|cpu=1,node=1,billing=1|5:00|(null)|\n", 1, 300.0),
    ("(no GPU)", "1|1|*|N/A|N/A|N/A|N/A|cpu=1,node=1,billing=1|UNLIMITED|(null)|\n", 0, None),
]


@pytest.mark.parametrize("options, line, gpus, limit", RECORDED)
def test_recorded_squeue_lines(options: str, line: str, gpus: int, limit: float | None) -> None:
    res = parse_squeue(line)
    assert (res.gpus, res.time_limit_s, res.admin_comment) == (gpus, limit, ""), options


def test_admin_comment_is_read_whole_even_with_the_separator_in_it() -> None:
    # Recorded: AdminComment set by an operator, with a '|' in it.
    line = ("1|1|*|N/A|gres:gpu:1|N/A|N/A|cpu=1,node=1,billing=1|UNLIMITED|"
            "ztgpu: MFA session required | run `ztgpu login`|\n")
    assert parse_squeue(line).admin_comment == "ztgpu: MFA session required | run `ztgpu login`"


def test_nodes_multiply_per_node_and_the_allocation_wins_when_larger() -> None:
    assert parse_squeue("2|2|*|N/A|gres:gpu:4|N/A|N/A|cpu=2|UNLIMITED|(null)|").gpus == 8
    # Synthesized: with AccountingStorageTRES=gres/gpu Slurm lists the
    # allocated count in tres-alloc.
    line = "1|1|*|N/A|gres:gpu|N/A|N/A|cpu=1,node=1,gres/gpu=3|UNLIMITED|(null)|"
    assert parse_squeue(line).gpus == 3


@pytest.mark.parametrize("spec, count", [
    ("N/A", 0), ("", 0),
    ("gres:gpu:2", 2), ("gres:gpu", 1), ("gres:gpu:a100:2", 2), ("gres:gpu:a100", 1),
    ("gres/gpu:2", 2), ("gres/gpu=2", 2), ("cpu=2,gres/gpu=1", 1),
    ("gres:gpu:1,gres:nic:1", 1), ("gres:nic:4", 0), ("gres:mps:50", 1), ("gres:shard:2", 1),
    ("gres:gpu:0", 0), ("gres:gpu:1k", 1024),
])
def test_gpus_in_tres(spec: str, count: int) -> None:
    assert gpus_in_tres(spec) == count


@pytest.mark.parametrize("spec", [
    "gres:gpu:2;reboot", "gres::2", "gres:gpu::", "gres:gpu:1,", "gres:gpu 2",
    "gres:gpu:9999999", "gres:gp\u00fc:1",
])
def test_garbage_tres_is_rejected(spec: str) -> None:
    with pytest.raises(InputRejected):
        gpus_in_tres(spec)


def test_gpus_in_alloc() -> None:
    assert gpus_in_alloc("cpu=1,node=1,billing=1") is None
    assert gpus_in_alloc("cpu=1,gres/gpu=2,gres/gpu:a100=2") == 2
    assert gpus_in_alloc("cpu=1,gres/gpu:a100=2,gres/gpu:v100=1") == 3


@pytest.mark.parametrize("text, seconds", [
    ("UNLIMITED", None), ("5:00", 300.0), ("02:00:00", 7200.0), ("1-02:04:00", 93840.0),
    ("0:00", None),
])
def test_time_limits(text: str, seconds: float | None) -> None:
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize("text", ["abc", "1-5:00", "5", "1:2:3:4", "-1:00", "1-", ""])
def test_garbage_time_limits_are_rejected(text: str) -> None:
    with pytest.raises(InputRejected):
        parse_time_limit(text)


@pytest.mark.parametrize("line", [
    "", "\n",
    "1|1|*|N/A|gres:gpu:2|N/A|N/A|cpu=1|UNLIMITED|(null)|\n1|1|*|N/A|N/A|N/A|N/A|x|5:00|(null)|",
    "1|1|*|N/A|gres:gpu:2|N/A",
    "x|1|*|N/A|gres:gpu:2|N/A|N/A|cpu=1|UNLIMITED|(null)|",
    "1|1|*|N/A|N/A|gres:gpu:1|N/A|cpu=1|UNLIMITED|(null)|",  # per socket, sockets unknown
    "1|x|*|N/A|N/A|N/A|gres:gpu:1|cpu=1|UNLIMITED|(null)|",  # per task, tasks unknown
    "1|1|*|N/A|gres:gpu:2|N/A|N/A|cpu=1|soon|(null)|",
    "slurm_load_jobs error: Invalid job id specified",
])
def test_malformed_squeue_output_is_rejected(line: str) -> None:
    with pytest.raises(InputRejected):
        parse_squeue(line)


# ---- authd's reply ------------------------------------------------------------------

def test_replies_map_to_verdicts() -> None:
    allow = verdict_from_reply(200, b'{"allow": true, "code": "allowed", "reason": "ok", '
                                    b'"rule": "r"}')
    assert allow.allow is True
    deny = verdict_from_reply(200, json.dumps({"allow": False, "code": "mfa_required",
                                               "reason": MFA_REASON, "rule": "r"}).encode())
    assert (deny.allow, deny.code, deny.reason) == (False, "mfa_required", MFA_REASON)
    refused = verdict_from_reply(403, b'{"error": "a node certificate may not", '
                                      b'"code": "forbidden"}')
    assert refused.allow is False and refused.code == "forbidden"
    assert "ask your admins" in refused.reason and "node certificate" in refused.detail


@pytest.mark.parametrize("status, raw", [
    (200, b'{"allow": "true", "code": "allowed", "reason": "ok"}'),
    (200, b'{"allow": 1, "code": "allowed", "reason": "ok"}'),
    (200, b"not json"), (200, b""), (200, b"[]"),
    (500, b'{"error": "boom"}'), (502, b""),
])
def test_unusable_replies_are_faults_never_allow(status: int, raw: bytes) -> None:
    with pytest.raises(GateFault):
        verdict_from_reply(status, raw)


# ---- the gate end to end, with fake Slurm commands and the stub authd ------------------

class FakeSlurm:
    """squeue printing a canned line; scontrol recording its arguments."""

    def __init__(self, base: Path, line: str, squeue_rc: int = 0) -> None:
        self.base = base
        self.calls = base / "calls"
        self.squeue = base / "squeue"
        self.scontrol = base / "scontrol"
        (base / "line").write_text(line)
        self.squeue.write_text(f"#!/bin/sh\necho \"squeue $*\" >> {self.calls}\n"
                               f"cat {base / 'line'}\nexit {squeue_rc}\n")
        self.scontrol.write_text(f"#!/bin/sh\necho \"scontrol $*\" >> {self.calls}\n")
        for path in (self.squeue, self.scontrol):
            path.chmod(0o755)

    def log(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


GPU_LINE = "1|1|*|N/A|gres:gpu:2|N/A|N/A|cpu=1,node=1,billing=1|2:00:00|(null)|\n"
NO_GPU_LINE = "1|1|*|N/A|N/A|N/A|N/A|cpu=1,node=1,billing=1|UNLIMITED|(null)|\n"


def settings_for(pki: SitePki, url: str, slurm: FakeSlurm, **over: Any) -> GateSettings:
    cert, key = pki.issue("controller", "slurmctld")
    args: dict[str, Any] = {"authd_url": url, "ca_cert": str(pki.ca_cert), "cert": str(cert),
                            "key": str(key), "squeue": str(slurm.squeue),
                            "scontrol": str(slurm.scontrol), "slurm_conf": "/nonexistent.conf",
                            "timeout_s": 3.0, "unreachable": "deny"}
    args.update(over)
    return GateSettings(**args)


def closed_port_url() -> str:
    return f"https://127.0.0.1:{free_port()}"


def test_gpu_less_job_is_allowed_without_asking_authd(tmp_path: Path, pki: SitePki,
                                                      stub: StubAuthd) -> None:
    slurm = FakeSlurm(tmp_path, NO_GPU_LINE)
    assert run_gate(gate_env(), settings_for(pki, stub.url, slurm)) == EXIT_ALLOW
    assert stub.requests == []
    assert slurm.log() == [f"squeue -h -j 42 -O {','.join(f + ':|' for f in gate.SQUEUE_FIELDS)}"]


def test_allowed_gpu_job_sends_the_documented_request(tmp_path: Path, pki: SitePki,
                                                      stub: StubAuthd) -> None:
    stub.allow(ME.pw_name)
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    assert run_gate(gate_env(), settings_for(pki, stub.url, slurm)) == EXIT_ALLOW
    (request,) = stub.requests
    assert request["_status"] == 200
    body = {k: v for k, v in request.items() if not k.startswith("_")}
    assert body == {"job_id": "42", "uid": ME.pw_uid, "user": ME.pw_name, "partition": "gpu",
                    "account": None, "gpus_count": 2, "time_limit_s": 7200.0,
                    "array_job_id": None}
    assert not any(call.startswith("scontrol") for call in slurm.log())


def test_mfa_denial_exits_non_zero_and_leaves_the_hold_to_authd(tmp_path: Path, pki: SitePki,
                                                                 stub: StubAuthd,
                                                                 capfd: Any) -> None:
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    assert run_gate(gate_env(), settings_for(pki, stub.url, slurm)) == EXIT_DENY
    assert stub.requests[0]["_reply"]["code"] == "mfa_required"
    # No AdminComment (authd holds the job and writes it); only the notice an
    # interactive srun/salloc shows on its terminal.
    assert [call for call in slurm.log() if call.startswith("scontrol")] == [
        "scontrol notify 42 ztgpu: MFA session required — run `ztgpu login`"]
    assert "MFA session required" in capfd.readouterr().err


def test_other_denials_tell_the_user_in_the_admin_comment(tmp_path: Path, pki: SitePki,
                                                          stub: StubAuthd) -> None:
    stub.denials[ME.pw_name] = ("too_many_gpus_job", "2 GPUs asked, at most 1 per job")
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    assert run_gate(gate_env(), settings_for(pki, stub.url, slurm)) == EXIT_DENY
    assert slurm.log()[-2:] == [
        "scontrol update JobId=42 AdminComment=ztgpu: 2 GPUs asked, at most 1 per job",
        "scontrol notify 42 ztgpu: 2 GPUs asked, at most 1 per job"]


def test_a_notice_that_cannot_be_sent_still_denies_and_is_logged(tmp_path: Path, pki: SitePki,
                                                                 stub: StubAuthd,
                                                                 capfd: Any) -> None:
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    slurm.scontrol.write_text("#!/bin/sh\necho 'slurm_notify_job error: Job is done' >&2\n"
                              "exit 1\n")
    assert run_gate(gate_env(), settings_for(pki, stub.url, slurm)) == EXIT_DENY
    assert "could not tell its owner why" in capfd.readouterr().err


def test_a_stale_gate_comment_is_cleared_when_the_job_is_allowed(tmp_path: Path, pki: SitePki,
                                                                 stub: StubAuthd) -> None:
    stub.allow(ME.pw_name)
    slurm = FakeSlurm(tmp_path, GPU_LINE.replace("(null)", "ztgpu: old reason"))
    assert run_gate(gate_env(), settings_for(pki, stub.url, slurm)) == EXIT_ALLOW
    assert slurm.log()[-1] == "scontrol update JobId=42 AdminComment="


def test_unreachable_authd_denies_by_default_and_says_so(tmp_path: Path, pki: SitePki) -> None:
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    started = time.monotonic()
    assert run_gate(gate_env(), settings_for(pki, closed_port_url(), slurm)) == EXIT_DENY
    assert time.monotonic() - started < 3
    assert "AdminComment=ztgpu: the GPU access service cannot be reached" in slurm.log()[-2]
    assert slurm.log()[-1].startswith("scontrol notify 42 ztgpu: the GPU access service")


def test_unreachable_authd_allows_only_when_configured(tmp_path: Path, pki: SitePki) -> None:
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    assert run_gate(gate_env(), settings_for(pki, closed_port_url(), slurm,
                                             unreachable="allow")) == EXIT_ALLOW
    for misspelt in ("Allow", "allow ", "yes", ""):
        assert run_gate(gate_env(), settings_for(pki, closed_port_url(), slurm,
                                                 unreachable=misspelt)) == EXIT_DENY


def test_a_silent_authd_is_given_up_on_at_the_deadline(tmp_path: Path, pki: SitePki) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP, never speaks TLS
    try:
        slurm = FakeSlurm(tmp_path, GPU_LINE)
        url = f"https://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        assert run_gate(gate_env(), settings_for(pki, url, slurm, timeout_s=1.0)) == EXIT_DENY
        assert 0.9 < time.monotonic() - started < 3.5
    finally:
        silent.close()


def test_a_hanging_squeue_is_given_up_on_at_the_deadline(tmp_path: Path, pki: SitePki,
                                                         stub: StubAuthd) -> None:
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    slurm.squeue.write_text("#!/bin/sh\nexec sleep 30\n")
    started = time.monotonic()
    assert run_gate(gate_env(), settings_for(pki, stub.url, slurm, timeout_s=1.0)) == EXIT_DENY
    assert time.monotonic() - started < 4
    assert stub.requests == []


def test_authd_with_a_certificate_from_another_ca_is_not_trusted(tmp_path: Path, pki: SitePki,
                                                                 stub: StubAuthd) -> None:
    other = SitePki(tmp_path / "other")
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    settings = settings_for(pki, stub.url, slurm)
    settings.ca_cert = str(other.ca_cert)
    assert run_gate(gate_env(), settings) == EXIT_DENY
    assert stub.requests == []
    assert "cannot be reached" in slurm.log()[-1]


def test_a_node_certificate_is_refused_by_authd_and_the_job_denied(tmp_path: Path,
                                                                   pki: SitePki,
                                                                   stub: StubAuthd) -> None:
    stub.allow(ME.pw_name)
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    cert, key = pki.issue("node", "gpu01")
    settings = settings_for(pki, stub.url, slurm, cert=str(cert), key=str(key),
                            unreachable="allow")
    assert run_gate(gate_env(), settings) == EXIT_DENY  # an answer, not an outage
    assert stub.requests[0]["_status"] == 403


def test_a_key_readable_by_others_is_not_used(tmp_path: Path, pki: SitePki,
                                              stub: StubAuthd) -> None:
    stub.allow(ME.pw_name)
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    settings = settings_for(pki, stub.url, slurm)
    Path(settings.key).chmod(0o644)
    assert run_gate(gate_env(), settings) == EXIT_DENY
    assert stub.requests == []


def test_array_task_is_looked_up_as_array_and_task(tmp_path: Path, pki: SitePki,
                                                   stub: StubAuthd) -> None:
    slurm = FakeSlurm(tmp_path, NO_GPU_LINE)
    env = gate_env(SLURM_ARRAY_JOB_ID="40", SLURM_ARRAY_TASK_ID="2")
    assert run_gate(env, settings_for(pki, stub.url, slurm)) == EXIT_ALLOW
    assert slurm.log()[0].startswith("squeue -h -j 40_2 -O ")


def test_malformed_env_is_denied_without_asking_anyone(tmp_path: Path, pki: SitePki,
                                                       stub: StubAuthd) -> None:
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    assert run_gate(gate_env(SLURM_JOB_ID="4;2"), settings_for(pki, stub.url, slurm)) == EXIT_DENY
    assert slurm.log() == [] and stub.requests == []


def test_failing_squeue_follows_the_unreachable_action(tmp_path: Path, pki: SitePki,
                                                       stub: StubAuthd) -> None:
    slurm = FakeSlurm(tmp_path, "", squeue_rc=1)
    assert run_gate(gate_env(), settings_for(pki, stub.url, slurm)) == EXIT_DENY
    assert run_gate(gate_env(), settings_for(pki, stub.url, slurm,
                                             unreachable="allow")) == EXIT_ALLOW
    assert stub.requests == []


# ---- the installer -------------------------------------------------------------------

def gate_config(base: Path, pki: SitePki | None, url: str | None = "https://127.0.0.1:1",
                **slurm: str) -> Config:
    data: dict[str, Any] = {"paths": {"hooks_dir": str(base / "libexec"),
                                      "socket": str(base / "noded.sock"),
                                      "task_socket": str(base / "task.sock")},
                            "auth": {"authd_url": url, "request_timeout_s": 3.0},
                            "slurm": {"bin_dir": "/usr/bin", **slurm}}
    if pki is not None:
        cert, key = pki.issue("controller", "slurmctld")
        data["tls"] = {"ca_cert": str(pki.ca_cert), "cert": str(cert), "key": str(key)}
    return parse_config(data, "test")


def test_render_gate_needs_authd_url_and_a_certificate(tmp_path: Path, pki: SitePki) -> None:
    with pytest.raises(ConfigError, match=r"auth\.authd_url"):
        render_gate(gate_config(tmp_path, pki, url=None), tmp_path / "slurm.conf")
    with pytest.raises(ConfigError, match=r"tls\.cert, tls\.key"):
        render_gate(gate_config(tmp_path, None), tmp_path / "slurm.conf")


def test_gate_path_must_be_writable_to_slurm_conf() -> None:
    with pytest.raises(UsageError):
        gate_changes(Path("relative/gate"))
    with pytest.raises(UsageError):
        gate_changes(Path("/opt/x#y/gate"))


def test_wrapper_bakes_in_the_settings_and_imports_nothing_heavy(tmp_path: Path,
                                                                 pki: SitePki) -> None:
    config = gate_config(tmp_path, pki)
    path, changed = write_gate(config, tmp_path / "etc" / "slurm.conf", dry_run=False)
    assert changed and path == gate_path(config) and path.stat().st_mode & 0o777 == 0o755
    assert write_gate(config, tmp_path / "etc" / "slurm.conf", dry_run=False) == (path, False)
    text = path.read_text()
    assert text.startswith(f"#!{sys.executable} -IS\n")
    assert f"slurm_conf={str(tmp_path / 'etc' / 'slurm.conf')!r}" in text
    assert "unreachable='deny'" in text and "squeue='/usr/bin/squeue'" in text
    # What the wrapper imports: no YAML, pydantic, cryptography or aiohttp.
    site = str(Path(gate.__file__).resolve().parents[2])
    probe = subprocess.run(
        [sys.executable, "-IS", "-c",
         f"import sys; sys.path.insert(0, {site!r}); import ztgpu.slurm_plugins.gate, "
         "ssl, http.client, json, subprocess; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=30, check=True)
    loaded = set(probe.stdout.split())
    assert not loaded & {"yaml", "pydantic", "cryptography", "aiohttp", "ztgpu.config"}


def test_installed_wrapper_runs_under_a_bare_environment(tmp_path: Path, pki: SitePki,
                                                         stub: StubAuthd) -> None:
    """As slurmscriptd runs it: no PATH, no SLURM_CONF, only the job's fields."""
    slurm = FakeSlurm(tmp_path, NO_GPU_LINE)
    config = gate_config(tmp_path, pki)
    text = render_gate(config, None).replace("'/usr/bin/squeue'", repr(str(slurm.squeue)))
    wrapper = tmp_path / "gate"
    wrapper.write_text(text)
    wrapper.chmod(0o755)
    res = subprocess.run([str(wrapper)], env=gate_env(), capture_output=True, text=True,
                         timeout=30, check=False)
    assert res.returncode == EXIT_ALLOW, res.stderr
    slurm.squeue.write_text("#!/bin/sh\nexit 1\n")
    res = subprocess.run([str(wrapper)], env=gate_env(), capture_output=True, text=True,
                         timeout=30, check=False)
    assert res.returncode == EXIT_DENY
    assert "squeue" in res.stderr


SITE_CONF = "ClusterName=site\nSlurmctldHost=head\nNodeName=gpu01 Gres=gpu:8\n"


def run_cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ZTGPU, "--config", str(config), *args], capture_output=True,
                          text=True, timeout=60, check=False)


def write_config(tmp_path: Path, pki: SitePki | None) -> Path:
    data: dict[str, Any] = {"paths": {"hooks_dir": str(tmp_path / "libexec"),
                                      "socket": str(tmp_path / "noded.sock"),
                                      "task_socket": str(tmp_path / "task.sock")},
                            "auth": {"authd_url": "https://authd.example:8444"}}
    if pki is not None:
        cert, key = pki.issue("controller", "slurmctld")
        data["tls"] = {"ca_cert": str(pki.ca_cert), "cert": str(cert), "key": str(key)}
    path = tmp_path / "ztgpu.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_installs_the_gate_only_when_asked(tmp_path: Path, pki: SitePki) -> None:
    config = write_config(tmp_path, pki)
    conf = tmp_path / "slurm.conf"
    conf.write_text(SITE_CONF)
    plain = run_cli("install", "--slurm-conf", str(conf), config=config)
    assert plain.returncode == 0, plain.stderr
    assert "PrologSlurmctld" not in conf.read_text()
    assert not (tmp_path / "libexec" / "prolog_slurmctld").exists()

    dry = run_cli("install", "--gate", "--slurm-conf", str(conf), "--dry-run", config=config)
    assert dry.returncode == 0, dry.stderr
    assert f"+PrologSlurmctld={tmp_path / 'libexec' / 'prolog_slurmctld'}" in dry.stdout
    assert not (tmp_path / "libexec" / "prolog_slurmctld").exists()

    real = run_cli("install", "--gate", "--slurm-conf", str(conf), config=config)
    assert real.returncode == 0, real.stderr
    assert f"PrologSlurmctld={tmp_path / 'libexec' / 'prolog_slurmctld'}\n" in conf.read_text()
    assert "restart slurmctld" in real.stdout
    wrapper = tmp_path / "libexec" / "prolog_slurmctld"
    assert wrapper.stat().st_mode & 0o777 == 0o755
    assert "https://authd.example:8444" in wrapper.read_text()
    assert f"slurm_conf={str(conf)!r}" in wrapper.read_text()

    again = run_cli("install", "--gate", "--slurm-conf", str(conf), config=config)
    assert again.returncode == 0 and f"unchanged: {conf}" in again.stdout


def test_cli_gate_without_certificate_changes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, None)
    conf = tmp_path / "slurm.conf"
    conf.write_text(SITE_CONF)
    res = run_cli("install", "--gate", "--slurm-conf", str(conf), config=config)
    assert res.returncode == 2
    assert "tls.cert" in res.stderr
    assert conf.read_text() == SITE_CONF
    assert not (tmp_path / "libexec").exists()


# ---- on a real Slurm cluster -----------------------------------------------------------

class GateCluster:
    def __init__(self, cluster: Any, stub: StubAuthd, slurm: Any) -> None:
        self.cluster = cluster
        self.stub = stub
        self.slurm = slurm  # CliSlurmClient, as authd's holder uses it

    def admin_comment(self, job_id: str, user: str) -> str:
        """AdminComment as the job's owner sees it in `scontrol show job`."""
        out = self.cluster.slurm(["scontrol", "show", "job", job_id], user=user)
        for line in out.splitlines():
            if line.strip().startswith("AdminComment="):
                return line.strip()[len("AdminComment="):].strip()
        return ""

    def squeue(self, job_id: str, user: str) -> str:
        return str(self.cluster.slurm(["squeue", "-h", "-j", job_id, "-o", "%i %T %r"],
                                      user=user)).strip()

    def login(self, user: str, job_id: str) -> None:
        """What a successful `ztgpu login` makes authd do."""
        self.stub.allow(user)
        # Also sets StartTime=now: a requeued job is otherwise eligible only
        # 121 s after the gate denied it (Reason=BeginTime).
        self.slurm.release(job_id)


@pytest.fixture(scope="module")
def gated(pki: SitePki) -> Iterator[GateCluster]:
    from ztgpu.authd.holder import SlurmJobHolder
    from ztgpu.slurm.client import CliSlurmClient
    from ztgpu.testing.slurm_cluster import ClusterSpec, slurm_cluster

    stub = StubAuthd(pki)
    stub.start()

    def install_gate(cluster: Any) -> None:
        config = gate_config(cluster.root, pki, url=stub.url, conf=str(cluster.slurm_conf))
        write_gate(config, cluster.slurm_conf, dry_run=False)
        install_slurm_conf(cluster.slurm_conf, gate_changes(gate_path(config)), dry_run=False)

    try:
        with slurm_cluster(ClusterSpec(), before_start=install_gate) as cluster:
            assert "PrologSlurmctld=" in cluster.slurm_conf.read_text()
            slurm = CliSlurmClient(Path("/usr/bin"), cluster.slurm_conf, 10.0)
            stub.holder = SlurmJobHolder(slurm, retry_s=0.2, deadline_s=60)
            yield GateCluster(cluster, stub, slurm)
    finally:
        stub.stop()


@pytest.fixture
def on_cluster(gated: GateCluster) -> Iterator[GateCluster]:
    """Each test starts and ends with an empty queue, a running stub denying everyone."""

    if gated.stub.server is None:
        gated.stub.start()
    with gated.stub.lock:
        gated.stub.allowed.clear()
        gated.stub.denials.clear()
    yield gated
    c = gated.cluster
    c.cancel_all()
    if "drain" in c.node_state():
        c.resume_node()


def watch(g: GateCluster, seconds: float, job_id: str) -> set[str]:
    """Node states seen while waiting ``seconds``; fails if the job started."""
    states = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        states.add(g.cluster.node_state())
        assert g.cluster.job_state(job_id).get("JobState") == "PENDING"
        time.sleep(0.5)
    return states


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    from ztgpu.testing.slurm_cluster import wait_for

    wait_for(predicate, timeout, what, interval=0.3)


@needs_slurm
@pytest.mark.slurm
def test_denied_job_waits_with_a_reason_then_runs_after_login(on_cluster: GateCluster) -> None:
    g, c = on_cluster, on_cluster.cluster
    job = c.sbatch("ztalice", "echo ran", gpus=1, extra=["--time=10"])
    wait_until(lambda: g.stub.requests_for(job), 60, "the gate to ask authd")
    wait_until(lambda: "MFA session required" in g.admin_comment(job, "ztalice"), 30,
               "the hold reason in AdminComment")
    assert g.squeue(job, "ztalice") == f"{job} PENDING JobHeldAdmin"
    comment = g.admin_comment(job, "ztalice")
    assert comment.startswith("ztgpu: MFA session required") and "ztgpu login" in comment
    # It stays pending (held: no retry loop) and no node is drained.
    states = watch(g, 6, job)
    assert not any("drain" in s for s in states), states
    assert c.node_state() == "idle"
    assert not c.output(job)
    (request,) = g.stub.requests_for(job)
    assert {k: request[k] for k in ("uid", "user", "partition", "account", "gpus_count",
                                    "time_limit_s")} == {
        "uid": pwd.getpwnam("ztalice").pw_uid, "user": "ztalice", "partition": "gpu",
        "account": None, "gpus_count": 1, "time_limit_s": 600.0}

    g.login("ztalice", job)
    fields = c.wait_job(job, ["COMPLETED", "FAILED", "CANCELLED"], timeout=30)
    assert fields["JobState"] == "COMPLETED"
    assert c.output(job).strip() == "ran"
    assert g.admin_comment(job, "ztalice") == ""
    assert [r["_reply"]["allow"] for r in g.stub.requests_for(job)] == [False, True]
    assert "drain" not in c.node_state()


@needs_slurm
@pytest.mark.slurm
def test_job_without_gpu_runs_without_asking_authd(on_cluster: GateCluster) -> None:
    g, c = on_cluster, on_cluster.cluster
    job = c.sbatch("ztalice", "echo cpu-only", gpus=0)
    fields = c.wait_job(job, ["COMPLETED", "FAILED", "CANCELLED"], timeout=60)
    assert fields["JobState"] == "COMPLETED" and c.output(job).strip() == "cpu-only"
    assert g.stub.requests_for(job) == []


@needs_slurm
@pytest.mark.slurm
def test_authd_sees_the_gpus_of_each_request_form(on_cluster: GateCluster) -> None:
    g, c = on_cluster, on_cluster.cluster
    g.stub.allow("ztbob")
    # (--gres=gpu:N, other sbatch options, GPUs authd is told, time limit it is told)
    forms = [(0, ["--gpus=2"], 2, None), (0, ["--gpus-per-task=1", "-n2"], 2, None),
             (3, ["--time=7"], 3, 420.0)]
    jobs = [c.sbatch("ztbob", "true", gpus=gres, extra=extra) for gres, extra, _, _ in forms]
    for job, (_, extra, count, limit) in zip(jobs, forms, strict=True):
        assert c.wait_job(job, ["COMPLETED", "FAILED", "CANCELLED"],
                          timeout=60)["JobState"] == "COMPLETED", extra
        (request,) = g.stub.requests_for(job)
        assert (request["gpus_count"], request["time_limit_s"]) == (count, limit), extra


@needs_slurm
@pytest.mark.slurm
def test_each_array_task_is_asked_about_with_its_own_job_id(on_cluster: GateCluster) -> None:
    g, c = on_cluster, on_cluster.cluster
    g.stub.allow("ztcarol")
    array = c.sbatch("ztcarol", "true", gpus=1, extra=["--array=0-1"])
    wait_until(lambda: not c.slurm(["squeue", "-h", "-u", "ztcarol"], check=False).strip(), 60,
               "the array to finish")
    states = [token for token in c.slurm(["scontrol", "-o", "show", "job", array]).split()
              if token.startswith("JobState=")]
    assert states == ["JobState=COMPLETED"] * 2
    asked = [r for r in g.stub.requests if r["user"] == "ztcarol"]
    assert len({r["job_id"] for r in asked}) == 2
    assert all(r["gpus_count"] == 1 and r["_reply"]["allow"] for r in asked)


@needs_slurm
@pytest.mark.slurm
def test_interactive_srun_is_refused_and_no_node_drains(on_cluster: GateCluster) -> None:
    g, c = on_cluster, on_cluster.cluster
    res = subprocess.run(["runuser", "-u", "ztcarol", "--", "env", f"SLURM_CONF={c.slurm_conf}",
                          "srun", "--gres=gpu:1", "-t", "1", "echo", "ran"],
                         capture_output=True, text=True, timeout=60, cwd=c.work_dir,
                         env=c.env(), check=False)
    assert res.returncode != 0
    assert "ran" not in res.stdout
    assert "PrologSlurmctld failed" in res.stderr
    # The gate's reason reaches the terminal too (scontrol notify).
    assert "srun: ztgpu: " in res.stderr, res.stderr
    assert any(r["user"] == "ztcarol" for r in g.stub.requests)
    assert "drain" not in c.node_state()


@needs_slurm
@pytest.mark.slurm
def test_unreachable_authd_keeps_the_job_queued_and_the_node_up(on_cluster: GateCluster) -> None:
    g, c = on_cluster, on_cluster.cluster
    g.stub.stop()
    job = c.sbatch("ztalice", "echo ran", gpus=1)
    wait_until(lambda: "cannot be reached" in g.admin_comment(job, "ztalice"), 60,
               "the gate's note in AdminComment")
    wait_until(lambda: c.job_state(job).get("Restarts") == "1", 30, "the requeue")
    states = watch(g, 4, job)
    assert not any("drain" in s for s in states), states
    assert g.squeue(job, "ztalice").startswith(f"{job} PENDING")
    assert not c.output(job)


# ---- the gate's own HTTP exchange (no http.client: its imports cost every job start) ----


class _Replies:
    """Stands in for the TLS socket: ``recv`` hands out the prepared pieces."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    def recv(self, size: int) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > size:
            self.pieces.insert(0, piece[size:])
            piece = piece[:size]
        return piece


def _reply(*pieces: bytes) -> tuple[int, bytes]:
    return gate._read_reply(_Replies(*pieces))  # type: ignore[arg-type]


def test_reply_reader_takes_a_content_length_body_in_pieces() -> None:
    body = b'{"allow": true, "code": "allowed", "reason": "ok"}'
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nServer: x\r\n\r\n")
    assert _reply(head + body) == (200, body)
    assert _reply(head[:7], head[7:30], head[30:], body[:5], body[5:]) == (200, body)
    assert _reply(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\n{}") == (403, b"{}")
    assert _reply(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") == (200, b"")
    # Bytes after the announced body (a stray pipeline) are not taken as the body.
    assert _reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}garbage") == (200, b"{}")


@pytest.mark.parametrize("raw, problem", [
    (b"", "without a complete reply"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "without a complete reply"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "middle of its reply"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not HTTP"),
    (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "not HTTP"),
    (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", "not HTTP"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
     "no Content-Length"),
    (b"HTTP/1.1 200 OK\r\n\r\n{}", "no usable Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
     "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n", "no usable Content-Length"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 9000, "too long"),
])
def test_reply_reader_refuses_what_authd_never_sends(raw: bytes, problem: str) -> None:
    with pytest.raises(gate.GateFault, match=problem):
        _reply(raw)


@pytest.mark.parametrize("url, expected", [
    ("https://ctl01.example:8443", ("ctl01.example", 8443)),
    ("https://ctl01.example:8443/", ("ctl01.example", 8443)),
    ("https://ctl01.example", ("ctl01.example", 443)),
    ("https://127.0.0.1:1", ("127.0.0.1", 1)),
    ("https://[::1]:8443", ("::1", 8443)),
    ("https://[fd00::5]", ("fd00::5", 443)),
])
def test_authd_url_is_split_by_hand(url: str, expected: tuple[str, int]) -> None:
    assert gate._host_port(url) == expected


@pytest.mark.parametrize("url", ["http://ctl01:8443", "https://", "https://:8443",
                                 "https://ctl01:0", "https://ctl01:65536", "https://ctl01:x",
                                 "https://ctl01:8443/v1/gate", "https://u@ctl01:8443",
                                 "ftp://ctl01", "https://ctl01:123456"])
def test_bad_authd_urls_are_a_gate_fault(url: str) -> None:
    with pytest.raises(gate.GateFault, match="not https://host"):
        gate._host_port(url)


def test_a_gate_run_imports_neither_http_client_nor_email(tmp_path: Path, pki: SitePki,
                                                          stub: StubAuthd) -> None:
    """The import cost that pushed srun past Slurm's first readiness poll stays out."""
    slurm = FakeSlurm(tmp_path, GPU_LINE)
    config = gate_config(tmp_path, pki, url=stub.url)
    text = render_gate(config, None).replace("'/usr/bin/squeue'", repr(str(slurm.squeue)))
    wrapper = tmp_path / "gate"
    wrapper.write_text(text)
    stub.allow(ME.pw_name)
    res = subprocess.run([sys.executable, "-IS", "-X", "importtime", str(wrapper)],
                         env=gate_env(), capture_output=True, text=True, timeout=60)
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()
                if line.startswith("import time:")}
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ssl" in imported and "json" in imported, "the run reached authd"
    assert stub.requests, "authd was asked"
    assert not {"http.client", "email.parser", "urllib.parse"} & imported


def test_with_authd_on_this_host_the_gate_needs_no_certificate(tmp_path: Path) -> None:
    config = parse_config({"paths": {"hooks_dir": str(tmp_path / "libexec")},
                           "authd": {"gate_socket": "/run/ztgpu-authd/gate.sock"}}, "test")
    text = render_gate(config, tmp_path / "slurm.conf")
    assert "authd_socket='/run/ztgpu-authd/gate.sock'" in text
    assert "cert=" not in text and "authd_url=" not in text
    # Without the socket the certificate and URL are still required, by name.
    with pytest.raises(ConfigError, match=r"auth\.authd_url.*tls\.cert.*authd\.gate_socket"):
        render_gate(parse_config({}, "test"), tmp_path / "slurm.conf")


def test_the_gate_reports_an_unreachable_gate_socket(tmp_path: Path) -> None:
    settings = gate.GateSettings(authd_url="", ca_cert="", cert="", key="", squeue="",
                                 scontrol="", slurm_conf=None,
                                 authd_socket=str(tmp_path / "missing.sock"))
    job = gate.parse_gate_env(gate_env())
    with pytest.raises(gate.GateFault, match=r"cannot reach authd at .*missing\.sock"):
        gate.ask_authd(job, gate.JobResources(1, None, ""), settings, 2.0)
