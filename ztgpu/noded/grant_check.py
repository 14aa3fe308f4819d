"""The node's side of MFA-backed job identity: signed grants and revocations.

Before the agent hands a job its GPUs it asks authd (with the node's own
certificate) for a grant and verifies it locally: Ed25519 signature by a key
in authd's JWKS, job id, uid, this node, the exact GPU set (index and UUID)
and expiry. The JWKS is cached and refetched once when a grant names a key
the cache does not know (key rotation).

authd unreachable: ``unreachable_action`` decides (``deny``, the default:
the job gets no GPU; ``allow``: Slurm's allocation stands and the exception
is recorded by the caller). A refusal by authd or a grant that does not
verify always denies.

With ``auth.grant_keys_file`` the keys are pinned: grants verify against
that root-owned file alone (reread when it changes), never against the JWKS
authd serves, so neither a compromised TLS endpoint nor a forged key set can
mint grants.

A ``RevocationWatcher`` thread polls authd's revocation feed and calls back
for each newly revoked user.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ztgpu.errors import Denied

log = logging.getLogger("ztgpu.noded")


class GrantRefused(Denied):
    """No valid grant for the job; ``code`` says why (authd's code or a GrantError code)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class GrantChecker:
    """Obtains and verifies per-job grants; thread-safe."""

    def __init__(self, url: str, context: Callable[[], ssl.SSLContext], node: str, *,
                 timeout_s: float, unreachable_action: str,
                 pinned_keys: Path | None = None) -> None:
        self.url = url
        self.context = context
        self.node = node
        self.timeout_s = timeout_s
        self.unreachable_action = unreachable_action
        self._lock = threading.Lock()
        self._conn_lock = threading.Lock()
        self._client: Any = None
        self._jwks: dict[str, Any] | None = None
        #: With a pinned key file, authd's own /v1/jwks is never used.
        self.pinned_keys = pinned_keys
        self._pinned_stamp: tuple[int, int, int] | None = None

    def _request(self, method: str, path: str, body: Any = None,
                 query: dict[str, Any] | None = None) -> Any:
        from ztgpu.auth_client import AuthdClient

        # One kept-alive connection (a TLS handshake per job start would cost
        # the Prolog several ms); a renewed certificate means a new one.
        context = self.context()
        with self._conn_lock:
            if self._client is None or self._client.context is not context:
                if self._client is not None:
                    self._client.close()
                self._client = AuthdClient(self.url, context, timeout_s=self.timeout_s)
            return self._client.request(method, path, body, query)

    def _keys(self, refresh: bool = False) -> dict[str, Any]:
        with self._lock:
            if self.pinned_keys is not None:
                return self._pinned()
            if self._jwks is None or refresh:
                self._jwks = dict(self._request("GET", "/v1/jwks"))
            return self._jwks

    def _pinned(self) -> dict[str, Any]:
        """The pinned key set, read again when the file changed (a new key was
        distributed). Raises GrantRefused when it cannot be trusted or read."""
        import json
        import os
        import stat

        from ztgpu.noded.checks import path_problem

        assert self.pinned_keys is not None
        path = self.pinned_keys
        problem = path_problem("auth.grant_keys_file", path)
        if problem is not None:
            raise GrantRefused(problem, "untrusted_keys")
        try:
            st = os.stat(path)
            if stat.S_IMODE(st.st_mode) & 0o022 or st.st_uid != 0:
                raise GrantRefused(f"auth.grant_keys_file {path} must be root's and writable "
                                   "by root alone", "untrusted_keys")
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._jwks is None or stamp != self._pinned_stamp:
                document = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(document, dict):
                    raise ValueError("not a JSON object")
                self._jwks, self._pinned_stamp = document, stamp
        except (OSError, ValueError) as exc:
            raise GrantRefused(f"cannot read auth.grant_keys_file {path}: {exc}",
                               "untrusted_keys") from None
        return self._jwks

    def check(self, *, job_id: str, uid: int, user: str, gpus: Sequence[dict[str, Any]],
              partition: str | None, account: str | None, held_on_node: int
              ) -> dict[str, Any] | None:
        """The verified grant's claims (``jti`` names it in authd's records), or
        None when authd is unreachable and ``unreachable_action`` is ``allow``.
        Raises GrantRefused otherwise."""
        from ztgpu.auth_client import AuthdError, AuthdRefused
        from ztgpu.trust.grants import GrantError, verify_grant

        body = {"node": self.node, "job_id": job_id, "uid": uid, "user": user,
                "partition": partition, "account": account, "gpus_count": len(gpus),
                "gpus": list(gpus), "gpus_held_on_node": held_on_node}
        try:
            token = str(self._request("POST", "/v1/grant", body)["token"])
            bound = [{"index": g["index"], "uuid": g["uuid"]} for g in gpus]
            try:
                claims = verify_grant(token, self._keys(), job_id=job_id, uid=uid,
                                      node=self.node, gpus=bound)
            except GrantError as exc:
                if exc.code != "unknown_key":
                    raise
                if self.pinned_keys is not None:
                    raise GrantRefused(
                        f"the grant is signed by a key not in auth.grant_keys_file "
                        f"{self.pinned_keys}: after `ztgpu admin keys rotate`, distribute "
                        "`ztgpu admin keys export` to the nodes", "unknown_key") from None
                claims = verify_grant(token, self._keys(refresh=True), job_id=job_id, uid=uid,
                                      node=self.node, gpus=bound)
        except AuthdRefused as exc:
            raise GrantRefused(f"authd refused the grant: {exc}", exc.code) from None
        except GrantError as exc:
            raise GrantRefused(f"the grant from authd does not verify: {exc}",
                               exc.code) from None
        except (AuthdError, KeyError, TypeError) as exc:
            if self.unreachable_action == "allow":
                log.error("authd unreachable for job %s (%s); allowed by "
                          "auth.unreachable_action", job_id, exc)
                return None
            raise GrantRefused(f"authd unreachable, GPU access denied: {exc}",
                               "authd_unreachable") from None
        return claims


    def hold(self, user: str, job_id: str, rule: str, reason: str) -> dict[str, Any]:
        """Ask authd to hold *user* (a telemetry rule's ``hold_user``). On a
        connection of its own: a slow authd delays no grant. Raises
        AuthdRefused or AuthdError."""
        from ztgpu.auth_client import AuthdClient

        with AuthdClient(self.url, self.context(), timeout_s=min(self.timeout_s, 5.0)) as c:
            reply = c.request("POST", "/v1/hold", {"user": user, "job_id": job_id,
                                                   "rule": rule, "reason": reason})
        return dict(reply)

    def jit(self, user: str) -> list[dict[str, Any]]:
        """*user*'s active just-in-time admin grants for this node (authd decides
        what is active: not expired, not revoked). Raises when authd cannot say."""
        items = self._request("GET", "/v1/jit", query={"user": user}).get("jit", [])
        return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


class RevocationWatcher(threading.Thread):
    """Polls authd's revocation feed; calls ``on_revoke(user, reason, at)`` for each entry.

    The whole feed is read once at start (an agent that was down while a
    user was revoked still acts), then only new entries. The callback must be
    idempotent and act only on jobs granted before ``at``.
    """

    def __init__(self, checker: GrantChecker, on_revoke: Callable[[str, str, str], object],
                 interval_s: float) -> None:
        super().__init__(name="revocations", daemon=True)
        self.checker = checker
        self.on_revoke = on_revoke
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.last_id = 0
        self.healthy = False

    def poll_once(self) -> int:
        """Fetch revocations after the last one seen and act on them; returns how many."""
        seen = 0
        while True:
            reply = self.checker._request("GET", "/v1/revocations",
                                          query={"after": self.last_id})
            items = reply.get("revocations", [])
            for item in items:
                self.on_revoke(str(item["user"]), str(item.get("reason", "")),
                               str(item.get("at", "")))
                self.last_id = max(self.last_id, int(item["id"]))
            seen += len(items)
            if len(items) < 1000:
                return seen

    def run(self) -> None:
        from ztgpu.errors import ZtgpuError

        while not self.stopping.is_set():
            try:
                self.poll_once()
                if not self.healthy:
                    log.info("revocation feed from %s: connected", self.checker.url)
                self.healthy = True
            except (ZtgpuError, KeyError, TypeError, ValueError) as exc:
                if self.healthy:
                    log.error("revocation feed from %s failed: %s", self.checker.url, exc)
                self.healthy = False
            self.stopping.wait(self.interval_s)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
