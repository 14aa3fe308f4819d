"""``ztgpu drill``: simulated breaches on a node with simulated GPUs, and what the agent did.

Each scenario starts a real process (as ``--user``, default ``nobody``) and
scripts the GPU telemetry the simulated backend replays so that the agent
sees that process on a GPU, then waits for the agent's audit event and
shows detection, the response and the evidence, with the time to detect:

``miner``
    a cryptominer-like load (100% busy, most of the memory, full power) on a
    GPU no job holds;
``foreign``
    another user's process on the GPU of a running job (needs one);
``off_hours``
    a running job's GPU busy outside ``telemetry.allowed_hours`` (drilled
    only where those hours exclude now);
``revoked``
    a job that keeps running after its user's access is revoked: the drill
    revokes the user of a running job at authd (as ``ztgpu admin revoke``:
    the caller needs the ``revoke`` role and a fresh MFA login) and shows the
    agent taking the job's GPUs back and ending it. It ends the user's
    sessions and enrolment, so it is run only when named (``--scenario
    revoked``), never by ``all``.

Drills never touch real GPUs: they refuse to run unless the agent's GPUs are
simulated and ``gpu.simulated_telemetry`` is set (the demo cluster).
"""

from __future__ import annotations

import argparse
import json
import pwd
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

SCENARIOS = ("miner", "foreign", "off_hours")
GIB = 1 << 30


@dataclass
class Outcome:
    scenario: str
    ok: bool
    lines: list[str]


