"""The MFA session belongs to the login that did MFA (authd
``mfa_binding: login_session``), proven through real ssh logins.

A private sshd plays the login node (its stack gives every login a session
keyring of its own, as Debian's sshd does with pam_keyinit); the private
cluster runs the job gate, and every submit goes through the cli_filter
that `ztgpu install --cli-filter` wrote. Login A runs `ztgpu login` with its
TOTP code and submits; login B has the user's key but no code (a stolen
key), and cannot start GPU work on A's MFA session.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_slurm

from ztgpu.testing.mfa_cluster import MfaCluster, held_reason, mfa_cluster
from ztgpu.testing.slurm_cluster import wait_for
from ztgpu.testing.sshd import PrivateSshd, private_sshd

pytestmark = [needs_slurm, pytest.mark.slurm]


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[MfaCluster, PrivateSshd]]:
    with mfa_cluster(authd={"mfa_binding": "login_session"}, cli_filter=True) as made, \
            private_sshd() as sshd:
        made.enroll("ztalice")
        sshd.authorize("ztalice")
        yield made, sshd


def sbatch(made: MfaCluster) -> str:
    out = made.suite.cluster.work_dir
    return (f"sbatch --parsable --gres=gpu:1 -o {out}/%j.out --wrap "
            f"{shlex.quote('sleep 120')}")


def test_a_second_login_without_totp_cannot_ride_the_first_logins_mfa(site):
    made, sshd = site
    c = made.suite.cluster
    code = made.code("ztalice")
    a = sshd.ssh("ztalice", made.login_shell(f"echo {code} | ztgpu login --code-stdin",
                                  sbatch(made)))
    assert a.returncode == 0, (a.stdout, a.stderr)
    assert "bound to it" in a.stdout, a.stdout
    job_a = a.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"[0-9]+", job_a), a.stdout
    c.wait_job(job_a, ["RUNNING"])
    made.suite.wait_event("job.grant", job_a)
    bound = [e for e in made.authd.events("auth.bound") if e.get("job_id") == job_a]
    assert [e["outcome"] for e in bound] == ["bound"], bound

    # srun/salloc: Slurm runs the cli_filter's post-submit step only once the
    # allocation has started, after the gate, so an interactive allocation
    # cannot be bound in time and is refused (fail closed; the README says so).
    srun = sshd.ssh("ztalice", made.login_shell("srun --gres=gpu:1 echo ran-on-gpu"))
    assert "ran-on-gpu" not in srun.stdout, (srun.stdout, srun.stderr)
    assert "not submitted from a login session that passed MFA" in srun.stderr, srun.stderr

    # Login B: the same user and key, no code. Its job waits, with the reason.
    b = sshd.ssh("ztalice", made.login_shell(sbatch(made)))
    assert b.returncode == 0, (b.stdout, b.stderr)
    job_b = b.stdout.strip().splitlines()[-1]
    wait_for(lambda: held_reason(c, job_b)[0] == "JobHeldAdmin", 30, "job B held")
    assert "not submitted from a login session that passed MFA" in held_reason(c, job_b)[1]
    assert c.job_state(job_a)["JobState"] == "RUNNING"
    # B can neither bind its job nor read A's key from its own keyring.
    bind = sshd.ssh("ztalice", made.login_shell(f"ztgpu job bind {job_b}"))
    assert bind.returncode != 0 and "no MFA session key" in bind.stderr, bind
    assert "ztgpu:session" not in sshd.ssh("ztalice", "cat /proc/keys").stdout
    refused = [e for e in made.authd.events("auth.bound") if e.get("job_id") == job_b]
    assert all(e["outcome"] != "bound" for e in refused), refused
    assert not [e for e in made.suite.events("job.grant") if e.get("job_id") == job_b]

    # B does MFA itself and binds the job it submitted: it starts.
    b2 = sshd.ssh("ztalice", made.login_shell(f"echo {made.code('ztalice')} | ztgpu login "
                                         f"--code-stdin", f"ztgpu job bind {job_b}"))
    assert b2.returncode == 0 and "released" in b2.stdout, (b2.stdout, b2.stderr)
    c.wait_job(job_b, ["RUNNING"], timeout=90)
    made.suite.wait_event("job.grant", job_b)


def test_a_binding_proof_without_the_logins_key_is_refused_and_recorded(site):
    """The session id alone (say it leaked) does not bind a job: the proof
    needs the key only the login's keyring holds."""
    made, sshd = site
    c = made.suite.cluster
    job = c.sbatch("ztalice", "sleep 60", gpus=1)
    wait_for(lambda: held_reason(c, job)[0] == "JobHeldAdmin", 30, "the unbound job held")
    tamper = ("python3 -c \"import base64, os; from ztgpu.trust import session_keyring as k; "
              "sid = k.read().split(b':')[0]; k.forget(); "
              "k.store(sid + b':' + base64.b64encode(os.urandom(32)), 600)\"")
    python = Path(sys.executable)
    res = sshd.ssh("ztalice", made.login_shell(
        f"echo {made.code('ztalice')} | ztgpu login --code-stdin",
        tamper.replace("python3", str(python)), f"ztgpu job bind {job}"))
    assert res.returncode != 0 and "does not match this login session" in res.stderr, res
    refused = [e for e in made.authd.events("auth.bound") if e.get("job_id") == job]
    assert [e["outcome"] for e in refused] == ["refused"], refused
    assert held_reason(c, job)[0] == "JobHeldAdmin"
    c.slurm(["scancel", job])
