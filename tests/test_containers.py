"""The central services in containers (containers/): built here, run hardened,
and used by a node agent on the host over mTLS.

Real parts: a private dockerd, the images containers/build makes (Debian
base from debootstrap, the suite's wheels), docker-compose with
containers/compose.yaml, PostgreSQL, ztgpu-collectord and ztgpu-authd in
their containers; on the host a private munged and ztgpu-noded (simulated
GPUs) driven through its Prolog hook.
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_root

from ztgpu.auth_client import AuthdClient
from ztgpu.authd.authority import ADMIN, LOGIN
from ztgpu.testing.agent_process import StandaloneAgent, standalone_agent
from ztgpu.testing.authd_process import DEFAULT_POLICY, CodeSource, secret_from_uri
from ztgpu.testing.collector_process import CollectorClient
from ztgpu.testing.containers import ContainerSite, container_site, listening
from ztgpu.testing.munge import MungeDaemon
from ztgpu.testing.slurm_cluster import wait_for
from ztgpu.trust.pki import client_context

pytestmark = needs_root
NOBODY = pwd.getpwnam("nobody")
CONTAINERS = Path(__file__).resolve().parents[1] / "containers"


class Users:
    """Logins and admin calls against the containerised authd, with host munge
    credentials (users log in from their node)."""

    def __init__(self, site: ContainerSite, munge: MungeDaemon) -> None:
        self.site, self.munge, self.codes = site, munge, CodeSource()

    def credential(self, user: str | None, purpose: bytes) -> str:
        import subprocess

        argv = ["munge", "-S", str(self.munge.socket)]
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        return subprocess.run(argv, input=purpose, capture_output=True, timeout=10,
                              check=True).stdout.decode().strip()

    def client(self) -> AuthdClient:
        return AuthdClient(self.site.authd_url, client_context(self.site.pki.ca_cert, None, None))

    def login(self, user: str | None) -> None:
        with self.client() as client:
            client.request("POST", "/v1/login", {
                "credential": self.credential(user, LOGIN),
                "code": self.codes.code(user or "root")})

    def admin(self, path: str, **body: Any) -> Any:
        self.login(None)
        with self.client() as client:
            return client.request("POST", path, {
                "credential": self.credential(None, ADMIN), **body})


@pytest.fixture(scope="module")
def services(munge_daemon: MungeDaemon) -> Iterator[tuple[ContainerSite, Users]]:
    with container_site(CONTAINERS, munge_daemon.socket, DEFAULT_POLICY) as site:
        users = Users(site, munge_daemon)
        # The first admin is enrolled inside authd's container, on its store.
        res = site.exec("authd", "ztgpu", "admin", "enroll", "root", "--local")
        assert res.returncode == 0, res.stdout + res.stderr + site.logs()
        found = re.search(r"otpauth://\S+", res.stdout)
        assert found is not None, res.stdout
        users.codes.secrets["root"] = secret_from_uri(found.group(0))
        yield site, users


@pytest.fixture
def agent(services: tuple[ContainerSite, Users], tmp_path: Path) -> Iterator[StandaloneAgent]:
    site, _ = services
    cert, key = site.pki.issue("node", "gpu01")
    tmp_path.chmod(0o755)
    with standalone_agent(tmp_path / "agent", node={"name": "gpu01"},
                          auth={"authd_url": site.authd_url},
                          audit={"collector_url": site.collector_url},
                          tls={"ca_cert": str(site.pki.ca_cert), "cert": str(cert),
                               "key": str(key)}) as made:
        yield made


def job_env(job_id: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job_id, "SLURM_JOB_UID": str(NOBODY.pw_uid),
            "SLURM_JOB_USER": "nobody", "SLURM_SCRIPT_CONTEXT": "prolog_slurmd",
            "SLURM_JOB_GPUS": "1", "SLURM_JOB_PARTITION": "gpu"}


def test_each_service_runs_as_its_own_user_on_a_read_only_root_with_mounted_secrets(
        services: tuple[ContainerSite, Users]) -> None:
    site, _ = services
    users = {"authd": "10001:10001", "collectord": "10001:10001", "postgres": "10002:10002"}
    for service, user in users.items():
        info = site.inspect(service)
        host = info["HostConfig"]
        assert info["State"]["Running"], (service, info["State"])
        assert info["Config"]["User"] == user, service
        assert host["ReadonlyRootfs"] is True, service
        assert host["CapDrop"] == ["ALL"] and "no-new-privileges:true" in host["SecurityOpt"]
        assert not host["Privileged"], service
    # The root filesystem refuses writes; the key is there only as a mount.
    res = site.exec("authd", "sh", "-c", "id -u; touch /opt/ztgpu/planted")
    assert res.stdout.split()[0] == "10001", res.stdout
    assert res.returncode != 0 and "Read-only file system" in res.stderr, res.stderr
    mounts = {m["Destination"]: m for m in site.inspect("authd")["Mounts"]}
    assert mounts["/run/secrets/authd_key"]["Source"] == str(site.site / "secrets/authd.key")
    for image in (f"ztgpu-authd:{site.version}", f"ztgpu-collectord:{site.version}"):
        listing = site.daemon.run("run", "--rm", "--entrypoint", "sh", image, "-c",
                                  "ls -A /run/secrets /etc/ztgpu 2>&1; true")
        assert "key" not in listing.stdout and "kek" not in listing.stdout, listing.stdout


def test_a_host_agent_gets_grants_from_authd_in_a_container_over_mtls(
        services: tuple[ContainerSite, Users], agent: StandaloneAgent) -> None:
    site, users = services
    reply = users.admin("/v1/admin/enroll", user="nobody")
    users.codes.secrets["nobody"] = secret_from_uri(reply["otpauth_uri"])

    # Without an MFA session authd refuses, and the node hands over nothing.
    res = agent.run_hook("prolog", job_env("700"))
    assert res.returncode == 0, res.stderr
    assert "MFA session required" in agent.wait_event("job.refused", "700")["reason"]
    assert not agent.events("job.grant", "700")

    users.login("nobody")
    res = agent.run_hook("prolog", job_env("701"))
    assert res.returncode == 0, res.stderr
    grant = agent.wait_event("job.grant", "701")
    assert [g["minor"] for g in grant["gpus"]] == [1]
    assert (agent.dev_dir / "nvidia1").lstat().st_uid == NOBODY.pw_uid
    assert agent.run_hook("epilog", job_env("701")).returncode == 0

    # The node's events and authd's decisions both reach the collector's
    # container, into its PostgreSQL.
    with closing(CollectorClient(site.collector_url,
                                 site.pki.context("auditor", "carol"))) as auditor:

        def stored(node: str, code: str, job: str) -> list[dict[str, Any]]:
            status, body = auditor.get("/v1/events", node=node, code=code, limit=1000)
            assert status == 200, body
            return [e for e in body["events"] if e.get("job_id") == job]

        wait_for(lambda: stored("gpu01", "job.grant", "701"), 60, "the node's job.grant",
                 interval=1)
        wait_for(lambda: stored("authd", "auth.grant", "701"), 60, "authd's auth.grant",
                 interval=1)


def test_a_node_certificate_from_another_ca_is_refused_by_the_containerised_authd(
        services: tuple[ContainerSite, Users], tmp_path: Path) -> None:
    from ztgpu.auth_client import AuthdError, AuthdRefused
    from ztgpu.testing.collector_process import SitePki

    site, _ = services
    stranger = SitePki(tmp_path / "other-pki")
    forged = client_context(site.pki.ca_cert, *stranger.issue("node", "gpu01"))
    with AuthdClient(site.authd_url, forged) as client, pytest.raises(AuthdError) as refused:
        client.request("POST", "/v1/grant", {"job_id": "702"})
    # TLS 1.3: the client sees the server's refusal of its certificate as the
    # connection closing right after the handshake; no reply was made.
    assert re.search(r"TLS with authd .* failed|closed the connection", str(refused.value)), \
        refused.value
    # Without a certificate the route itself refuses: grants are for nodes.
    with AuthdClient(site.authd_url, client_context(site.pki.ca_cert, None, None)) as client, \
            pytest.raises(AuthdRefused) as anonymous:
        client.request("POST", "/v1/grant", {"job_id": "702"})
    assert "certificate" in str(anonymous.value), anonymous.value


def test_a_secret_readable_by_others_stops_authd_with_a_clear_error_until_fixed(
        services: tuple[ContainerSite, Users]) -> None:
    site, users = services
    dsn = site.site / "secrets" / "authd.dsn"
    dsn.chmod(0o644)
    try:
        site.compose("restart", "--timeout", "10", "authd")
        wait_for(lambda: "must not be readable by group or others" in site.compose(
            "logs", "--no-color", "authd", check=False).stdout, 60,
            "authd's refusal in its log", interval=1)
        assert not listening(site.authd_port)
        assert "postgres.dsn" not in site.logs() and "postgresql://" not in site.logs()
    finally:
        dsn.chmod(0o600)
    site.compose("restart", "--timeout", "10", "authd")
    wait_for(lambda: listening(site.authd_port), 60, "authd back", interval=1)
    users.login("nobody")  # its enrolment survived in PostgreSQL
