"""authd's decisions: who is asking (munge), MFA (TOTP), policy, grants, revocation.

Every decision is recorded through the event registry. Secrets (TOTP seeds,
signing keys) are opened from their KEK-sealed form only for the moment they
are used and never logged; errors say what failed, not what the secret was.

Identity: a researcher's command line proves its uid with a munge credential
whose payload names its purpose (``LOGIN``, ``STATUS``, ``ADMIN``), so a
credential made for one purpose cannot be used for another, and munged
itself refuses a credential seen before (replay) or too old (expired).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from ztgpu.audit.events import format_timestamp
from ztgpu.audit.spool import Clock, SystemClock
from ztgpu.authd.store import AuthStore, Session
from ztgpu.config import AuthdConfig
from ztgpu.errors import Denied, InputRejected, SlurmError
from ztgpu.net.ratelimit import RateWindow, RejectLimiter

log = logging.getLogger("ztgpu.authd")

LOGIN = b"ztgpu-login-v1"
STATUS = b"ztgpu-status-v1"
ADMIN = b"ztgpu-admin-v1"
BIND = b"ztgpu-bind-v1"

_MAX_GRANT_S = 30 * 86400.0
_MFA_CODES = ("mfa_required", "mfa_too_old")
#: Decisions whose job waits in Slurm (held) rather than being ended: the
#: user can cure MFA by logging in, an admin a user hold by releasing it.
_HOLD_CODES = (*_MFA_CODES, "user_held")


def _session_time(text: str) -> datetime:
    """A stored session time (``format_timestamp``: UTC, ``Z``) as an aware datetime."""
    return datetime.fromisoformat(text)


class AuthDenied(Denied):
    """A request refused for a reason the caller may read; ``code`` is stable."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class EventSink(Protocol):
    def append(self, code: str, **fields: Any) -> dict[str, Any]: ...

    def append_many(self, items: Sequence[tuple[str, Mapping[str, Any]]]
                    ) -> list[dict[str, Any]]: ...


class UserDirectory(Protocol):
    """Names, uids and groups as the cluster knows them (pwd/grp, LDAP via NSS)."""

    def name_of(self, uid: int) -> str | None: ...

    def uid_of(self, name: str) -> int | None: ...

    def groups_of(self, name: str) -> frozenset[str]: ...


class SystemUsers:
    """The host's user database (NSS: files, LDAP, SSSD...)."""

    def name_of(self, uid: int) -> str | None:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return None

    def uid_of(self, name: str) -> int | None:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            return None

    def groups_of(self, name: str) -> frozenset[str]:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return frozenset()
        names = set()
        for gid in os.getgrouplist(name, entry.pw_gid):
            try:
                names.add(grp.getgrgid(gid).gr_name)
            except KeyError:
                continue
        return frozenset(names)


class JobHolder(Protocol):
    """Holds jobs that wait for MFA and releases them (Slurm on the controller)."""

    def hold(self, job_id: str, reason: str) -> None: ...

    def release(self, job_ids: Sequence[str]) -> None: ...

    def cancel(self, job_id: str, reason: str) -> None: ...

    def job_user(self, job_id: str) -> str | None:
        """The user Slurm says owns the job; None if Slurm does not list it."""
        ...


@dataclass(frozen=True)
class Caller:
    """Who a munge credential proved the caller to be."""

    user: str
    uid: int


@dataclass(frozen=True)
class JobRequest:
    """What the gate or a node tells authd about a job."""

    job_id: str
    uid: int
    user: str
    partition: str | None
    account: str | None
    gpus: int
    time_limit_s: float | None = None
    #: The job's array id (SLURM_ARRAY_JOB_ID): a binding of the array counts.
    array_job_id: str | None = None


def _refusal(code: str, reason: str) -> Any:
    """A denial decided by authd itself, not by a policy rule."""
    from ztgpu.policy import Decision

    return Decision(allow=False, rule="", reason=reason, code=code, mfa_max_age_s=0.0,
                    max_gpus_per_job=0, max_gpus_per_user_per_node=0, trace=())


