"""SSH through the ztgpu PAM module, proven through a real sshd and ssh.

A private sshd (own config, host key, port on 127.0.0.1, own PAM service
whose stack ``ztgpu install --pam`` wrote) in front of the real private
Slurm cluster with the suite. Every login is the real ``ssh`` client with a
key. Runs with ``ConstrainDevices=yes`` and the compiled module
(pam_ztgpu.so, the default), then ``no`` and the pam_python one: in both
the adopted shell must open exactly its job's GPUs. (Both faces make the
same decisions on every failure mode: tests/test_pam_module_faces.py.)
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_slurm

from ztgpu.testing import gpu_probe
from ztgpu.testing.slurm_cluster import ClusterSpec, wait_for
from ztgpu.testing.sshd import PrivateSshd, alive, pids_running, private_sshd
from ztgpu.testing.suite_cluster import SuiteCluster, suite_cluster

pytestmark = [needs_slurm, pytest.mark.slurm]

HOLD = "sleep 600"


@pytest.fixture(scope="module", params=["ConstrainDevices=yes,compiled",
                                        "ConstrainDevices=no,python"])
def suite(request: pytest.FixtureRequest) -> Iterator[SuiteCluster]:
    constrain = "=yes" in request.param
    with suite_cluster(ClusterSpec(constrain_devices=constrain)) as running:
        gpu_probe.install_probe(running.cluster.work_dir)
        yield running


def face(suite: SuiteCluster) -> str:
    """The module's form this run of the file uses (see the suite's params)."""
    return "compiled" if suite.cluster.spec.constrain_devices else "python"


@pytest.fixture(scope="module")
def sshd(suite: SuiteCluster) -> Iterator[PrivateSshd]:
    with private_sshd(start=False) as daemon:
        daemon.authorize("root", *suite.cluster.spec.users)
        install_pam(suite, daemon, f"log={daemon.base / 'pam.log'}")
        daemon.start()
        yield daemon


def install_pam(suite: SuiteCluster, daemon: PrivateSshd, *options: str,
                kind: str | None = None) -> subprocess.CompletedProcess[str]:
    args = ["install", "--pam", daemon.service, "--pam-dir", "/etc/pam.d",
            "--pam-module", kind or face(suite)]
    args += [f"--pam-option={o}" for o in options]
    return suite.ztgpu(*args)


@pytest.fixture(autouse=True)
def _no_jobs_left(suite: SuiteCluster) -> Iterator[None]:
    yield
    suite.cluster.clean_slate()
    if not suite.alive():
        suite.start_agent()


def running(suite: SuiteCluster, user: str, gpus: int = 1) -> tuple[str, set[int]]:
    job = suite.cluster.sbatch(user, HOLD, gpus=gpus)
    suite.cluster.wait_job(job, ["RUNNING"])
    grant = suite.wait_event("job.grant", job)
    return job, {int(g["minor"]) for g in grant["gpus"]}


def probe_over_ssh(suite: SuiteCluster, sshd: PrivateSshd, user: str) -> dict[str, str]:
    res = sshd.ssh(user, f"python3 {suite.cluster.work_dir / 'probe.py'} ssh "
                         f"{suite.cluster.dev_dir}; cat /proc/self/cgroup")
    assert res.returncode == 0, (res.returncode, res.stderr, sshd.log()[-3000:])
    return {**gpu_probe.parse_probes(res.stdout)["ssh"], "cgroup": res.stdout}


def events_since(suite: SuiteCluster, code: str, mark: int) -> list[dict[str, object]]:
    return [e for e in suite.events(code) if int(str(e["seq"])) > mark]


def last_seq(suite: SuiteCluster) -> int:
    seqs = [int(str(e["seq"])) for e in suite.events()]
    return max(seqs, default=0)


def test_a_user_without_a_job_is_denied_with_a_message_and_it_is_recorded(suite, sshd):
    mark = last_seq(suite)
    res = sshd.ssh("ztcarol", "echo logged-in")
    assert res.returncode == 255 and "logged-in" not in res.stdout, res
    assert "you have no running job on" in res.stderr, res.stderr
    denied = events_since(suite, "ssh.denied", mark)
    assert [(e["user"], e["rhost"], e["service"], e["action"]) for e in denied] == [
        ("ztcarol", "127.0.0.1", sshd.service, "deny")], denied
    assert "no running job of ztcarol" in str(denied[0]["reason"])
    assert "action_no_job=deny" in (sshd.base / "pam.log").read_text()


def test_the_jobs_user_is_adopted_and_opens_exactly_the_jobs_gpus(suite, sshd):
    alice, alice_minors = running(suite, "ztalice")
    bob, bob_minors = running(suite, "ztbob")
    mark = last_seq(suite)
    seen = probe_over_ssh(suite, sshd, "ztalice")
    for minor in range(4):
        got = seen[f"nvidia{minor}"]
        if minor in alice_minors:
            assert got == "open", seen
        else:  # Bob's GPU and idle ones: refused (file owner and, adopted, the cgroup)
            assert got in ("EACCES", "EPERM"), seen
    assert f"job_{alice}/step_extern" in seen["cgroup"], seen["cgroup"]
    session = events_since(suite, "ssh.session", mark)
    adopted = [e for e in session if e["outcome"] == "adopted"]
    assert [(e["user"], e["job_id"]) for e in adopted] == [("ztalice", alice)], session
    wait_for(lambda: any(e["outcome"] == "closed" and e["job_id"] == alice
                         for e in events_since(suite, "ssh.session", mark)), 20,
             "the session's close recorded")
    logins = events_since(suite, "ssh.login", mark)
    assert [(e["user"], e["outcome"]) for e in logins] == [("ztalice", "allowed")]
    # Root inside the adopted session's devices cgroup: the cgroup alone
    # refuses every GPU but the job's own (with ConstrainDevices=no the
    # agent's own per-job cgroup does it).
    res = sshd.ssh("ztalice", "cat /proc/self/cgroup")
    devices = next(line.split(":", 2)[2] for line in res.stdout.splitlines()
                   if ":devices:" in line)
    assert f"job_{alice}" in devices, res.stdout
    del bob, bob_minors


def test_the_adopted_shell_ends_with_its_job(suite, sshd):
    job, _ = running(suite, "ztalice")
    # A login that would keep running: when the job ends, every process of
    # it must end too (Slurm ends the extern step it was put into).
    login = sshd.ssh_background("ztalice", "sleep 555; echo done")
    wait_for(lambda: pids_running(b"sleep\x00555"), 30, "the ssh session's sleep")
    sleepers = pids_running(b"sleep\x00555")
    suite.cluster.slurm(["scancel", job])
    suite.cluster.wait_job(job, ["CANCELLED", "COMPLETED"], timeout=60)
    out, _ = login.communicate(timeout=60)
    assert "done" not in out
    wait_for(lambda: not any(alive(p) for p in sleepers), 30, "the session's processes gone")
    suite.wait_event("job.release", job)


def test_several_jobs_the_newest_is_chosen_and_the_user_can_pick(suite, sshd):
    import pwd

    entry = pwd.getpwnam("ztbob")
    home = sshd.base / "home-ztbob"
    choice = home / ".config" / "ztgpu" / "ssh-job"
    choice.parent.mkdir(parents=True)
    for path in (home, home / ".config", choice.parent):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    # usermod refuses while the user runs processes: before the jobs start.
    subprocess.run(["usermod", "-d", str(home), "ztbob"], check=True, capture_output=True)
    try:
        first, _ = running(suite, "ztbob")
        second, _ = running(suite, "ztbob")
        seen = probe_over_ssh(suite, sshd, "ztbob")
        assert f"job_{second}/step_extern" in seen["cgroup"], seen["cgroup"]
        choice.write_text(f"{first}\n")
        os.chown(choice, entry.pw_uid, entry.pw_gid)
        seen = probe_over_ssh(suite, sshd, "ztbob")
        assert f"job_{first}/step_extern" in seen["cgroup"], seen["cgroup"]
        # A file the user does not own is ignored (it could be planted).
        os.chown(choice, 0, 0)
        seen = probe_over_ssh(suite, sshd, "ztbob")
        assert f"job_{second}/step_extern" in seen["cgroup"], seen["cgroup"]
    finally:
        c = suite.cluster
        c.slurm(["scancel", "-u", "ztbob"], check=False)
        wait_for(lambda: not c.slurm(["squeue", "-h"], check=False).strip(), 60,
                 "empty queue")
        wait_for(lambda: subprocess.run(["usermod", "-d", entry.pw_dir, "ztbob"],
                                        capture_output=True).returncode == 0, 30,
                 "ztbob's home restored")


def test_agent_down_denies_users_but_not_root_or_break_glass(suite, sshd):
    job, _ = running(suite, "ztalice")
    suite.stop_agent()
    try:
        res = sshd.ssh("ztalice", "echo in")
        assert res.returncode == 255 and "in" not in res.stdout.split(), res
        assert "access service is down" in res.stderr, res.stderr
        assert sshd.ssh("root", "echo in").stdout.split() == ["in"]
        install_pam(suite, sshd, f"log={sshd.base / 'pam.log'}", "break_glass=ztcarol")
        assert sshd.ssh("ztcarol", "echo in").stdout.split() == ["in"]
        log = (sshd.base / "pam.log").read_text()
        assert "action_no_agent=deny" in log and "let in as root/break-glass" in log
    finally:
        install_pam(suite, sshd, f"log={sshd.base / 'pam.log'}")
        suite.start_agent()
    del job


def test_a_misspelled_option_refuses_users_and_says_which(suite, sshd):
    job, _ = running(suite, "ztalice")
    stack = sshd.stack()
    sshd.write_stack(stack.replace("socket=", "action_adopt_faliure=allow socket=", 1))
    try:
        res = sshd.ssh("ztalice", "echo in")
        assert res.returncode == 255, res
        assert sshd.ssh("root", "echo in").stdout.split() == ["in"]
        log = (sshd.base / "pam.log").read_text()
        assert "unknown option 'action_adopt_faliure'" in log, log[-2000:]
        assert "configuration error, login refused" in log
    finally:
        sshd.write_stack(stack)
    assert sshd.ssh("ztalice", "echo in").stdout.split() == ["in"]
    del job


def test_a_crash_inside_the_module_denies_and_is_logged(suite, sshd, tmp_path):
    """An agent that answers nonsense makes the module fail in its own code."""
    import socket as socketlib
    import threading

    fake = tmp_path / "fake.sock"
    server = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    server.bind(str(fake))
    server.listen(8)
    stop = threading.Event()

    def answer() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b'{"ok":true,"result":[1,2,3]}\n')

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    stack = sshd.stack()
    sshd.write_stack(stack.replace(f"socket={suite.socket}", f"socket={fake}"))
    try:
        res = sshd.ssh("ztalice", "echo in")
        assert res.returncode == 255 and "internal error" in res.stderr, res
        log = (sshd.base / "pam.log").read_text()
        # pam_python: the exception and its traceback; compiled: what was wrong.
        cause = ("AttributeError" if face(suite) == "python"
                 else "the node agent's answer has no result object")
        assert "internal error" in log and cause in log, log[-2000:]
        assert sshd.ssh("root", "echo in").stdout.split() == ["in"]
    finally:
        sshd.write_stack(stack)
        stop.set()
        thread.join(5)
        server.close()


def test_pam_exec_entry_point_denies_and_adopts_the_same(suite, sshd):
    install_pam(suite, sshd, f"log={sshd.base / 'pam.log'}", kind="exec")
    try:
        assert "pam_exec.so" in sshd.stack()
        res = sshd.ssh("ztcarol", "echo in")
        assert res.returncode == 255, res
        job, minors = running(suite, "ztalice")
        seen = probe_over_ssh(suite, sshd, "ztalice")
        assert f"job_{job}/step_extern" in seen["cgroup"], seen["cgroup"]
        assert {seen[f"nvidia{m}"] for m in minors} == {"open"}, seen
        assert {seen[f"nvidia{m}"] for m in range(4) if m not in minors} <= {"EACCES", "EPERM"}
    finally:
        install_pam(suite, sshd, f"log={sshd.base / 'pam.log'}")
    assert "pam_exec.so" not in sshd.stack()





def test_a_session_moved_out_of_its_job_after_adoption_is_recorded_and_put_back(suite, sshd):
    """What pam_systemd does when it runs after the module: a later session
    module moves sshd's process (and so the shell it forks) elsewhere."""
    root = Path("/sys/fs/cgroup")
    mover = sshd.base / "move-out.sh"
    mover.write_text("#!/bin/sh\n"
                     f"echo $PPID > {root / 'freezer' / 'cgroup.procs'}\n"
                     f"echo $PPID > {root / 'devices' / 'cgroup.procs'}\n")
    mover.chmod(0o755)
    stack = sshd.stack()
    sshd.write_stack(stack + f"session required pam_exec.so {mover}\n")
    job, minors = running(suite, "ztalice")
    mark = last_seq(suite)
    try:
        # The agent's loop puts it back within a few seconds; the shell waits
        # for that (at most 30 s) and then shows where it is.
        res = sshd.ssh("ztalice", "for i in $(seq 60); do grep -q 'freezer:.*job_' "
                       "/proc/$$/cgroup && grep -q 'devices:.*job_' /proc/$$/cgroup && break; "
                       "sleep 0.5; done; cat /proc/self/cgroup")
    finally:
        sshd.write_stack(stack)
    assert res.returncode == 0, res
    lines = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in res.stdout.splitlines()}
    assert f"job_{job}" in lines["freezer"] and f"job_{job}" in lines["devices"], (
        res.stdout, events_since(suite, "ssh.session", mark),
        (sshd.base / "pam.log").read_text()[-1500:])
    escaped = events_since(suite, "ssh.escaped", mark)
    assert escaped and escaped[0]["job_id"] == job and escaped[0]["action"] == "moved_back"
    assert escaped[0]["severity"] == "critical", escaped
    del minors
