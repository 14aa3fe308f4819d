"""Collector ingest throughput: a real ztgpu-collectord under sustained load.

Starts a site PKI and a real collector process (``ztgpu-collectord``, mutual
TLS 1.3, durable commits) in a temporary directory, then drives it from
separate client processes. Each client process plays one or more nodes: it
holds that node's own certificate and one persistent HTTPS connection per
node, and sends the node's batches (``POST /v1/events``) one after the other,
timing each request from send to the 200 answer. Every answer is checked
(status 200, ``acked_seq`` = the batch's last seq, every event accepted);
any failure aborts the run.

The events are realistic hash-chained node events (job.grant,
isolation.verified, job.release with 1-8 GPUs), generated and serialised as
request bodies before any timing, so the clients spend the timed part only
on sending. The collector's RSS is sampled every 0.5 s during the run.
After the run the store is checked through the auditor API (``GET
/v1/nodes``): every node's head and event count must equal what was sent.

The run is done with the SQLite store, then with the PostgreSQL store (a
private real server, fsync and synchronous commit on); PostgreSQL is
reported as n/a when its server binaries are missing.

Prints figures, never asserts on them. The last line is:

    collector_ingest sqlite_eps=X postgres_eps=Y p99_ack_ms=Z rss_mb=M

(events/s per store; p99 acknowledgement latency and peak collector RSS,
the worse of the stores run).

Usage (root): python bench/collector_ingest.py [--events 200000] [--batch 1000]
              [--procs 4] [--nodes 4] [--store sqlite|postgres|both]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchlib import percentile, reports_to_parent, wait_for_workers

from ztgpu.audit import events
from ztgpu.testing.collector_process import CollectorClient, CollectorProcess, SitePki

GPUS_PER_NODE = 8
RSS_INTERVAL_S = 0.5
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0
DEFAULT_MAX_BATCH = 5000  # the collector's default max_batch_events
DEFAULT_MAX_BODY = 8 * 1024 * 1024  # the collector's default max_body_bytes


@dataclass
class Batch:
    body: bytes
    first_seq: int
    last_seq: int

    @property
    def count(self) -> int:
        return self.last_seq - self.first_seq + 1


@dataclass
class NodeLoad:
    name: str
    batches: list[Batch]
    cert: Path | None = None
    key: Path | None = None

    @property
    def events(self) -> int:
        return sum(b.count for b in self.batches)


@dataclass
class Load:
    """What one timed run measured."""

    first_send: float
    last_ack: float
    latencies_ms: list[float]
    rss_kb: list[int]
    rss_start_kb: int
    rss_end_kb: int
    #: CPU seconds during the run: collector main thread, whole collector, clients.
    cpu_main_s: float
    cpu_collector_s: float
    cpu_clients_s: float


@dataclass
class StoreRun:
    store: str
    eps: float
    wall_s: float
    latencies_ms: list[float]
    rss_kb: list[int] = field(default_factory=list)
    rss_start_kb: int = 0
    rss_end_kb: int = 0
    cpu_main_s: float = 0.0
    cpu_collector_s: float = 0.0
    cpu_clients_s: float = 0.0


# ----------------------------------------------------------------- workload


def generate_node(name: str, index: int, count: int, batch: int) -> NodeLoad:
    """``count`` chained events of node ``name`` as request bodies of ``batch`` events.

    A job's life on a node is job.grant, isolation.verified, job.release,
    each naming the job's 1-8 GPUs; the node's GPUs have stable UUIDs.
    """
    rng = random.Random(f"ztgpu-bench-{name}")
    gpus = [{"index": i, "uuid": f"GPU-{uuid.UUID(int=rng.getrandbits(128))}", "minor": i}
            for i in range(GPUS_PER_NODE)]
    base = datetime.now(UTC) - timedelta(milliseconds=count)
    prev = events.GENESIS_PREV
    pending: list[dict[str, Any]] = []
    batches: list[Batch] = []
    job: dict[str, Any] = {}
    for seq in range(1, count + 1):
        step = (seq - 1) % 3
        if step == 0:
            uid = rng.randrange(1000, 61000)
            taken = sorted(rng.sample(range(GPUS_PER_NODE), rng.randint(1, GPUS_PER_NODE)))
            job = {"job_id": str(index * 10_000_000 + seq // 3 + 1), "uid": uid,
                   "user": f"user{uid}", "gpus": [gpus[i] for i in taken]}
            code, fields = "job.grant", {**job, "outcome": "granted", "reason": ""}
        elif step == 1:
            cgroup = f"slurm/uid_{job['uid']}/job_{job['job_id']}/step_batch"
            allowed = {g["index"] for g in job["gpus"]}
            probe = {"cgroup": cgroup,
                     "devices": {f"nvidia{i}": "allowed" if i in allowed else "denied"
                                 for i in range(GPUS_PER_NODE)}}
            code, fields = "isolation.verified", {**job, "probe": probe, "outcome": "ok",
                                                  "reason": ""}
        else:
            code, fields = "job.release", {**job, "outcome": "released", "reason": ""}
        etype = events.validate_fields(code, fields)
        ts = events.format_timestamp(base + timedelta(milliseconds=seq))
        event = events.build_event(etype, name, seq, prev, ts, fields)
        prev = event["hash"]
        pending.append(event)
        if len(pending) == batch or seq == count:
            body = json.dumps({"node": name, "events": pending}).encode()
            batches.append(Batch(body, pending[0]["seq"], pending[-1]["seq"]))
            pending = []
    return NodeLoad(name, batches)


def generate(total: int, nodes: int, batch: int) -> list[NodeLoad]:
    share, extra = divmod(total, nodes)
    return [generate_node(f"bench-node{i:03d}", i, share + (1 if i < extra else 0), batch)
            for i in range(nodes)]


# ------------------------------------------------------------------ clients


@reports_to_parent
def client_main(index: int, loads: list[NodeLoad], port: int, ca_cert: Path,
                start: Any, results: Any) -> tuple[float, float, list[float], float]:
    """One client process: connect every node, wait for ``start``, send every batch."""
    from ztgpu.trust.pki import client_context

    conns: list[http.client.HTTPSConnection] = []
    for load in loads:
        assert load.cert is not None and load.key is not None
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=REQUEST_TIMEOUT_S,
            context=client_context(ca_cert, load.cert, load.key))
        conn.connect()  # TLS handshake before the timed part
        conns.append(conn)
    headers = {"Content-Type": "application/json"}
    results.put(("ready", index, None))
    start.wait()
    cpu_start = time.process_time()
    latencies: list[float] = []
    first_send = time.monotonic()
    rounds = max(len(load.batches) for load in loads)
    for r in range(rounds):  # the process's nodes take turns, one batch each
        for load, conn in zip(loads, conns, strict=True):
            if r >= len(load.batches):
                continue
            b = load.batches[r]
            sent = time.monotonic()
            conn.request("POST", "/v1/events", body=b.body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            latencies.append((time.monotonic() - sent) * 1000)
            problem = check_answer(response.status, data, b)
            if problem:
                raise RuntimeError(f"node {load.name} batch {r + 1} (seq {b.first_seq}-"
                                   f"{b.last_seq}): {problem}")
    last_ack = time.monotonic()
    cpu = time.process_time() - cpu_start
    for conn in conns:
        conn.close()
    return (first_send, last_ack, latencies, cpu)


def check_answer(status: int, data: bytes, batch: Batch) -> str | None:
    """What is wrong with the collector's answer to ``batch``, or None."""
    text = data[:300].decode(errors="replace")
    if status != 200:
        return f"HTTP {status}: {text}"
    try:
        answer = json.loads(data)
    except ValueError:
        return f"answer is not JSON: {text}"
    if not isinstance(answer, dict):
        return f"unexpected answer: {text}"
    if answer.get("acked_seq") != batch.last_seq:
        return f"acked_seq {answer.get('acked_seq')!r}, expected {batch.last_seq}: {text}"
    if answer.get("accepted") != batch.count or answer.get("duplicates") != 0:
        return f"expected {batch.count} accepted and 0 duplicates: {text}"
    return None