def _hold_words(hold: Mapping[str, Any]) -> str:
    return (f"{hold['user']}'s GPU jobs are held since {hold['held_at']}: "
            f"{hold['rule']} on {hold['node']} (job {hold['job_id']})")


def bind_message(user: str, job_id: str) -> bytes:
    """What a login session's binding key signs to bind a job to it."""
    return f"ztgpu-bind|{user}|{job_id}".encode()


class Authority:
    """All of authd's decisions; thread-safe, each one recorded."""

    def __init__(self, *, store: AuthStore, keyring: Any, config: AuthdConfig,
                 events: EventSink, clock: Clock | None = None,
                 munge_decode: Callable[..., Any] | None = None,
                 users: UserDirectory | None = None, holder: JobHolder | None = None) -> None:
        from ztgpu.trust import munge

        self.store = store
        self.keyring = keyring
        self.config = config
        self.events = events
        self.clock = clock or SystemClock()
        self.munge_decode = munge_decode or munge.decode
        self.users = users or SystemUsers()
        self.holder = holder
        self._logins_by_user: RateWindow[str] = RateWindow(config.login_per_user_per_min)
        # A flood of limited logins is recorded at a bounded rate, with counts.
        self._login_limited: RejectLimiter[str] = RejectLimiter(self._record_limited_login)
        self._policy: Any = None
        self._policy_stamp: tuple[int, int] | None = None
        self._policy_lock = threading.Lock()
        self._signing: Any = None
        self.ensure_signing_key()

    # -- helpers ------------------------------------------------------------
    def now(self) -> datetime:
        return self.clock.now()

    def policy(self) -> Any:
        """The policy file, reloaded when it changes; a new version is recorded.

        A policy file that becomes invalid keeps the last good version in
        force (and logs the error); with no good version yet, it raises.
        """
        from ztgpu.policy import load_policy

        path = self.config.policy_file
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        with self._policy_lock:
            if self._policy is not None and stamp == self._policy_stamp:
                return self._policy
            try:
                policy = load_policy(path)
            except Exception:
                if self._policy is None:
                    raise
                log.exception("policy %s is invalid; keeping the previous version", path)
                self._policy_stamp = stamp
                return self._policy
            self._policy, self._policy_stamp = policy, stamp
        if self.store.note_policy(policy.content_hash, format_timestamp(self.now())):
            self.events.append("auth.policy_loaded", policy_hash=policy.content_hash,
                               source=str(path), outcome="loaded")
        return policy

    def identify(self, credential: Any, purpose: bytes) -> Caller:
        """The caller proven by a munge ``credential`` made for ``purpose``."""
        from ztgpu.trust.munge import MungeError

        if not isinstance(credential, str):
            raise InputRejected("credential must be a munge credential string")
        try:
            cred = self.munge_decode(credential, socket=self.config.munge_socket)
        except MungeError as exc:
            raise AuthDenied(f"munge credential refused ({exc.code})", "bad_credential") from None
        if cred.payload != purpose:
            raise AuthDenied("munge credential was made for another purpose", "bad_credential")
        name = self.users.name_of(cred.uid)
        if name is None:
            raise AuthDenied(f"uid {cred.uid} is not a known user", "unknown_user")
        return Caller(name, cred.uid)

    def _ts(self, moment: datetime | None = None) -> str:
        return format_timestamp(moment or self.now())

    # -- enrolment and login --------------------------------------------------
    def enroll(self, user: str, *, by: str) -> str:
        """Enrol ``user`` with a new TOTP secret; returns the otpauth URI (secret inside)."""
        from ztgpu.trust.totp import new_secret, otpauth_uri

        uid = self.users.uid_of(user)
        if uid is None:
            raise InputRejected(f"no such user {user!r}")
        secret = new_secret()
        sealed = self.keyring.seal(secret, f"totp:{user}".encode())
        self.store.enroll(user, uid, sealed, self._ts(), by)
        self.events.append("auth.enrolled", user=user, uid=uid, by=by, outcome="enrolled")
        return str(otpauth_uri(secret, user))

    def _record_limited_login(self, user: str, reason: str) -> None:
        self.events.append("auth.login", user=user, outcome="rate_limited", reason=reason)

    def login(self, credential: Any, code: Any) -> Session:
        """Open an MFA session for the credential's user if ``code`` is right.

        A code is accepted once; ``login_max_failures`` wrong codes in a row
        lock the account for ``login_lockout_s``. Releases the user's jobs
        held for MFA. Raises AuthDenied (recorded) otherwise.
        """
        from ztgpu.trust.totp import verify

        caller = self.identify(credential, LOGIN)
        if not self._logins_by_user.allow(caller.user):
            detail = (f"more than {self.config.login_per_user_per_min} logins a minute for "
                      f"{caller.user}; wait a minute")
            self._login_limited(caller.user, detail)
            raise AuthDenied(detail, "rate_limited")
        if not isinstance(code, str):
            raise InputRejected("code must be a string of 6 digits")
        now = self.now()
        ts = self._ts(now)
        outcome, detail, session = "failed", "", None
        with self.store.db.transaction():
            enrolment = self.store.enrolment(caller.user, lock=True)
            if enrolment is None or enrolment.uid != caller.uid:
                detail = "not enrolled for MFA: ask an admin to run `ztgpu admin enroll`"
                outcome = "not_enrolled"
            elif enrolment.locked_until is not None and enrolment.locked_until > ts:
                detail = f"account locked after repeated wrong codes until {enrolment.locked_until}"
                outcome = "locked"
            else:
                secret = self.keyring.open(enrolment.secret, f"totp:{caller.user}".encode())
                step = verify(secret, code, now, enrolment.last_step)
                if step is None:
                    failures = enrolment.failures + 1
                    locked = None
                    if failures >= self.config.login_max_failures:
                        locked = self._ts(now + timedelta(seconds=self.config.login_lockout_s))
                    self.store.record_failure(caller.user, locked)
                    detail = "wrong or already used code"
                    if locked is not None:
                        self.events.append("auth.locked", user=caller.user, failures=failures,
                                           until=locked, outcome="locked")
                else:
                    self.store.record_success(caller.user, step)
                    lifetime = self._session_lifetime_s(caller.user)
                    session = Session(secrets.token_hex(16), caller.user, caller.uid, ts,
                                      self._ts(now + timedelta(seconds=lifetime)),
                                      bind_key=secrets.token_bytes(32))
                    self.store.open_session(session)
                    assert session.bind_key is not None
                    self.store.add_session_key(session.id, self.keyring.seal(
                        session.bind_key, f"session:{session.id}".encode()))
                    outcome = "ok"
        self.events.append("auth.login", user=caller.user, uid=caller.uid, outcome=outcome,
                           reason=detail)
        if session is None:
            raise AuthDenied(detail, outcome)
        if self.config.mfa_binding != "login_session":
            # Per login session, a login here opens nothing submitted elsewhere:
            # a held job is released by its own binding (`ztgpu job bind`).
            self._release_held(caller.user)
        return session

    def bind(self, credential: Any, job_id: Any, session_id: Any, mac: Any) -> dict[str, Any]:
        """Bind a job to the login session that submitted it.

        The caller (munge) proves the user; ``mac`` (HMAC-SHA256 of
        ``ztgpu-bind|USER|JOB`` under the session's binding key, which only
        that login holds) proves the session. The job must be the user's in
        Slurm. A job held for want of a binding is released. Recorded
        either way; raises AuthDenied when the proof fails.
        """
        import hashlib
        import hmac

        from ztgpu.slurm.env import parse_job_id

        caller = self.identify(credential, BIND)
        try:
            job = parse_job_id(job_id if isinstance(job_id, str) else None)
        except InputRejected:
            raise InputRejected("job_id must be a Slurm job id") from None
        if not (isinstance(session_id, str) and len(session_id) == 32
                and all(c in "0123456789abcdef" for c in session_id)):
            raise InputRejected("session_id must be a session id")
        if not isinstance(mac, str) or len(mac) != 64:
            raise InputRejected("mac must be 64 hex digits")

        def refuse(reason: str, code: str) -> AuthDenied:
            self.events.append("auth.bound", user=caller.user, job_id=job, outcome="refused",
                               reason=reason)
            return AuthDenied(reason, code)

        now = self._ts()
        sealed = self.store.session_key(session_id, caller.user, now)
        if sealed is None:
            raise refuse("no open MFA login session of yours has this id (expired, revoked, "
                         "or another user's): run `ztgpu login` again", "no_session")
        key = self.keyring.open(sealed, f"session:{session_id}".encode())
        expected = hmac.new(key, bind_message(caller.user, job), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, mac):
            raise refuse("the binding proof does not match this login session", "bad_proof")
        if self.holder is not None:
            try:
                owner = self.holder.job_user(job)
            except SlurmError as exc:
                raise refuse(f"cannot check with Slurm whose job {job} is: {exc}",
                             "slurm_error") from None
            if owner != caller.user:
                raise refuse(f"job {job} is not {caller.user}'s in Slurm", "not_your_job")
        fresh = self.store.bind_job(job, session_id, caller.user, now)
        self.events.append("auth.bound", user=caller.user, job_id=job,
                           outcome="bound" if fresh else "already_bound",
                           reason=f"login session {session_id[:8]}")
        held = [j for j, _, _ in self.store.held_jobs(caller.user) if j == job]
        if held:
            if self.holder is not None:
                self.holder.release(held)
            self.store.mark_released(held, now)
            self.events.append("auth.released", user=caller.user, jobs=held, outcome="released")
        return {"job_id": job, "bound": fresh, "released": bool(held)}

    def _bound_session(self, job: JobRequest) -> tuple[Session | None, str]:
        """login_session mode: the open session *job* is bound to, else why not.

        A job submitted a moment ago may reach the gate before its
        submitter's binding (cli_filter's post-submit) reaches authd: while
        the user has an MFA session anywhere, wait up to ``bind_wait_s``.
        """
        import time

        ids = [job.job_id] + ([job.array_job_id] if job.array_job_id else [])
        deadline = time.monotonic() + self.config.bind_wait_s
        while True:
            now = self._ts()
            sid = self.store.job_session(ids, job.user, now)
            if sid is not None:
                found = self.store.session(sid)
                if found is not None:
                    return found, ""
            if self.store.current_session(job.user, now) is None:
                return None, ""  # no MFA at all: the policy's own reason says so
            if time.monotonic() >= deadline:
                return None, (f"job {job.job_id} was not submitted from a login session that "
                              "passed MFA (another login's `ztgpu login` does not count): run "
                              "`ztgpu login` in the shell you submit from, then `ztgpu job "
                              f"bind {job.job_id}` there or submit again")
            time.sleep(0.05)

    def _session_lifetime_s(self, user: str) -> float:
        hours: float = self.policy().defaults.mfa_max_age_h
        return hours * 3600.0

    def _release_held(self, user: str) -> None:
        held = [job for job, _, _ in self.store.held_jobs(user)]
        if not held:
            return
        if self.holder is not None:
            self.holder.release(held)
        self.store.mark_released(held, self._ts())
        self.events.append("auth.released", user=user, jobs=held, outcome="released")

    def status(self, credential: Any) -> dict[str, Any]:
        """The caller's MFA session expiry and jobs waiting for MFA."""
        caller = self.identify(credential, STATUS)
        session = self.store.current_session(caller.user, self._ts())
        hold = self.store.active_user_hold(caller.user)
        return {"user": caller.user,
                "session_expires": session.expires if session is not None else None,
                "user_hold": None if hold is None else _hold_words(hold),
                "held_jobs": [{"job_id": j, "reason": r, "since": s}
                              for j, r, s in self.store.held_jobs(caller.user)]}

    # -- decisions ------------------------------------------------------------
    def decide(self, job: JobRequest, *, gpus_held_on_node: int = 0,
               session: Session | None = None, bound_only: bool = False) -> Any:
        """The policy's decision for ``job`` (not recorded; see gate/grant).

        The MFA age is that of *session* when given, else of the user's
        newest session; with ``bound_only`` and no *session*, of none.
        """
        from ztgpu.policy import AccessRequest, evaluate

        if self.users.uid_of(job.user) != job.uid:
            raise AuthDenied(f"uid {job.uid} is not user {job.user!r}", "uid_mismatch")
        hold = self.store.active_user_hold(job.user)
        if hold is not None:
            return _refusal("user_held", f"{_hold_words(hold)}; an admin must release it "
                            "(ztgpu admin hold release)")
        now = self.now()
        if session is None and not bound_only:
            session = self.store.current_session(job.user, self._ts(now))
        age = None
        if session is not None:
            created = _session_time(session.created)
            age = max(0.0, (now - created).total_seconds())
        request = AccessRequest(user=job.user, groups=self.users.groups_of(job.user),
                                account=job.account, partition=job.partition, gpus=job.gpus,
                                gpus_held_on_node=gpus_held_on_node, mfa_age_s=age, now=now)
        return evaluate(self.policy(), request)

    def gate(self, job: JobRequest) -> Any:
        """PrologSlurmctld's question: may this job start?

        Missing or stale MFA: the job is held until its user logs in. A
        denial that waiting cannot cure (a rule denies, too many GPUs): the
        job is ended with the reason, rather than requeued again and again.
        Outside allowed hours: it is requeued and asked about again later.
        """
        owner = self._job_owner_problem(job)
        if owner is not None:
            # The caller's word against Slurm's: decide nothing, touch no job.
            # (job_user_mismatch is authd's own code, not one of the policy's.)
            self.events.append("auth.decision", job_id=job.job_id, uid=job.uid, user=job.user,
                               outcome="deny", reason=owner, rule="", stage="gate")
            return _refusal("job_user_mismatch", owner)
        if job.time_limit_s:
            self.store.note_time_limit(job.job_id, job.time_limit_s, self._ts())
        if self.config.mfa_binding == "login_session":
            session, unbound = self._bound_session(job)
            decision = self.decide(job, session=session, bound_only=True)
            if unbound and decision.code in _MFA_CODES:
                from dataclasses import replace

                decision = replace(decision, reason=unbound)
        else:
            decision = self.decide(job)
        self.events.append("auth.decision", job_id=job.job_id, uid=job.uid, user=job.user,
                           outcome="allow" if decision.allow else "deny",
                           reason=decision.reason, rule=decision.rule, stage="gate")
        if not decision.allow and decision.code in _HOLD_CODES:
            reason = f"ztgpu: {decision.reason}"
            self.store.hold(job.job_id, job.user, reason, self._ts())
            if self.holder is not None:
                self.holder.hold(job.job_id, reason)
        elif not decision.allow and decision.code != "outside_hours" and self.holder is not None:
            self.holder.cancel(job.job_id, decision.reason)
        return decision

    def _job_owner_problem(self, job: JobRequest) -> str | None:
        """Why the gate must not believe this request about whose job it is, or None."""
        if self.holder is None or not self.config.gate_checks_job_owner:
            return None  # no Slurm here to ask
        try:
            owner = self.holder.job_user(job.job_id)
        except SlurmError as exc:
            return f"cannot check with Slurm whose job {job.job_id} is: {exc}"
        if owner is None:
            return f"Slurm does not know job {job.job_id}"
        if owner != job.user:
            return f"job {job.job_id} belongs to {owner}, not {job.user}"
        return None

    def grant(self, node: str, job: JobRequest, gpus: Sequence[Mapping[str, Any]],
              gpus_held_on_node: int = 0) -> tuple[str, str]:
        """A signed grant for ``job`` on ``node``: (token, expiry), or AuthDenied.

        ``gpus`` are the node's GPUs for the job, each ``{index, uuid, minor}``;
        the grant binds their index and UUID.
        """
        from ztgpu.trust.grants import issue_grant

        decision = self.decide(job, gpus_held_on_node=gpus_held_on_node)
        decided = {"job_id": job.job_id, "uid": job.uid, "user": job.user,
                   "outcome": "allow" if decision.allow else "deny", "reason": decision.reason,
                   "rule": decision.rule, "stage": "grant", "target_node": node}
        if not decision.allow:
            self.events.append("auth.decision", **decided)
            raise AuthDenied(decision.reason, decision.code)
        now = self.now()
        lifetime = (job.time_limit_s or self.store.time_limit(job.job_id)
                    or self.config.default_grant_s)
        lifetime = min(max(lifetime + 300.0, 600.0), _MAX_GRANT_S)
        expires = now + timedelta(seconds=lifetime)
        bound = [{"index": g["index"], "uuid": g["uuid"]} for g in gpus]
        jti = secrets.token_urlsafe(16)
        token = issue_grant(self._signing_key(), job_id=job.job_id, uid=job.uid, user=job.user,
                            node=node, gpus=bound, expires_at=expires, now=now, jti=jti)
        self.store.record_grant(jti, job.job_id, job.uid, job.user, node, bound,
                                self._ts(now), self._ts(expires))
        # The decision and the grant it led to: one durable write for both.
        self.events.append_many([
            ("auth.decision", decided),
            ("auth.grant", {"job_id": job.job_id, "uid": job.uid, "user": job.user,
                            "target_node": node, "gpus": [dict(g) for g in gpus], "jti": jti,
                            "expires": self._ts(expires), "outcome": "issued"})])
        return token, self._ts(expires)

    # -- signing keys -----------------------------------------------------------
    def ensure_signing_key(self) -> None:
        """Create the first grant-signing key if there is none."""
        if not any(current for *_, current in self.store.signing_keys()):
            self._new_signing_key()

    def _new_signing_key(self) -> str:
        from ztgpu.trust.grants import new_signing_key, private_pem

        key = new_signing_key()
        sealed = self.keyring.seal(private_pem(key), f"signing-key:{key.kid}".encode())
        self.store.add_signing_key(key.kid, sealed, self._ts())
        self._signing = None
        return str(key.kid)

    def _signing_key(self) -> Any:
        from ztgpu.trust.grants import from_pem

        current = next((k for k in self.store.signing_keys() if k[4]), None)
        if current is None:
            raise AuthDenied("no grant-signing key", "no_key")
        kid, sealed = current[0], current[1]
        if self._signing is None or self._signing.kid != kid:
            pem = self.keyring.open(sealed, f"signing-key:{kid}".encode())
            self._signing = from_pem(kid, pem)
        return self._signing

    def jwks(self) -> dict[str, Any]:
        """Public keys of every signing key not retired (old ones verify old grants)."""
        from ztgpu.trust.grants import from_pem, jwks

        keys = []
        for kid, sealed, _created, retired, _current in self.store.signing_keys():
            if retired is None:
                pem = self.keyring.open(sealed, f"signing-key:{kid}".encode())
                keys.append((kid, from_pem(kid, pem).private.public_key()))
        return dict(jwks(keys))

    # -- admin actions ------------------------------------------------------------
    def admin(self, credential: Any, role: str) -> Caller:
        """The caller, if the policy gives them ``role`` and their MFA login is fresh."""
        from ztgpu.policy import admin_roles

        caller = self.identify(credential, ADMIN)
        roles = admin_roles(self.policy(), caller.user, self.users.groups_of(caller.user))
        if role not in roles:
            raise AuthDenied(f"{caller.user} does not hold the admin role {role!r}", "not_admin")
        now = self.now()
        session = self.store.current_session(caller.user, self._ts(now))
        limit = self.config.admin_mfa_max_age_s
        if session is None:
            raise AuthDenied("admin actions need a fresh MFA login: run `ztgpu login`",
                             "mfa_required")
        created = _session_time(session.created)
        if (now - created).total_seconds() > limit:
            raise AuthDenied(f"admin actions need an MFA login at most {limit / 60:.0f} min "
                             "old: run `ztgpu login` again", "mfa_too_old")
        return caller

    def revoke(self, user: str, reason: str, *, by: str) -> int:
        """End ``user``'s sessions and enrolment; nodes end their jobs. Returns the id."""
        if self.users.uid_of(user) is None and self.store.enrolment(user) is None:
            raise InputRejected(f"no such user {user!r}")
        revocation = self.store.revoke(user, self._ts(), reason, by)
        self.store.db.execute("DELETE FROM users WHERE username = ?", (user,))
        self.events.append("auth.revoked", user=user, reason=reason, by=by,
                           outcome="revoked")
        return revocation

    def hold_user(self, node: str, user: str, job_id: str, rule: str, reason: str
                  ) -> dict[str, Any]:
        """A node's telemetry rule fired on *user*'s process: refuse their GPU
        jobs (the gate holds them in Slurm, grants are refused) until an admin
        releases the hold. Jobs already running are the node's to answer (and
        a revocation's). A node may hold at most ``node_holds_per_hour``
        distinct users an hour: a compromised node cannot hold everyone."""
        if self.users.uid_of(user) is None:
            raise InputRejected(f"no such user {user!r}")
        now = self.now()
        recent = self.store.users_held_by(node, self._ts(now - timedelta(hours=1)))
        limit = self.config.node_holds_per_hour
        if user not in recent and len(recent) >= limit:
            self.events.append("auth.user_held", user=user, target_node=node, job_id=job_id,
                               rule=rule, reason=reason, outcome="refused")
            raise AuthDenied(f"node {node} held {len(recent)} users in the last hour "
                             f"(authd.node_holds_per_hour {limit}): not {user}",
                             "too_many_holds")
        hold_id, new = self.store.add_user_hold(user, node, job_id, rule, reason,
                                                self._ts(now))
        if new:
            self.events.append("auth.user_held", user=user, target_node=node, job_id=job_id,
                               rule=rule, reason=reason, outcome="held")
        return {"hold": hold_id, "user": user, "new": new}

    def release_user_hold(self, user: str, reason: str, *, by: str) -> list[int]:
        """An admin ends *user*'s hold; their jobs held by it go back to the gate."""
        ids = self.store.release_user_hold(user, self._ts(), by, reason)
        if not ids:
            raise InputRejected(f"{user} is not held")
        self.events.append("auth.hold_released", user=user, holds=ids, by=by, reason=reason,
                           outcome="released")
        self._release_held(user)
        return ids

    def rotate_keys(self, *, by: str) -> str:
        kid = self._new_signing_key()
        # Keys whose last possible grant has expired are retired from the JWKS.
        cutoff = self._ts(self.now() - timedelta(seconds=_MAX_GRANT_S))
        self.store.retire_signing_keys(cutoff, self._ts())
        self.events.append("auth.keys_rotated", kid=kid, by=by, outcome="rotated")
        return kid

    def jit_grant(self, user: str, node: str, ttl_s: float, reason: str, *, by: str
                  ) -> dict[str, Any]:
        if self.users.uid_of(user) is None:
            raise InputRejected(f"no such user {user!r}")
        if not reason.strip():
            raise InputRejected("a reason is required")
        now = self.now()
        expires = self._ts(now + timedelta(seconds=ttl_s))
        jit_id = secrets.token_hex(8)
        self.store.add_jit(jit_id, user, node, by, reason, self._ts(now), expires)
        self.events.append("auth.jit", user=user, target_node=node, approver=by, reason=reason,
                           expires=expires, outcome="granted")
        return {"id": jit_id, "user": user, "node": node, "expires": expires}
