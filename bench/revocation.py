"""Revocation latency: from an admin's revoke request to the GPUs taken back on a node.

Starts a private munged, a site PKI, a real authd process (``ztgpu-authd``,
SQLite store, TLS 1.3) and a standalone node agent (``ztgpu-noded`` on
simulated GPUs, no Slurm) named ``gpu01``, configured with ``auth.authd_url``
and a node certificate of that name. The agent's ``auth.revocation_poll_s``
is left at the configuration default (reported), so the figures are what a
site gets out of the box. The bootstrap admin root is enrolled locally and
logs in (again when its MFA session nears the admin age limit).

Each of ``--runs`` rounds:

1. root enrols ``nobody`` through the admin API (a revocation deletes the
   enrolment, so every round enrols again) and ``nobody`` logs in with a TOTP
   code;
2. the installed Prolog hook runs for a new job id with GPUs 0,1; the agent
   must record job.grant and hand both device files to ``nobody``;
3. after a random wait of 0 to ``revocation_poll_s`` (``--no-jitter``: none;
   without it the rounds lock onto the agent's poll cycle and every revoke
   lands just after a poll, the worst case), root's revoke request
   (``POST /v1/admin/revoke``) is timed from just before it is sent (its
   munge credential is made beforehand); the spool is
   then polled every ``--poll-ms`` ms (``agent.events``) until it holds a
   job.action event with action "revoke" for the job, and the device files
   are checked (``os.lstat``) until both are owned by root again;
4. the Epilog hook ends the job, so the next round starts from a clean node.

Prints per-run figures and never asserts on them. The last line is:

    revocation p50_s=A p99_s=B

(the time to the agent's revoke event, over all runs).

Usage (root): python bench/revocation.py [--runs 20] [--poll-ms 20] [--no-jitter]
"""

from __future__ import annotations

import argparse
import os
import pwd
import random
import re
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchlib import percentile

from ztgpu.testing.agent_process import StandaloneAgent, standalone_agent
from ztgpu.testing.authd_process import AuthdProcess, secret_from_uri
from ztgpu.testing.collector_process import SitePki
from ztgpu.testing.munge import MungeDaemon

USER = "nobody"
NODE = "gpu01"
GPUS = "0,1"
ROUND_TIMEOUT_S = 30.0
#: Log root in again when its session is older than this (authd wants admin
#: actions within admin_mfa_max_age_s, 900 s by default).
ROOT_RELOGIN_S = 600.0


class Site:
    """authd with root as the bootstrap admin; researcher and admin calls over TLS."""

    def __init__(self, base: Path, munge: MungeDaemon) -> None:
        self.pki = SitePki(base / "pki")
        self.authd = AuthdProcess(base / "authd", self.pki, munge.socket)
        self.secrets: dict[str, bytes] = {}
        self.steps: dict[str, int] = {}
        self.root_login_at = 0.0

    def start(self) -> None:
        res = self.authd.ztgpu("admin", "enroll", "root", "--local")
        found = re.search(r"otpauth://\S+", res.stdout)
        if res.returncode != 0 or found is None:
            raise SystemExit(f"enrolling root failed ({res.returncode}): {res.stderr.strip()}")
        self.secrets["root"] = secret_from_uri(found.group(0))
        self.authd.start()

    def request(self, path: str, body: dict[str, Any]) -> Any:
        from ztgpu.auth_client import AuthdClient
        from ztgpu.trust.pki import client_context

        with AuthdClient(self.authd.url, client_context(self.pki.ca_cert, None, None)
                         ) as client:
            return client.request("POST", path, body)

    def code(self, user: str) -> str:
        """A code of a step this user has not used yet (the next step's if need be:
        authd accepts one step either side), so the bench never waits for the clock."""
        from ztgpu.trust.totp import code_at

        moment = datetime.now(UTC)
        step = int(moment.timestamp()) // 30
        if step <= self.steps.get(user, -1):
            step = self.steps[user] + 1
            if step > int(moment.timestamp()) // 30 + 1:
                time.sleep((step - 1) * 30 - moment.timestamp() + 0.5)
            moment = datetime.fromtimestamp(step * 30 + 1, UTC)
        self.steps[user] = step
        return code_at(self.secrets[user], moment)

    def login(self, user: str | None) -> None:
        from ztgpu.authd.authority import LOGIN

        name = user or "root"
        self.request("/v1/login", {"credential": self.authd.credential_as(user, LOGIN),
                                   "code": self.code(name)})
        if user is None:
            self.root_login_at = time.monotonic()

    def admin_credential(self) -> str:
        from ztgpu.authd.authority import ADMIN

        if time.monotonic() - self.root_login_at > ROOT_RELOGIN_S:
            self.login(None)
        return self.authd.credential_as(None, ADMIN)

    def enroll(self, user: str) -> None:
        reply = self.request("/v1/admin/enroll",
                             {"credential": self.admin_credential(), "user": user})
        self.secrets[user] = secret_from_uri(reply["otpauth_uri"])
        self.steps.pop(user, None)  # a new secret: its steps are all unused


