"""What an SSH login's PAM work costs: the ztgpu module against pam_slurm_adopt.

One run, one machine, one job: the real private Slurm cluster with the
suite (``ztgpu.testing.suite_cluster``, ConstrainDevices=yes), a running
1-GPU job of ztalice, and two private PAM services:

* ``ztgpu``: the stack ``ztgpu install --pam`` writes (the compiled module,
  pam_ztgpu.so: account, then session), so each login is one account check
  and one adoption by ztgpu-noded, both recorded;
* ``ztgpu_python``: the same through the pam_python face (printed for
  comparison, not in the last line, and run after the other two);
* ``slurm_adopt``: Debian's pam_slurm_adopt with its defaults (account only:
  it adopts in the account phase), talking to the job's slurmstepd.

Each timed unit is one ``pamtester SERVICE ztalice acct_mgmt open_session
close_session`` run (process start included, as sshd pays it per login),
the two services alternating so both see the same machine state. The last
line is::

    pam_latency ztgpu_p50_ms=A ztgpu_p99_ms=B slurm_adopt_p50_ms=C slurm_adopt_p99_ms=D

    .venv/bin/python bench/pam_latency.py [--runs 100]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time

from benchlib import percentile

from ztgpu.testing.prerequisites import require
from ztgpu.testing.slurm_cluster import ClusterSpec
from ztgpu.testing.sshd import BASE_STACK, PAM_DIR
from ztgpu.testing.suite_cluster import suite_cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (starts Slurm daemons, writes private PAM services)", file=sys.stderr)
        return 2
    pamtester = str(require("pamtester"))
    adopt = require("pam_slurm_adopt.so")
    tag = secrets.token_hex(4)
    ours, theirs = f"ztgpu-bench-{tag}", f"ztgpu-bench-adopt-{tag}"
    python = f"ztgpu-bench-py-{tag}"
    with suite_cluster(ClusterSpec(constrain_devices=True)) as suite:
        made = []
        try:
            for name, extra in ((ours, ""), (python, ""),
                                (theirs, f"account required {adopt} service={theirs}\n")):
                path = PAM_DIR / name
                path.write_text(BASE_STACK + extra)
                made.append(path)
            suite.ztgpu("install", "--pam", ours, "--pam-dir", str(PAM_DIR))
            suite.ztgpu("install", "--pam", python, "--pam-dir", str(PAM_DIR),
                        "--pam-module", "python")
            c = suite.cluster
            job = c.sbatch("ztalice", "sleep 3600", gpus=1)
            c.wait_job(job, ["RUNNING"])
            suite.wait_event("job.grant", job)
            env = {**os.environ, "SLURM_CONF": str(c.slurm_conf)}
            times: dict[str, list[float]] = {ours: [], python: [], theirs: []}
            failures: dict[str, list[str]] = {ours: [], python: [], theirs: []}
            # The two compared services alternate; the pam_python face (only
            # printed) runs after them, so its heavier start does not load theirs.
            rounds = [(ours, theirs)] * (args.runs + 5) + [(python,)] * (args.runs // 3 + 5)
            for i, services in enumerate(rounds):
                i = i if i < args.runs + 5 else i - args.runs - 5
                for service in services:
                    started = time.perf_counter()
                    res = subprocess.run([pamtester, "-I", "rhost=127.0.0.1", service,
                                          "ztalice", "acct_mgmt", "open_session",
                                          "close_session"], capture_output=True, text=True,
                                         env=env, timeout=30, check=False)
                    took = (time.perf_counter() - started) * 1000
                    if res.returncode != 0:
                        failed = [e.get("reason") for e in suite.events("ssh.session")
                                  if e["outcome"] == "adopt_failed"]
                        failures[service].append(f"{res.stdout}{res.stderr}".strip()[-300:]
                                                 + (f" (agent: {failed[-1]})"
                                                    if failed and service == ours else ""))
                        continue
                    if i >= 5:
                        times[service].append(took)
            adopted = sum(1 for e in suite.events("ssh.session") if e["outcome"] == "adopted")
            print(f"job {job}; {args.runs} runs each of ztgpu and slurm_adopt, alternating, "
                  f"then {args.runs // 3} of ztgpu_python; the agent recorded "
                  f"{adopted} adoptions")
            for label, service in (("ztgpu", ours), ("ztgpu_python", python),
                                   ("slurm_adopt", theirs)):
                values = sorted(times[service])
                print(f"{label}: {len(failures[service])} failed logins, "
                      f"p50 {percentile(values, 50):.1f} ms, p90 "
                      f"{percentile(values, 90):.1f} ms, p99 {percentile(values, 99):.1f} ms, "
                      f"min {values[0]:.1f} ms, max {values[-1]:.1f} ms")
            for service, seen in failures.items():
                for text in seen:
                    print(f"failed login ({service}): {text}")
            z, s = sorted(times[ours]), sorted(times[theirs])
            print(f"p99 ratio ztgpu/slurm_adopt: {percentile(z, 99) / percentile(s, 99):.2f} "
                  f"(target <= 1.5)")
            print(f"pam_latency ztgpu_p50_ms={percentile(z, 50):.1f} "
                  f"ztgpu_p99_ms={percentile(z, 99):.1f} "
                  f"slurm_adopt_p50_ms={percentile(s, 50):.1f} "
                  f"slurm_adopt_p99_ms={percentile(s, 99):.1f}")
        finally:
            for path in made:
                path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