# -------------------------------------------------------------- measuring


def group_pids(pid: int) -> list[int]:
    """``pid`` and every process of its process group (the collector's ingest workers).

    The harness starts the collector as a session leader, so its group is
    the whole service.
    """
    found = [pid]
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pid:
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pid:  # pgrp
            found.append(int(entry))
    return found


def cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system): (the collector's main thread, the whole service)."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> float:
        try:
            with open(path) as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    return (read(f"/proc/{pid}/task/{pid}/stat"),
            sum(read(f"/proc/{p}/stat") for p in group_pids(pid)))


def rss_kb(pid: int) -> int:
    """VmRSS of the whole service (``pid`` and its group) in kB (0 if it is gone)."""
    total = 0
    for member in group_pids(pid):
        try:
            with open(f"/proc/{member}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.samples: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append(rss_kb(self.pid))
            if self.stopping.wait(RSS_INTERVAL_S):
                return




def drive(collector: CollectorProcess, pki: SitePki, loads: list[NodeLoad],
          procs: int) -> Load:
    """Run the client processes once. Raises SystemExit on any failed request."""
    assert collector.proc is not None
    pid = collector.proc.pid
    for load in loads:
        load.cert, load.key = pki.issue("node", load.name)
    ctx = mp.get_context("fork")
    start = ctx.Event()
    results = ctx.Queue()
    workers = [ctx.Process(target=client_main, name=f"bench-client-{i}",
                           args=(i, loads[i::procs], collector.port, pki.ca_cert, start,
                                 results))
               for i in range(procs)]
    sampler = RssSampler(pid)
    try:
        for worker in workers:
            worker.start()
        wait_for_workers(workers, results, "ready", READY_TIMEOUT_S)
        rss_start = rss_kb(pid)
        cpu_start = cpu_s(pid)
        sampler.start()
        start.set()
        done = wait_for_workers(workers, results, "done", None)
        cpu_end = cpu_s(pid)
        sampler.stopping.set()
        sampler.join()
        rss_end = rss_kb(pid)
    finally:
        sampler.stopping.set()
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join(10)
        results.close()
    return Load(first_send=min(d[0] for d in done), last_ack=max(d[1] for d in done),
                latencies_ms=[ms for d in done for ms in d[2]], rss_kb=sampler.samples,
                rss_start_kb=rss_start, rss_end_kb=rss_end,
                cpu_main_s=cpu_end[0] - cpu_start[0],
                cpu_collector_s=cpu_end[1] - cpu_start[1],
                cpu_clients_s=sum(d[3] for d in done))




def verify_store(collector: CollectorProcess, pki: SitePki, loads: list[NodeLoad]) -> int:
    """Check through the auditor API that every node's events are stored; returns the total."""
    client = CollectorClient(collector.url, pki.context("auditor", "bench-auditor"),
                             timeout=REQUEST_TIMEOUT_S)
    try:
        status, body = client.get("/v1/nodes")
    finally:
        client.close()
    if status != 200:
        raise SystemExit(f"GET /v1/nodes: HTTP {status}: {str(body)[:300]}")
    stored = {n["node"]: n for n in body["nodes"]}
    total = 0
    for load in loads:
        row = stored.get(load.name)
        if row is None:
            raise SystemExit(f"store check: node {load.name} is not in the store")
        if row["head_seq"] != load.events or row["events"] != load.events:
            raise SystemExit(f"store check: node {load.name} has head_seq {row['head_seq']} "
                             f"and {row['events']} events, {load.events} were sent")
        total += row["events"]
    return total


def run_store(store: str, base: Path, pki: SitePki, loads: list[NodeLoad], procs: int,
              batch: int, dsn: str | None = None) -> StoreRun:
    biggest = max(len(b.body) for load in loads for b in load.batches)
    limits: dict[str, Any] = {}
    if batch > DEFAULT_MAX_BATCH:
        limits["max_batch_events"] = batch
    if biggest + 65536 > DEFAULT_MAX_BODY:
        limits["max_body_bytes"] = biggest + 65536
    collector = CollectorProcess(base / f"collector-{store}", pki, store=store, dsn=dsn,
                                 collector=limits)
    collector.start()
    try:
        assert collector.proc is not None
        print(f"{store}: collector pid {collector.proc.pid} at {collector.url}", flush=True)
        load = drive(collector, pki, loads, procs)
        if collector.proc.poll() is not None:
            raise SystemExit(f"{store}: collector exited with {collector.proc.returncode}:\n"
                             f"{collector.log()}")
        stored = verify_store(collector, pki, loads)
    finally:
        code = collector.stop()
    if code not in (0, None):
        print(f"{store}: collector exited with {code} on SIGTERM; log tail:\n"
              f"{collector.log()}", flush=True)
    sent = sum(load.events for load in loads)
    wall = load.last_ack - load.first_send
    result = StoreRun(store, sent / wall, wall, load.latencies_ms, load.rss_kb,
                      load.rss_start_kb, load.rss_end_kb, load.cpu_main_s,
                      load.cpu_collector_s, load.cpu_clients_s)
    report(result, sent, stored, len(loads))
    return result


def report(run: StoreRun, sent: int, stored: int, nodes: int) -> None:
    lat = run.latencies_ms
    print(f"{run.store}: events={sent} requests={len(lat)} wall_s={run.wall_s:.2f} "
          f"eps={run.eps:.0f}", flush=True)
    print(f"{run.store}: ack_ms p50={percentile(lat, 50):.1f} p90={percentile(lat, 90):.1f} "
          f"p99={percentile(lat, 99):.1f} max={max(lat):.1f}", flush=True)
    samples = run.rss_kb or [run.rss_start_kb]
    thirds = [samples[len(samples) * k // 3: len(samples) * (k + 1) // 3] or samples
              for k in range(3)]
    trend = "/".join(f"{max(part) / 1024:.0f}" for part in thirds)
    print(f"{run.store}: collector rss_mb start={run.rss_start_kb / 1024:.1f} "
          f"end={run.rss_end_kb / 1024:.1f} max={peak_rss_kb(run) / 1024:.1f} "
          f"max_by_third={trend} samples={len(run.rss_kb)}", flush=True)
    print(f"{run.store}: cpu_cores collector={run.cpu_collector_s / run.wall_s:.2f} "
          f"(main thread {run.cpu_main_s / run.wall_s:.2f}) "
          f"clients={run.cpu_clients_s / run.wall_s:.2f} of {os.cpu_count()} CPUs", flush=True)
    print(f"{run.store}: store verified: {stored} events of {nodes} nodes "
          f"(sent {sent}), heads at the last sent seq", flush=True)


def peak_rss_kb(run: StoreRun) -> int:
    return max([run.rss_start_kb, run.rss_end_kb, *run.rss_kb])


def run_postgres(base: Path, pki: SitePki, loads: list[NodeLoad], procs: int,
                 batch: int) -> StoreRun | None:
    """The PostgreSQL run, or None (with a printed note) when PostgreSQL is unavailable."""
    try:
        from ztgpu.testing.postgres import PostgresServer
    except ImportError as exc:
        print(f"postgres: unavailable ({exc}); postgres_eps=n/a", flush=True)
        return None
    server = PostgresServer()
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - PostgresUnavailable and start failures
        print(f"postgres: unavailable ({type(exc).__name__}: {str(exc)[:500]}); "
              "postgres_eps=n/a", flush=True)
        return None
    try:
        return run_store("postgres", base, pki, loads, procs, batch, dsn=server.dsn)
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000,
                        help="events sent per store (default 200000)")
    parser.add_argument("--batch", type=int, default=1000, help="events per request")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--nodes", type=int, default=None,
                        help="simulated nodes, spread over the processes (default: --procs)")
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    args = parser.parse_args()
    nodes = args.nodes or args.procs
    if min(args.events, args.batch, args.procs, nodes) < 1:
        parser.error("--events, --batch, --procs and --nodes must be >= 1")
    if nodes < args.procs:
        parser.error("--nodes must be at least --procs (each process plays its own nodes)")
    if args.events < nodes:
        parser.error("--events must be at least --nodes")
    if os.geteuid() != 0:
        print("needs root (the PostgreSQL run starts a private server as postgres)",
              file=sys.stderr)
        return 2

    started = time.monotonic()
    loads = generate(args.events, nodes, args.batch)
    bodies = [len(b.body) for load in loads for b in load.batches]
    print(f"generated {args.events} events of {nodes} nodes in {len(bodies)} requests in "
          f"{time.monotonic() - started:.1f}s (body avg {sum(bodies) / len(bodies) / 1024:.0f} "
          f"KiB, {sum(bodies) / args.events:.0f} B/event); {args.procs} client processes, "
          f"{os.cpu_count()} CPUs", flush=True)

    base = Path(tempfile.mkdtemp(prefix="ztgpu-bench-ingest-"))
    runs: dict[str, StoreRun | None] = {}
    try:
        pki = SitePki(base / "pki")
        if args.store in ("sqlite", "both"):
            runs["sqlite"] = run_store("sqlite", base, pki, loads, args.procs, args.batch)
        if args.store in ("postgres", "both"):
            runs["postgres"] = run_postgres(base, pki, loads, args.procs, args.batch)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    done = [run for run in runs.values() if run is not None]

    def eps(name: str) -> str:
        run = runs.get(name)
        return "n/a" if run is None else f"{run.eps:.0f}"

    p99 = f"{max(percentile(r.latencies_ms, 99) for r in done):.1f}" if done else "n/a"
    rss = f"{max(peak_rss_kb(r) for r in done) / 1024:.0f}" if done else "n/a"
    print(f"collector_ingest sqlite_eps={eps('sqlite')} postgres_eps={eps('postgres')} "
          f"p99_ack_ms={p99} rss_mb={rss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
