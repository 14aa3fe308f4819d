"""The ztgpu PAM module and Slurm's pam_slurm_adopt, side by side.

The same scenarios, through the same private sshd and the real ``ssh``
client, on the same real cluster with the suite (ConstrainDevices=yes),
against three account/session stacks: the ztgpu module, pam_slurm_adopt
with its default options, and pam_slurm_adopt hardened
(``action_adopt_failure=deny action_generic_failure=deny``). ``pytest -s``
prints the table of outcomes; the assertions pin what each does.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import needs_slurm

from ztgpu.testing import gpu_probe
from ztgpu.testing.slurm_cluster import ClusterSpec, wait_for
from ztgpu.testing.sshd import BASE_STACK, PrivateSshd, private_sshd
from ztgpu.testing.suite_cluster import SuiteCluster, suite_cluster

pytestmark = [needs_slurm, pytest.mark.slurm]

ADOPT = "/lib/security/pam_slurm_adopt.so"
HARDENED = "action_adopt_failure=deny action_generic_failure=deny"


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[SuiteCluster, PrivateSshd]]:
    with suite_cluster(ClusterSpec(constrain_devices=True)) as suite, \
            private_sshd(start=False) as sshd:
        gpu_probe.install_probe(suite.cluster.work_dir)
        sshd.authorize("root", *suite.cluster.spec.users)
        suite.ztgpu("install", "--pam", sshd.service, "--pam-dir", "/etc/pam.d")
        sshd.start(env={"SLURM_CONF": str(suite.cluster.slurm_conf)})
        yield suite, sshd


def slurm_adopt_stack(service: str, options: str = "") -> str:
    return BASE_STACK + f"account required {ADOPT} service={service} {options}\n".replace(
        "  ", " ")


def scenarios(suite: SuiteCluster, sshd: PrivateSshd) -> dict[str, str]:
    """Run every scenario against the stack sshd has now; outcome per scenario."""
    c = suite.cluster
    out: dict[str, str] = {}
    mark = max((int(str(e["seq"])) for e in suite.events()), default=0)
    res = sshd.ssh("ztcarol", "echo in")
    out["no job: login"] = "denied" if res.returncode == 255 else "ALLOWED"
    out["no job: message"] = "shown" if ("no active jobs" in res.stderr
                                         or "no running job" in res.stderr) else "none"
    job = c.sbatch("ztalice", "sleep 300", gpus=1)
    c.wait_job(job, ["RUNNING"])
    minor = int(suite.wait_event("job.grant", job)["gpus"][0]["minor"])
    bob = c.sbatch("ztbob", "sleep 300", gpus=1)
    c.wait_job(bob, ["RUNNING"])
    res = sshd.ssh("ztalice", f"python3 {c.work_dir / 'probe.py'} s {c.dev_dir}; "
                              f"cat /proc/self/cgroup")
    seen = gpu_probe.parse_probes(res.stdout).get("s", {})
    out["job user: login"] = "allowed" if res.returncode == 0 else "denied"
    out["job user: in extern step"] = ("yes" if f"job_{job}/step_extern" in res.stdout
                                       else "no")
    out["job user: own GPU"] = seen.get(f"nvidia{minor}", "?")
    others = sorted({seen.get(f"nvidia{m}", "?") for m in range(4) if m != minor})
    out["job user: other GPUs"] = "/".join(others)
    out["root: login"] = "allowed" if sshd.ssh("root", "true").returncode == 0 else "DENIED"
    long = sshd.ssh_background("ztalice", "sleep 333; echo survived")
    wait_for(lambda: "sleep" in c.slurm(["scontrol", "listpids", job], check=False)
             or True, 5, "session")
    c.slurm(["scancel", job])
    try:
        text, _ = long.communicate(timeout=60)
        out["session after job end"] = "ended" if "survived" not in text else "SURVIVED"
    except Exception:  # noqa: BLE001 - a session that outlives its job is the finding
        long.kill()
        long.communicate()
        out["session after job end"] = "SURVIVED"
    c.slurm(["scancel", bob])
    out["recorded"] = str(sum(1 for e in suite.events() if str(e["code"]).startswith("ssh.")
                              and int(str(e["seq"])) > mark)) + " ssh.* events"
    wait_for(lambda: not c.slurm(["squeue", "-h"], check=False).strip(), 60, "empty queue")
    return out


def moved_out(suite: SuiteCluster, sshd: PrivateSshd, stack: str) -> dict[str, str]:
    """What pam_systemd does when it runs after adoption: a later session
    module moves sshd's process (and so the shell) out of the job."""
    c = suite.cluster
    mover = sshd.base / "move-out.sh"
    mover.write_text("#!/bin/sh\necho $PPID > /sys/fs/cgroup/freezer/cgroup.procs\n"
                     "echo $PPID > /sys/fs/cgroup/devices/cgroup.procs\n")
    mover.chmod(0o755)
    sshd.write_stack(stack + f"session required pam_exec.so {mover}\n")
    job = c.sbatch("ztalice", "sleep 300", gpus=1)
    c.wait_job(job, ["RUNNING"])
    suite.wait_event("job.grant", job)
    try:
        long = sshd.ssh_background("ztalice", "sleep 3; cat /proc/self/cgroup; sleep 334; "
                                              "echo survived")
        time.sleep(6)
    finally:
        sshd.write_stack(stack)
    c.slurm(["scancel", job])
    survived = False
    try:
        text, _ = long.communicate(timeout=15)
    except subprocess.TimeoutExpired:  # still running 15 s after the job ended
        survived = True
        long.kill()
        text, _ = long.communicate()
    survived = survived or "survived" in text
    freezer = next((line for line in text.splitlines() if ":freezer:" in line), "")
    wait_for(lambda: not c.slurm(["squeue", "-h"], check=False).strip(), 60, "empty queue")
    return {"moved out later: shell back in job": "yes" if f"job_{job}" in freezer else "NO",
            "moved out later: after job end": "SURVIVED" if survived else "ended"}


