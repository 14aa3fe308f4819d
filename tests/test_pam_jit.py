"""Just-in-time admin access through sshd and the ztgpu PAM module.

A real authd grants JIT access (`ztgpu admin jit grant`); the node agent
asks authd for it when a user with no job logs in. The session is let in,
recorded, confined to no GPU, and ended when the grant expires or the user
is revoked; a login after that is refused.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest
from conftest import needs_slurm

from ztgpu.testing import gpu_probe
from ztgpu.testing.mfa_cluster import MfaCluster, mfa_cluster
from ztgpu.testing.prerequisites import require
from ztgpu.testing.slurm_cluster import wait_for
from ztgpu.testing.sshd import TOTP_STACK, PrivateSshd, alive, pids_running, private_sshd

pytestmark = [needs_slurm, pytest.mark.slurm]


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[MfaCluster, PrivateSshd]]:
    with mfa_cluster(gate=False) as made, private_sshd(start=False) as sshd:
        gpu_probe.install_probe(made.suite.cluster.work_dir)
        sshd.authorize("root", *made.suite.cluster.spec.users)
        made.suite.ztgpu("install", "--pam", sshd.service, "--pam-dir", "/etc/pam.d",
                         f"--pam-option=log={sshd.base / 'pam.log'}")
        sshd.start()
        yield made, sshd


def jit(made: MfaCluster, user: str, ttl: str) -> str:
    res = made.admin("jit", "grant", "--user", user, "--node", made.suite.cluster.node,
                     "--ttl", ttl, "--reason", "replace a failed disk")
    assert res.returncode == 0, res.stderr
    found = re.search(r"JIT access ([0-9a-f]+)", res.stdout)
    assert found is not None, res.stdout
    return found.group(1)




def test_jit_admin_gets_in_without_a_job_sees_no_gpu_and_is_out_when_it_expires(site):
    made, sshd = site
    suite = made.suite
    refused = sshd.ssh("ztcarol", "echo in")
    assert refused.returncode == 255 and "no running job" in refused.stderr, refused
    grant = jit(made, "ztcarol", "60s")
    res = sshd.ssh("ztcarol", f"python3 {suite.cluster.work_dir / 'probe.py'} jit "
                              f"{suite.cluster.dev_dir}; cat /proc/self/cgroup")
    assert res.returncode == 0, (res.stderr, sshd.log()[-2000:])
    seen = gpu_probe.parse_probes(res.stdout)["jit"]
    assert {seen[f"nvidia{m}"] for m in range(4)} <= {"EACCES", "EPERM"}, seen
    assert "/jit_ztcarol_" in res.stdout, res.stdout
    logins = [e for e in suite.events("ssh.login") if e["user"] == "ztcarol"]
    assert logins and grant in str(logins[-1]["reason"]), logins
    sessions = [e for e in suite.events("ssh.session") if e["user"] == "ztcarol"]
    assert any(e["outcome"] == "jit" for e in sessions), sessions

    # A session open when the grant runs out is ended; a new login is refused.
    login = sshd.ssh_background("ztcarol", "sleep 444; echo done")
    wait_for(lambda: pids_running(b"sleep\x00444"), 30, "the JIT session's sleep")
    sleepers = pids_running(b"sleep\x00444")
    out, _ = login.communicate(timeout=120)
    assert "done" not in out
    wait_for(lambda: not any(alive(p) for p in sleepers), 10, "the JIT session ended")

    def ended() -> list[dict[str, object]]:
        return [e for e in suite.events("ssh.session")
                if e["user"] == "ztcarol" and e["outcome"] == "ended"]

    wait_for(ended, 10, "the JIT session's end recorded")
    assert "expired" in str(ended()[-1]["reason"]), ended()
    late = sshd.ssh("ztcarol", "echo in")
    assert late.returncode == 255, late


def test_a_revoked_user_loses_jit_sessions_and_logins(site):
    made, sshd = site
    suite = made.suite
    jit(made, "ztbob", "1h")
    login = sshd.ssh_background("ztbob", "sleep 445; echo done")
    wait_for(lambda: pids_running(b"sleep\x00445"), 30, "the JIT session's sleep")
    res = made.admin("revoke", "--user", "ztbob", "--reason", "laptop stolen")
    assert res.returncode == 0, res.stderr
    out, _ = login.communicate(timeout=60)
    assert "done" not in out
    def ended() -> list[dict[str, object]]:
        return [e for e in suite.events("ssh.session")
                if e["user"] == "ztbob" and e["outcome"] == "ended"]

    wait_for(ended, 10, "the JIT session's end recorded")
    assert "revoked" in str(ended()[-1]["reason"]), ended()
    again = sshd.ssh("ztbob", "echo in")
    assert again.returncode == 255 and "in" not in again.stdout.split(), again


def test_with_mfa_jit_the_admin_gives_a_totp_code_and_a_job_user_is_not_asked(site):
    """``ztgpu install --pam-mfa jit``: JIT logins answer a TOTP prompt in the
    auth phase (authd checks it, as the user); the agent lets a JIT login
    through the account phase only after that check."""
    made, _ = site
    suite = made.suite
    admin = "ztcarol"  # (ztbob was revoked above)
    made.enroll(admin)
    with private_sshd(TOTP_STACK, start=False, totp=True) as sshd:
        sshd.authorize(admin, "ztalice")
        log = sshd.base / "pam.log"
        res = suite.ztgpu("install", "--pam", sshd.service, "--pam-dir", "/etc/pam.d",
                          "--pam-mfa", "jit", f"--pam-option=config={made.login_config}",
                          f"--pam-option=log={log}")
        assert "mfa=jit" in sshd.stack() and "pam_ztgpu.so" in sshd.stack(), sshd.stack()
        sshd.start()
        grant = jit(made, admin, "600s")
        code = made.code(admin)
        wrong = sshd.ssh_with_code(admin, "echo in", "000000" if code != "000000" else "111111")
        assert wrong.returncode == 255 and "in" not in wrong.stdout.split(), wrong
        right = sshd.ssh_with_code(admin, "echo in", code)
        assert right.stdout.split() == ["in"], (right.stdout, right.stderr, log.read_text())
        checks = [e["outcome"] for e in suite.events("ssh.mfa") if e["user"] == admin]
        assert checks == ["failed", "passed"], checks
        logins = [e for e in suite.events("ssh.login") if e["user"] == admin]
        assert logins and grant in str(logins[-1]["reason"]), logins

        # A stack or an sshd that skips the auth phase: the account phase
        # alone does not let a JIT login in.
        alone = subprocess.run([str(require("pamtester")), sshd.service, admin, "acct_mgmt"],
                               capture_output=True, text=True, timeout=60, check=False)
        assert alone.returncode != 0 and "needs a TOTP code" in alone.stdout + alone.stderr
        denied = [e for e in suite.events("ssh.denied") if e["user"] == admin]
        assert "needs a TOTP code" in str(denied[-1]["reason"]), denied[-1:]

        # A user with a running job here is not asked for a code.
        made.enroll("ztalice")
        assert made.login("ztalice").returncode == 0
        job = suite.cluster.sbatch("ztalice", "sleep 300", gpus=1)
        suite.cluster.wait_job(job, ["RUNNING"])
        suite.wait_event("job.grant", job)
        (sshd.base / "askpass.log").unlink(missing_ok=True)
        res = sshd.ssh_with_code("ztalice", "echo in", "")
        assert res.stdout.split() == ["in"], (res.stdout, res.stderr, log.read_text()[-1500:])
        assert not (sshd.base / "askpass.log").exists() or \
            "TOTP" not in (sshd.base / "askpass.log").read_text()
        suite.cluster.slurm(["scancel", job])
