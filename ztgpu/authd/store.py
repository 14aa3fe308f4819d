"""authd's durable state: enrolments, MFA sessions, signing keys, grants, revocations.

One schema on SQLite or PostgreSQL (``ztgpu.sqldb``). Secrets never appear in
clear: TOTP secrets and grant-signing keys are stored sealed under the KEK
(``ztgpu.trust.kek``) by the caller; this module only keeps the sealed text.
Timestamps are RFC 3339 UTC strings with microseconds, which sort as text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ztgpu.sqldb import Database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY, uid {int} NOT NULL, secret TEXT NOT NULL,
    enrolled_at TEXT NOT NULL, enrolled_by TEXT NOT NULL, last_step {int} NOT NULL,
    failures {int} NOT NULL, locked_until TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, username TEXT NOT NULL, uid {int} NOT NULL,
    created TEXT NOT NULL, expires TEXT NOT NULL, revoked TEXT
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (username, expires);
CREATE TABLE IF NOT EXISTS session_keys (session_id TEXT PRIMARY KEY, sealed TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_bindings (
    job_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, username TEXT NOT NULL,
    bound_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS signing_keys (
    kid TEXT PRIMARY KEY, private TEXT NOT NULL, created TEXT NOT NULL,
    retired TEXT, current {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    jti TEXT PRIMARY KEY, job_id TEXT NOT NULL, uid {int} NOT NULL, username TEXT NOT NULL,
    node TEXT NOT NULL, gpus TEXT NOT NULL, issued TEXT NOT NULL, expires TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS grants_user ON grants (username, expires);
CREATE TABLE IF NOT EXISTS revocations (
    id {id_column}, username TEXT NOT NULL, at TEXT NOT NULL, reason TEXT NOT NULL,
    by_user TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS held_jobs (
    job_id TEXT PRIMARY KEY, username TEXT NOT NULL, reason TEXT NOT NULL,
    held_at TEXT NOT NULL, released_at TEXT
);
CREATE TABLE IF NOT EXISTS user_holds (
    id {id_column}, username TEXT NOT NULL, node TEXT NOT NULL, job_id TEXT NOT NULL,
    rule TEXT NOT NULL, reason TEXT NOT NULL, held_at TEXT NOT NULL, released_at TEXT,
    released_by TEXT, release_reason TEXT
);
CREATE INDEX IF NOT EXISTS user_holds_user ON user_holds (username, released_at);
CREATE TABLE IF NOT EXISTS jit (
    id TEXT PRIMARY KEY, username TEXT NOT NULL, node TEXT NOT NULL, approver TEXT NOT NULL,
    reason TEXT NOT NULL, created TEXT NOT NULL, expires TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_versions (hash TEXT PRIMARY KEY, loaded_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_limits (
    job_id TEXT PRIMARY KEY, time_limit_s {int} NOT NULL, noted TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Enrolment:
    """A user's TOTP enrolment (the secret sealed under the KEK)."""

    username: str
    uid: int
    secret: str
    last_step: int
    failures: int
    locked_until: str | None


@dataclass(frozen=True)
class Session:
    """An MFA session opened by ``ztgpu login``."""

    id: str
    username: str
    uid: int
    created: str
    expires: str
    #: Only when just opened: the key that binds jobs to this login session
    #: (stored sealed, handed to the login once).
    bind_key: bytes | None = None