def add_parser(sub: Any) -> None:
    drill = sub.add_parser("drill", help="run simulated breaches (simulated GPUs only) and "
                           "show detection, response and audit trail")
    drill.add_argument("--scenario", choices=(*SCENARIOS, "revoked", "all"), default="all",
                       help="'all' is every scenario but revoked (which ends a user's "
                       "enrolment)")
    drill.add_argument("--user", default="nobody",
                       help="the account the intruding process runs as (not root)")
    drill.add_argument("--timeout", type=float, default=30.0,
                       help="seconds to wait for each detection")
    drill.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ztgpu.config import load_config
    from ztgpu.node_client import call

    config = load_config(args.config)
    script = config.gpu.simulated_telemetry
    status = call(str(config.paths.socket), "status")
    if not status.get("simulated") or script is None:
        print("ztgpu drill: drills script GPU telemetry, so they run only where the agent's "
              "GPUs are simulated and gpu.simulated_telemetry is set (e.g. `make demo`); "
              "this node's GPUs are real", file=sys.stderr)
        return 2
    try:
        intruder = pwd.getpwnam(args.user)
    except KeyError:
        print(f"ztgpu drill: no user {args.user!r}", file=sys.stderr)
        return 2
    if args.scenario == "revoked":
        outcome = Drill(config, status, Path(script), intruder, args.timeout).revoked()
        for line in outcome.lines:
            print(line)
        return 0 if outcome.ok else 1
    if intruder.pw_uid in config.telemetry.spared_uids:
        print(f"ztgpu drill: {args.user} is in telemetry.spared_uids: its processes are never "
              f"ended; choose another --user", file=sys.stderr)
        return 2
    chosen = SCENARIOS if args.scenario == "all" else (args.scenario,)
    drill = Drill(config, status, Path(script), intruder, args.timeout)
    outcomes = [drill.run(name) for name in chosen]
    for outcome in outcomes:
        for line in outcome.lines:
            print(line)
    failed = [o.scenario for o in outcomes if not o.ok]
    print(f"drills: {len(outcomes) - len(failed)} of {len(outcomes)} as expected"
          + (f"; not: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


class Drill:
    def __init__(self, config: Any, status: dict[str, Any], script: Path,
                 intruder: pwd.struct_passwd, timeout_s: float) -> None:
        self.config = config
        self.status = status
        self.script = script
        self.intruder = intruder
        self.timeout_s = timeout_s

    # ---- scenarios -------------------------------------------------------
    def run(self, name: str) -> Outcome:
        held = {index: job for job in self.status["jobs"] for index in job["gpus"]}
        gpus = {g["index"]: g for g in self.status["gpus"]}
        title = f"drill {name}:"
        if name == "miner":
            free = sorted(set(gpus) - set(held))
            if not free:
                return Outcome(name, False, [f"{title} no free GPU to put a miner on"])
            return self._inject(name, gpus[free[0]], None, "unallocated_use",
                                {"util_pct": 100, "memory_used_bytes": 70 * GIB,
                                 "power_w": 690, "sm_clock_mhz": 1980}, with_process=True)
        if not held:
            return Outcome(name, True, [f"{title} skipped: no running job on this node "
                                        f"(submit one and drill again)"])
        index = min(held)
        job = held[index]
        if name == "foreign":
            return self._inject(name, gpus[index], job, "foreign_process",
                                {"util_pct": 95, "memory_used_bytes": 20 * GIB,
                                 "power_w": 600}, with_process=True)
        from ztgpu.hours import in_hours

        hours = self.config.telemetry.allowed_hours
        if in_hours(hours, datetime.now().astimezone()):
            return Outcome(name, True, [f"{title} skipped: telemetry.allowed_hours "
                                        f"({', '.join(hours) or 'any time'}) allows now"])
        return self._inject(name, gpus[index], job, "off_hours",
                            {"util_pct": 80, "power_w": 450}, with_process=False)

    def revoked(self) -> Outcome:
        """Revoke the user of a running job at authd; show the node answer it."""
        from ztgpu.audit.spool import Spool
        from ztgpu.auth_client import AuthdError, AuthdRefused, credential, user_client
        from ztgpu.authd.authority import ADMIN

        title = "drill revoked:"
        if self.config.auth.authd_url is None:
            return Outcome("revoked", True, [f"{title} skipped: no authd (auth.authd_url)"])
        jobs = self.status["jobs"]
        if not jobs:
            return Outcome("revoked", True, [f"{title} skipped: no running job on this node "
                                             "(submit one and drill again)"])
        job = jobs[0]
        lines = [f"{title} revoking {job['user']}, whose job {job['job_id']} runs on GPU(s) "
                 f"{', '.join(map(str, job['gpus']))}"]
        spool_path = self.config.paths.spool_dir / "events.db"
        with Spool.open(spool_path, self.config.node_name) as spool:
            head = spool.head()[0]
        began = time.time()
        try:
            with user_client(self.config) as client:
                client.request("POST", "/v1/admin/revoke", {
                    "credential": credential(self.config, ADMIN), "user": job["user"],
                    "reason": "ztgpu drill: revocation of a running job"})
        except (AuthdRefused, AuthdError) as exc:
            lines.append(f"  authd did not revoke: {exc} (the drill needs an admin with the "
                         "revoke role and a fresh `ztgpu login`)")
            return Outcome("revoked", False, lines)
        lines.append(f"  revoked at {datetime.fromtimestamp(began).astimezone():%H:%M:%S}")
        event = self._wait_for(spool_path, head, "job.action",
                               lambda e: e.get("job_id") == job["job_id"]
                               and e.get("action") == "revoke")
        if event is None:
            lines.append(f"  NOT ACTED ON within {self.timeout_s:g} s")
            return Outcome("revoked", False, lines)
        at = datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp()
        lines.append(f"  detected after {max(0.0, at - began):.1f} s: job.action "
                     f"action=revoke outcome={event['outcome']}")
        lines.append(f"  response: GPUs taken back, job ended: {event['reason']}")
        lines.append(f"  audit trail: seq {event['seq']} hash {str(event['hash'])[:16]}… "
                     f"(ztgpu audit trail --job {job['job_id']})")
        return Outcome("revoked", event["outcome"] == "access_removed", lines)

    def _inject(self, name: str, gpu: dict[str, Any], job: dict[str, Any] | None,
                rule: str, sample: dict[str, Any], *, with_process: bool) -> Outcome:
        from ztgpu.audit.spool import Spool

        spool_path = self.config.paths.spool_dir / "events.db"
        proc = None
        if with_process:
            proc = subprocess.Popen(["setpriv", f"--reuid={self.intruder.pw_uid}",
                                     f"--regid={self.intruder.pw_gid}", "--clear-groups",
                                     "sleep", "600"])
            sample = {**sample, "pids": [proc.pid]}
        where = (f"GPU {gpu['index']} (minor {gpu['minor']}) of job {job['job_id']} "
                 f"({job['user']})" if job else f"GPU {gpu['index']} (minor {gpu['minor']}), "
                 f"held by no job")
        lines = [f"drill {name}: {self._what(name)} on {where}"]
        saved = self._read_script()
        try:
            with Spool.open(spool_path, self.config.node_name) as spool:
                head = spool.head()[0]
            began = time.time()
            self._write_script({**saved, gpu["uuid"]: sample})
            lines.append(f"  injected at {datetime.fromtimestamp(began).astimezone():%H:%M:%S}"
                         + (f": pid {proc.pid} as {self.intruder.pw_name}" if proc else ""))
            event = self._wait(spool_path, head, rule, gpu["minor"])
            if event is None:
                lines.append(f"  NOT DETECTED within {self.timeout_s:g} s")
                return Outcome(name, False, lines)
            at = datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp()
            lines.append(f"  detected after {max(0.0, at - began):.1f} s: {event['code']} "
                         f"rule={event['rule']} severity={event['severity']}")
            lines.append(f"  response: {event['response']} -> {event['outcome']}")
            lines.append(f"  evidence: {event['reason']}")
            lines.append(f"  audit trail: seq {event['seq']} hash {str(event['hash'])[:16]}… "
                         f"(ztgpu audit trail --code {event['code']})")
            ok = True
            if proc is not None and "end_process" in str(event["response"]).split("+"):
                try:
                    code = proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                ended = code is not None and code < 0
                lines.append(f"  the process {'was ended' if ended else 'is STILL RUNNING'}")
                ok = ended
            return Outcome(name, ok, lines)
        finally:
            self._write_script(saved)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    @staticmethod
    def _what(name: str) -> str:
        return {"miner": "a miner-like load (100% busy, 70 GiB, 690 W)",
                "foreign": "another user's process",
                "off_hours": "use outside the allowed hours"}[name]

    # ---- helpers ---------------------------------------------------------
    def _wait(self, spool_path: Path, head: int, rule: str, minor: int) -> dict[str, Any] | None:
        return self._wait_for(spool_path, head, "gpu.misuse",
                              lambda e: e.get("rule") == rule
                              and e["gpus"][0]["minor"] == minor)

    def _wait_for(self, spool_path: Path, head: int, code: str,
                  wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        from ztgpu.audit.spool import Spool

        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            with Spool.open(spool_path, self.config.node_name) as spool:
                for event in spool.read(after_seq=head, limit=10_000, code=code):
                    if wanted(event):
                        return event
            time.sleep(0.1)
        return None

    def _read_script(self) -> dict[str, Any]:
        try:
            data = json.loads(self.script.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_script(self, data: dict[str, Any]) -> None:
        tmp = self.script.with_name(f".{self.script.name}.drill")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.script)
