"""``ztgpu demo``: a private Slurm cluster with the suite, narrated.

Brings up real munged/slurmctld/slurmd from a private directory, installs the
suite into its slurm.conf, runs two users' GPU jobs side by side and shows,
from inside each job and from the agent's own probe, which GPUs open and
which are refused; shows that a user with no job gets nothing; prints the
recorded audit events and verifies their hash chain; wipes each GPU's
memory after its job (through a stand-in libcuda built from C when no GPU
is here); then removes everything it made. GPUs are simulated device nodes (major 195), so the demo
never touches the machine's real /dev or /etc/slurm.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ztgpu.testing import gpu_probe, stand_in_cuda
from ztgpu.testing.collector_process import AuditSite, audit_site
from ztgpu.testing.slurm_cluster import ClusterSpec, wait_for
from ztgpu.testing.suite_cluster import SuiteCluster, suite_cluster

WIDTH = 78
MEANING = {
    "open": "open   (reached the driver)",
    "EPERM": "EPERM  (refused by the devices cgroup)",
    "EACCES": "EACCES (refused by device-file ownership)",
}


def _say(text: str = "") -> None:
    print(text, flush=True)


def _section(number: int, title: str) -> None:
    _say()
    _say(f"== {number}. {title} " + "=" * max(0, WIDTH - len(title) - 8))


def _ls(suite: SuiteCluster) -> None:
    import grp
    import pwd

    for path in sorted(suite.cluster.dev_dir.iterdir()):
        st = os.lstat(path)
        user = pwd.getpwuid(st.st_uid).pw_name
        group = grp.getgrgid(st.st_gid).gr_name
        _say(f"    {stat.filemode(st.st_mode)}  {user:<8} {group:<6} "
             f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev):<4} {path.name}")


def _show_probe(title: str, outcome: dict[str, str], mine: set[int] | None) -> None:
    _say(f"    {title}")
    for name in sorted(outcome, key=lambda n: (n == "nvidiactl", n)):
        mark = ""
        if mine is not None and name != "nvidiactl":
            mark = "  <- allocated" if int(name.removeprefix("nvidia")) in mine else ""
        _say(f"      {name:<10} {MEANING.get(outcome[name], outcome[name])}{mark}")


def _ztgpu(suite: SuiteCluster, *args: str) -> str:
    return suite.ztgpu(*args, check=False).stdout


def _backlog(suite: SuiteCluster) -> int:
    from ztgpu.node_client import call

    status = call(str(suite.config["paths"]["socket"]), "status")
    return int(status["audit"].get("unacked", -1))


def run_demo(keep: bool = False) -> int:
    """Run the narrated demo; returns 0 when every shown check held."""
    if os.geteuid() != 0:
        print("ztgpu demo: run as root (it starts Slurm daemons and creates device nodes)",
              file=sys.stderr)
        return 2
    from ztgpu.testing.prerequisites import PrerequisiteMissing, require

    try:
        for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
            require(tool)
    except PrerequisiteMissing as exc:
        print(f"ztgpu demo: {exc}", file=sys.stderr)
        return 2
    _say("ztgpu demo: per-job least-privilege GPU access on a real Slurm cluster")
    _say("-" * WIDTH)
    if Path("/proc/driver/nvidia/version").exists():
        _say("An NVIDIA driver is present, but the demo leaves real GPUs alone and uses")
        _say("4 SIMULATED GPUs (device nodes 195:0-3 in a private directory).")
    else:
        _say("No NVIDIA driver here: the GPUs are 4 SIMULATED device nodes (195:0-3) in a")
        _say("private directory. Slurm, munge, cgroups and file permissions are all real.")
    _say("How to read a probe: a job tries to open each GPU device node;")
    for meaning in MEANING.values():
        _say(f"    {meaning}")
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        _say(f"  [{'ok' if ok else 'FAILED'}] {what}")
        if not ok:
            failures.append(what)

    spec = ClusterSpec(constrain_devices=True)
    # The cluster names its one node after this host, as Slurm does.
    with audit_site(socket.gethostname().split(".")[0], checkpoint_interval_s=2.0) as site:
        _run_cluster(spec, check, failures, keep, site)
    _run_mfa(check)
    return _summary(failures)


def _stand_in_wipe(where: Path) -> dict[str, Any]:
    """The agent's ``wipe`` section for simulated GPUs: the stand-in libcuda
    (host memory; 4 GPUs of 256 MiB at the simulated GPUs' PCI buses)."""
    os.environ.update({"ZTGPU_STANDIN_GPUS": "4", "ZTGPU_STANDIN_MEM_MIB": "256",
                       "ZTGPU_STANDIN_CTX_MIB": "24"})
    return {"mode": "wipe", "libcuda": str(stand_in_cuda.build(where))}


def _run_cluster(spec: ClusterSpec, check: Callable[[bool, str], None], failures: list[str],
                 keep: bool, site: AuditSite) -> int:
    collector, auditor = site.collector, site.auditor_args
    wipe = _stand_in_wipe(Path(site.collector.base).parent / "stand-in")
    # The simulated GPUs' telemetry, scripted by the breach drills (section 6).
    telemetry = Path(site.collector.base).parent / "telemetry.json"
    telemetry.write_text("{}")
    with suite_cluster(spec, wipe=wipe, gpu={"simulated_telemetry": str(telemetry)},
                       telemetry={"interval_s": 1.0}, **site.node_config) as suite:
        c = suite.cluster
        gpu_probe.install_probe(c.work_dir)

        _section(1, "A private cluster with the suite installed")
        _say(f"  slurmctld + slurmd + munged from {c.conf_dir} (node '{c.node}', 4 GPUs)")
        _say("  `ztgpu install --slurm-conf` added these lines to its slurm.conf:")
        lines = c.slurm_conf.read_text().splitlines()
        for line in lines[lines.index("# --- ztgpu (managed by ztgpu install) ---") + 1:]:
            _say(f"    {line}")
        _say("  ztgpu-noded runs as root; its GPU inventory (NVML index != /dev minor):")
        for line in _ztgpu(suite, "status", "--node").splitlines():
            _say(f"    {line}")
        _say("  GPU device files at rest (no job holds them):")
        _ls(suite)

        _section(2, "Two users' GPU jobs, side by side")
        alice = c.sbatch("ztalice", gpu_probe.job_script(c.work_dir, c.dev_dir, True), gpus=2)
        bob = c.sbatch("ztbob", gpu_probe.job_script(c.work_dir, c.dev_dir, True), gpus=1)
        _say(f"  sbatch --gres=gpu:2 as ztalice -> job {alice}")
        _say(f"  sbatch --gres=gpu:1 as ztbob   -> job {bob}")
        for job in (alice, bob):
            c.wait_job(job, ["RUNNING"])
            suite.wait_event("isolation.verified", job)
        wait_for(lambda: all("PROBE step0" in c.output(j) for j in (alice, bob)), 60, "probes")
        mine = {job: {g["minor"] for g in suite.wait_event("job.grant", job)["gpus"]}
                for job in (alice, bob)}
        for job, user in ((alice, "ztalice"), (bob, "ztbob")):
            seen = gpu_probe.parse_probes(c.output(job))
            _say(f"  job {job} ({user}), allocated /dev minors {sorted(mine[job])}:")
            _show_probe("from the batch step and from an `srun` step (identical):",
                        seen["batch"], mine[job])
            same = seen["batch"] == seen["step0"]
            only_mine = all((v == "open") == (k == "nvidiactl" or
                                              int(k.removeprefix("nvidia")) in mine[job])
                            for k, v in seen["batch"].items())
            check(same and only_mine, f"job {job} opens exactly its own GPUs in every step")
        _say("  Device files while both jobs run (each job's GPUs belong to its user):")
        _ls(suite)

        _section(3, "The agent proves isolation from inside each job's cgroups")
        _say("  `ztgpu node verify`: as root inside each step's devices cgroup (cgroup")
        _say("  alone), then as the job's user (everything together):")
        out = _ztgpu(suite, "node", "verify")
        for line in out.splitlines():
            _say(f"    {line}")
        check("VIOLATED" not in out and "OK" in out,
              "every step of both jobs matches its allocation, and the cgroup alone "
              "refuses every other GPU (EPERM)")

        _section(4, "A user with no job on the node")
        res = subprocess.run(["runuser", "-u", "ztcarol", "--", "python3",
                              str(c.work_dir / "probe.py"), "shell", str(c.dev_dir)],
                             capture_output=True, text=True, timeout=30, check=False)
        shell = gpu_probe.parse_probes(res.stdout).get("shell", {})
        _show_probe("`runuser -u ztcarol` (a login with no job, as over SSH):", shell, None)
        check(bool(shell) and all(v == "EACCES" for k, v in shell.items() if k != "nvidiactl"),
              "a shell outside any job opens no GPU")

        _section(5, "Something resets a device file to 0666 (e.g. the NVIDIA driver)")
        other = min(set(range(4)) - mine[alice] - mine[bob])
        before = len(suite.events("device.drift"))
        os.chmod(c.gpu_path(other), 0o666)  # noqa: S103 - the point of this step
        _say(f"  chmod 0666 {c.gpu_path(other).name}, then both jobs probe again:")
        for job in (alice, bob):
            (c.work_dir / f"go-{job}").touch()
        wait_for(lambda: all("PROBE step1" in c.output(j) for j in (alice, bob)), 60, "probes")
        late = gpu_probe.parse_probes(c.output(alice))["step1"]
        _show_probe(f"job {alice}, new `srun` step:", late, mine[alice])
        check(late[f"nvidia{other}"] == "EPERM",
              f"with file permissions gone, the cgroup still refuses nvidia{other}")
        wait_for(lambda: len(suite.events("device.drift")) > before, 30, "drift")
        drift = suite.events("device.drift")[-1]
        _say(f"  agent: device.drift on {Path(drift['path']).name}: found {drift['found']}, "
             f"{drift['outcome']}")
        check(drift["outcome"] == "restored", "the change was recorded and undone")

        _section(6, "Breach drills: what the agent sees on the GPUs, and what it does")
        _say("  `ztgpu drill` starts a real process as `nobody` and scripts the simulated")
        _say("  GPUs' telemetry so the agent sees it on a GPU (sampling every second here,")
        _say("  every 5 s as shipped):")
        res = suite.ztgpu("drill", check=False)
        for line in res.stdout.splitlines():
            _say(f"    {line[:WIDTH + 40]}")
        check(res.returncode == 0, "each drilled breach was detected, answered and recorded")

        _section(7, "Jobs end: each GPU's memory is wiped, then it goes back to root")
        for job in (alice, bob):
            (c.work_dir / f"end-{job}").touch()
            state = c.wait_job(job, ["COMPLETED", "FAILED", "CANCELLED"], timeout=60)
            _say(f"  job {job}: {state['JobState']}")
        for job in (alice, bob):
            suite.wait_event("job.release", job, timeout=60)
            for wipe_event in suite.events("gpu.wipe", job):
                _say(f"  gpu.wipe nvidia{wipe_event['gpus'][0]['minor']} (job {job}): "
                     f"{wipe_event['reason']}")
            wiped = {w["gpus"][0]["minor"] for w in suite.events("gpu.wipe", job)}
            check(wiped == mine[job], f"every GPU of job {job} was wiped and verified "
                  f"(stand-in libcuda: host memory, no GPU here)")
        _ls(suite)
        check(all(os.lstat(c.gpu_path(m)).st_uid == 0 for m in range(4)),
              "no GPU belongs to anyone once the jobs are gone")
        check(c.node_state() == "idle", "the node stayed in service (never drained)")

        _section(8, "What the node recorded (hash-chained local audit spool)")
        for line in _ztgpu(suite, "audit", "tail", "--local", "-n", "40").splitlines():
            _say(f"  {line[:WIDTH + 60]}")
        verify = _ztgpu(suite, "audit", "verify", "--local").strip()
        _say(f"  ztgpu audit verify --local: {verify}")
        check(verify.startswith("OK"), "the audit chain verifies")

        _section(9, "The auditor's view: the central collector (mutual TLS 1.3)")
        _say(f"  ztgpu-collectord at {collector.url}; the node forwards its spool to it, and")
        _say("  only an auditor certificate may read it back.")
        wait_for(lambda: _backlog(suite) == 0, 60, "the node's spool to reach the collector")
        for line in _ztgpu(suite, "status", "--node").splitlines():
            if line.startswith(("audit", "  spool")):
                _say(f"    {line}")
        _say(f"  $ ztgpu audit trail --job {alice}")
        trail = _ztgpu(suite, "audit", "trail", "--job", alice, *auditor)
        for line in trail.splitlines():
            _say(f"    {line[:WIDTH + 40]}")
        check("job.grant" in trail and "job.release" in trail and "gpu.wipe" in trail,
              f"the collector holds job {alice}'s grant, the wipes of its GPUs and its "
              f"release")
        _say("  $ ztgpu audit verify")
        central = _ztgpu(suite, "audit", "verify", *auditor)
        for line in central.splitlines():
            _say(f"    {line}")
        lines = central.strip().splitlines()
        check(bool(lines) and lines[-1].startswith("OK") and "last signed seq" in central,
              "every chain at the collector verifies, with the node's signed checkpoints")
        if keep:
            _say(f"  (--keep: cluster left at {c.root} until you press Enter)")
            input()
    return 0


def _run_mfa(check: Callable[[bool, str], None]) -> None:
    """Part 2: MFA-backed job identity (authd, the job gate, grants, revocation)."""
    import time

    from ztgpu.testing.mfa_cluster import held_reason, mfa_cluster

    _section(10, "MFA-backed job identity: a second cluster with ztgpu-authd")
    _say("  authd on the controller decides; the job gate (PrologSlurmctld) asks it before")
    _say("  a GPU job starts, and the node agent asks it for a signed grant per job.")
    with mfa_cluster(ClusterSpec(constrain_devices=True)) as site:
        c = site.suite.cluster
        site.enroll("ztalice")
        _say("  $ ztgpu admin enroll ztalice    (by root, after root's own MFA login)")
        from ztgpu.trust.totp import otpauth_uri, qr_text

        uri = otpauth_uri(site.secrets["ztalice"], "ztalice")
        for line in qr_text(uri).splitlines():
            _say(f"    {line}")
        _say(f"    {uri}")
        _say("  (the demo computes ztalice's codes from this secret, as her phone would)")

        _section(11, "A GPU job without MFA waits in the queue; the node stays up")
        job = c.sbatch("ztalice", "#!/bin/sh\nsleep 1\n", gpus=1)
        _say(f"  sbatch --gres=gpu:1 as ztalice -> job {job}")
        wait_for(lambda: held_reason(c, job)[0] == "JobHeldAdmin", 60, "the MFA hold")
        reason, comment = held_reason(c, job)
        _say(f"  scontrol show job {job}: Reason={reason}")
        _say(f"    AdminComment={comment}")
        for line in site.ztgpu_as("ztalice", "status").stdout.splitlines():
            _say(f"  $ ztgpu status (as ztalice): {line.strip()}")
        check("ztgpu login" in comment and c.node_state() == "idle",
              "the job is held with a reason its user can read; the node is not drained")

        _section(12, "ztgpu login releases it")
        res = site.login("ztalice")
        _say(f"  $ ztgpu login (as ztalice, code from the demo secret): {res.stdout.strip()}")
        state = c.wait_job(job, ["COMPLETED", "FAILED", "CANCELLED"], timeout=90)
        grant = site.suite.wait_event("job.grant", job)
        _say(f"  job {job}: {state['JobState']}; the agent verified authd's signed grant and "
             f"gave GPUs {[g['index'] for g in grant['gpus']]}")
        check(state["JobState"] == "COMPLETED", "after login the job ran, without an admin")

        _section(13, "Revocation: a running job loses its GPU and ends")
        gpu_probe.install_probe(c.work_dir)
        running = c.sbatch("ztalice", gpu_probe.job_script(c.work_dir, c.dev_dir, True), gpus=1)
        c.wait_job(running, ["RUNNING"], timeout=60)
        site.suite.wait_event("isolation.verified", running)
        _say(f"  job {running} runs and was verified; $ ztgpu admin revoke --user ztalice")
        started = time.monotonic()
        site.admin("revoke", "--user", "ztalice", "--reason", "demo: laptop stolen")
        wait_for(lambda: any(e["action"] == "revoke"
                             for e in site.suite.events("job.action", running)), 10,
                 "the revocation to reach the node")
        took = time.monotonic() - started

        def after_revoke() -> list[dict[str, Any]]:
            # The agent records the revoke, then probes the job again.
            return [e for e in site.suite.events("isolation.verified", running)
                    if e["seq"] > revoke_seq[0]]

        revoke_event = max((e for e in site.suite.events("job.action", running)
                            if e["action"] == "revoke"), key=lambda e: int(e["seq"]))
        revoke_seq = [revoke_event["seq"]]
        _say(f"  audit trail: job.action action=revoke outcome={revoke_event['outcome']} "
             f"seq {revoke_event['seq']} hash {str(revoke_event['hash'])[:16]}…")
        wait_for(lambda: bool(after_revoke()), 10, "the probe after the revocation")
        last = after_revoke()[-1]["probe"].get("user", {})
        _say(f"  the agent took the GPU back {took:.1f} s after the revoke; its probe from "
             "inside the job now sees:")
        for name in sorted(last):
            _say(f"      {name:<10} {MEANING.get(last[name], last[name])}")
        state = c.wait_job(running, ["CANCELLED", "FAILED", "COMPLETED"], timeout=30)
        _say(f"  job {running}: {state['JobState']}")
        check(took < 5 and state["JobState"] == "CANCELLED" and
              all(v != "open" for k, v in last.items() if k != "nvidiactl"),
              "revocation removed GPU access within 5 s (proven by the probe) and ended the job")


def _summary(failures: list[str]) -> int:
    _say()
    _say("=" * WIDTH)
    if failures:
        _say(f"ztgpu demo: {len(failures)} check(s) FAILED:")
        for what in failures:
            _say(f"  - {what}")
        return 1
    _say("What this showed, on real Slurm with simulated GPUs:")
    _say("  * each job opened only the GPUs Slurm gave it, in every step;")
    _say("  * two independent locks: device-file ownership and a devices cgroup, and the")
    _say("    agent proved the cgroup alone holds by probing from inside each job;")
    _say("  * a user with no job opened nothing; a reset device mode was caught and undone;")
    _say("  * each GPU's memory was wiped and verified after its job, with the evidence;")
    _say("  * every grant, probe, drift and release was recorded in a verified hash chain,")
    _say("    forwarded over mutual TLS to a collector, and verified there by an auditor;")
    _say("  * a GPU job without MFA waited with a readable reason until its user logged in,")
    _say("    each grant was signed by authd and checked by the node, and a revocation took")
    _say("    a running job's GPU away and ended it.")
    _say("Everything the demo created (daemons, users, device nodes, cgroups) is removed.")
    return 0
