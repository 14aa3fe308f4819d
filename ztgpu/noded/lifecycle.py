"""A job's grant, from Prolog to Epilog: checks, grants, releases, refusals, revocation.

Every grant, release and refusal is spooled before the hook that asked is
answered. A job refused on this node is ended (never the node drained); a
revoked job loses its GPUs at once and is ended.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from ztgpu.cgroups.device_allowlist import CharDevice
from ztgpu.cgroups.device_files import apply_state
from ztgpu.errors import CgroupError, DeviceError, Fault, InputRejected
from ztgpu.gpu.backend import GpuInfo
from ztgpu.gpu.device_state import boot_clock_us
from ztgpu.noded.core import AgentCore, LiveJob, gpu_fields, log, parse_time
from ztgpu.noded.grant_check import GrantRefused
from ztgpu.noded.state import JobRecord
from ztgpu.slurm.env import check_user, parse_gpus, parse_job_id, parse_word


class Lifecycle(AgentCore):
    """Prolog, Epilog, refusals and revocation."""

    def _check_job(self, job: Any) -> tuple[str, int, str, int, list[GpuInfo]]:
        if not isinstance(job, dict):
            raise InputRejected("'job' must be an object")
        job_id = parse_job_id(job.get("job_id") if isinstance(job.get("job_id"), str) else None)
        uid = job.get("uid")
        if not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid < 2**32 - 1:
            raise InputRejected("'uid' must be a non-negative integer")
        user = job.get("user")
        gid = check_user(user if isinstance(user, str) else None, uid)
        assert isinstance(user, str)
        raw = job.get("gpus")
        if not isinstance(raw, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in raw):
            raise InputRejected("'gpus' must be a list of GPU indices")
        indices = parse_gpus(",".join(str(i) for i in raw))
        missing = [i for i in indices if i >= len(self.inventory)]
        if missing:
            raise InputRejected(f"GPU index {missing[0]} is not in this node's inventory "
                                f"of {len(self.inventory)} GPUs")
        return job_id, uid, user, gid, [self.inventory[i] for i in indices]

    def prolog(self, job: Any) -> dict[str, Any]:
        """Grant the job its GPUs. Raises InputRejected (job refused) or Fault (node unsafe)."""
        try:
            job_id, uid, user, gid, gpus = self._check_job(job)
        except InputRejected as exc:
            self._refuse("prolog", str(exc), job)
            raise
        if self.unsafe:
            reason = "; ".join(self.unsafe)
            self.spool.append("job.refused", job_id=job_id, uid=uid, user=user,
                              outcome="node_unsafe", reason=reason[:500])
            raise Fault(reason)
        grant: dict[str, Any] = {}
        if self.grant_checker is not None:
            jti = self._check_grant(job, job_id, uid, user, gpus)
            if jti is not None:
                grant = {"jti": jti}  # links this record to authd's auth.grant
        if self.guard is not None and self.guard.check():
            # The node cannot account for new work: like a node that fails a
            # health check, it takes no more jobs (Slurm drains it and
            # requeues this one) until its audit backlog drains.
            reason = self.guard.refusal()
            self.spool.append("job.refused", job_id=job_id, uid=uid, user=user,
                              outcome="refused", reason=reason)
            raise Fault(reason)
        record = JobRecord(job_id=job_id, uid=uid, gid=gid, user=user,
                           minors=tuple(g.minor for g in gpus),
                           granted_at=self.clock().isoformat(),
                           partition=parse_word(job.get("partition")),
                           account=parse_word(job.get("account")),
                           granted_us=boot_clock_us(), ecc_at_grant=self.ecc_counts(gpus))
        with self.lock:
            held = self._check_held([g.minor for g in gpus])
            # A GPU an earlier job's data may still be on (a wipe that failed or
            # never finished, or was skipped while a stuck holder kept it) is
            # wiped now, before it is granted; a no-op when nothing is dirty.
            held = held or self.check_dirty([g.minor for g in gpus], job_id=job_id)
            if held:
                reason = "; ".join(held)
                self.spool.append("job.refused", job_id=job_id, uid=uid, user=user,
                                  outcome="node_unsafe", reason=reason[:500])
                raise Fault(reason)
            existing = self.jobs.get(job_id)
            if existing is not None and existing.record.uid != uid:
                self._refuse("prolog", f"job {job_id} is already registered for uid "
                             f"{existing.record.uid}", job)
                raise InputRejected(f"job {job_id} is already registered for another user")
            for gpu in gpus:
                _, holder = self._expected_state(gpu.minor)
                if holder is not None and holder.job_id != job_id and self._stale(holder):
                    self._release_stale(holder)
                    _, holder = self._expected_state(gpu.minor)
                if holder is not None and holder.job_id != job_id:
                    reason = (f"GPU {gpu.index} (minor {gpu.minor}) is still held by job "
                              f"{holder.job_id}")
                    self._refuse("prolog", reason, job)
                    raise InputRejected(reason)
            self.state.put(record)
            live = LiveJob(record=record)
            self.jobs[job_id] = live
            try:
                for gpu in gpus:
                    apply_state(self.device_path(gpu), self.major, gpu.minor,
                                self._held_state(record))
                if existing is not None:  # Prolog rerun (e.g. requeue) with other GPUs
                    for minor in set(existing.record.minors) - set(record.minors):
                        if minor in self.by_minor:
                            apply_state(self.device_path(self.by_minor[minor]), self.major,
                                        minor, self._expected_state(minor)[0])
            except (DeviceError, CgroupError) as exc:
                self._undo_grant(live)
                self.spool.append("enforcement.failed", job_id=job_id, uid=uid, user=user,
                                  gpus=gpu_fields(gpus), outcome="node_unsafe",
                                  reason=str(exc))
                raise Fault(str(exc)) from exc
            self.spool.append("job.grant", job_id=job_id, uid=uid, user=user,
                              gpus=gpu_fields(gpus), outcome="granted", reason="", **grant)
        self.write_job_mapping()
        return {"job_id": job_id, "gpus": gpu_fields(gpus)}

    def _check_grant(self, job: Any, job_id: str, uid: int, user: str,
                     gpus: list[GpuInfo]) -> str | None:
        """The grant's jti; refuse the job (recorded, cancelled, node stays up)
        without a valid grant. None when allowed without authd."""
        assert self.grant_checker is not None
        with self.lock:
            held = sum(len(j.record.minors) for j in self.jobs.values()
                       if j.record.uid == uid and j.record.job_id != job_id)
        try:
            claims = self.grant_checker.check(
                job_id=job_id, uid=uid, user=user, gpus=gpu_fields(gpus),
                partition=parse_word(job.get("partition")),
                account=parse_word(job.get("account")), held_on_node=held)
        except GrantRefused as exc:
            self._refuse("prolog", str(exc), job)
            raise InputRejected(str(exc)) from None
        if claims is None:
            self.spool.append("job.action", job_id=job_id, uid=uid, user=user,
                              action="grant_without_authd", outcome="allowed",
                              reason="authd unreachable; auth.unreachable_action is allow")
            return None
        jti = claims.get("jti")
        return jti if isinstance(jti, str) else None

    def revoke_user(self, user: str, reason: str, at: str) -> list[str]:
        """Take the GPUs of ``user``'s jobs granted before ``at``, prove it, end the jobs."""
        cutoff = parse_time(at)

        def granted_before(record: JobRecord) -> bool:
            granted = parse_time(record.granted_at)
            return cutoff is None or granted is None or granted <= cutoff

        with self.lock:
            targets = [live for live in self.jobs.values()
                       if live.record.user == user and granted_before(live.record)
                       and live.record.job_id not in self.revoked_jobs]
            for live in targets:
                # Durable first: a restarted agent must not hand the GPU back.
                self.state.put_revoked(live.record.job_id, f"access revoked: {reason}")
                self.revoked_jobs.add(live.record.job_id)
        for live in targets:
            self._revoke_job(live, reason)
        return [live.record.job_id for live in targets]

    def _revoke_job(self, live: LiveJob, reason: str) -> None:
        record = live.record
        own = [CharDevice(self.major, m) for m in record.minors]
        with self.work_lock:
            for minor in record.minors:
                gpu = self.by_minor.get(minor)
                if gpu is not None:
                    try:
                        apply_state(self.device_path(gpu), self.major, minor, self.rest)
                    except DeviceError as exc:
                        log.error("revoking job %s: %s", record.job_id, exc)
            if self.steps is not None:
                self._revoke_steps(live)
            else:
                cgroups = set(live.hardened)
                mine = self.devices.path(f"{self.own_cgroup}/job_{record.job_id}")
                if mine.exists():
                    cgroups.add(mine)
                for cgroup in cgroups:
                    with contextlib.suppress(CgroupError):
                        self.devices.deny(cgroup, own)
        # Nothing opens them any more; now end whatever still has them open,
        # the job's own processes included.
        stuck = self._take_back(record.minors, context="revoke", job=record)
        self.spool.append("job.action", job_id=record.job_id, uid=record.uid,
                          user=record.user, action="revoke",
                          outcome="failed" if stuck else "access_removed",
                          reason="; ".join([f"access revoked: {reason}", *stuck])[:500])
        for cgroup in list(live.probed):
            live.probed[cgroup] = 0.0  # probe again now, against "no GPU at all"
        self.verify(record.job_id)
        self._act_on_job(record.job_id, f"access revoked: {reason}")

    def epilog(self, job: Any) -> dict[str, Any]:
        """Take the job's GPUs back. Raises Fault if a device could not be restored.

        Only the job id matters here: whatever else the Epilog's environment
        says (a user deleted meanwhile, say), a known job's grant is undone.
        """
        raw = job.get("job_id") if isinstance(job, dict) else None
        try:
            job_id = parse_job_id(raw if isinstance(raw, str) else None)
        except InputRejected as exc:
            self._refuse("epilog", str(exc), job)
            raise
        with self.lock:
            live = self.jobs.get(job_id)
            if live is None:
                # Never granted (refused, or no GPU); make sure nothing is left open.
                problems = self._reconcile_files()
                if problems:
                    raise Fault("; ".join(problems))
                return {"job_id": job_id, "released": []}
        held = [self.by_minor[m] for m in live.record.minors if m in self.by_minor]
        problems = self._release(live, "")
        if problems:
            raise Fault("; ".join(problems))
        return {"job_id": job_id, "released": gpu_fields(held)}

    def _stale(self, record: JobRecord) -> bool:
        """A grant whose job has left no trace on this node for a while (its
        Epilog never reached the agent, e.g. while the agent was down)."""
        live = self.jobs.get(record.job_id)
        if live is None or (time.monotonic() - live.granted_mono
                            < self.config.isolation.stale_grant_s):
            return False
        return not self._has_cgroups(record)

    def _release_stale(self, record: JobRecord) -> None:
        self._release(self.jobs[record.job_id], "stale grant: the job has no processes on "
                      "this node and its Epilog never reached the agent")

    def _release(self, live: LiveJob, why: str) -> list[str]:
        """Undo the job's grant and record it; returns what could not be restored.

        The GPUs' files go to rest first, then every process still holding
        them is ended, and only then is the grant forgotten (the GPUs free).
        A GPU a process would not let go of stays held (see ``_take_back``).
        """
        record = live.record
        held = [self.by_minor[m] for m in record.minors if m in self.by_minor]
        with self.lock:
            self.releasing.add(record.job_id)
        self.record_usage(record)
        with self.lock:
            for gpu in held:  # rest now: the job's record no longer counts
                with contextlib.suppress(DeviceError):  # retried, and reported, below
                    apply_state(self.device_path(gpu), self.major, gpu.minor,
                                self._expected_state(gpu.minor)[0])
        stuck = self._take_back(record.minors, context="release", job=record)
        # Nobody holds them now: wipe their memory before anyone else gets them.
        dirty = self.wipe(record.minors, job_id=record.job_id,
                          mode=self.wipe_mode(record.partition), context="release")
        unhealthy = self.check_state(record)
        with self.lock:
            problems = self._undo_grant(live)
            self.revoked_jobs.discard(record.job_id)
            self.releasing.discard(record.job_id)
            self.spool.append("job.release", job_id=record.job_id, uid=record.uid,
                              user=record.user, gpus=gpu_fields(held),
                              outcome="failed" if problems else "held" if stuck
                              else "dirty" if dirty else "unhealthy" if unhealthy
                              else "released",
                              reason="; ".join([r for r in (why, *problems, *stuck, *dirty,
                                                            *unhealthy) if r])[:500])
        self.write_job_mapping()
        return problems + stuck + dirty + unhealthy

    def _undo_grant(self, live: LiveJob) -> list[str]:
        """Restore rest state for the job's GPUs and forget it; returns problems."""
        problems = []
        self.jobs.pop(live.record.job_id, None)
        for minor in live.record.minors:
            gpu = self.by_minor.get(minor)
            if gpu is None:
                continue
            wanted, _ = self._expected_state(minor)
            try:
                apply_state(self.device_path(gpu), self.major, minor, wanted)
            except DeviceError as exc:
                problems.append(str(exc))
        if self.steps is not None:
            problems.extend(self._release_steps(live))
        else:
            cgroup = self.devices.path(f"{self.own_cgroup}/job_{live.record.job_id}")
            if cgroup.exists() and not self.devices.remove(cgroup):
                self.stale_cgroups.add(cgroup)
        if problems:
            self.jobs[live.record.job_id] = live
        else:
            self.state.delete(live.record.job_id)
        return problems

    def _refuse(self, hook: str, reason: str, job: Any) -> None:
        raw = job.get("job_id") if isinstance(job, dict) else None
        fields: dict[str, Any] = {"outcome": "refused", "reason": f"{hook}: {reason}"}
        job_id: str | None = None
        with contextlib.suppress(InputRejected):
            job_id = parse_job_id(raw if isinstance(raw, str) else None)
            fields["job_id"] = job_id
        uid = job.get("uid") if isinstance(job, dict) else None
        if isinstance(uid, int) and not isinstance(uid, bool) and 0 <= uid < 2**32:
            fields["uid"] = uid
        if isinstance(job, dict) and isinstance(job.get("user"), str):
            fields["user"] = job["user"][:64]
        self.spool.append("job.refused", **fields)
        if job_id is not None and hook == "prolog":
            self._act_on_job(job_id, f"refused on this node: {reason}")

    def refused(self, hook: Any, reason: Any, job_id: Any) -> dict[str, Any]:
        """A hook could not parse the job environment; record it (and end the job)."""
        if hook not in ("prolog", "epilog") or not isinstance(reason, str):
            raise InputRejected("'hook' must be prolog or epilog and 'reason' a string")
        self.spool.append("hook.error", hook=hook, reason=reason[:500],
                          outcome="refused")
        candidate = job_id if isinstance(job_id, str) else None
        self._refuse(hook, reason[:500], {"job_id": candidate})
        return {"recorded": True}
