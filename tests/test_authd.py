"""ztgpu-authd as a real process: munge identity, TOTP logins, policy, grants, revocation."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztgpu.auth_client import AuthdClient, AuthdRefused
from ztgpu.authd.authority import ADMIN, LOGIN, STATUS
from ztgpu.testing.authd_process import AuthdProcess, CodeSource, secret_from_uri
from ztgpu.testing.collector_process import SitePki
from ztgpu.testing.munge import MungeDaemon
from ztgpu.trust.grants import GrantError, verify_grant
from ztgpu.trust.pki import client_context
from ztgpu.trust.totp import code_at

pytestmark = needs_root

GPUS = [{"index": 0, "uuid": "GPU-aaaa0000", "minor": 2},
        {"index": 1, "uuid": "GPU-bbbb1111", "minor": 0}]


class Site:
    """authd plus the clients a test needs; root is the bootstrap admin."""

    def __init__(self, base: Path, munge: MungeDaemon, **kwargs: Any) -> None:
        self.store = kwargs.get("store", "sqlite")
        self.dsn = kwargs.get("dsn")
        self.pki = SitePki(base / "pki")
        self.authd = AuthdProcess(base / "authd", self.pki, munge.socket, **kwargs)
        self.clients: list[AuthdClient] = []
        self.codes = CodeSource()
        self.secrets = self.codes.secrets

    def user_client(self) -> AuthdClient:
        return self._track(AuthdClient(self.authd.url,
                                       client_context(self.pki.ca_cert, None, None)))

    def cert_client(self, role: str, name: str) -> AuthdClient:
        return self._track(AuthdClient(self.authd.url, self.pki.context(role, name)))

    def _track(self, client: AuthdClient) -> AuthdClient:
        self.clients.append(client)
        return client

    def enroll_local(self, user: str) -> None:
        res = self.authd.ztgpu("admin", "enroll", user, "--local")
        assert res.returncode == 0, res.stderr
        uri = re.search(r"otpauth://\S+", res.stdout)
        assert uri is not None
        self.secrets[user] = secret_from_uri(uri.group(0))

    def fresh_code(self, user: str) -> str:
        return self.codes.code(user)

    def login(self, user: str | None, code: str | None = None) -> Any:
        name = user or "root"
        body = {"credential": self.authd.credential_as(user, LOGIN),
                "code": code or self.fresh_code(name)}
        return self.user_client().request("POST", "/v1/login", body)

    def admin(self, path: str, **body: Any) -> Any:
        return self.user_client().request(
            "POST", path, {"credential": self.authd.credential_as(None, ADMIN), **body})

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.authd.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def site(tmp_path: Path, munge_daemon: MungeDaemon,
         request: pytest.FixtureRequest) -> Iterator[Site]:
    """A running authd with root enrolled; on SQLite and on a real PostgreSQL server."""
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgres" else None
    made = Site(tmp_path, munge_daemon, store=request.param, dsn=dsn)
    made.enroll_local("root")
    made.authd.start()
    try:
        yield made
    finally:
        made.close()


def job(user: str = "nobody", job_id: str = "42", gpus: int = 2, **extra: Any) -> dict[str, Any]:
    import pwd

    return {"job_id": job_id, "uid": pwd.getpwnam(user).pw_uid, "user": user,
            "partition": "gpu", "account": None, "gpus_count": gpus, "time_limit_s": 3600,
            **extra}


def enroll_nobody(site: Site) -> None:
    site.login(None)  # root's own fresh MFA for the admin action
    reply = site.admin("/v1/admin/enroll", user="nobody")
    site.secrets["nobody"] = secret_from_uri(reply["otpauth_uri"])


def test_login_opens_a_session_and_a_code_works_once(site: Site) -> None:
    enroll_nobody(site)
    code = site.fresh_code("nobody")
    reply = site.login("nobody", code)
    assert reply["user"] == "nobody"
    expires = datetime.strptime(reply["expires"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert timedelta(hours=11.9) < expires - datetime.now(UTC) <= timedelta(hours=12)
    with pytest.raises(AuthdRefused, match="wrong or already used"):
        site.login("nobody", code)  # replayed code
    status = site.user_client().request(
        "POST", "/v1/status", {"credential": site.authd.credential_as("nobody", STATUS)})
    assert status["session_expires"] == reply["expires"]


def test_repeated_wrong_codes_lock_the_account(site: Site) -> None:
    enroll_nobody(site)
    good = site.fresh_code("nobody")
    wrong = f"{(int(good) + 1) % 1_000_000:06d}"
    for _ in range(5):
        with pytest.raises(AuthdRefused) as info:
            site.login("nobody", wrong)
        assert info.value.code == "failed"
    with pytest.raises(AuthdRefused) as info:
        site.login("nobody", good)
    assert info.value.code == "locked" and "locked" in str(info.value)


def test_munge_credentials_prove_identity_and_purpose(site: Site) -> None:
    enroll_nobody(site)
    client = site.user_client()
    # A credential made for another purpose is refused.
    with pytest.raises(AuthdRefused, match="another purpose"):
        client.request("POST", "/v1/login", {
            "credential": site.authd.credential_as("nobody", STATUS),
            "code": site.fresh_code("nobody")})
    # A replayed credential is refused by munged.
    cred = site.authd.credential_as("nobody", LOGIN)
    with pytest.raises(AuthdRefused):
        client.request("POST", "/v1/login", {"credential": cred, "code": "000000"})
    with pytest.raises(AuthdRefused, match="replayed"):
        client.request("POST", "/v1/login", {"credential": cred, "code": "000000"})
    # Garbage credentials and bodies are refused with 4xx, the service keeps serving.
    for body in ({"credential": "MUNGE:abc:", "code": "123456"}, {"credential": 5},
                 {"code": "123456"}, {"credential": "x" * 20000, "code": "1"}):
        with pytest.raises(AuthdRefused):
            client.request("POST", "/v1/login", body)


def test_gate_and_grant_follow_the_mfa_session(site: Site) -> None:
    enroll_nobody(site)
    gate = site.cert_client("controller", "slurmctld")
    decision = gate.request("POST", "/v1/gate", job())
    assert (decision["allow"], decision["code"]) == (False, "mfa_required")
    assert "ztgpu login" in decision["reason"]
    node = site.cert_client("node", "gpu01")
    with pytest.raises(AuthdRefused) as info:
        node.request("POST", "/v1/grant", {**job(), "node": "gpu01", "gpus": GPUS})
    assert info.value.code == "mfa_required"

    site.login("nobody")
    assert gate.request("POST", "/v1/gate", job())["allow"] is True
    reply = node.request("POST", "/v1/grant", {**job(), "node": "gpu01", "gpus": GPUS})
    keys = node.request("GET", "/v1/jwks")
    import pwd

    claims = verify_grant(reply["token"], keys, job_id="42", uid=pwd.getpwnam("nobody").pw_uid,
                          node="gpu01", gpus=[{"index": g["index"], "uuid": g["uuid"]}
                                              for g in GPUS])
    assert claims["exp"] - time.time() >= 3600  # at least the job's time limit
    with pytest.raises(GrantError) as bad:
        verify_grant(reply["token"], keys, job_id="42", uid=65534, node="gpu02", gpus=None)
    assert bad.value.code == "wrong_node"


def test_grants_are_bound_to_the_asking_node_and_the_policy(site: Site) -> None:
    enroll_nobody(site)
    site.login("nobody")
    node = site.cert_client("node", "gpu01")
    with pytest.raises(AuthdRefused) as info:
        node.request("POST", "/v1/grant", {**job(), "node": "gpu02", "gpus": GPUS})
    assert info.value.status == 403 and "gpu02" in str(info.value)
    too_many = [{"index": i, "uuid": f"GPU-{i}", "minor": i} for i in range(5)]
    with pytest.raises(AuthdRefused) as info:
        node.request("POST", "/v1/grant", {**job(gpus=5), "node": "gpu01", "gpus": too_many})
    assert info.value.code == "too_many_gpus_job"
    with pytest.raises(AuthdRefused) as info:  # uid that is not the user's
        node.request("POST", "/v1/grant", {**job(), "uid": 0, "node": "gpu01", "gpus": GPUS})
    assert info.value.code == "uid_mismatch"
    # Roles: a researcher without a certificate, a service certificate.
    with pytest.raises(AuthdRefused):
        site.user_client().request("POST", "/v1/grant", {**job(), "node": "gpu01",
                                                         "gpus": GPUS})
    with pytest.raises(AuthdRefused):
        site.cert_client("service", "x").request("POST", "/v1/grant",
                                                  {**job(), "node": "gpu01", "gpus": GPUS})


def test_only_the_controller_certificate_may_ask_the_gate(site: Site) -> None:
    """authd's and the collector's own role (service) could otherwise hold, end or
    stretch any job: the gate answers the controller role alone."""
    for role, name in (("service", "audit01"), ("service", "ctl02"), ("node", "gpu01"),
                       ("auditor", "audit1")):
        with pytest.raises(AuthdRefused) as info:
            site.cert_client(role, name).request("POST", "/v1/gate", job())
        assert info.value.status == 403 and "controller" in str(info.value), (role, info.value)
    decision = site.cert_client("controller", "slurmctld").request("POST", "/v1/gate", job())
    assert decision["code"] in ("mfa_required", "allowed", "not_enrolled", "rule_denies"), \
        decision


def test_admin_actions_need_role_and_fresh_mfa(site: Site) -> None:
    with pytest.raises(AuthdRefused) as info:  # root has no session yet
        site.admin("/v1/admin/enroll", user="nobody")
    assert info.value.code == "mfa_required"
    enroll_nobody(site)
    site.login("nobody")
    client = site.user_client()
    with pytest.raises(AuthdRefused) as info:  # nobody is not an admin
        client.request("POST", "/v1/admin/revoke", {
            "credential": site.authd.credential_as("nobody", ADMIN), "user": "root",
            "reason": "x"})
    assert info.value.code == "not_admin"


def test_revocation_ends_sessions_and_is_published_to_nodes(site: Site) -> None:
    enroll_nobody(site)
    site.login("nobody")
    node = site.cert_client("node", "gpu01")
    before = node.request("GET", "/v1/revocations", query={"after": 0})["revocations"]
    site.admin("/v1/admin/revoke", user="nobody", reason="laptop stolen")
    after = node.request("GET", "/v1/revocations", query={"after": 0})["revocations"]
    assert [r["user"] for r in after[len(before):]] == ["nobody"]
    assert after[-1]["reason"] == "laptop stolen"
    decision = site.cert_client("controller", "slurmctld").request("POST", "/v1/gate", job())
    assert decision["allow"] is False
    with pytest.raises(AuthdRefused) as info:
        site.login("nobody")
    assert info.value.code == "not_enrolled"


def test_a_node_holds_a_user_until_an_admin_releases_them(site: Site) -> None:
    """A node's telemetry rule (hold_user) stops the user's GPU jobs at the gate
    and at the grant; only an admin's release with a reason ends it."""
    enroll_nobody(site)
    site.login("nobody")
    gate = site.cert_client("controller", "slurmctld")
    node = site.cert_client("node", "gpu01")
    assert gate.request("POST", "/v1/gate", job())["allow"] is True
    hold = {"user": "nobody", "job_id": "41", "rule": "foreign_process",
            "reason": "pid 77 on GPU 0, held by job 41 of root"}
    first = node.request("POST", "/v1/hold", hold)
    assert first["new"] is True
    again = node.request("POST", "/v1/hold", {**hold, "job_id": "43"})
    assert (again["hold"], again["new"]) == (first["hold"], False)
    decision = gate.request("POST", "/v1/gate", job())
    assert (decision["allow"], decision["code"]) == (False, "user_held")
    assert "foreign_process on gpu01 (job 41)" in decision["reason"], decision
    with pytest.raises(AuthdRefused) as info:
        node.request("POST", "/v1/grant", {**job(), "node": "gpu01", "gpus": GPUS})
    assert info.value.code == "user_held"
    status = site.user_client().request(
        "POST", "/v1/status", {"credential": site.authd.credential_as("nobody", STATUS)})
    assert "foreign_process on gpu01" in status["user_hold"]

    # Only node certificates may hold; bad fields are refused and hold no one.
    for role, name in (("controller", "slurmctld"), ("service", "gpu01"),
                       ("auditor", "audit1")):
        with pytest.raises(AuthdRefused) as info:
            site.cert_client(role, name).request("POST", "/v1/hold", {**hold, "user": "root"})
        assert info.value.status == 403, (role, info.value)
    for bad in ({**hold, "user": "No Such"}, {**hold, "job_id": "4; rm"},
                {**hold, "rule": ""}, {**hold, "reason": 7}, {**hold, "user": "nosuchuser9"}):
        with pytest.raises(AuthdRefused) as info:
            node.request("POST", "/v1/hold", bad)
        assert info.value.status == 400, (bad, info.value)
    # A node holds at most node_holds_per_hour (5) distinct users an hour.
    other = site.cert_client("node", "gpu02")
    for user in ("daemon", "bin", "sys", "games", "man"):
        other.request("POST", "/v1/hold", {**hold, "user": user})
    with pytest.raises(AuthdRefused) as info:
        other.request("POST", "/v1/hold", {**hold, "user": "lp"})
    assert info.value.code == "too_many_holds"
    assert other.request("POST", "/v1/hold", {**hold, "user": "man"})["new"] is False

    site.login(None)
    listed = site.admin("/v1/admin/holds")["holds"]
    assert {h["user"] for h in listed} == {"nobody", "daemon", "bin", "sys", "games", "man"}
    with pytest.raises(AuthdRefused) as info:  # a researcher cannot release
        site.user_client().request("POST", "/v1/admin/holds/release", {
            "credential": site.authd.credential_as("nobody", ADMIN), "user": "nobody",
            "reason": "mine"})
    assert info.value.code == "not_admin"
    with pytest.raises(AuthdRefused) as info:
        site.admin("/v1/admin/holds/release", user="nobody", reason=" ")
    assert info.value.status == 400
    assert site.admin("/v1/admin/holds/release", user="nobody",
                      reason="a debugger of root's")["released"] == [first["hold"]]
    with pytest.raises(AuthdRefused) as info:
        site.admin("/v1/admin/holds/release", user="nobody", reason="again")
    assert "not held" in str(info.value)
    assert gate.request("POST", "/v1/gate", job())["allow"] is True
    held = _authd_events(site, "auth.user_held")
    assert [(e["user"], e["outcome"]) for e in held][:1] == [("nobody", "held")]
    assert ("lp", "refused") in [(e["user"], e["outcome"]) for e in held]
    released = _authd_events(site, "auth.hold_released")
    assert [(e["user"], e["by"], e["reason"]) for e in released] == [
        ("nobody", "root", "a debugger of root's")]


