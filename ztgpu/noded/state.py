"""The agent's durable record of which local jobs hold which GPUs.

Kept in SQLite (WAL, synchronous=FULL) under ``paths.state_dir`` so that a
restarted agent knows, before it serves any request, which device files
belong to which job.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztgpu.errors import Fault


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    uid: int
    gid: int
    user: str
    #: Minor numbers of the GPUs granted to the job.
    minors: tuple[int, ...]
    granted_at: str
    #: The job's Slurm partition, as its Prolog said (its wipe mode).
    partition: str | None = None
    #: The job's Slurm account (the project: the collector's baselines).
    account: str | None = None
    #: When the grant was made, on the kernel log's clock (µs since boot):
    #: Xid events from then on are the job's (grants do not outlive a boot).
    granted_us: int = 0
    #: Volatile uncorrectable ECC errors of each GPU (by minor) at the grant,
    #: where they could be read: only errors after it are the job's.
    ecc_at_grant: tuple[tuple[int, int], ...] = ()


class StateStore:
    """Jobs granted on this node; every change is committed before it returns."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, uid INTEGER NOT NULL,"
                " gid INTEGER NOT NULL, user TEXT NOT NULL, minors TEXT NOT NULL,"
                " granted_at TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            # What else the agent learned at a grant (partition, clock, ECC
            # counts), as JSON: a table of its own, so that state written by
            # an earlier version still opens.
            self._db.execute("CREATE TABLE IF NOT EXISTS job_meta (job_id TEXT PRIMARY KEY,"
                             " meta TEXT NOT NULL)")
            # Jobs whose user's access was revoked: they stay without GPUs after a
            # restart of the agent until their Epilog (or a reboot) ends them.
            self._db.execute("CREATE TABLE IF NOT EXISTS revoked (job_id TEXT PRIMARY KEY,"
                             " reason TEXT NOT NULL)")
            # GPUs a process would not let go of: never granted until it is gone,
            # across restarts of the agent (a reboot ends the process).
            self._db.execute("CREATE TABLE IF NOT EXISTS held (minor INTEGER PRIMARY KEY,"
                             " reason TEXT NOT NULL)")
            # GPUs whose memory a job used and no wipe has yet cleared: never
            # granted until a wipe succeeds, across crashes and reboots.
            self._db.execute("CREATE TABLE IF NOT EXISTS dirty (minor INTEGER PRIMARY KEY,"
                             " job_id TEXT NOT NULL, reason TEXT NOT NULL)")
        except sqlite3.Error as exc:
            raise Fault(f"cannot open agent state {path}: {exc}") from exc

    def put(self, job: JobRecord) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?)",
                    (job.job_id, job.uid, job.gid, job.user, json.dumps(list(job.minors)),
                     job.granted_at))
                self._db.execute(
                    "INSERT OR REPLACE INTO job_meta VALUES (?, ?)",
                    (job.job_id, json.dumps({"partition": job.partition,
                                             "account": job.account,
                                             "granted_us": job.granted_us,
                                             "ecc_at_grant": list(job.ecc_at_grant)})))
            except sqlite3.Error as exc:
                raise Fault(f"cannot record job {job.job_id} in agent state: {exc}") from exc

    def put_revoked(self, job_id: str, reason: str) -> None:
        """Record a revoked job durably (before its GPUs are taken back)."""
        with self._lock:
            try:
                self._db.execute("INSERT OR REPLACE INTO revoked VALUES (?, ?)",
                                 (job_id, reason[:500]))
            except sqlite3.Error as exc:
                raise Fault(f"cannot record the revocation of job {job_id}: {exc}") from exc

    def revoked(self) -> dict[str, str]:
        """Revoked jobs and why."""
        with self._lock:
            rows = self._db.execute("SELECT job_id, reason FROM revoked").fetchall()
        return {str(job_id): str(reason) for job_id, reason in rows}

    def put_held(self, minor: int, reason: str) -> None:
        """Record that a process still holds the GPU of *minor* (before saying so)."""
        self._write("INSERT OR REPLACE INTO held VALUES (?, ?)", (minor, reason[:500]),
                    f"the hold on GPU minor {minor}")

    def held(self) -> dict[int, str]:
        """GPUs (by minor) still held by a process that would not die, and why."""
        with self._lock:
            rows = self._db.execute("SELECT minor, reason FROM held").fetchall()
        return {int(minor): str(reason) for minor, reason in rows}

    def delete_held(self, minor: int) -> None:
        """The GPU of *minor* is held no more."""
        self._write("DELETE FROM held WHERE minor = ?", (minor,),
                    f"the end of the hold on GPU minor {minor}")

    def put_dirty(self, minor: int, job_id: str, reason: str) -> None:
        """Mark the GPU of *minor* as holding a job's data (before wiping it)."""
        self._write("INSERT OR REPLACE INTO dirty VALUES (?, ?, ?)", (minor, job_id, reason[:500]),
                    f"the dirty mark of GPU minor {minor}")

    def dirty(self) -> dict[int, tuple[str, str]]:
        """GPUs (by minor) not wiped since a job used them: (job id, why)."""
        with self._lock:
            rows = self._db.execute("SELECT minor, job_id, reason FROM dirty").fetchall()
        return {int(minor): (str(job), str(reason)) for minor, job, reason in rows}

    def delete_dirty(self, minor: int) -> None:
        self._write("DELETE FROM dirty WHERE minor = ?", (minor,),
                    f"the end of the dirty mark of GPU minor {minor}")

    def _write(self, sql: str, args: tuple[object, ...], what: str) -> None:
        with self._lock:
            try:
                self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise Fault(f"cannot record {what} in agent state: {exc}") from exc

    def delete(self, job_id: str) -> None:
        """Forget the job (and its revocation, which ends with it)."""
        with self._lock:
            try:
                self._db.execute("DELETE FROM revoked WHERE job_id = ?", (job_id,))
                self._db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
                self._db.execute("DELETE FROM job_meta WHERE job_id = ?", (job_id,))
            except sqlite3.Error as exc:
                raise Fault(f"cannot remove job {job_id} from agent state: {exc}") from exc

    def all(self) -> dict[str, JobRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT jobs.job_id, uid, gid, user, minors, granted_at, meta FROM jobs"
                " LEFT JOIN job_meta ON job_meta.job_id = jobs.job_id").fetchall()
        return {row[0]: JobRecord(job_id=row[0], uid=row[1], gid=row[2], user=row[3],
                                  minors=tuple(json.loads(row[4])), granted_at=row[5],
                                  **_meta(row[6]))
                for row in rows}

    def boot_changed(self, boot_id: str) -> bool:
        """Record *boot_id*; True if the state was written during another boot.

        After a reboot no job from before can still be running, so its
        grants must not be restored.
        """
        with self._lock:
            try:
                row = self._db.execute("SELECT value FROM meta WHERE key = 'boot_id'").fetchone()
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('boot_id', ?)", (boot_id,))
            except sqlite3.Error as exc:
                raise Fault(f"cannot read agent state: {exc}") from exc
        return row is not None and row[0] != boot_id

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _meta(text: str | None) -> dict[str, Any]:
    """A job's extra fields from their JSON (defaults where absent or unreadable)."""
    try:
        meta = json.loads(text) if text else {}
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    partition, account, granted_us, ecc = (meta.get("partition"), meta.get("account"),
                                           meta.get("granted_us"), meta.get("ecc_at_grant"))
    pairs = tuple((int(p[0]), int(p[1])) for p in ecc if isinstance(p, list) and len(p) == 2
                  and all(isinstance(v, int) for v in p)) if isinstance(ecc, list) else ()
    return {"partition": partition if isinstance(partition, str) else None,
            "account": account if isinstance(account, str) else None,
            "granted_us": granted_us if isinstance(granted_us, int) else 0,
            "ecc_at_grant": pairs}
