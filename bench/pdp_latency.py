"""Policy decision latency: a real ztgpu-authd answering POST /v1/gate, and evaluate().

Starts a private munged, a site PKI and a real authd process (``ztgpu-authd``,
TLS 1.3 with client certificates) in a temporary directory, with the SQLite
store (or ``--store postgres``: a private real PostgreSQL server, fsync and
synchronous commit on). The bootstrap admin root is enrolled locally and logs
in; root enrols ``nobody`` through the admin API and ``nobody`` logs in with a
TOTP code, so every gate decision is "allow".

authd runs a realistic policy of ``--rules`` rules (users, groups, accounts,
partitions, allowed hours, deny rules); ``nobody``'s jobs are allowed only by
the last rule, so each decision walks the whole rule list.

Two phases against the same authd:

* **Open loop** at a fixed offered load (``--open-rate``, default 500
  decisions/s, for ``--open-duration`` s): ``--open-procs`` client processes
  share the arrivals; in each, a dispatcher queues a request at its
  scheduled time whether or not earlier ones were answered, and
  ``--open-conns`` sender threads with one persistent connection each send
  them. Latency runs from the scheduled arrival to the answer, so queueing
  behind a busy authd counts (no coordinated omission).
* **Closed loop** for the maximum rate: ``--procs`` client processes each
  hold one persistent connection and send the next request when the last
  was answered, until ``--duration`` s have passed or ``--count`` decisions
  are done in all.

Every request has the controller's ``controller`` certificate (TLS handshake
and a warm-up decision before the timed part), a new job id, and must be
answered 200 with ``allow`` true; anything else aborts the run. authd's CPU
(process and threads, from /proc) is measured over each phase.

Then the same policy is evaluated in this process (``ztgpu.policy.evaluate``)
``--eval-calls`` times over a mix of realistic requests, each call timed with
``time.perf_counter_ns``.

Prints figures, never asserts on them. The last line is:

    pdp_latency p50_ms=A p99_ms=B rate=R eval_p99_us=E cpu_ms=C

(p50/p99 end to end at the open loop's offered load, the closed loop's
maximum decisions/s, the p99 of one in-process evaluate() call in
microseconds, and authd's CPU per decision at the offered load in ms).

Usage (root): python bench/pdp_latency.py [--open-rate 500] [--open-duration 10]
              [--procs 4] [--duration 10] [--count 5000]
              [--store sqlite|postgres] [--rules 50] [--eval-calls 20000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import pwd
import queue
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchlib import percentile, reports_to_parent, wait_for_workers

from ztgpu.testing.authd_process import AuthdProcess, secret_from_uri
from ztgpu.testing.collector_process import SitePki
from ztgpu.testing.munge import MungeDaemon

READY_TIMEOUT_S = 60.0
#: What a client process reports: first send, last answer, latencies (ms), its CPU s.
WorkerResult = tuple[float, float, list[float], float]
REQUEST_TIMEOUT_S = 30.0
USER = "nobody"
PARTITION = "gpu"

# ------------------------------------------------------------------ the policy

PROJECTS = 24  # group + account rules
PEOPLE = 12    # per-user rules
BANNED = 3     # deny rules


def realistic_policy(rules: int) -> str:
    """Policy YAML with ``rules`` rules; only the last one (any user, partition gpu) allows
    ``nobody``.

    The rules are what a site writes: deny rules for suspended users and a
    closed account, per-project rules (unix group + Slurm accounts + partitions,
    some with working hours or night windows and GPU limits), per-user rules
    (their accounts, a shorter MFA age), partition rules (debug, interactive),
    and a catch-all for the gpu partition at the end.
    """
    out = ["version: 1", "defaults:", "  mfa_max_age_h: 12", "  max_gpus_per_job: 8",
           "  max_gpus_per_user_per_node: 8", "admins:", "  - user: root",
           "    roles: [enroll, revoke, keys, jit_approve, policy, audit]",
           "  - group: hpc-admins", "    roles: [audit, jit_approve]", "rules:"]
    body: list[list[str]] = []
    for b in range(BANNED):
        body.append([f"  - name: suspended-{b}",
                     f"    users: [{', '.join(f'sus{b}u{k}' for k in range(5))}]",
                     "    allow: false",
                     "    reason: account suspended; contact hpc-support@example.org"])
    body.append(["  - name: closed-account", "    accounts: [legacy-2019, legacy-2020]",
                 "    allow: false",
                 "    reason: this account has no GPU allocation left; use a current project"])
    for p in range(PROJECTS):
        rule = [f"  - name: project-{p:02d}", f"    groups: [proj{p:02d}, proj{p:02d}-ext]",
                f"    accounts: [acct{p:02d}, acct{p:02d}-gpu]",
                "    partitions: [gpu, gpu-long]" if p % 3 else "    partitions: [gpu]",
                "    allow: true", f"    max_gpus_per_job: {4 if p % 2 else 8}",
                "    max_gpus_per_user_per_node: 8"]
        if p % 4 == 1:
            rule += ["    allowed_hours:", "      days: [mon, tue, wed, thu, fri]",
                     '      from: "07:00"', '      to: "21:00"', "      tz: Europe/Berlin"]
        elif p % 4 == 3:
            rule += ["    allowed_hours:", '      from: "20:00"', '      to: "06:00"',
                     "      tz: America/New_York"]
        body.append(rule)
    for u in range(PEOPLE):
        body.append([f"  - name: person-{u:02d}", f"    users: [user{u:03d}]",
                     f"    accounts: [acct{u % PROJECTS:02d}, pers{u:03d}]",
                     "    allow: true", "    mfa_max_age_h: 4", "    max_gpus_per_job: 2"])
    body.append(["  - name: debug", "    partitions: [debug]", "    allow: true",
                 "    max_gpus_per_job: 1", "    max_gpus_per_user_per_node: 1",
                 "    mfa_max_age_h: 1"])
    body.append(["  - name: interactive-staff", "    groups: [staff, hpc-admins]",
                 "    partitions: [interactive]", "    allow: true", "    max_gpus_per_job: 2"])
    body.append(["  - name: students-daytime", "    groups: [students]",
                 "    partitions: [gpu-small]", "    allow: true", "    max_gpus_per_job: 1",
                 "    allowed_hours:", "      days: [mon, tue, wed, thu, fri]",
                 '      from: "08:00"', '      to: "18:00"', "      tz: UTC"])
    catch_all = ["  - name: everyone-gpu", '    users: ["*"]', f"    partitions: [{PARTITION}]",
                 "    allow: true", "    max_gpus_per_job: 4",
                 "    max_gpus_per_user_per_node: 4"]
    filler = 0
    while len(body) + 1 < rules:  # more project-like rules up to the count asked for
        body.append([f"  - name: extra-{filler:03d}", f"    groups: [extra{filler:03d}]",
                     f"    accounts: [xacct{filler:03d}]", "    partitions: [gpu, gpu-long]",
                     "    allow: true"])
        filler += 1
    body = body[:max(0, rules - 1)]
    body.append(catch_all)
    out += [line for rule in body for line in rule]
    out.append("default: deny")
    return "\n".join(out) + "\n"


def eval_requests(count: int, now: datetime) -> list[Any]:
    """A mix of realistic AccessRequests: members of projects, named users, debug and
    interactive jobs, suspended users, strangers (no rule), and the catch-all case."""
    from ztgpu.policy import AccessRequest

    rng = random.Random(20240601)
    out: list[Any] = []
    for _ in range(count):
        kind = rng.random()
        p = rng.randrange(PROJECTS)
        groups = {f"user{rng.randrange(1000):03d}", "users"}
        user, account, partition = f"r{rng.randrange(10_000):05d}", f"acct{p:02d}", "gpu"
        if kind < 0.45:  # a project member
            groups.add(f"proj{p:02d}" if rng.random() < 0.8 else f"proj{p:02d}-ext")
            partition = rng.choice(["gpu", "gpu-long"])
        elif kind < 0.6:  # a named user
            u = rng.randrange(PEOPLE)
            user, account = f"user{u:03d}", f"pers{u:03d}"
        elif kind < 0.7:
            partition = "debug"
        elif kind < 0.75:
            groups.add("staff")
            partition = "interactive"
        elif kind < 0.8:
            user = f"sus{rng.randrange(BANNED)}u{rng.randrange(5)}"
        elif kind < 0.9:  # no rule matches: default deny (builds the longest reason)
            account, partition = f"other{p}", "cpu"
        else:  # falls through to the catch-all, as nobody does in the gate
            account = None
        mfa = None if rng.random() < 0.1 else rng.uniform(0, 20 * 3600)
        out.append(AccessRequest(user=user, groups=frozenset(groups), account=account,
                                 partition=partition, gpus=rng.randint(1, 8),
                                 gpus_held_on_node=rng.choice([0, 0, 0, 2, 4]),
                                 mfa_age_s=mfa, now=now))
    return out


def bench_evaluate(policy_text: str, calls: int) -> tuple[list[int], dict[str, int], float]:
    """Time ``calls`` evaluate() calls: (ns per call, decision codes seen, worst-case p99 ns)."""
    from ztgpu.policy import AccessRequest, evaluate, parse_policy

    policy = parse_policy(policy_text, "bench-policy.yaml")
    now = datetime.now(UTC)
    requests = eval_requests(1000, now)
    for request in requests:  # warm up (zoneinfo caches, branch paths)
        evaluate(policy, request)
    codes: dict[str, int] = {}
    timings: list[int] = []
    clock = time.perf_counter_ns
    for i in range(calls):
        request = requests[i % len(requests)]
        start = clock()
        decision = evaluate(policy, request)
        timings.append(clock() - start)
        codes[decision.code] = codes.get(decision.code, 0) + 1
    # The gate's own case: nobody, walking every rule to the catch-all.
    gate_case = AccessRequest(user=USER, groups=frozenset({"nogroup"}), account=None,
                              partition=PARTITION, gpus=1, mfa_age_s=60.0, now=now)
    worst: list[int] = []
    for _ in range(min(calls, 5000)):
        start = clock()
        evaluate(policy, gate_case)
        worst.append(clock() - start)
    return timings, codes, percentile(worst, 99)


# --------------------------------------------------------------------- the site


def api(authd: AuthdProcess, pki: SitePki, path: str, body: dict[str, Any]) -> Any:
    """One request as a researcher or admin (no certificate); raises on refusal."""
    from ztgpu.auth_client import AuthdClient
    from ztgpu.trust.pki import client_context

    with AuthdClient(authd.url, client_context(pki.ca_cert, None, None)) as client:
        return client.request("POST", path, body)


def login(authd: AuthdProcess, pki: SitePki, user: str | None, secret: bytes) -> None:
    from ztgpu.authd.authority import LOGIN
    from ztgpu.trust.totp import code_at

    api(authd, pki, "/v1/login", {"credential": authd.credential_as(user, LOGIN),
                                  "code": code_at(secret, datetime.now(UTC))})


def set_up_site(authd: AuthdProcess, pki: SitePki) -> None:
    """Enrol root locally, start authd, log root in, enrol and log in nobody."""
    from ztgpu.authd.authority import ADMIN

    res = authd.ztgpu("admin", "enroll", "root", "--local")
    found = re.search(r"otpauth://\S+", res.stdout)
    if res.returncode != 0 or found is None:
        raise SystemExit(f"enrolling root failed ({res.returncode}): {res.stderr.strip()}")
    root_secret = secret_from_uri(found.group(0))
    authd.start()
    login(authd, pki, None, root_secret)
    reply = api(authd, pki, "/v1/admin/enroll",
                {"credential": authd.credential_as(None, ADMIN), "user": USER})
    login(authd, pki, USER, secret_from_uri(reply["otpauth_uri"]))


# ------------------------------------------------------------------ clients


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over authd's gate socket (the job gate on the controller host)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=REQUEST_TIMEOUT_S)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(REQUEST_TIMEOUT_S)
        sock.connect(self.path)
        self.sock = sock


def _connect(port: int, ca_cert: Path, cert: Path, key: Path) -> http.client.HTTPConnection:
    """A connected client: mutual TLS to ``port``, or the gate socket when ``port`` is 0
    (``ca_cert`` then names the socket)."""
    from ztgpu.trust.pki import client_context

    if port == 0:
        unix = _UnixHTTPConnection(str(ca_cert))
        unix.connect()
        return unix

    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S,
                                       context=client_context(ca_cert, cert, key))
    conn.connect()  # TLS handshake before the timed part
    return conn


def _gate_body(job_id: int, uid: int, n: int) -> bytes:
    return json.dumps({"job_id": str(job_id), "uid": uid, "user": USER,
                       "partition": PARTITION, "account": None,
                       "gpus_count": 1 + n % 4, "time_limit_s": 3600}).encode()


def _decide(conn: http.client.HTTPConnection, data: bytes) -> None:
    conn.request("POST", "/v1/gate", body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = response.read()
    text = answer[:300].decode(errors="replace")
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {text}")
    if json.loads(answer).get("allow") is not True:
        raise RuntimeError(f"not allowed: {text}")


@reports_to_parent
def client_main(index: int, port: int, ca_cert: Path, cert: Path, key: Path, uid: int,
                quota: int, duration: float, start: Any, results: Any) -> WorkerResult:
    """Closed loop: one connection, the next request sent when the last answer came."""
    conn = _connect(port, ca_cert, cert, key)
    job_base = 1_000_000 * (index + 1)
    _decide(conn, _gate_body(job_base, uid, 0))  # warm-up, not timed
    bodies = [_gate_body(job_base + n, uid, n) for n in range(1, (quota or 200_000) + 1)]
    results.put(("ready", index, None))
    start.wait()
    cpu_start = time.process_time()
    latencies: list[float] = []
    first_send = time.monotonic()
    deadline = first_send + duration if duration > 0 else float("inf")
    clock = time.perf_counter
    for data in bodies:
        sent = clock()
        _decide(conn, data)
        latencies.append((clock() - sent) * 1000)
        if time.monotonic() >= deadline:
            break
    last_answer = time.monotonic()
    cpu = time.process_time() - cpu_start
    conn.close()
    return (first_send, last_answer, latencies, cpu)


@reports_to_parent
def open_loop_main(index: int, port: int, ca_cert: Path, cert: Path, key: Path, uid: int,
                   rate: float, duration: float, conns: int, start: Any,
                   results: Any) -> WorkerResult:
    """Open loop: requests arrive every 1/rate s whether or not earlier ones were answered.

    A dispatcher queues each request at its scheduled time; ``conns`` sender
    threads, each with its own persistent connection, take them in order.
    Latency runs from the scheduled arrival to the answer, so time spent
    waiting for a free connection (authd falling behind) counts.
    """
    job_base = 1_000_000 * (index + 1) + 500_000
    connections = [_connect(port, ca_cert, cert, key) for _ in range(conns)]
    for n, conn in enumerate(connections):
        _decide(conn, _gate_body(job_base - 1 - n, uid, n))  # warm-up, not timed
    total = int(rate * duration)
    bodies = [_gate_body(job_base + n, uid, n) for n in range(total)]
    arrivals: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
    latencies: list[float] = []
    failures: list[str] = []
    clock = time.perf_counter

    def sender(conn: http.client.HTTPConnection) -> None:
        while (item := arrivals.get()) is not None:
            scheduled, data = item
            try:
                _decide(conn, data)
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            latencies.append((clock() - scheduled) * 1000)

    threads = [threading.Thread(target=sender, args=(c,), daemon=True) for c in connections]
    for thread in threads:
        thread.start()
    results.put(("ready", index, None))
    start.wait()
    cpu_start = time.process_time()
    first = clock()
    first_send = time.monotonic()
    for n, data in enumerate(bodies):
        scheduled = first + n / rate
        pause = scheduled - clock()
        if pause > 0:
            time.sleep(pause)
        arrivals.put((scheduled, data))
    for _ in threads:
        arrivals.put(None)
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S + duration)
    last_answer = time.monotonic()
    if failures:
        raise RuntimeError(failures[0])
    cpu = time.process_time() - cpu_start
    for conn in connections:
        conn.close()
    return (first_send, last_answer, latencies, cpu)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and all its threads."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")




def drive(authd: AuthdProcess, pki: SitePki, procs: int, count: int, duration: float,
          *, open_rate: float = 0.0, conns: int = 4,
          unix: bool = False) -> tuple[float, list[float], float, float]:
    """Run the clients once: (wall seconds, latencies in ms, authd CPU s, clients CPU s).

    With ``open_rate`` the ``procs`` clients share that many arrivals per
    second for ``duration`` seconds (open loop); otherwise each sends its
    share of ``count`` one after another (closed loop).
    """
    assert authd.proc is not None
    uid = pwd.getpwnam(USER).pw_uid
    cert, key = pki.issue("controller", "slurmctld")
    quotas = [count // procs + (1 if i < count % procs else 0) if count else 0
              for i in range(procs)]
    ctx = mp.get_context("fork")
    start = ctx.Event()
    results = ctx.Queue()
    if open_rate:
        port, ca = (0, authd.gate_socket) if unix else (authd.port, pki.ca_cert)
        workers = [ctx.Process(target=open_loop_main, name=f"bench-open-{i}",
                               args=(i, port, ca, cert, key, uid,
                                     open_rate / procs, duration, conns, start, results))
                   for i in range(procs)]
    else:
        workers = [ctx.Process(target=client_main, name=f"bench-gate-{i}",
                               args=(i, authd.port, pki.ca_cert, cert, key, uid, quotas[i],
                                     duration, start, results))
                   for i in range(procs)]
    try:
        for worker in workers:
            worker.start()
        wait_for_workers(workers, results, "ready", READY_TIMEOUT_S)
        cpu_start = cpu_s(authd.proc.pid)
        start.set()
        done = wait_for_workers(workers, results, "done", None)
        cpu_authd = cpu_s(authd.proc.pid) - cpu_start
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join(10)
        results.close()
    wall = max(d[1] for d in done) - min(d[0] for d in done)
    return wall, [ms for d in done for ms in d[2]], cpu_authd, sum(d[3] for d in done)


def report(label: str, wall: float, lat: list[float], cpu_authd: float,
           cpu_clients: float) -> None:
    rate = len(lat) / wall
    print(f"{label}: decisions={len(lat)} wall_s={wall:.2f} rate={rate:.0f}/s "
          f"(all allow, persistent connections)", flush=True)
    print(f"{label}: latency_ms p50={percentile(lat, 50):.2f} p90={percentile(lat, 90):.2f} "
          f"p99={percentile(lat, 99):.2f} p99.9={percentile(lat, 99.9):.2f} "
          f"max={max(lat):.1f} mean={sum(lat) / len(lat):.2f}", flush=True)
    print(f"{label}: cpu_cores authd={cpu_authd / wall:.2f} clients={cpu_clients / wall:.2f} "
          f"of {os.cpu_count()} CPUs; authd CPU per decision "
          f"{cpu_authd / len(lat) * 1000:.3f} ms", flush=True)


def start_postgres() -> Any:
    from ztgpu.testing.postgres import PostgresServer

    server = PostgresServer()
    server.start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="stop after this many seconds (0: no time limit; default 10)")
    parser.add_argument("--count", type=int, default=5000,
                        help="stop after this many decisions in all (0: no limit; default 5000)")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--open-rate", type=float, default=500.0,
                        help="offered load of the open-loop phase, decisions/s (default 500)")
    parser.add_argument("--open-duration", type=float, default=10.0,
                        help="length of the open-loop phase in seconds (default 10)")
    parser.add_argument("--open-procs", type=int, default=2,
                        help="open-loop client processes (default 2)")
    parser.add_argument("--open-conns", type=int, default=4,
                        help="connections per open-loop client process (default 4)")
    parser.add_argument("--rules", type=int, default=50, help="policy rules (default 50)")
    parser.add_argument("--eval-calls", type=int, default=20_000,
                        help="timed in-process evaluate() calls (default 20000)")
    args = parser.parse_args()
    if args.procs < 1 or args.rules < 1 or args.eval_calls < 1:
        parser.error("--procs, --rules and --eval-calls must be >= 1")
    if args.duration <= 0 and args.count <= 0:
        parser.error("give a --duration or a --count")
    if args.count and args.count < args.procs:
        parser.error("--count must be at least --procs")
    if os.geteuid() != 0:
        print("needs root (private munged, runuser, PostgreSQL as postgres)", file=sys.stderr)
        return 2

    policy_text = realistic_policy(args.rules)
    base = Path(tempfile.mkdtemp(prefix="ztgpu-bench-pdp-"))
    base.chmod(0o755)
    munge = MungeDaemon()
    server: Any = None
    authd: AuthdProcess | None = None
    try:
        munge.start()
        pki = SitePki(base / "pki")
        dsn = None
        if args.store == "postgres":
            server = start_postgres()
            dsn = server.dsn
        authd = AuthdProcess(base / "authd", pki, munge.socket, policy=policy_text,
                             authd={"gate_socket": str(base / "gate.sock")},
                             store=args.store, dsn=dsn)
        set_up_site(authd, pki)
        assert authd.proc is not None
        print(f"{args.store}: authd pid {authd.proc.pid} at {authd.url}, policy of "
              f"{args.rules} rules; {USER} enrolled and logged in; {args.procs} client "
              f"processes, {os.cpu_count()} CPUs", flush=True)
        open_run = drive(authd, pki, args.open_procs, 0, args.open_duration,
                         open_rate=args.open_rate, conns=args.open_conns)
        unix_run = drive(authd, pki, args.open_procs, 0, args.open_duration,
                         open_rate=args.open_rate, conns=args.open_conns, unix=True)
        closed_run = drive(authd, pki, args.procs, args.count, args.duration)
        if authd.proc.poll() is not None:
            raise SystemExit(f"authd exited with {authd.proc.returncode}:\n{authd.log()}")
    finally:
        if authd is not None:
            code = authd.stop()
            if code not in (0, None):
                print(f"authd exited with {code} on SIGTERM; log tail:\n{authd.log()}",
                      flush=True)
        if server is not None:
            server.stop()
        munge.stop()
        shutil.rmtree(base, ignore_errors=True)

    report(f"mTLS, open loop at {args.open_rate:g}/s", *open_run)
    report(f"gate socket, open loop at {args.open_rate:g}/s", *unix_run)
    report("mTLS, closed loop (maximum rate)", *closed_run)
    _, lat, cpu_authd, _ = open_run
    max_rate = len(closed_run[1]) / closed_run[0]
    cpu_ms = cpu_authd / len(lat) * 1000

    timings, codes, gate_case_p99 = bench_evaluate(policy_text, args.eval_calls)
    us = [t / 1000 for t in timings]
    shown = " ".join(f"{k}={v}" for k, v in sorted(codes.items()))
    print(f"evaluate: calls={len(us)} rules={args.rules} p50_us={percentile(us, 50):.1f} "
          f"p99_us={percentile(us, 99):.1f} max_us={max(us):.1f} "
          f"mean_us={sum(us) / len(us):.1f}", flush=True)
    print(f"evaluate: decisions {shown}", flush=True)
    print(f"evaluate: the gate's case (every rule to the catch-all) p99_us="
          f"{gate_case_p99 / 1000:.1f}", flush=True)
    _, unix_lat, unix_cpu, _ = unix_run
    print(f"pdp_latency_gate_socket p50_ms={percentile(unix_lat, 50):.2f} "
          f"p99_ms={percentile(unix_lat, 99):.2f} "
          f"cpu_ms={unix_cpu / len(unix_lat) * 1000:.3f}")
    print(f"pdp_latency p50_ms={percentile(lat, 50):.2f} p99_ms={percentile(lat, 99):.2f} "
          f"rate={max_rate:.0f} eval_p99_us={percentile(us, 99):.0f} cpu_ms={cpu_ms:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