def misspelled(sshd: PrivateSshd, stack: str, option: str) -> str:
    """A no-job user's login with a misspelled option on the module's line."""
    sshd.write_stack(stack.replace("socket=", f"{option} socket=", 1)
                     if "socket=" in stack else stack.replace(
                         "pam_slurm_adopt.so", f"pam_slurm_adopt.so {option}"))
    try:
        return "denied" if sshd.ssh("ztcarol", "true").returncode == 255 else "ALLOWED"
    finally:
        sshd.write_stack(stack)


def test_side_by_side_with_pam_slurm_adopt(site, capsys):
    suite, sshd = site
    ztgpu_stack = sshd.stack()
    table: dict[str, dict[str, str]] = {}
    table["ztgpu"] = scenarios(suite, sshd)
    table["ztgpu"]["misspelled option"] = misspelled(sshd, ztgpu_stack,
                                                     "action_no_jbo=allow")
    table["ztgpu"].update(moved_out(suite, sshd, ztgpu_stack))
    for name, options in (("slurm_adopt default", ""), ("slurm_adopt hardened", HARDENED)):
        stack = slurm_adopt_stack(sshd.service, options)
        sshd.write_stack(stack)
        try:
            table[name] = scenarios(suite, sshd)
            table[name]["misspelled option"] = misspelled(sshd, stack, "action_no_jbos=ignore")
            table[name].update(moved_out(suite, sshd, stack))
        finally:
            sshd.write_stack(ztgpu_stack)
    rows = list(table["ztgpu"])
    with capsys.disabled():
        print("\n| scenario | " + " | ".join(table) + " |")
        print("|---|" + "---|" * len(table))
        for row in rows:
            print(f"| {row} | " + " | ".join(table[n].get(row, "?") for n in table) + " |")
    mine = table["ztgpu"]
    assert mine == {
        "no job: login": "denied", "no job: message": "shown",
        "job user: login": "allowed", "job user: in extern step": "yes",
        "job user: own GPU": "open", "job user: other GPUs": mine["job user: other GPUs"],
        "root: login": "allowed", "session after job end": "ended",
        "recorded": mine["recorded"], "misspelled option": "denied",
        "moved out later: shell back in job": "yes",
        "moved out later: after job end": "ended"}, mine
    assert set(mine["job user: other GPUs"].split("/")) <= {"EACCES", "EPERM"}, mine
    assert int(mine["recorded"].split()[0]) >= 4, mine
    for name in ("slurm_adopt default", "slurm_adopt hardened"):
        theirs = table[name]
        # The peer does its core job here too (what makes the comparison fair)
        # and records nothing in the suite's trail.
        assert theirs["no job: login"] == "denied" and theirs["job user: login"] == "allowed"
        assert theirs["job user: in extern step"] == "yes", theirs
        assert theirs["recorded"] == "0 ssh.* events", theirs
        # What deepops#745 reported: a session moved out after adoption stays out.
        assert theirs["moved out later: shell back in job"] == "NO", theirs
