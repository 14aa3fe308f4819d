"""Test harness: a real ``ztgpu-authd`` process with its own KEK, policy and store.

It talks to a private munged (``ztgpu.testing.munge.MungeDaemon``) and uses
a ``SitePki`` for its certificate. ``credential_as(user, purpose)`` makes a
munge credential as another local user (``runuser``), which is how the tests
prove that authd learns the caller's uid from munge and nothing else.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ztgpu.testing.collector_process import SitePki, free_port
from ztgpu.testing.service_process import ServiceProcess

DEFAULT_POLICY = """\
version: 1
defaults:
  mfa_max_age_h: 12
  max_gpus_per_job: 4
  max_gpus_per_user_per_node: 4
admins:
  - user: root
    roles: [enroll, revoke, keys, jit_approve, policy, audit]
rules:
  - name: everyone
    users: ["*"]
    allow: true
default: deny
"""


class AuthdProcess(ServiceProcess):
    """One ``ztgpu-authd`` child process; ``config_path`` also serves the CLI."""

    module = "ztgpu.authd"
    what = "authd"

    def __init__(self, base: Path, pki: SitePki, munge_socket: Path, *,
                 policy: str = DEFAULT_POLICY, store: str = "sqlite", dsn: str | None = None,
                 authd: dict[str, Any] | None = None,
                 sections: dict[str, dict[str, Any]] | None = None) -> None:
        from ztgpu.trust.kek import KeyRing

        self.base = base
        self.pki = pki
        self.munge_socket = munge_socket
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.kek = base / "kek"
        KeyRing.create(self.kek)
        self.policy_path = base / "policy.yaml"
        self.policy_path.write_text(policy)
        cert, key = pki.issue("service", "authd", dns_names=["localhost"],
                              ip_addresses=["127.0.0.1"])
        section: dict[str, Any] = {
            "listen_host": "127.0.0.1", "listen_port": self.port, "store": store,
            "sqlite_path": str(base / "authd.db"), "kek_file": str(self.kek),
            "policy_file": str(self.policy_path), "munge_socket": str(munge_socket),
        }
        if dsn is not None:
            section["postgres_dsn_file"] = str(self.write_dsn_file(base, dsn))
        if "slurm" not in (sections or {}):
            # No Slurm beside this authd: nothing to ask whose a job is.
            section["gate_checks_job_owner"] = False
        section.update(authd or {})
        #: authd's unix gate socket, when it has one.
        self.gate_socket = Path(section["gate_socket"]) if section.get("gate_socket") else None
        self.config_path = base / "ztgpu.yaml"
        config: dict[str, dict[str, Any]] = {
            "tls": {"ca_cert": str(pki.ca_cert), "cert": str(cert), "key": str(key)},
            "auth": {"authd_url": self.url},
            "paths": {"spool_dir": str(base / "spool")},
            "slurm": {"bin_dir": str(base / "no-slurm-here")},
            "authd": section,
        }
        for name, values in (sections or {}).items():
            config.setdefault(name, {}).update(values)
        self.config_path.write_text(yaml.safe_dump(config))
        super().__init__(base, self.config_path, base / "authd.log")

    def ztgpu(self, *args: str, user: str | None = None, stdin: str = "",
              timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run the ``ztgpu`` CLI against this authd, as ``user`` (default: the caller)."""
        ztgpu = str(Path(sys.executable).with_name("ztgpu"))
        argv = [ztgpu, "--config", str(self.config_path), *args]
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        return subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def events(self, code: str | None = None) -> list[dict[str, Any]]:
        """authd's own recorded events (its spool), oldest first."""
        from ztgpu.audit.spool import Spool

        spool = Spool.open(self.base / "spool" / "authd-events.db", "authd")
        try:
            return spool.read(limit=100_000, code=code)
        finally:
            spool.close()

    def credential_as(self, user: str | None, purpose: bytes) -> str:
        """A munge credential for ``purpose`` made by local ``user`` (None: this process)."""
        argv = ["munge", "-S", str(self.munge_socket)]
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        res = subprocess.run(argv, input=purpose, capture_output=True, timeout=10, check=True)
        return res.stdout.decode().strip()


def secret_from_uri(uri: str) -> bytes:
    """The TOTP secret inside an otpauth URI (tests compute codes from it)."""
    import base64
    from urllib.parse import parse_qs, urlsplit

    encoded = parse_qs(urlsplit(uri).query)["secret"][0]
    return base64.b32decode(encoded + "=" * (-len(encoded) % 8))


class CodeSource:
    """What each test user's authenticator app shows: a code per call, each usable once.

    A code already used moves to the next 30 s step (authd's ±1 step window
    accepts it), so a test waits for the clock only when it needs a third
    code for one user within one step.
    """

    def __init__(self) -> None:
        self.secrets: dict[str, bytes] = {}
        self._steps: dict[str, int] = {}

    def code(self, user: str) -> str:
        import time
        from datetime import UTC, datetime

        from ztgpu.trust.totp import code_at

        now = datetime.now(UTC).timestamp()
        step = max(int(now) // 30, self._steps.get(user, -1) + 1)
        if step > int(now) // 30 + 1:  # beyond the window: wait until it is not
            time.sleep((step - 1) * 30 - now + 0.1)
        self._steps[user] = step
        return code_at(self.secrets[user], datetime.fromtimestamp(step * 30 + 1, UTC))
