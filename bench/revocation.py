"""Revocation latency on real Slurm: from an admin's revoke until the job has lost its
GPUs and until it is gone from Slurm.

Runs on the private Slurm cluster with MFA switched on
(``ztgpu.testing.mfa_cluster``, no job gate): a private munged, a site PKI, a
real ``ztgpu-authd`` (SQLite, the harness's default policy), slurmctld and
slurmd with 4 simulated GPUs, and the suite installed by ``ztgpu install``
with its node agent asking authd for a signed grant in every Prolog and
polling authd's revocation feed. The harness polls that feed every 0.5 s;
the bench restarts the agent (before any job) with
``auth.revocation_poll_s`` at the configuration default (printed), so the
figures are what a site gets out of the box. root is enrolled locally and
logs in once (again when its MFA session nears the admin age limit).

Each of ``--runs`` rounds:

1. root enrols the test user (``ztalice``) through the admin API (a
   revocation deletes the enrolment, so every round enrols again) and the
   user runs ``ztgpu login`` with a TOTP code;
2. the user submits a batch job holding 1 GPU (odd rounds) or 2 (even
   rounds) whose script starts a second, background process and waits; the
   bench waits until Slurm shows it RUNNING, the agent has recorded
   job.grant and the device files belong to the user;
3. after a random wait of 0 to ``revocation_poll_s`` (``--no-jitter``: none;
   without it the rounds lock onto the agent's poll cycle and every revoke
   lands just after a poll, the worst case), root's revoke request
   (``POST /v1/admin/revoke``, its munge credential made beforehand) is
   timed from just before it is sent:

   * **lost its GPUs** (``A``): the agent's spool (checked every
     ``--poll-ms`` ms) holds the job.action event with action "revoke" and
     outcome "access_removed" (recorded only after every process that held
     one of the job's GPUs was killed) *and* the device files are owned by
     root again (``os.lstat``). A revoke event with another outcome counts as
     never: ``inf``.
   * **gone from Slurm** (``C``): ``squeue -h -j JOB`` prints nothing (polled
     every ``--squeue-ms`` ms in a thread; a failing squeue never counts as
     gone). The time the job left RUNNING is printed too.

4. the job's final state is read with ``scontrol -o show job`` (the cluster
   keeps ended jobs for ``MinJobAge``), and the bench waits (up to 15 s) for
   the agent's job.action cancel_job events to settle and for its job.release
   (the Epilog). Each round prints the revoke event's outcome, every
   cancel_job event's outcome (a failed cancel is reported, never hidden),
   the final Slurm state, the release outcome and any isolation.violated or
   device.holder events of the job, and (from the events' own timestamps)
   when the agent saw the job ended after its cancel and when the Epilog's
   release was recorded, which splits ``C`` into its parts.

The simulated GPUs are device nodes without a driver (an open that access
control allows fails with ENXIO), so no process of the job can really hold
one open; "lost every handle" is therefore what the agent records once it
has killed every holder it found, together with the files back at rest.

One round takes about 5 s here (2 CPUs); with start and teardown the default
20 rounds take about 2 minutes.

Prints per-run figures and never asserts on them. The last line is:

    revocation p50_s=A p99_s=B gone_p99_s=C runs=N cancel_failures=F

where ``F`` counts the rounds in which the agent recorded a failed cancel_job
or no successful one.

Usage (root): python bench/revocation.py [--runs 20] [--poll-ms 20] [--squeue-ms 30]
    [--no-jitter]
"""

from __future__ import annotations

import argparse
import math
import os
import pwd
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import yaml
from benchlib import percentile

from ztgpu.testing.mfa_cluster import MfaCluster, mfa_cluster
from ztgpu.testing.slurm_cluster import ClusterSpec, SlurmTestCluster

USER = "ztalice"
ROUND_TIMEOUT_S = 60.0
#: How long after the job left squeue the agent's cancel and release may take
#: to show in its spool.
SETTLE_S = 15.0
#: Log root in again when its session is older than this (authd wants admin
#: actions within admin_mfa_max_age_s, 900 s by default).
ROOT_RELOGIN_S = 600.0
JOB_SCRIPT = """#!/bin/sh
# a second process of the job, as a real job has workers
sleep 600 &
wait
"""


