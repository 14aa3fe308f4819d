"""A login node where the SSH login is the researcher's daily MFA.

A private sshd asks for the key and then keyboard-interactive; its stack is
what ``ztgpu install --pam SERVICE --pam-mfa login`` writes (pam_python:
the auth phase asks for the TOTP code and opens the user's MFA session with
authd as the user; the session phase keeps the login's binding key in the
session keyring pam_keyinit made for it). The private cluster runs the job
gate with ``mfa_binding: login_session`` and the cli_filter binds each
submission, so a job from that login starts and nothing else rides on it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator

import pytest
from conftest import needs_slurm

from ztgpu.testing.mfa_cluster import MfaCluster, mfa_cluster
from ztgpu.testing.prerequisites import require
from ztgpu.testing.sshd import TOTP_STACK, PrivateSshd, private_sshd

pytestmark = [needs_slurm, pytest.mark.slurm]


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[MfaCluster, PrivateSshd]]:
    with mfa_cluster(authd={"mfa_binding": "login_session"}, cli_filter=True) as made, \
            private_sshd(TOTP_STACK, start=False, totp=True) as sshd:
        made.enroll("ztalice")
        sshd.authorize("ztalice", "root")
        res = made.suite.ztgpu("install", "--pam", sshd.service, "--pam-dir", "/etc/pam.d",
                               "--pam-mfa", "login", f"--pam-option=config={made.login_config}",
                               f"--pam-option=log={sshd.base / 'pam.log'}",
                               f"--pam-option=state_dir={sshd.base / 'pam-state'}")
        assert "AuthenticationMethods publickey,keyboard-interactive" in res.stderr, res.stderr
        sshd.start()
        yield made, sshd


def test_the_ssh_login_with_its_totp_code_opens_that_logins_mfa_session(site):
    made, sshd = site
    c = made.suite.cluster
    out = c.work_dir
    submit = (f"sbatch --parsable --gres=gpu:1 -o {out}/%j.out --wrap "
              f"{shlex.quote('sleep 60')}")
    res = sshd.ssh_with_code("ztalice", made.login_shell("env | grep -c ZTGPU_MFA || true", submit),
                             made.code("ztalice"))
    assert res.returncode == 0, (res.stdout, res.stderr, sshd.log()[-2000:],
                                 (sshd.base / "pam.log").read_text()[-2000:])
    assert "ztgpu TOTP code" in (sshd.base / "askpass.log").read_text()
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "0", res.stdout  # not even the ticket reaches the shell's environment
    assert not list((sshd.base / "pam-state").iterdir())  # the key was collected
    job = lines[-1]
    assert re.fullmatch(r"[0-9]+", job), res.stdout
    c.wait_job(job, ["RUNNING"], timeout=90)
    made.suite.wait_event("job.grant", job)
    bound = [e for e in made.authd.events("auth.bound") if e.get("job_id") == job]
    assert [e["outcome"] for e in bound] == ["bound"], bound
    logins = [e for e in made.authd.events("auth.login") if e.get("user") == "ztalice"]
    assert logins and logins[-1]["outcome"] == "ok", logins[-1:]
    log = (sshd.base / "pam.log").read_text()
    assert "TOTP accepted; MFA session until" in log and "kept in the login's session keyring" \
        in log, log[-2000:]
    c.slurm(["scancel", job])


def test_a_wrong_or_reused_code_or_the_key_alone_does_not_get_in(site):
    made, sshd = site
    code = made.code("ztalice")
    first = sshd.ssh_with_code("ztalice", "echo in", code)
    assert first.stdout.split() == ["in"], (first.stdout, first.stderr)
    # The same code again (someone watching the first login): authd refuses it.
    again = sshd.ssh_with_code("ztalice", "echo in", code)
    assert again.returncode == 255 and "in" not in again.stdout.split(), again
    wrong = sshd.ssh_with_code("ztalice", "echo in", "000000" if code != "000000" else "111111")
    assert wrong.returncode == 255, wrong
    garbage = sshd.ssh_with_code("ztalice", "echo in", "letmein")
    assert garbage.returncode == 255, garbage
    key_only = sshd.ssh("ztalice", "echo in")
    assert key_only.returncode == 255, key_only
    log = (sshd.base / "pam.log").read_text()
    assert log.count("TOTP check failed") >= 3, log[-2000:]
    assert "the answer is not a TOTP code" in log
    refused = [e for e in made.authd.events("auth.login")
               if e.get("user") == "ztalice" and e["outcome"] != "ok"]
    assert len(refused) >= 2, refused


def test_authd_down_refuses_the_login_by_default_and_root_still_gets_in(site):
    made, sshd = site
    made.authd.stop()
    try:
        res = sshd.ssh_with_code("ztalice", "echo in", made.code("ztalice"))
        assert res.returncode == 255, res
        assert "action_no_authd=deny" in (sshd.base / "pam.log").read_text()
        # root is never asked (over ssh, sshd's PermitRootLogin prohibit-password
        # also refuses keyboard-interactive for root: sites give root
        # `Match User root` / `AuthenticationMethods publickey`).
        root = subprocess.run([str(require("pamtester")), sshd.service, "root",
                               "authenticate", "open_session"], capture_output=True,
                              text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
        assert root.returncode == 0, root
    finally:
        made.authd.start()
