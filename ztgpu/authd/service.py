"""ztgpu-authd's HTTP API (aiohttp) over TLS 1.3.

Who may call what:

* researchers, with no certificate (a munge credential proves the uid):
  ``POST /v1/login``, ``POST /v1/status``, ``POST /v1/bind`` (a job to the
  login session that submitted it: its binding key signs the request);
* admins, with no certificate (munge + a fresh MFA login + a policy role):
  ``POST /v1/admin/enroll|revoke|keys/rotate|jit|holds|holds/release``;
* the controller, with a ``controller`` certificate (no other role, not even
  authd's or the collector's ``service`` one): ``POST /v1/gate``; or, on
  the controller host itself, over ``authd.gate_socket`` (a unix socket,
  only that route) as root, authd's own uid or a ``gate_socket_users`` uid;
* nodes, with a ``node`` certificate: ``POST /v1/grant`` (for their own
  name only), ``POST /v1/hold`` (a telemetry rule's ``hold_user``),
  ``GET /v1/revocations``, ``GET /v1/jit``;
* any certificate of the site CA: ``GET /v1/jwks``.

Refused TLS handshakes and requests are logged and recorded at most 10 per
sender per minute (``ztgpu.net.ratelimit``). Decisions run on a worker thread,
so the event loop never waits for the database, munge or the policy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from ztgpu.authd.authority import AuthDenied, Authority, JobRequest
from ztgpu.errors import InputRejected, ZtgpuError
from ztgpu.metrics import HttpMetrics
from ztgpu.net.ratelimit import RateWindow, RejectLimiter
from ztgpu.net.tls_server import peer_address, peer_certificate, serve_tls
from ztgpu.net.unix_server import peer_uid, serve_unix

log = logging.getLogger("ztgpu.authd")
T = TypeVar("T")

_JOB_ID = re.compile(r"[0-9]{1,20}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?")
_WORD = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class HttpRefusal(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def _field(body: dict[str, Any], key: str, kind: type, pattern: re.Pattern[str] | None = None,
           *, optional: bool = False) -> Any:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise HttpRefusal(400, f"{key!r} must be a {kind.__name__}", "bad_request")
    if pattern is not None and not pattern.fullmatch(str(value)):
        raise HttpRefusal(400, f"{key!r} is not a valid value", "bad_request")
    return value


def job_request(body: dict[str, Any]) -> JobRequest:
    """A job description from the gate or a node; HttpRefusal(400) if malformed."""
    uid = _field(body, "uid", int)
    gpus = _field(body, "gpus_count", int)
    limit = body.get("time_limit_s")
    if uid < 0 or not 0 <= gpus <= 1024:
        raise HttpRefusal(400, "uid and gpus_count must be non-negative", "bad_request")
    if limit is not None and (not isinstance(limit, int | float) or isinstance(limit, bool)
                              or not 0 < limit <= 10 * 365 * 86400):
        raise HttpRefusal(400, "'time_limit_s' must be a positive number", "bad_request")
    return JobRequest(job_id=_field(body, "job_id", str, _JOB_ID), uid=uid,
                      user=_field(body, "user", str, _USER),
                      partition=_field(body, "partition", str, _WORD, optional=True),
                      account=_field(body, "account", str, _WORD, optional=True),
                      gpus=gpus, time_limit_s=float(limit) if limit is not None else None,
                      array_job_id=_field(body, "array_job_id", str, _JOB_ID, optional=True))


def _gpu_list(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > 64:
        raise HttpRefusal(400, "'gpus' must be a list of GPUs", "bad_request")
    out = []
    for gpu in value:
        if not (isinstance(gpu, dict) and set(gpu) == {"index", "uuid", "minor"}
                and all(isinstance(gpu[k], int) and not isinstance(gpu[k], bool)
                        and gpu[k] >= 0 for k in ("index", "minor"))
                and isinstance(gpu["uuid"], str) and 0 < len(gpu["uuid"]) <= 96):
            raise HttpRefusal(400, "each GPU must be {index, uuid, minor}", "bad_request")
        out.append(dict(gpu))
    return out


class AuthService:
    """The routes; decisions are delegated to an Authority on a worker thread."""

    def __init__(self, authority: Authority, *, server_context: Callable[[], ssl.SSLContext],
                 max_body_bytes: int, handshake_timeout_s: float = 10.0,
                 gate_uids: frozenset[int] = frozenset(),
                 metrics: HttpMetrics | None = None) -> None:
        self.authority = authority
        self.metrics = metrics
        #: Who may ask the gate over the unix socket (kernel-proven uids).
        self.gate_uids = gate_uids
        self.max_body_bytes = max_body_bytes
        self.server_context = server_context
        self.handshake_timeout_s = handshake_timeout_s
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="authd")
        # Logins and status (no certificate, one unmunge each) on their own
        # workers, bounded, so that a flood of them never delays a grant.
        self._login_pool = ThreadPoolExecutor(2, thread_name_prefix="authd-login")
        self._logins_pending = 0
        self._login_by_address: RateWindow[str] = RateWindow(
            authority.config.login_per_address_per_min)
        self._limiter: RejectLimiter[str] = RejectLimiter(self._record_refusal)
        timing = [metrics.middleware()] if metrics is not None else []
        self.app = web.Application(client_max_size=max_body_bytes,
                                   middlewares=[*timing, self._errors])
        self.app.add_routes([
            web.get("/metrics", self.get_metrics),
            web.post("/v1/login", self.login),
            web.post("/v1/status", self.status),
            web.post("/v1/bind", self.bind),
            web.post("/v1/gate", self.gate),
            web.post("/v1/grant", self.grant),
            web.post("/v1/hold", self.hold),
            web.get("/v1/jwks", self.jwks),
            web.get("/v1/revocations", self.revocations),
            web.get("/v1/jit", self.jit_list),
            web.post("/v1/admin/enroll", self.enroll),
            web.post("/v1/admin/revoke", self.revoke),
            web.post("/v1/admin/keys/rotate", self.rotate_keys),
            web.post("/v1/admin/jit", self.jit_grant),
            web.post("/v1/admin/holds", self.list_holds),
            web.post("/v1/admin/holds/release", self.release_hold),
        ])

    async def get_metrics(self, request: web.Request) -> web.Response:
        """Prometheus metrics, for a ``monitor`` or ``auditor`` certificate."""
        from ztgpu.metrics import METRIC_ROLES

        identity = self._identity(request, None)
        if identity is None or identity[0] not in METRIC_ROLES:
            raise HttpRefusal(403, f"/metrics needs a {' or '.join(METRIC_ROLES)} certificate",
                              "forbidden")
        if self.metrics is None:
            raise HttpRefusal(404, "metrics are off", "not_found")
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _run_login(self, request: web.Request, fn: Callable[..., T], *args: Any) -> T:
        """Run a login-class call on the login workers, within the pending bound."""
        limit = self.authority.config.login_max_pending
        if self._logins_pending >= limit:
            raise HttpRefusal(503, f"authd is busy with {limit} logins; try again in a "
                              "few seconds", "busy")
        self._logins_pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._login_pool, fn,
                                                                    *args)
        finally:
            self._logins_pending -= 1

    def _record_refusal(self, key: str, reason: str) -> None:
        address = key.partition("|")[2]
        try:
            self.authority.events.append("auth.refused", peer=address, reason=reason)
        except ZtgpuError:
            log.exception("could not record a refusal")

    def refuse(self, address: str, reason: str) -> None:
        log.warning("refused %s: %s", address, reason)
        self._limiter(f"refused|{address.rpartition(':')[0] or address}", reason[:300])

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpRefusal as exc:
            if exc.status in (400, 403, 413, 415, 429, 503):
                self.refuse(self._peer(request), exc.message)
            return web.json_response({"error": exc.message, "code": exc.code},
                                     status=exc.status)
        except AuthDenied as exc:
            status = (401 if exc.code in ("bad_credential", "failed", "locked", "not_enrolled")
                      else 429 if exc.code == "rate_limited" else 403)
            return web.json_response({"error": str(exc), "code": exc.code}, status=status)
        except InputRejected as exc:
            return web.json_response({"error": str(exc), "code": "bad_request"}, status=400)
        except web.HTTPRequestEntityTooLarge:
            self.refuse(self._peer(request), "request body too large")
            return web.json_response({"error": "body too large", "code": "too_large"},
                                     status=413)

    @classmethod
    def _peer_host(cls, request: web.Request) -> str:
        """The sender's address without its port (ports change per connection)."""
        peer = cls._peer(request)
        return peer.rpartition(":")[0] or peer

    @staticmethod
    def _peer(request: web.Request) -> str:
        uid = peer_uid(request)
        return f"local uid {uid}" if uid is not None else peer_address(request)

    def _identity(self, request: web.Request, role: str | None) -> tuple[str, str] | None:
        """(role, name) of the client certificate; HttpRefusal(403) if ``role`` is not met."""
        from ztgpu.trust.pki import PkiError, identity_from_der

        der = peer_certificate(request)
        if der is None:
            if role is None:
                return None
            raise HttpRefusal(403, f"a {role} certificate is required", "forbidden")
        try:
            identity = identity_from_der(der)
        except PkiError as exc:
            raise HttpRefusal(403, f"unusable client certificate: {exc}", "forbidden") from None
        if role is not None and identity.role != role:
            raise HttpRefusal(403, f"a {identity.role} certificate may not use "
                              f"{request.method} {request.path} (it needs a {role} "
                              "certificate)", "forbidden")
        return identity.role, identity.name

    async def _json(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise HttpRefusal(415, "body must be application/json", "bad_request")
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):
            raise HttpRefusal(400, "body is not valid JSON", "bad_request") from None
        if not isinstance(body, dict):
            raise HttpRefusal(400, "body must be a JSON object", "bad_request")
        return body

    # -- researchers ----------------------------------------------------------
    async def login(self, request: web.Request) -> web.Response:
        host = self._peer_host(request)
        if not self._login_by_address.allow(host):
            raise HttpRefusal(429, f"too many logins from {host}; wait a minute",
                              "rate_limited")
        body = await self._json(request)
        session = await self._run_login(request, self.authority.login, body.get("credential"),
                                        body.get("code"))
        import base64

        # The binding key goes to this login once; the client keeps it in the
        # login's session keyring (ztgpu.trust.session_keyring).
        key = base64.b64encode(session.bind_key or b"").decode()
        return web.json_response({"user": session.username, "expires": session.expires,
                                  "session_id": session.id, "session_key": key})

    async def bind(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        return web.json_response(await self._run_login(
            request, self.authority.bind, body.get("credential"), body.get("job_id"),
            body.get("session_id"), body.get("mac")))

    async def status(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        return web.json_response(await self._run_login(request, self.authority.status,
                                                       body.get("credential")))

    # -- controller and nodes -------------------------------------------------------
    async def gate(self, request: web.Request) -> web.Response:
        self._identity(request, "controller")
        return await self._decide_gate(request)

    async def gate_local(self, request: web.Request) -> web.Response:
        """``POST /v1/gate`` on the gate socket: the caller's uid instead of a certificate."""
        uid = peer_uid(request)
        if uid is None or uid not in self.gate_uids:
            raise HttpRefusal(403, f"uid {uid} may not ask the job gate", "forbidden")
        return await self._decide_gate(request)

    async def _decide_gate(self, request: web.Request) -> web.Response:
        job = job_request(await self._json(request))
        decision = await self._run(self.authority.gate, job)
        return web.json_response({"allow": decision.allow, "code": decision.code,
                                  "reason": decision.reason, "rule": decision.rule})

    async def grant(self, request: web.Request) -> web.Response:
        identity = self._identity(request, "node")
        assert identity is not None
        body = await self._json(request)
        node = _field(body, "node", str, _NAME)
        if node != identity[1]:
            raise HttpRefusal(403, f"certificate of node {identity[1]!r} cannot ask for "
                              f"grants on {node!r}", "forbidden")
        job = job_request(body)
        gpus = _gpu_list(body.get("gpus"))
        if len(gpus) != job.gpus:
            raise HttpRefusal(400, "gpus_count does not match the GPU list", "bad_request")
        held = body.get("gpus_held_on_node", 0)
        if not isinstance(held, int) or isinstance(held, bool) or not 0 <= held <= 1024:
            raise HttpRefusal(400, "'gpus_held_on_node' must be a count", "bad_request")
        token, expires = await self._run(self.authority.grant, node, job, gpus, held)
        return web.json_response({"token": token, "expires": expires})

    async def hold(self, request: web.Request) -> web.Response:
        """A node asks authd to hold a user its telemetry caught (``hold_user``)."""
        identity = self._identity(request, "node")
        assert identity is not None
        body = await self._json(request)
        user = _field(body, "user", str, _USER)
        job_id = body.get("job_id") or ""
        if not isinstance(job_id, str) or (job_id and not _JOB_ID.fullmatch(job_id)):
            raise HttpRefusal(400, "'job_id' must be a job id or empty", "bad_request")
        rule = _field(body, "rule", str, _WORD)
        reason = _field(body, "reason", str)[:500]
        result = await self._run(self.authority.hold_user, identity[1], user, job_id, rule,
                                 reason)
        return web.json_response(result)

    async def jwks(self, request: web.Request) -> web.Response:
        self._identity(request, None)
        if peer_certificate(request) is None:
            raise HttpRefusal(403, "a certificate of the site CA is required", "forbidden")
        return web.json_response(await self._run(self.authority.jwks))

    async def revocations(self, request: web.Request) -> web.Response:
        self._identity(request, "node")
        after = request.query.get("after", "0")
        if not after.isdigit() or len(after) > 18:
            raise HttpRefusal(400, "after must be a revocation id", "bad_request")
        items = await self._run(self.authority.store.revocations_after, int(after))
        return web.json_response({"revocations": items})

    async def jit_list(self, request: web.Request) -> web.Response:
        identity = self._identity(request, "node")
        assert identity is not None
        user = request.query.get("user", "")
        if not _USER.fullmatch(user):
            raise HttpRefusal(400, "user must be a user name", "bad_request")
        now = self.authority._ts()
        items = await self._run(self.authority.store.active_jit, user, identity[1], now)
        return web.json_response({"jit": items})

    # -- admins ---------------------------------------------------------------
    async def _admin(self, request: web.Request, role: str) -> tuple[Any, dict[str, Any]]:
        body = await self._json(request)
        caller = await self._run(self.authority.admin, body.get("credential"), role)
        return caller, body

    async def enroll(self, request: web.Request) -> web.Response:
        caller, body = await self._admin(request, "enroll")
        user = _field(body, "user", str, _USER)
        uri = await self._run(lambda: self.authority.enroll(user, by=caller.user))
        return web.json_response({"user": user, "otpauth_uri": uri})

    async def revoke(self, request: web.Request) -> web.Response:
        caller, body = await self._admin(request, "revoke")
        user = _field(body, "user", str, _USER)
        reason = _field(body, "reason", str)
        if not reason.strip() or len(reason) > 500:
            raise HttpRefusal(400, "a reason (1-500 characters) is required", "bad_request")
        rid = await self._run(lambda: self.authority.revoke(user, reason, by=caller.user))
        return web.json_response({"revocation": rid, "user": user})

    async def list_holds(self, request: web.Request) -> web.Response:
        await self._admin(request, "revoke")
        return web.json_response({"holds": await self._run(self.authority.store.user_holds)})

    async def release_hold(self, request: web.Request) -> web.Response:
        caller, body = await self._admin(request, "revoke")
        user = _field(body, "user", str, _USER)
        reason = _field(body, "reason", str)
        if not reason.strip() or len(reason) > 500:
            raise HttpRefusal(400, "a reason (1-500 characters) is required", "bad_request")
        ids = await self._run(lambda: self.authority.release_user_hold(user, reason,
                                                                       by=caller.user))
        return web.json_response({"user": user, "released": ids})

    async def rotate_keys(self, request: web.Request) -> web.Response:
        caller, _ = await self._admin(request, "keys")
        kid = await self._run(lambda: self.authority.rotate_keys(by=caller.user))
        return web.json_response({"kid": kid})

    async def jit_grant(self, request: web.Request) -> web.Response:
        caller, body = await self._admin(request, "jit_approve")
        user = _field(body, "user", str, _USER)
        node = _field(body, "node", str, _NAME)
        ttl = body.get("ttl_s")
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 60 <= ttl <= 86400:
            raise HttpRefusal(400, "ttl_s must be 60 to 86400 seconds", "bad_request")
        reason = _field(body, "reason", str)
        if caller.user == user:
            raise HttpRefusal(403, "an approver cannot grant access to themselves",
                              "self_approval")
        result = await self._run(lambda: self.authority.jit_grant(
            user, node, float(ttl), reason[:500], by=caller.user))
        return web.json_response(result)

    # -- serving --------------------------------------------------------------------
    async def serve(self, host: str, port: int, stop: asyncio.Event,
                    ready: Callable[[int], None] | None = None) -> None:
        await serve_tls(self.app, host, port, context=self.server_context, stop=stop,
                        on_refused=self.refuse, ready=ready,
                        handshake_timeout_s=self.handshake_timeout_s)

    async def serve_gate_socket(self, path: Path, stop: asyncio.Event,
                                ready: Callable[[Path], None] | None = None) -> None:
        """Answer the job gate on the unix socket ``path`` (only that route)."""
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors])
        app.add_routes([web.post("/v1/gate", self.gate_local)])
        await serve_unix(app, path, stop=stop, ready=ready)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