class AuthStore:
    """Typed access to authd's tables; every method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.create_schema(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- enrolment --------------------------------------------------------
    def enroll(self, username: str, uid: int, secret: str, at: str, by: str) -> None:
        """Create or replace a user's enrolment (a new secret resets failures)."""
        with self.db.transaction():
            self.db.execute("DELETE FROM users WHERE username = ?", (username,))
            self.db.execute(
                "INSERT INTO users (username, uid, secret, enrolled_at, enrolled_by, "
                "last_step, failures, locked_until) VALUES (?, ?, ?, ?, ?, -1, 0, NULL)",
                (username, uid, secret, at, by))

    def enrolment(self, username: str, *, lock: bool = False) -> Enrolment | None:
        sql = ("SELECT username, uid, secret, last_step, failures, locked_until FROM users "
               "WHERE username = ?")
        rows = self.db.execute(sql + (self.db.for_update if lock else ""), (username,))
        if not rows:
            return None
        name, uid, secret, last_step, failures, locked = rows[0]
        return Enrolment(str(name), int(uid), str(secret), int(last_step), int(failures),
                         locked)

    def record_success(self, username: str, step: int) -> None:
        self.db.execute("UPDATE users SET last_step = ?, failures = 0, locked_until = NULL "
                        "WHERE username = ?", (step, username))

    def record_failure(self, username: str, locked_until: str | None) -> int:
        self.db.execute("UPDATE users SET failures = failures + 1, locked_until = ? "
                        "WHERE username = ?", (locked_until, username))
        rows = self.db.execute("SELECT failures FROM users WHERE username = ?", (username,))
        return int(rows[0][0]) if rows else 0

    def rewrap_secrets(self, rewrap: Any) -> int:
        """Re-seal every stored secret with ``rewrap(sealed, aad) -> sealed``."""
        count = 0
        with self.db.transaction():
            for username, secret in self.db.execute("SELECT username, secret FROM users"):
                new = rewrap(secret, f"totp:{username}".encode())
                if new != secret:
                    self.db.execute("UPDATE users SET secret = ? WHERE username = ?",
                                    (new, username))
                    count += 1
            for kid, private in self.db.execute("SELECT kid, private FROM signing_keys"):
                new = rewrap(private, f"signing-key:{kid}".encode())
                if new != private:
                    self.db.execute("UPDATE signing_keys SET private = ? WHERE kid = ?",
                                    (new, kid))
                    count += 1
        return count

    # -- sessions ---------------------------------------------------------
    def open_session(self, session: Session) -> None:
        self.db.execute("INSERT INTO sessions (id, username, uid, created, expires, revoked) "
                        "VALUES (?, ?, ?, ?, ?, NULL)",
                        (session.id, session.username, session.uid, session.created,
                         session.expires))

    def current_session(self, username: str, now: str) -> Session | None:
        """The user's newest unrevoked session that has not expired at ``now``."""
        rows = self.db.execute(
            "SELECT id, username, uid, created, expires FROM sessions WHERE username = ? "
            "AND revoked IS NULL AND expires > ? ORDER BY created DESC LIMIT 1",
            (username, now))
        if not rows:
            return None
        sid, name, uid, created, expires = rows[0]
        return Session(str(sid), str(name), int(uid), str(created), str(expires))

    def session(self, session_id: str) -> Session | None:
        rows = self.db.execute("SELECT id, username, uid, created, expires FROM sessions "
                               "WHERE id = ?", (session_id,))
        if not rows:
            return None
        sid, name, uid, created, expires = rows[0]
        return Session(str(sid), str(name), int(uid), str(created), str(expires))

    def add_session_key(self, session_id: str, sealed: str) -> None:
        self.db.execute("INSERT INTO session_keys (session_id, sealed) VALUES (?, ?)",
                        (session_id, sealed))

    def session_key(self, session_id: str, username: str, now: str) -> str | None:
        """The sealed binding key of *username*'s session *session_id*, while
        that session is open (not revoked, not expired at ``now``)."""
        rows = self.db.execute(
            "SELECT k.sealed FROM session_keys k JOIN sessions s ON s.id = k.session_id "
            "WHERE k.session_id = ? AND s.username = ? AND s.revoked IS NULL AND s.expires > ?",
            (session_id, username, now))
        return str(rows[0][0]) if rows else None

    def bind_job(self, job_id: str, session_id: str, username: str, at: str) -> bool:
        """Bind a job to the login session that submitted it; False if it is
        bound already (to this or another session: the first binding stays)."""
        with self.db.transaction():
            if self.db.execute("SELECT 1 FROM job_bindings WHERE job_id = ?", (job_id,)):
                return False
            self.db.execute("INSERT INTO job_bindings (job_id, session_id, username, bound_at) "
                            "VALUES (?, ?, ?, ?)", (job_id, session_id, username, at))
        return True

    def job_session(self, job_ids: Sequence[str], username: str, now: str) -> str | None:
        """The open session of *username* one of *job_ids* (a job, its array's
        id) is bound to, or None."""
        for job_id in job_ids:
            rows = self.db.execute(
                "SELECT b.session_id FROM job_bindings b JOIN sessions s ON s.id = b.session_id "
                "WHERE b.job_id = ? AND b.username = ? AND s.revoked IS NULL AND s.expires > ?",
                (job_id, username, now))
            if rows:
                return str(rows[0][0])
        return None

    def revoke_sessions(self, username: str, at: str) -> int:
        rows = self.db.execute("SELECT count(*) FROM sessions WHERE username = ? AND "
                               "revoked IS NULL AND expires > ?", (username, at))
        self.db.execute("UPDATE sessions SET revoked = ? WHERE username = ? AND revoked IS NULL",
                        (at, username))
        return int(rows[0][0])

    # -- signing keys -----------------------------------------------------
    def signing_keys(self) -> list[tuple[str, str, str, str | None, bool]]:
        """(kid, sealed private key, created, retired, current) for every key, newest first."""
        rows = self.db.execute("SELECT kid, private, created, retired, current FROM "
                               "signing_keys ORDER BY created DESC")
        return [(str(k), str(p), str(c), r, bool(cur)) for k, p, c, r, cur in rows]

    def add_signing_key(self, kid: str, sealed: str, created: str) -> None:
        """Make ``kid`` the current key; older keys stay for verification."""
        with self.db.transaction():
            self.db.execute("UPDATE signing_keys SET current = 0")
            self.db.execute("INSERT INTO signing_keys (kid, private, created, retired, current)"
                            " VALUES (?, ?, ?, NULL, 1)", (kid, sealed, created))

    def retire_signing_keys(self, older_than: str, at: str) -> list[str]:
        """Retire non-current keys created before ``older_than``; returns their kids."""
        rows = self.db.execute("SELECT kid FROM signing_keys WHERE current = 0 AND "
                               "retired IS NULL AND created < ?", (older_than,))
        self.db.execute("UPDATE signing_keys SET retired = ? WHERE current = 0 AND "
                        "retired IS NULL AND created < ?", (at, older_than))
        return [str(r[0]) for r in rows]

    # -- grants, revocations, held jobs, JIT --------------------------------
    def record_grant(self, jti: str, job_id: str, uid: int, username: str, node: str,
                     gpus: Sequence[Any], issued: str, expires: str) -> None:
        self.db.execute("INSERT INTO grants (jti, job_id, uid, username, node, gpus, issued, "
                        "expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (jti, job_id, uid, username, node, json.dumps(list(gpus)), issued,
                         expires))

    def latest_grant_expiry(self, username: str, now: str) -> str | None:
        rows = self.db.execute("SELECT max(expires) FROM grants WHERE username = ? AND "
                               "expires > ?", (username, now))
        return rows[0][0] if rows and rows[0][0] is not None else None

    def revoke(self, username: str, at: str, reason: str, by: str) -> int:
        """Record a revocation and end the user's sessions; returns its id."""
        with self.db.transaction():
            self.revoke_sessions(username, at)
            self.db.execute("INSERT INTO revocations (username, at, reason, by_user) "
                            "VALUES (?, ?, ?, ?)", (username, at, reason, by))
            rows = self.db.execute("SELECT max(id) FROM revocations")
        return int(rows[0][0])

    def revocations_after(self, last_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT id, username, at, reason FROM revocations WHERE id > ? "
                               "ORDER BY id LIMIT ?", (last_id, limit))
        return [{"id": int(i), "user": u, "at": a, "reason": r} for i, u, a, r in rows]

    def revoked_since(self, username: str, since: str) -> bool:
        rows = self.db.execute("SELECT count(*) FROM revocations WHERE username = ? AND at >= ?",
                               (username, since))
        return int(rows[0][0]) > 0

    def hold(self, job_id: str, username: str, reason: str, at: str) -> None:
        self.db.execute("INSERT INTO held_jobs (job_id, username, reason, held_at, released_at) "
                        "VALUES (?, ?, ?, ?, NULL) ON CONFLICT (job_id) DO UPDATE SET "
                        "reason = excluded.reason, released_at = NULL",
                        (job_id, username, reason, at))

    def held_jobs(self, username: str) -> list[tuple[str, str, str]]:
        """(job_id, reason, held_at) of the user's jobs still held for MFA."""
        rows = self.db.execute("SELECT job_id, reason, held_at FROM held_jobs WHERE "
                               "username = ? AND released_at IS NULL ORDER BY held_at",
                               (username,))
        return [(str(j), str(r), str(h)) for j, r, h in rows]

    def mark_released(self, job_ids: Sequence[str], at: str) -> None:
        for job_id in job_ids:
            self.db.execute("UPDATE held_jobs SET released_at = ? WHERE job_id = ?",
                            (at, job_id))

    # -- users held after a node's telemetry rule ---------------------------
    def add_user_hold(self, username: str, node: str, job_id: str, rule: str, reason: str,
                      at: str) -> tuple[int, bool]:
        """Hold *username* (id, True); when already held: (that hold's id, False)."""
        with self.db.transaction():
            active = self.active_user_hold(username)
            if active is not None:
                return int(active["id"]), False
            self.db.execute("INSERT INTO user_holds (username, node, job_id, rule, reason, "
                            "held_at) VALUES (?, ?, ?, ?, ?, ?)",
                            (username, node, job_id, rule, reason, at))
            rows = self.db.execute("SELECT max(id) FROM user_holds")
        return int(rows[0][0]), True

    def active_user_hold(self, username: str) -> dict[str, Any] | None:
        holds = self.user_holds(username)
        return holds[0] if holds else None

    def user_holds(self, username: str | None = None) -> list[dict[str, Any]]:
        """Holds not yet released (of *username*, or of everyone), oldest first."""
        query = ("SELECT id, username, node, job_id, rule, reason, held_at FROM user_holds "
                 "WHERE released_at IS NULL AND (? = '' OR username = ?) ORDER BY id")
        rows = self.db.execute(query, (username or "", username or ""))
        return [{"id": int(i), "user": u, "node": n, "job_id": j, "rule": r, "reason": why,
                 "held_at": h} for i, u, n, j, r, why, h in rows]

    def users_held_by(self, node: str, since: str) -> set[str]:
        rows = self.db.execute("SELECT DISTINCT username FROM user_holds WHERE node = ? AND "
                               "held_at >= ?", (node, since))
        return {str(r[0]) for r in rows}

    def release_user_hold(self, username: str, at: str, by: str, reason: str) -> list[int]:
        """End *username*'s holds; returns their ids (none: it was not held)."""
        with self.db.transaction():
            ids = [h["id"] for h in self.user_holds(username)]
            for hold_id in ids:
                self.db.execute("UPDATE user_holds SET released_at = ?, released_by = ?, "
                                "release_reason = ? WHERE id = ?", (at, by, reason, hold_id))
        return ids

    def add_jit(self, jit_id: str, username: str, node: str, approver: str, reason: str,
                created: str, expires: str) -> None:
        self.db.execute("INSERT INTO jit (id, username, node, approver, reason, created, "
                        "expires) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (jit_id, username, node, approver, reason, created, expires))

    def active_jit(self, username: str, node: str, now: str) -> list[dict[str, Any]]:
        # A revocation of the user ends every JIT grant made before it.
        rows = self.db.execute("SELECT id, approver, reason, expires FROM jit WHERE "
                               "username = ? AND node = ? AND expires > ? AND NOT EXISTS "
                               "(SELECT 1 FROM revocations r WHERE r.username = jit.username "
                               "AND r.at >= jit.created)",
                               (username, node, now))
        return [{"id": i, "approver": a, "reason": r, "expires": e} for i, a, r, e in rows]

    def note_policy(self, digest: str, at: str) -> bool:
        """Remember a policy version; True if it was not seen before."""
        with self.db.transaction():
            rows = self.db.execute("SELECT hash FROM policy_versions WHERE hash = ?", (digest,))
            if rows:
                return False
            self.db.execute("INSERT INTO policy_versions (hash, loaded_at) VALUES (?, ?)",
                            (digest, at))
            return True

    def note_time_limit(self, job_id: str, seconds: float, at: str) -> None:
        """Remember a job's time limit (the gate knows it; nodes do not).

        A hint for the grant's lifetime, which falls back to
        ``default_grant_s``, so it is written without its own fsync: the
        gate's decision event is the durable record of the gate.
        """
        self.db.execute_unsynced(
            "INSERT INTO job_limits (job_id, time_limit_s, noted) VALUES (?, ?, ?) "
            "ON CONFLICT (job_id) DO UPDATE SET time_limit_s = "
            "excluded.time_limit_s, noted = excluded.noted", (job_id, int(seconds), at))

    def time_limit(self, job_id: str) -> float | None:
        rows = self.db.execute("SELECT time_limit_s FROM job_limits WHERE job_id = ?",
                               (job_id,))
        return float(rows[0][0]) if rows else None