class Admin:
    """root's admin calls to authd over TLS, with one MFA login kept fresh."""

    def __init__(self, mfa: MfaCluster) -> None:
        self.mfa = mfa
        self.login_at = -math.inf

    def login(self) -> None:
        res = self.mfa.authd.ztgpu("login", "--code-stdin", stdin=self.mfa.code("root") + "\n")
        if res.returncode != 0:
            raise SystemExit(f"root login failed ({res.returncode}): {res.stderr.strip()}")
        self.login_at = time.monotonic()

    def credential(self) -> str:
        from ztgpu.authd.authority import ADMIN

        if time.monotonic() - self.login_at > ROOT_RELOGIN_S:
            self.login()
        return self.mfa.authd.credential_as(None, ADMIN)

    def request(self, path: str, body: dict[str, Any]) -> Any:
        from ztgpu.auth_client import AuthdClient
        from ztgpu.trust.pki import client_context

        with AuthdClient(self.mfa.authd.url,
                         client_context(self.mfa.pki.ca_cert, None, None)) as client:
            return client.request("POST", path, body)

    def enroll(self, user: str) -> None:
        from ztgpu.testing.authd_process import secret_from_uri

        reply = self.request("/v1/admin/enroll", {"credential": self.credential(),
                                                  "user": user})
        self.mfa.secrets[user] = secret_from_uri(reply["otpauth_uri"])
        # A new secret: none of its steps is used yet (authd resets them too).
        self.mfa.codes._steps.pop(user, None)


@dataclass
class SqueueWatch:
    """Polls ``squeue -h -j JOB`` in a thread: when the job left RUNNING and left squeue."""

    cluster: SlurmTestCluster
    job_id: str
    interval_s: float
    left_running: float | None = None
    gone: float | None = None
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="squeue", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        argv = ["squeue", "-h", "-j", self.job_id, "-o", "%T"]
        while not self.stop.is_set():
            res = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                 env=self.cluster.env(), check=False)
            seen = time.monotonic()
            if res.returncode != 0:
                if len(self.errors) < 5:
                    self.errors.append(f"rc {res.returncode}: {res.stderr.strip()[:200]}")
            else:
                states = res.stdout.split()
                if self.left_running is None and "RUNNING" not in states:
                    self.left_running = seen
                if not states:
                    self.gone = seen
                    return
            self.stop.wait(self.interval_s)

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        self.stop.set()
        self.thread.join(5)


def owners(cluster: SlurmTestCluster, minors: list[int]) -> list[int]:
    return [os.lstat(cluster.gpu_path(m)).st_uid for m in minors]


def settled_cancels(events: list[dict[str, Any]]) -> bool:
    """Whether the agent's cancel of the job has come to an end (done or given up)."""
    return any(e.get("outcome") == "cancelled" or "gave up" in str(e.get("reason", ""))
               for e in events)


def use_default_revocation_poll(mfa: MfaCluster) -> float:
    """Restart the agent (no job runs yet) with auth.revocation_poll_s at the default."""
    from ztgpu.config import parse_config

    suite = mfa.suite
    suite.config["auth"].pop("revocation_poll_s", None)
    suite.config_path.write_text(yaml.safe_dump(suite.config, sort_keys=False))
    suite.stop_agent()
    suite.start_agent()
    return parse_config(suite.config, str(suite.config_path)).auth.revocation_poll_s