def job_env(job_id: str, hook_context: str) -> dict[str, str]:
    entry = pwd.getpwnam(USER)
    return {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job_id,
            "SLURM_JOB_UID": str(entry.pw_uid), "SLURM_JOB_USER": USER,
            "SLURM_SCRIPT_CONTEXT": hook_context, "SLURM_JOB_GPUS": GPUS,
            "SLURM_JOB_PARTITION": "gpu"}


def owners(agent: StandaloneAgent, minors: list[int]) -> list[int]:
    return [os.lstat(agent.dev_dir / f"nvidia{m}").st_uid for m in minors]


def one_round(site: Site, agent: StandaloneAgent, job_id: str, poll_s: float,
              delay_s: float) -> dict[str, float]:
    """One enrol/login/prolog/revoke/epilog round; the timings in seconds."""
    uid = pwd.getpwnam(USER).pw_uid
    t_setup = time.monotonic()
    site.enroll(USER)
    site.login(USER)
    res = agent.run_hook("prolog", job_env(job_id, "prolog_slurmd"))
    if res.returncode != 0:
        raise SystemExit(f"job {job_id}: prolog failed ({res.returncode}): {res.stderr[-500:]}")
    grant = agent.wait_event("job.grant", job_id, timeout=ROUND_TIMEOUT_S)
    minors = [int(g["minor"]) for g in grant["gpus"]]
    if not minors or owners(agent, minors) != [uid] * len(minors):
        raise SystemExit(f"job {job_id}: granted minors {minors} are not all owned by "
                         f"{USER}: {owners(agent, minors)}")
    setup_s = time.monotonic() - t_setup

    time.sleep(delay_s)
    body = {"credential": site.admin_credential(), "user": USER, "reason": "bench revocation"}
    sent = time.monotonic()
    site.request("/v1/admin/revoke", body)
    answered = time.monotonic() - sent
    event_s = devices_s = None
    deadline = sent + ROUND_TIMEOUT_S
    while True:
        # The event first: the agent writes it after the files are back to root, so
        # once it shows, the device check below sees root in the same pass.
        if event_s is None and any(e.get("action") == "revoke"
                                   for e in agent.events("job.action", job_id)):
            event_s = time.monotonic() - sent
        if devices_s is None and owners(agent, minors) == [0] * len(minors):
            devices_s = time.monotonic() - sent
        if event_s is not None and devices_s is not None:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id}: no revoke event ({event_s}) or devices not back "
                             f"to root ({owners(agent, minors)}) {ROUND_TIMEOUT_S:.0f}s after "
                             f"the revoke request; agent log:\n{agent.log()}")
        time.sleep(poll_s)

    res = agent.run_hook("epilog", job_env(job_id, "epilog_slurmd"))
    if res.returncode != 0:
        raise SystemExit(f"job {job_id}: epilog failed ({res.returncode}): {res.stderr[-500:]}")
    return {"setup": setup_s, "delay": delay_s, "answer": answered, "event": event_s,
            "devices": devices_s}