def test_key_rotation_keeps_old_grants_valid(site: Site) -> None:
    import pwd

    enroll_nobody(site)
    site.login("nobody")
    node = site.cert_client("node", "gpu01")
    old = node.request("POST", "/v1/grant", {**job(), "node": "gpu01", "gpus": GPUS})["token"]
    kid = site.admin("/v1/admin/keys/rotate")["kid"]
    new = node.request("POST", "/v1/grant", {**job(job_id="43"), "node": "gpu01",
                                             "gpus": GPUS})["token"]
    keys = node.request("GET", "/v1/jwks")
    uid = pwd.getpwnam("nobody").pw_uid
    bound = [{"index": g["index"], "uuid": g["uuid"]} for g in GPUS]
    verify_grant(old, keys, job_id="42", uid=uid, node="gpu01", gpus=bound)
    verify_grant(new, keys, job_id="43", uid=uid, node="gpu01", gpus=bound)
    import jwt

    assert jwt.get_unverified_header(new)["kid"] == kid != jwt.get_unverified_header(old)["kid"]


def test_jit_grant_expires_and_cannot_be_self_approved(site: Site) -> None:
    enroll_nobody(site)
    site.login(None)
    reply = site.admin("/v1/admin/jit", user="nobody", node="gpu01", ttl_s=3600,
                       reason="debug a hung job")
    assert reply["user"] == "nobody" and reply["node"] == "gpu01"
    expires = datetime.strptime(reply["expires"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((expires - datetime.now(UTC)) - timedelta(hours=1)) < timedelta(minutes=1)
    listed = site.cert_client("node", "gpu01").request("GET", "/v1/jit",
                                                       query={"user": "nobody"})["jit"]
    assert [j["id"] for j in listed] == [reply["id"]]
    other = site.cert_client("node", "gpu02").request("GET", "/v1/jit", query={"user": "nobody"})
    assert other["jit"] == []
    with pytest.raises(AuthdRefused) as info:
        site.admin("/v1/admin/jit", user="root", node="gpu01", ttl_s=3600, reason="me")
    assert info.value.code == "self_approval"


def test_cli_login_and_status(site: Site) -> None:
    import shutil
    import subprocess
    import sys
    import tempfile

    import yaml

    enroll_nobody(site)
    # What a login node has: the authd URL, the site CA and munge. World-readable.
    home = Path(tempfile.mkdtemp(prefix="ztgpu-login-"))
    try:
        home.chmod(0o755)
        shutil.copy(site.pki.ca_cert, home / "ca.crt")
        config = home / "ztgpu.yaml"
        config.write_text(yaml.safe_dump({
            "auth": {"authd_url": site.authd.url}, "tls": {"ca_cert": str(home / "ca.crt")},
            "authd": {"munge_socket": str(site.authd.munge_socket)}}))
        ztgpu = str(Path(sys.executable).with_name("ztgpu"))

        def as_nobody(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run(["runuser", "-u", "nobody", "--", ztgpu, "--config",
                                   str(config), *args], input=stdin, capture_output=True,
                                  text=True, timeout=30, check=False)

        res = as_nobody("status")
        assert res.returncode == 0 and "no MFA session; run `ztgpu login`" in res.stdout
        res = as_nobody("login", "--code-stdin", stdin=site.fresh_code("nobody") + "\n")
        assert res.returncode == 0, res.stderr
        assert "MFA session for nobody valid until" in res.stdout
        res = as_nobody("status")
        assert res.returncode == 0 and "nobody: MFA session valid until" in res.stdout
        res = as_nobody("login", "--code-stdin", stdin="12345\n")
        assert res.returncode == 2 and "6 digits" in res.stderr
        now_code = int(code_at(site.secrets["nobody"], datetime.now(UTC)))
        res = as_nobody("login", "--code-stdin", stdin=f"{(now_code + 500_000) % 10**6:06d}\n")
        assert res.returncode == 1 and "wrong or already used code" in res.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_decisions_and_secrets_are_recorded_without_secrets(site: Site) -> None:
    from ztgpu.audit.spool import Spool

    enroll_nobody(site)
    site.login("nobody")
    spool = Spool.open(site.authd.base / "spool" / "authd-events.db", "authd")
    try:
        events = spool.read(limit=1000)
    finally:
        spool.close()
    codes = [e["code"] for e in events]
    for code in ("auth.start", "auth.policy_loaded", "auth.enrolled", "auth.login"):
        assert code in codes
    import base64

    from ztgpu.sqldb import open_database

    db = open_database(site.store, sqlite_path=site.authd.base / "authd.db", dsn=site.dsn)
    try:
        stored = [row[0] for row in db.execute("SELECT secret FROM users")]
        stored += [row[0] for row in db.execute("SELECT private FROM signing_keys")]
    finally:
        db.close()
    assert len(stored) >= 3 and all(value.startswith("v1.") for value in stored)  # sealed
    blob = "".join(stored).encode()
    if site.store == "sqlite":
        blob += (site.authd.base / "authd.db").read_bytes()
    for secret in site.secrets.values():
        assert base64.b32encode(secret).rstrip(b"=") not in blob
        assert secret not in blob


def _authd_events(site: Site, code: str) -> list[dict[str, Any]]:
    return site.authd.events(code)


def test_kek_rotation_reencrypts_every_secret_and_logins_still_work(site: Site) -> None:
    from ztgpu.trust.kek import KeyRing

    enroll_nobody(site)
    old_kid = KeyRing.load(site.authd.kek).current_kid
    res = site.authd.ztgpu("admin", "kek", "rotate")
    assert res.returncode == 0, res.stderr
    ring = KeyRing.load(site.authd.kek)
    assert ring.current_kid != old_kid and old_kid in ring.kids
    assert "re-encrypted 3 secrets" in res.stdout  # root's and nobody's TOTP, one signing key
    KeyRing.retire(site.authd.kek, old_kid)  # nothing needs the old key any more
    site.login("nobody")
    node = site.cert_client("node", "gpu01")
    assert node.request("POST", "/v1/grant", {**job(), "node": "gpu01", "gpus": GPUS})["token"]


def test_policy_changes_are_recorded_and_a_broken_edit_keeps_the_last_good_one(
        site: Site) -> None:
    from ztgpu.policy import load_policy

    enroll_nobody(site)
    site.login("nobody")
    gate = site.cert_client("controller", "slurmctld")
    assert gate.request("POST", "/v1/gate", job())["allow"] is True
    first = {e["policy_hash"] for e in _authd_events(site, "auth.policy_loaded")}
    text = site.authd.policy_path.read_text().replace("max_gpus_per_job: 4",
                                                      "max_gpus_per_job: 1")
    site.authd.policy_path.write_text(text)
    decision = gate.request("POST", "/v1/gate", job())
    assert (decision["allow"], decision["code"]) == (False, "too_many_gpus_job")
    hashes = [e["policy_hash"] for e in _authd_events(site, "auth.policy_loaded")]
    assert load_policy(site.authd.policy_path).content_hash in hashes
    assert set(hashes) - first
    site.authd.policy_path.write_text("version: 1\nrules: [oops\n")
    decision = gate.request("POST", "/v1/gate", job())
    assert decision["code"] == "too_many_gpus_job"  # still the last good policy


def test_authd_decisions_reach_the_collector(tmp_path: Path, munge_daemon: MungeDaemon) -> None:
    from ztgpu.testing.collector_process import CollectorClient, CollectorProcess

    made = Site(tmp_path, munge_daemon)
    collector = CollectorProcess(tmp_path / "collector", made.pki).start()
    made.authd = AuthdProcess(tmp_path / "authd2", made.pki, munge_daemon.socket,
                              sections={"audit": {"collector_url": collector.url,
                                                  "retry_min_s": 0.2}})
    auditor = CollectorClient(collector.url, made.pki.context("auditor", "a"))
    try:
        made.enroll_local("root")
        made.authd.start()
        made.login(None)
        from ztgpu.testing.slurm_cluster import wait_for

        def logged_in() -> bool:
            status, body = auditor.get("/v1/events", node="authd", code="auth.login")
            return status == 200 and any(e["user"] == "root" and e["outcome"] == "ok"
                                         for e in body["events"])

        wait_for(logged_in, 20, "authd's login event at the collector")
    finally:
        auditor.close()
        made.close()
        collector.stop()


def test_grant_lives_at_least_the_time_limit_the_gate_saw(site: Site) -> None:
    import pwd

    import jwt

    enroll_nobody(site)
    site.login("nobody")
    week = 7 * 86400
    gate = site.cert_client("controller", "slurmctld")
    assert gate.request("POST", "/v1/gate", job(job_id="77", time_limit_s=week))["allow"]
    node = site.cert_client("node", "gpu01")
    token = node.request("POST", "/v1/grant", {**job(job_id="77", time_limit_s=None),
                                               "node": "gpu01", "gpus": GPUS})["token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - time.time() >= week
    assert claims["uid"] == pwd.getpwnam("nobody").pw_uid


def test_a_credential_proves_its_maker_not_whoever_presents_it(site: Site) -> None:
    enroll_nobody(site)
    # root's credential with nobody's code: authd sees root, so nobody's code is wrong.
    with pytest.raises(AuthdRefused) as info:
        site.user_client().request("POST", "/v1/login", {
            "credential": site.authd.credential_as(None, LOGIN),
            "code": site.fresh_code("nobody")})
    assert info.value.code == "failed"
    status = site.user_client().request(
        "POST", "/v1/status", {"credential": site.authd.credential_as("nobody", STATUS)})
    assert status["session_expires"] is None


def test_expired_jit_grants_are_not_active(tmp_path: Path) -> None:
    from ztgpu.authd.store import AuthStore
    from ztgpu.sqldb import SqliteDatabase

    store = AuthStore(SqliteDatabase(tmp_path / "a.db"))
    try:
        store.add_jit("a", "nobody", "gpu01", "root", "r", "2026-01-01T00:00:00.000000Z",
                      "2026-01-01T01:00:00.000000Z")
        store.add_jit("b", "nobody", "gpu01", "root", "r", "2026-01-01T00:00:00.000000Z",
                      "2026-01-01T03:00:00.000000Z")
        now = "2026-01-01T02:00:00.000000Z"
        assert [j["id"] for j in store.active_jit("nobody", "gpu01", now)] == ["b"]
        assert store.active_jit("nobody", "gpu02", now) == []
    finally:
        store.close()



_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["credential", "code", "job_id", "uid", "user", "gpus", "gpus_count",
                         "node", "partition", "time_limit_s", "reason", "ttl_s"]),
        children, max_size=6),
    max_leaves=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_JSON)
def test_garbage_gets_4xx_and_never_a_grant(site: Site, body: Any) -> None:
    clients = {"/v1/login": site.user_client(), "/v1/status": site.user_client(),
               "/v1/admin/enroll": site.user_client(),
               "/v1/gate": site.cert_client("controller", "slurmctld"),
               "/v1/grant": site.cert_client("node", "gpu01")}
    for path, client in clients.items():
        with pytest.raises(AuthdRefused) as info:
            client.request("POST", path, body)
        assert 400 <= info.value.status < 500, (path, info.value)
        client.close()
    site.clients.clear()


# ---- the gate socket: the job gate beside authd, the caller known by the kernel ----

GATE_CLIENT = r"""
import json, socket, sys
path, body = sys.argv[1], sys.argv[2].encode()
sock = socket.socket(socket.AF_UNIX)
sock.connect(path)
sock.sendall(b"POST " + sys.argv[3].encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
             b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
             + b"\r\nConnection: close\r\n\r\n" + body)
data = b""
while chunk := sock.recv(65536):
    data += chunk
head, _, payload = data.partition(b"\r\n\r\n")
print(head.split(b" ")[1].decode(), payload.decode())
"""


def _ask_gate_socket(site: Site, body: dict[str, Any], *, user: str | None = None,
                     path: str = "/v1/gate") -> tuple[int, dict[str, Any]]:
    import subprocess
    import sys

    assert site.authd.gate_socket is not None
    argv = [sys.executable, "-I", "-c", GATE_CLIENT, str(site.authd.gate_socket),
            json.dumps(body), path]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    status, _, payload = res.stdout.strip().partition(" ")
    try:
        return int(status), json.loads(payload)
    except ValueError:  # aiohttp's own 404/405 pages are text
        return int(status), {"text": payload}


@pytest.fixture
def gate_site(tmp_path: Path, munge_daemon: MungeDaemon) -> Iterator[Site]:
    run = Path(tempfile.mkdtemp(prefix="ztgpu-gate-"))
    run.chmod(0o755)  # nobody may reach the socket's directory (the socket mode decides)
    made = Site(tmp_path, munge_daemon, authd={"gate_socket": str(run / "gate.sock")})
    made.enroll_local("root")
    made.authd.start()
    try:
        yield made
    finally:
        made.close()
        shutil.rmtree(run, ignore_errors=True)


def test_the_gate_socket_answers_root_and_refuses_other_users(gate_site: Site) -> None:
    site = gate_site
    assert site.authd.gate_socket is not None
    mode = site.authd.gate_socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    enroll_nobody(site)
    status, reply = _ask_gate_socket(site, job(job_id="501"))
    assert status == 200 and reply["allow"] is False and reply["code"] == "mfa_required"
    site.login("nobody")
    status, reply = _ask_gate_socket(site, job(job_id="502"))
    assert (status, reply["allow"]) == (200, True)
    # The same decision is recorded as one over TLS would be.
    decided = [e for e in _authd_events(site, "auth.decision") if e.get("job_id") == "502"]
    assert decided and decided[0]["outcome"] == "allow" and decided[0]["stage"] == "gate"
    # A user who is not SlurmUser (nobody) is refused by uid, and that is recorded, even
    # where an admin opened the socket's mode to everyone: the uid check stands alone.
    os.chmod(site.authd.gate_socket, 0o666)
    status, reply = _ask_gate_socket(site, job(job_id="503"), user="nobody")
    assert status == 403 and reply["code"] == "forbidden"
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    refused = _authd_events(site, "auth.refused")
    assert any(e["peer"] == f"local uid {nobody}" for e in refused), refused
    assert not [e for e in _authd_events(site, "auth.decision") if e.get("job_id") == "503"]
    # Only the gate lives there: no logins, grants or admin actions without TLS.
    status, _ = _ask_gate_socket(site, job(job_id="504"), path="/v1/grant")
    assert status in (404, 405)
    status, _ = _ask_gate_socket(site, {"credential": "x", "code": "1"}, path="/v1/login")
    assert status in (404, 405)
    # Malformed jobs get the same 400 as over TLS.
    status, reply = _ask_gate_socket(site, {"job_id": "x; rm"})
    assert status == 400


def test_the_gate_socket_replaces_a_stale_socket_and_refuses_other_files(
        tmp_path: Path, munge_daemon: MungeDaemon) -> None:
    import socket

    path = tmp_path / "gate.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # as left by a crashed authd
    stale.close()
    made = Site(tmp_path, munge_daemon, authd={"gate_socket": str(path)})
    made.authd.start()
    made.authd.stop()
    assert not path.exists(), "authd removes its socket when it stops"
    path.write_text("not a socket")
    with pytest.raises(RuntimeError, match="not a socket"):
        made.authd.start(timeout=10)
    assert path.read_text() == "not a socket", "a file that is not a socket is left alone"
    made.close()


def test_an_unknown_gate_socket_user_stops_authd_with_the_name(
        tmp_path: Path, munge_daemon: MungeDaemon) -> None:
    made = Site(tmp_path, munge_daemon, authd={"gate_socket": str(tmp_path / "g.sock"),
                                               "gate_socket_users": ["no-such-slurmuser"]})
    with pytest.raises(RuntimeError, match="no-such-slurmuser"):
        made.authd.start(timeout=10)
    made.close()


# ---- logins cannot starve grants -------------------------------------------------

FLOOD = r"""
import json, ssl, sys, threading, http.client
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
count, threads = int(sys.argv[4]), int(sys.argv[5])
context = ssl.create_default_context(cafile=ca)
context.check_hostname = False
statuses, lock = {}, threading.Lock()
def worker(n):
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    for _ in range(n):
        try:
            body = json.dumps({"credential": "MUNGE:AAAA", "code": "000000"})
            conn.request("POST", "/v1/login", body=body,
                         headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            reply.read()
            status = reply.status
        except OSError:
            conn.close()
            status = "error"
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
    conn.close()
ts = [threading.Thread(target=worker, args=(count // threads,)) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(statuses))
"""


def test_a_burst_of_bogus_logins_is_bounded_and_grants_still_succeed(
        tmp_path: Path, munge_daemon: MungeDaemon) -> None:
    import json
    import subprocess
    import sys
    import threading

    made = Site(tmp_path, munge_daemon, authd={"login_per_address_per_min": 30,
                                               "login_max_pending": 8})
    made.enroll_local("root")
    made.authd.start()
    try:
        enroll_nobody(made)
        made.login("nobody")
        node = made.cert_client("node", "gpu01")
        granted: list[str] = []
        stop = threading.Event()

        def grants() -> None:
            while not stop.is_set():
                reply = node.request("POST", "/v1/grant", {**job(job_id=str(100 + len(granted))),
                                                           "node": "gpu01", "gpus": GPUS})
                granted.append(reply["token"])

        grantor = threading.Thread(target=grants)
        grantor.start()
        host, port = made.authd.url.removeprefix("https://").rsplit(":", 1)
        flood = subprocess.run([sys.executable, "-c", FLOOD, host, port, str(made.pki.ca_cert),
                                "1000", "20"], capture_output=True, text=True, timeout=300,
                               check=False)
        stop.set()
        grantor.join(60)
        assert flood.returncode == 0, flood.stderr
        statuses = json.loads(flood.stdout)
        assert sum(statuses.values()) == 1000, statuses
        # At most the per-address budget reached munge; the rest were refused at once.
        assert statuses.get("401", 0) <= 30 + 1, statuses
        assert statuses.get("429", 0) + statuses.get("503", 0) >= 1000 - 31, statuses
        assert len(granted) >= 5, "grants did not keep going during the flood"
        events = _authd_events(made, "auth.refused")
        assert 1 <= len(events) <= 12, len(events)  # recorded, at a bounded rate
        # Which refusal is recorded first depends on the machine's load: the
        # per-address limit (429) or the bound on pending logins (503).
        assert any("too many logins" in e["reason"] or "is busy with" in e["reason"]
                   for e in events), [e["reason"] for e in events]
    finally:
        made.close()


def test_logins_for_one_user_are_limited_and_recorded(site: Site) -> None:
    enroll_nobody(site)
    codes = []
    for _ in range(11):  # default: 10 a minute for one user
        try:
            site.login("nobody", code="000000")
        except AuthdRefused as exc:
            codes.append((exc.status, exc.code))
    assert codes[-1] == (429, "rate_limited"), codes
    assert all(code != "rate_limited" for _, code in codes[:10]), codes
    limited = [e for e in _authd_events(site, "auth.login") if e["outcome"] == "rate_limited"]
    assert limited and limited[-1]["user"] == "nobody"


def test_metrics_time_each_decision_count_its_events_and_need_a_monitor(site: Site) -> None:
    from ztgpu.testing.prometheus import fetch_metrics, sample_value, samples

    enroll_nobody(site)
    gate = site.cert_client("controller", "slurmctld")
    assert gate.request("POST", "/v1/gate", job())["allow"] is False  # no MFA session yet
    status, text = fetch_metrics(site.authd.url, site.pki.context("monitor", "prometheus"))
    assert status == 200, text
    found = samples(text)
    assert (sample_value(found, "ztgpu_http_request_duration_seconds_count", route="/v1/gate",
                         method="POST", status="200") or 0) >= 1
    assert (sample_value(found, "ztgpu_events_total", code="auth.enrolled") or 0) >= 1
    # The gate's decision is an event too, and it is counted.
    assert (sample_value(found, "ztgpu_events_total", code="auth.decision") or 0) >= 1, \
        sorted({labels["code"] for labels, _ in found["ztgpu_events_total"]})
    for role, name in (("node", "gpu01"), ("controller", "slurmctld")):
        status, text = fetch_metrics(site.authd.url, site.pki.context(role, name))
        assert status == 403 and "monitor or auditor" in text, (role, text)
    status, text = fetch_metrics(site.authd.url, site.pki.context(None, None))
    assert status == 403