def one_round(mfa: MfaCluster, admin: Admin, gpus: int, delay_s: float, poll_s: float,
              squeue_s: float) -> dict[str, Any]:
    """One enrol/login/submit/revoke round; its timings (s) and what the agent recorded."""
    suite, cluster = mfa.suite, mfa.suite.cluster
    uid = pwd.getpwnam(USER).pw_uid
    t_setup = time.monotonic()
    admin.enroll(USER)
    login = mfa.login(USER)
    if login.returncode != 0:
        raise SystemExit(f"ztgpu login as {USER} failed: {login.stderr.strip()}")
    job = cluster.sbatch(USER, JOB_SCRIPT, gpus=gpus)
    cluster.wait_job(job, ["RUNNING"], timeout=ROUND_TIMEOUT_S)
    grant = suite.wait_event("job.grant", job, timeout=ROUND_TIMEOUT_S)
    minors = [int(g["minor"]) for g in grant["gpus"]]
    if len(minors) != gpus or owners(cluster, minors) != [uid] * gpus:
        raise SystemExit(f"job {job}: granted minors {minors} are not {gpus} GPUs all owned "
                         f"by {USER}: {owners(cluster, minors)}")
    setup_s = time.monotonic() - t_setup

    time.sleep(delay_s)
    body = {"credential": admin.credential(), "user": USER, "reason": "bench revocation"}
    watch = SqueueWatch(cluster, job, squeue_s)
    watch.start()
    sent, sent_wall = time.monotonic(), time.time()
    admin.request("/v1/admin/revoke", body)
    answered = time.monotonic() - sent
    event_s = files_s = removed_s = None
    revoke_outcome = "none"
    deadline = sent + ROUND_TIMEOUT_S
    while removed_s is None and time.monotonic() < deadline:
        if event_s is None:
            revokes = [e for e in suite.events("job.action", job) if e.get("action") == "revoke"]
            if revokes:
                event_s = time.monotonic() - sent
                revoke_outcome = str(revokes[0].get("outcome"))
        if files_s is None and owners(cluster, minors) == [0] * gpus:
            files_s = time.monotonic() - sent
        if event_s is not None and files_s is not None:
            removed_s = max(event_s, files_s) if revoke_outcome == "access_removed" else math.inf
            break
        time.sleep(poll_s)
    if removed_s is None:
        removed_s = math.inf
    watch.join(max(0.0, deadline - time.monotonic()))
    gone_s = math.inf if watch.gone is None else watch.gone - sent
    left_s = math.inf if watch.left_running is None else watch.left_running - sent
    cleanup = ""
    if watch.gone is None:  # end it ourselves so the next round starts clean
        cluster.slurm(["scancel", job], check=False)
        cleanup = "; the bench had to scancel it"
        end = time.monotonic() + 30
        while cluster.slurm(["squeue", "-h", "-j", job], check=False).strip():
            if time.monotonic() > end:
                raise SystemExit(f"job {job} still in squeue after the bench's scancel")
            time.sleep(0.2)

    state = cluster.job_state(job)
    end = time.monotonic() + SETTLE_S
    while time.monotonic() < end:
        cancels = [e for e in suite.events("job.action", job) if e.get("action") == "cancel_job"]
        if settled_cancels(cancels) and suite.events("job.release", job):
            break
        time.sleep(0.2)
    cancels = [e for e in suite.events("job.action", job) if e.get("action") == "cancel_job"]
    releases = suite.events("job.release", job)
    done = [e for e in cancels if e.get("outcome") == "cancelled"]
    return {
        "job": job, "gpus": gpus, "setup": setup_s, "delay": delay_s, "answer": answered,
        "event": event_s, "files": files_s, "removed": removed_s, "left": left_s,
        "gone": gone_s, "revoke_outcome": revoke_outcome,
        "cancels": [(str(e.get("outcome")), str(e.get("reason", ""))) for e in cancels],
        "cancel_failed": (not any(e.get("outcome") == "cancelled" for e in cancels)
                          or any(e.get("outcome") == "failed" for e in cancels)),
        "state": state.get("JobState", "?"), "reason": state.get("Reason", "?"),
        "exit": state.get("ExitCode", "?"),
        "release": [str(e.get("outcome")) for e in releases],
        # From the events' own timestamps (wall clock, microseconds):
        "cancelled_at": event_age(done[0], sent_wall) if done else None,
        "released_at": event_age(releases[0], sent_wall) if releases else None,
        "violations": [str(e.get("reason", "")) for e in suite.events("isolation.violated",
                                                                        job)],
        "holders": len(suite.events("device.holder", job)),
        "squeue_errors": watch.errors, "cleanup": cleanup,
        "node": cluster.node_state(),
    }


def event_age(event: dict[str, Any], since: float) -> float:
    """Seconds from the wall-clock time *since* to the event's timestamp."""
    from datetime import datetime

    return datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp() - since


def fmt(value: float | None) -> str:
    return "never" if value is None or math.isinf(value) else f"{value:.3f}s"


def summary(values: list[float]) -> str:
    return (f"p50={percentile(values, 50):.2f} p90={percentile(values, 90):.2f} "
            f"p99={percentile(values, 99):.2f} min={min(values):.2f} max={max(values):.2f}")


