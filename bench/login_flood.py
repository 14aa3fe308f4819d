"""Grant latency while ztgpu-authd is flooded with bogus logins.

``/v1/login`` needs no certificate and costs authd an unmunge, so anyone who
can reach authd can send logins. Starts a private munged, a site PKI and a
real authd (SQLite store, TLS 1.3, default login limits), enrols and logs in
``nobody``, then times ``--grants`` node grant requests (node certificate,
one kept-alive connection) twice: on a quiet authd, and while ``--threads``
threads in another process send ``--logins`` bogus logins as fast as authd
answers them. Prints how the logins were answered (401: reached munge; 429:
over the per-address budget; 503: over the pending bound) and the grant
latencies; never asserts on them. The last line is:

    login_flood logins=N refused=R grant_p50_ms=A grant_p99_ms=B quiet_p99_ms=C

Usage (root): python bench/login_flood.py [--logins 1000] [--threads 20] [--grants 200]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import percentile

from ztgpu.auth_client import AuthdClient
from ztgpu.testing.authd_process import AuthdProcess, CodeSource, secret_from_uri
from ztgpu.testing.collector_process import SitePki
from ztgpu.testing.munge import MungeDaemon
from ztgpu.trust.pki import client_context

FLOOD = r"""
import json, ssl, sys, threading, http.client
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
count, threads = int(sys.argv[4]), int(sys.argv[5])
context = ssl.create_default_context(cafile=ca)
context.check_hostname = False
statuses, lock = {}, threading.Lock()
print("go", flush=True)
def worker(n):
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    for _ in range(n):
        try:
            body = json.dumps({"credential": "MUNGE:AAAA", "code": "000000"})
            conn.request("POST", "/v1/login", body=body,
                         headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            reply.read()
            status = str(reply.status)
        except OSError:
            conn.close()
            status = "error"
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
    conn.close()
ts = [threading.Thread(target=worker, args=(count // threads,)) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(statuses), flush=True)
"""

GPUS = [{"index": 0, "uuid": "GPU-aaaa0000", "minor": 0}]


def grant_times(node: AuthdClient, count: int, first_job: int,
                stop: threading.Event | None = None) -> list[float]:
    times = []
    for i in range(count):
        if stop is not None and stop.is_set():
            break
        body = {"job_id": str(first_job + i), "uid": 65534, "user": "nobody",
                "partition": None, "account": None, "gpus_count": 1, "time_limit_s": None,
                "node": "gpu01", "gpus": GPUS, "gpus_held_on_node": 0}
        start = time.perf_counter()
        node.request("POST", "/v1/grant", body)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=20)
    parser.add_argument("--grants", type=int, default=200)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ztgpu-bench-flood-"))
    base.chmod(0o755)
    munge = MungeDaemon()
    munge.start()
    authd: AuthdProcess | None = None
    try:
        pki = SitePki(base / "pki")
        authd = AuthdProcess(base / "authd", pki, munge.socket)
        codes = CodeSource()
        res = authd.ztgpu("admin", "enroll", "root", "--local")
        found = re.search(r"otpauth://\S+", res.stdout)
        if res.returncode != 0 or found is None:
            raise SystemExit(f"enrolling root failed: {res.stderr.strip()}")
        codes.secrets["root"] = secret_from_uri(found.group(0))
        authd.start()
        user = AuthdClient(authd.url, client_context(pki.ca_cert, None, None))
        from ztgpu.authd.authority import ADMIN, LOGIN

        user.request("POST", "/v1/login", {"credential": authd.credential_as(None, LOGIN),
                                           "code": codes.code("root")})
        reply = user.request("POST", "/v1/admin/enroll", {
            "credential": authd.credential_as(None, ADMIN), "user": "nobody"})
        codes.secrets["nobody"] = secret_from_uri(reply["otpauth_uri"])
        user.request("POST", "/v1/login", {"credential": authd.credential_as("nobody", LOGIN),
                                           "code": codes.code("nobody")})
        node = AuthdClient(authd.url, pki.context("node", "gpu01"))
        grant_times(node, 20, 1)  # warm up
        quiet = grant_times(node, args.grants, 1000)
        host, port = authd.url.removeprefix("https://").rsplit(":", 1)
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, host, port, str(pki.ca_cert),
                                  str(args.logins), str(args.threads)],
                                 stdout=subprocess.PIPE, text=True)
        assert flood.stdout is not None
        flood.stdout.readline()  # "go"
        stop = threading.Event()
        loaded: list[float] = []
        started = time.monotonic()

        def run() -> None:
            loaded.extend(grant_times(node, args.grants * 100, 100_000, stop))

        grantor = threading.Thread(target=run)
        grantor.start()
        statuses = json.loads(flood.stdout.readline() or "{}")
        flood_s = time.monotonic() - started
        stop.set()
        grantor.join(60)
        flood.wait(30)
        refused = statuses.get("429", 0) + statuses.get("503", 0)
        print(f"logins: {statuses} in {flood_s:.1f} s")
        for name, values in (("quiet", quiet), ("during the flood", loaded)):
            print(f"grants {name}: {len(values)}, p50 {percentile(values, 50) * 1000:.1f} ms, "
                  f"p99 {percentile(values, 99) * 1000:.1f} ms, "
                  f"max {max(values) * 1000:.1f} ms")
        print(f"login_flood logins={sum(statuses.values())} refused={refused} "
              f"grant_p50_ms={percentile(loaded, 50) * 1000:.1f} "
              f"grant_p99_ms={percentile(loaded, 99) * 1000:.1f} "
              f"quiet_p99_ms={percentile(quiet, 99) * 1000:.1f}")
        node.close()
        user.close()
    finally:
        if authd is not None:
            authd.stop()
        munge.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
