"""Test harness: the private Slurm cluster with MFA-backed job identity switched on.

On top of ``suite_cluster``: a private munged for authd and the users'
``ztgpu login``, a site PKI, a real ``ztgpu-authd`` (holding and releasing
jobs through the cluster's own slurm.conf), the node agent asking authd for
grants and watching revocations, and optionally the job gate
(PrologSlurmctld) written with a "controller" certificate.
Researchers run ``ztgpu login`` with a world-readable login-node config.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ztgpu.testing.authd_process import (
    DEFAULT_POLICY,
    AuthdProcess,
    CodeSource,
    secret_from_uri,
)
from ztgpu.testing.collector_process import CollectorProcess, SitePki
from ztgpu.testing.munge import MungeDaemon
from ztgpu.testing.slurm_cluster import ClusterSpec, SlurmTestCluster
from ztgpu.testing.suite_cluster import SuiteCluster, suite_cluster


@dataclass
class MfaCluster:
    """What a test or the demo drives: the suite cluster, authd and logins."""

    suite: SuiteCluster
    authd: AuthdProcess
    pki: SitePki
    login_config: Path
    codes: CodeSource = field(default_factory=CodeSource)

    @property
    def secrets(self) -> dict[str, bytes]:
        return self.codes.secrets

    def login_shell(self, *commands: str) -> str:
        """A command line for an ssh login to the "login node": the cluster's
        Slurm and the users' ztgpu config, then *commands*."""
        ztgpu = Path(sys.executable).with_name("ztgpu")
        env = (f"export SLURM_CONF={self.suite.cluster.slurm_conf} "
               f"ZTGPU_CONFIG={self.login_config} PATH={ztgpu.parent}:$PATH; ")
        return env + "; ".join(commands)

    def code(self, user: str) -> str:
        """A TOTP code for ``user`` that has not been used yet (never waits)."""
        return self.codes.code(user)

    def ztgpu_as(self, user: str, *args: str, stdin: str = ""
                 ) -> subprocess.CompletedProcess[str]:
        """``ztgpu`` run by ``user`` on the "login node" (its own config)."""
        ztgpu = str(Path(sys.executable).with_name("ztgpu"))
        return subprocess.run(["runuser", "-u", user, "--", ztgpu, "--config",
                               str(self.login_config), *args], input=stdin,
                              capture_output=True, text=True, timeout=60, check=False)

    def login(self, user: str) -> subprocess.CompletedProcess[str]:
        return self.ztgpu_as(user, "login", "--code-stdin", stdin=self.code(user) + "\n")

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ztgpu admin ...`` as root, after a fresh root login."""
        root_login = self.authd.ztgpu("login", "--code-stdin", stdin=self.code("root") + "\n")
        if root_login.returncode != 0:
            return root_login
        return self.authd.ztgpu("admin", *args)

    def enroll(self, user: str) -> None:
        res = self.admin("enroll", user)
        if res.returncode != 0:
            raise RuntimeError(f"enrolling {user} failed: {res.stderr}")
        uri = re.search(r"otpauth://\S+", res.stdout)
        assert uri is not None
        self.secrets[user] = secret_from_uri(uri.group(0))


@contextlib.contextmanager
def mfa_cluster(spec: ClusterSpec | None = None, *, gate: bool = True,
                policy: str = DEFAULT_POLICY, audit: bool = False,
                gate_socket: bool = True,
                authd: dict[str, Any] | None = None,
                cli_filter: bool = False,
                sections: dict[str, dict[str, Any]] | None = None) -> Iterator[MfaCluster]:
    """A running cluster where GPUs need MFA; everything is removed afterwards.

    With ``audit`` the node agent also forwards its spool to a private
    collector of the same site PKI, as a site with MFA runs it. The gate asks
    authd over its unix gate socket (authd runs on the "controller", this
    host) unless ``gate_socket`` is false, when it uses mutual TLS. ``authd``
    adds settings to authd's own config section. ``cli_filter`` installs the
    submit-side binding (`ztgpu install --cli-filter`) with the users' login
    config. ``sections`` adds settings to the agent's config sections.
    """
    base = Path(tempfile.mkdtemp(prefix="ztgpu-mfa-"))
    base.chmod(0o755)
    munge = MungeDaemon()
    holder: dict[str, Any] = {}
    try:
        munge.start()
        pki = SitePki(base / "pki")

        def prepare(cluster: SlurmTestCluster) -> dict[str, Any]:
            local = {"gate_socket": str(base / "gate.sock")} if gate_socket else {}
            authd_process = AuthdProcess(base / "authd", pki, munge.socket, policy=policy,
                                         authd={**local, **(authd or {})},
                                         sections={"slurm": {"conf": str(cluster.slurm_conf),
                                                             "bin_dir": "/usr/bin"}})
            res = authd_process.ztgpu("admin", "enroll", "root", "--local")
            if res.returncode != 0:
                raise RuntimeError(f"bootstrap enrolment failed: {res.stderr}")
            uri = re.search(r"otpauth://\S+", res.stdout)
            assert uri is not None
            holder["authd"] = authd_process.start()
            holder["root"] = secret_from_uri(uri.group(0))
            cert, key = pki.issue("node", cluster.node)
            agent: dict[str, Any] = {
                "auth": {"authd_url": authd_process.url, "revocation_poll_s": 0.5},
                "tls": {"ca_cert": str(pki.ca_cert), "cert": str(cert), "key": str(key)},
                # The node's admin tools (`ztgpu drill --scenario revoked`) prove
                # their caller with the site's munge.
                "authd": {"munge_socket": str(munge.socket)}}
            if audit:
                holder["collector"] = CollectorProcess(base / "collector", pki).start()
                agent["audit"] = {"collector_url": holder["collector"].url}
            for name, values in (sections or {}).items():
                agent.setdefault(name, {}).update(values)
            return agent

        def installed(suite: SuiteCluster) -> None:
            if gate:
                _install_gate(suite, pki, holder["authd"])
            if cli_filter:
                suite.ztgpu("install", "--slurm-conf", str(suite.cluster.slurm_conf),
                            "--cli-filter", "--cli-filter-config",
                            str(base / "login" / "ztgpu.yaml"))

        with suite_cluster(spec, prepare=prepare, installed=installed) as suite:
            login = base / "login"
            login.mkdir(mode=0o755)
            shutil.copy(pki.ca_cert, login / "ca.crt")
            (login / "ca.crt").chmod(0o644)
            config = login / "ztgpu.yaml"
            config.write_text(yaml.safe_dump({
                "auth": {"authd_url": holder["authd"].url},
                "tls": {"ca_cert": str(login / "ca.crt")},
                "authd": {"munge_socket": str(munge.socket)}}))
            config.chmod(0o644)
            made = MfaCluster(suite=suite, authd=holder["authd"], pki=pki,
                              login_config=config)
            made.secrets["root"] = holder["root"]
            yield made
    finally:
        if "authd" in holder:
            holder["authd"].stop()
        if "collector" in holder:
            holder["collector"].stop()
        munge.stop()
        shutil.rmtree(base, ignore_errors=True)


def _install_gate(suite: SuiteCluster, pki: SitePki, authd: AuthdProcess) -> None:
    """Write the PrologSlurmctld wrapper as on a controller: with authd's gate socket when
    authd has one, else with a controller certificate."""
    from ztgpu.config import parse_config
    from ztgpu.slurm.conf import gate_changes, install
    from ztgpu.slurm.hooks_install import gate_path, write_gate

    cluster = suite.cluster
    cert, key = pki.issue("controller", "slurmctld")
    controller = dict(suite.config)
    controller["tls"] = {"ca_cert": str(pki.ca_cert), "cert": str(cert), "key": str(key)}
    controller["auth"] = {**controller.get("auth", {}), "authd_url": authd.url}
    if authd.gate_socket is not None:
        controller["authd"] = {"gate_socket": str(authd.gate_socket)}
    config = parse_config(controller, "controller config")
    write_gate(config, cluster.slurm_conf, dry_run=False)
    install(cluster.slurm_conf, gate_changes(gate_path(config)), dry_run=False)


def held_reason(cluster: SlurmTestCluster, job_id: str) -> tuple[str, str]:
    """(Reason, AdminComment) of a job from ``scontrol show job``."""
    out = cluster.slurm(["scontrol", "show", "job", job_id], check=False)
    reason = re.search(r"Reason=(\S+)", out)
    comment = re.search(r"AdminComment=(.*?)(?:\n|$)", out)
    return (reason.group(1) if reason else "", comment.group(1).strip() if comment else "")
