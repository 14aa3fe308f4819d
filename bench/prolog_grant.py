"""Prolog/Epilog latency when every grant needs authd's signed grant.

Starts a private munged, a site PKI, a real ztgpu-authd and a standalone
ztgpu-noded on simulated GPUs configured with ``auth.authd_url``; enrols and
logs in the user ``nobody``; then times the installed Prolog and Epilog
hooks (as slurmd runs them) for ``--runs`` jobs. Each Prolog asks authd for
a grant, verifies it and hands out the GPU. Prints figures only; the last
line is:

    prolog_grant p50_ms=A p99_ms=B epilog_p50_ms=C runs=N

Usage (root): python bench/prolog_grant.py [--runs 100]
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchlib import percentile

from ztgpu.auth_client import AuthdClient
from ztgpu.authd.authority import ADMIN, LOGIN
from ztgpu.testing.agent_process import standalone_agent
from ztgpu.testing.authd_process import AuthdProcess, secret_from_uri
from ztgpu.testing.collector_process import SitePki
from ztgpu.testing.munge import MungeDaemon
from ztgpu.trust.pki import client_context
from ztgpu.trust.totp import code_at


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (device nodes, cgroups, munged)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="ztgpu-bench-grant-"))
    base.chmod(0o755)
    try:
        with MungeDaemon() as munge:
            pki = SitePki(base / "pki")
            authd = AuthdProcess(base / "authd", pki, munge.socket)
            res = authd.ztgpu("admin", "enroll", "root", "--local")
            found = re.search(r"otpauth://\S+", res.stdout)
            if found is None:
                raise SystemExit(f"bootstrap enrolment failed: {res.stderr}")
            root_secret = secret_from_uri(found.group(0))
            authd.start()
            try:
                client = AuthdClient(authd.url, client_context(pki.ca_cert, None, None))
                now = datetime.now(UTC)
                client.request("POST", "/v1/login", {
                    "credential": authd.credential_as(None, LOGIN),
                    "code": code_at(root_secret, now)})
                uri = client.request("POST", "/v1/admin/enroll", {
                    "credential": authd.credential_as(None, ADMIN),
                    "user": "nobody"})["otpauth_uri"]
                client.request("POST", "/v1/login", {
                    "credential": authd.credential_as("nobody", LOGIN),
                    "code": code_at(secret_from_uri(uri), now + timedelta(seconds=30))})
                client.close()
                cert, key = pki.issue("node", "gpu01")
                nobody = pwd.getpwnam("nobody")
                with standalone_agent(
                        base / "agent", node={"name": "gpu01"},
                        auth={"authd_url": authd.url},
                        tls={"ca_cert": str(pki.ca_cert), "cert": str(cert),
                             "key": str(key)}) as agent:
                    prolog, epilog = [], []
                    for i in range(args.runs):
                        env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": str(100000 + i),
                               "SLURM_JOB_UID": str(nobody.pw_uid), "SLURM_JOB_USER": "nobody",
                               "SLURM_JOB_GPUS": str(i % 4), "SLURM_JOB_PARTITION": "gpu",
                               "SLURM_SCRIPT_CONTEXT": "prolog_slurmd"}
                        for hook, times in (("prolog", prolog), ("epilog", epilog)):
                            start = time.perf_counter()
                            done = agent.run_hook(hook, env)
                            times.append((time.perf_counter() - start) * 1000)
                            if done.returncode != 0:
                                raise SystemExit(f"{hook} failed: {done.stderr[-300:]}")
                    grants = len(agent.events("job.grant"))
            finally:
                authd.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if grants != args.runs:
        raise SystemExit(f"expected {args.runs} grants, the agent recorded {grants}")
    print(f"prolog (grant from authd, verified): p50={statistics.median(prolog):.1f} ms "
          f"p90={percentile(prolog, 90):.1f} p99={percentile(prolog, 99):.1f} "
          f"max={max(prolog):.1f}")
    print(f"epilog: p50={statistics.median(epilog):.1f} ms p99={percentile(epilog, 99):.1f}")
    print(f"prolog_grant p50_ms={statistics.median(prolog):.1f} "
          f"p99_ms={percentile(prolog, 99):.1f} epilog_p50_ms={statistics.median(epilog):.1f} "
          f"runs={args.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