def summary(values: list[float]) -> str:
    return (f"p50={percentile(values, 50):.2f} p90={percentile(values, 90):.2f} "
            f"p99={percentile(values, 99):.2f} min={min(values):.2f} max={max(values):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="revocations (default 20)")
    parser.add_argument("--poll-ms", type=float, default=20.0,
                        help="how often the spool and device files are checked (default 20)")
    parser.add_argument("--jitter", action=argparse.BooleanOptionalAction, default=True,
                        help="wait a random 0 to revocation_poll_s before each revoke, so "
                             "revocations land anywhere in the agent's poll cycle (default); "
                             "--no-jitter sends it as soon as the job runs")
    args = parser.parse_args()
    if args.runs < 1 or args.poll_ms <= 0:
        parser.error("--runs must be >= 1 and --poll-ms > 0")
    if os.geteuid() != 0:
        print("needs root (private munged, device nodes, cgroups, runuser)", file=sys.stderr)
        return 2

    from ztgpu.config import parse_config

    base = Path(tempfile.mkdtemp(prefix="ztgpu-bench-revoke-"))
    base.chmod(0o755)
    munge = MungeDaemon()
    site: Site | None = None
    runs: list[dict[str, float]] = []
    try:
        munge.start()
        site = Site(base, munge)
        site.start()
        site.login(None)
        cert, key = site.pki.issue("node", NODE)
        auth = {"authd_url": site.authd.url}  # revocation_poll_s: the default
        tls = {"ca_cert": str(site.pki.ca_cert), "cert": str(cert), "key": str(key)}
        with standalone_agent(base / "agent", node={"name": NODE}, auth=auth,
                              tls=tls) as agent:
            poll = parse_config(agent.config, str(agent.config_path)).auth.revocation_poll_s
            print(f"authd at {site.authd.url}; agent {NODE} with auth.revocation_poll_s="
                  f"{poll:g} (config default); spool checked every {args.poll_ms:g} ms; "
                  f"jitter {'0-' + format(poll, 'g') + 's' if args.jitter else 'off'}; "
                  f"{os.cpu_count()} CPUs", flush=True)
            rng = random.Random(20240601)
            for i in range(args.runs):
                job_id = str(810_000 + i)
                delay = rng.uniform(0, poll) if args.jitter else 0.0
                figures = one_round(site, agent, job_id, args.poll_ms / 1000, delay)
                runs.append(figures)
                print(f"run {i + 1:2d} job {job_id}: revoke event {figures['event']:.3f}s "
                      f"devices root {figures['devices']:.3f}s (revoke answered "
                      f"{figures['answer'] * 1000:.0f} ms; enrol+login+prolog "
                      f"{figures['setup']:.2f}s; waited {figures['delay']:.2f}s before "
                      "revoking)", flush=True)
    finally:
        if site is not None:
            code = site.authd.stop()
            if code not in (0, None):
                print(f"authd exited with {code} on SIGTERM; log tail:\n{site.authd.log()}",
                      flush=True)
        munge.stop()
        shutil.rmtree(base, ignore_errors=True)

    events = [r["event"] for r in runs]
    print(f"to the revoke event (s): {summary(events)}", flush=True)
    print(f"to the devices back to root (s): {summary([r['devices'] for r in runs])}",
          flush=True)
    answers = [r["answer"] * 1000 for r in runs]
    print(f"revoke request answered (ms): p50={percentile(answers, 50):.0f} "
          f"max={max(answers):.0f}", flush=True)
    print(f"revocation p50_s={percentile(events, 50):.2f} p99_s={percentile(events, 99):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