def report(i: int, r: dict[str, Any]) -> None:
    cancels = ", ".join(f"{o} ({why[-90:]})" for o, why in r["cancels"]) or "NONE"
    print(f"run {i:2d} job {r['job']} ({r['gpus']} GPU): lost GPUs {fmt(r['removed'])} "
          f"(revoke event {fmt(r['event'])} outcome {r['revoke_outcome']}; files root "
          f"{fmt(r['files'])}); left RUNNING {fmt(r['left'])}; gone from squeue "
          f"{fmt(r['gone'])}{r['cleanup']}; agent's cancel done {fmt(r['cancelled_at'])}, "
          f"Epilog release {fmt(r['released_at'])}", flush=True)
    print(f"    Slurm {r['state']} reason {r['reason']} exit {r['exit']}; cancel_job: "
          f"{cancels}; release: {', '.join(r['release']) or 'NONE'}; node {r['node']}; "
          f"revoke answered {r['answer'] * 1000:.0f} ms; enrol+login+start "
          f"{r['setup']:.2f}s; waited {r['delay']:.2f}s", flush=True)
    for what, items in (("isolation.violated", r["violations"]),
                        ("squeue failed", r["squeue_errors"])):
        for item in items:
            print(f"    {what}: {item}", flush=True)
    if r["holders"]:
        print(f"    device.holder events: {r['holders']}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="revocations (default 20)")
    parser.add_argument("--poll-ms", type=float, default=20.0,
                        help="how often the spool and device files are checked (default 20)")
    parser.add_argument("--squeue-ms", type=float, default=30.0,
                        help="pause between squeue calls while waiting for the job to leave "
                             "(default 30)")
    parser.add_argument("--jitter", action=argparse.BooleanOptionalAction, default=True,
                        help="wait a random 0 to revocation_poll_s before each revoke, so "
                             "revocations land anywhere in the agent's poll cycle (default); "
                             "--no-jitter sends it as soon as the job runs")
    args = parser.parse_args()
    if args.runs < 1 or args.poll_ms <= 0 or args.squeue_ms <= 0:
        parser.error("--runs must be >= 1, --poll-ms and --squeue-ms > 0")
    if os.geteuid() != 0:
        print("needs root (starts Slurm daemons, munged, device nodes, cgroups)",
              file=sys.stderr)
        return 2

    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    # Every run logs ztalice in again: lift authd's per-user login limit
    # (10 a minute by default), which would otherwise refuse the 11th run.
    with mfa_cluster(ClusterSpec(), gate=False,
                     authd={"login_per_user_per_min": 10_000}) as mfa:
        poll = use_default_revocation_poll(mfa)
        admin = Admin(mfa)
        admin.login()
        print(f"cluster up in {time.monotonic() - started:.1f}s; authd at {mfa.authd.url}; "
              f"agent on {mfa.suite.cluster.node} with auth.revocation_poll_s={poll:g} "
              f"(config default); spool checked every {args.poll_ms:g} ms, squeue every "
              f"{args.squeue_ms:g} ms; jitter "
              f"{'0-' + format(poll, 'g') + 's' if args.jitter else 'off'}; "
              f"{os.cpu_count()} CPUs", flush=True)
        rng = random.Random(20240601)
        t_rounds = time.monotonic()
        for i in range(1, args.runs + 1):
            delay = rng.uniform(0, poll) if args.jitter else 0.0
            figures = one_round(mfa, admin, 1 if i % 2 else 2, delay, args.poll_ms / 1000,
                                args.squeue_ms / 1000)
            runs.append(figures)
            report(i, figures)
        rounds_s = time.monotonic() - t_rounds
    print(f"{len(runs)} rounds in {rounds_s:.1f}s ({rounds_s / len(runs):.1f}s each); "
          f"{time.monotonic() - started:.1f}s with start and teardown", flush=True)

    removed = [r["removed"] for r in runs]
    gone = [r["gone"] for r in runs]
    print(f"to the GPUs lost (revoke event access_removed and files root) (s): "
          f"{summary(removed)}", flush=True)
    events = [math.inf if r["event"] is None else r["event"] for r in runs]
    print(f"to the revoke event (s): {summary(events)}", flush=True)
    print(f"to leaving RUNNING in squeue (s): {summary([r['left'] for r in runs])}",
          flush=True)
    for label, key in (("the agent's cancel recorded done", "cancelled_at"),
                       ("the Epilog's release recorded", "released_at")):
        seen = [r[key] for r in runs if r[key] is not None]
        if seen:
            print(f"to {label} (s, event timestamps; {len(seen)} runs): {summary(seen)}",
                  flush=True)
    print(f"to gone from squeue (s): {summary(gone)}", flush=True)
    answers = [r["answer"] * 1000 for r in runs]
    print(f"revoke request answered (ms): p50={percentile(answers, 50):.0f} "
          f"max={max(answers):.0f}", flush=True)
    outcomes: dict[str, int] = {}
    for r in runs:
        key = f"revoke={r['revoke_outcome']} slurm={r['state']}"
        outcomes[key] = outcomes.get(key, 0) + 1
    print("outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())),
          flush=True)
    failures = sum(1 for r in runs if r["cancel_failed"])
    print(f"revocation p50_s={percentile(removed, 50):.2f} p99_s={percentile(removed, 99):.2f} "
          f"gone_p99_s={percentile(gone, 99):.2f} runs={len(runs)} cancel_failures={failures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
