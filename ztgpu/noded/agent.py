"""The node agent's decisions and enforcement, independent of its socket.

Guarantees, on a node where the agent runs:

* GPU device files are at their configured rest state (default
  ``root:root 0600``) unless a job holds them; a job's GPUs belong to its
  user only between its Prolog and its Epilog.
* Every process of a running job is in a devices cgroup that denies the
  GPUs the job was not given: Slurm's own (``ConstrainDevices=yes``), to
  which the agent adds its denies, or the agent's own per-job cgroup
  (``ConstrainDevices=no``).
* Isolation is probed, not assumed: once a job's processes exist the agent
  opens every GPU from inside each of the job's devices cgroups as the job's
  user and compares the outcome with the allocation. A mismatch is a
  critical event and triggers ``isolation.on_violation``.
* Every grant, release, refusal, probe result and drift is spooled before
  the request that caused it is answered.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import pwd
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from ztgpu import __version__
from ztgpu.cgroups.device_allowlist import CharDevice, DevicesV1
from ztgpu.cgroups.device_files import FileState, apply_state, read_state
from ztgpu.config import Config
from ztgpu.errors import CgroupError, Denied, DeviceError, Fault, InputRejected, SlurmError
from ztgpu.gpu.backend import GpuBackend, GpuInfo, slurm_order
from ztgpu.gpu.devices import gpu_device_path
from ztgpu.noded import job_cgroups
from ztgpu.noded.backlog import SpoolGuard
from ztgpu.noded.grant_check import GrantChecker, GrantRefused
from ztgpu.noded.state import JobRecord, StateStore
from ztgpu.slurm_client import SlurmClient
from ztgpu.slurm_env import check_user, parse_gpus, parse_job_id, parse_word

log = logging.getLogger("ztgpu.noded")

PROBE_CHILD = Path(__file__).with_name("probe_child.py")
#: After a grant, look for the job's first processes this often, for this long.
FAST_SWEEP_S = 0.02
FAST_SWEEP_WINDOW_S = 15.0


class EventSink(Protocol):
    """What the agent needs from the audit spool (``ztgpu.spool.Spool`` fits)."""

    def append(self, code: str, **fields: Any) -> dict[str, Any]: ...


@dataclass
class LiveJob:
    """In-memory companion of a :class:`JobRecord`: what the sweeps learned."""

    record: JobRecord
    granted_mono: float = field(default_factory=time.monotonic)
    #: Devices cgroups (absolute dirs) the agent already hardened.
    hardened: set[Path] = field(default_factory=set)
    #: Devices cgroups probed, with the monotonic time of the last probe.
    probed: dict[Path, float] = field(default_factory=dict)
    confined: bool = False
    violated: bool = False


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _parse_time(text: str) -> datetime | None:
    """An RFC 3339 / ISO time as an aware datetime (None if unreadable)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _gpu_fields(gpus: list[GpuInfo]) -> list[dict[str, Any]]:
    return [{"index": g.index, "uuid": g.uuid, "minor": g.minor} for g in gpus]


class Agent:
    """State and enforcement for one node. Thread-safe."""

    def __init__(self, config: Config, backend: GpuBackend, spool: EventSink,
                 state: StateStore, slurm: SlurmClient, *, major: int,
                 devices: DevicesV1 | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.config = config
        self.backend = backend
        self.spool = spool
        self.state = state
        self.slurm = slurm
        self.major = major
        self.clock = clock
        self.devices = devices if devices is not None else DevicesV1(
            config.cgroups.root / "devices")
        self.inventory: tuple[GpuInfo, ...] = slurm_order(backend.inventory())
        self.by_minor = {g.minor: g for g in self.inventory}
        self.lock = threading.RLock()
        #: Serialises sweeps and probes (background loop vs. on-demand verify);
        #: the Prolog/Epilog path never waits for it.
        self.work_lock = threading.RLock()
        self.jobs: dict[str, LiveJob] = {}
        self.stale_cgroups: set[Path] = set()
        self.rest = self._rest_state()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Set by the service when events are forwarded to a collector: the
        #: bounded-spool guard, and a callable giving the forwarding status.
        self.guard: SpoolGuard | None = None
        self.audit_status: Callable[[], dict[str, Any]] | None = None
        #: Set when authd is configured: every grant needs a signed grant.
        self.grant_checker: GrantChecker | None = None
        #: Jobs whose user's access was revoked: no GPU, whatever Slurm allocated.
        self.revoked_jobs: set[str] = set()

    # ---- setup --------------------------------------------------------
    def _rest_state(self) -> FileState:
        dev = self.config.devices
        try:
            uid = pwd.getpwnam(dev.rest_owner).pw_uid
            gid = grp.getgrnam(dev.rest_group).gr_gid
        except KeyError as exc:
            raise Fault(f"devices.rest_owner/rest_group: {exc.args[0]} does not exist") from None
        return FileState(uid=uid, gid=gid, mode=dev.rest_mode_bits)

    def _held_state(self, job: JobRecord) -> FileState:
        return FileState(uid=job.uid, gid=self.rest.gid, mode=self.rest.mode | 0o600)

    def device_path(self, gpu: GpuInfo) -> Path:
        return gpu_device_path(self.config.paths.device_dir, gpu)

    @property
    def own_cgroup(self) -> str:
        return self.config.cgroups.name

    def start(self) -> None:
        """Reload jobs, put every device file in its expected state, record the start."""
        if not self.devices.available():
            log.critical("cgroup v1 devices controller not found under %s: only device-file "
                         "ownership protects GPUs; jobs of one user are not separated",
                         self.devices.root)
        recovered = self.state.all()
        rebooted = self.state.boot_changed(_boot_id())
        if recovered and rebooted:
            for job_id in recovered:
                self.state.delete(job_id)
            self.spool.append("agent.recovered", jobs=sorted(recovered, key=int),
                              outcome="discarded",
                              reason="the node rebooted since these grants were made")
            recovered = {}
        with self.lock:
            for job_id, record in recovered.items():
                self.jobs[job_id] = LiveJob(record=record)
            problems = self._reconcile_files()
        self.spool.append("agent.start", version=__version__, gpu_backend=self.backend.name,
                          gpus=_gpu_fields(list(self.inventory)),
                          outcome="degraded" if problems else "ok",
                          reason="; ".join(problems) if problems else
                          ("simulated GPUs: no real device is protected"
                           if self.backend.simulated else ""))
        if recovered:
            self.spool.append("agent.recovered", jobs=sorted(recovered, key=int),
                              outcome="ok", reason="job grants reloaded from agent state")

    def _expected_state(self, minor: int) -> tuple[FileState, JobRecord | None]:
        for live in self.jobs.values():
            if minor in live.record.minors and live.record.job_id not in self.revoked_jobs:
                return self._held_state(live.record), live.record
        return self.rest, None

    def _reconcile_files(self) -> list[str]:
        problems = []
        for gpu in self.inventory:
            wanted, _ = self._expected_state(gpu.minor)
            try:
                apply_state(self.device_path(gpu), self.major, gpu.minor, wanted)
            except DeviceError as exc:
                problems.append(str(exc))
                log.error("%s", exc)
        return problems

    # ---- requests -----------------------------------------------------
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
        if self.grant_checker is not None:
            self._check_grant(job, job_id, uid, user, gpus)
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
                           granted_at=self.clock().isoformat())
        with self.lock:
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
                                  gpus=_gpu_fields(gpus), outcome="node_unsafe",
                                  reason=str(exc))
                raise Fault(str(exc)) from exc
            self.spool.append("job.grant", job_id=job_id, uid=uid, user=user,
                              gpus=_gpu_fields(gpus), outcome="granted", reason="")
        return {"job_id": job_id, "gpus": _gpu_fields(gpus)}

    def _check_grant(self, job: Any, job_id: str, uid: int, user: str,
                     gpus: list[GpuInfo]) -> None:
        """Refuse the job (recorded, cancelled, node stays up) without a valid grant."""
        assert self.grant_checker is not None
        with self.lock:
            held = sum(len(j.record.minors) for j in self.jobs.values()
                       if j.record.uid == uid and j.record.job_id != job_id)
        try:
            token = self.grant_checker.check(
                job_id=job_id, uid=uid, user=user, gpus=_gpu_fields(gpus),
                partition=parse_word(job.get("partition")),
                account=parse_word(job.get("account")), held_on_node=held)
        except GrantRefused as exc:
            self._refuse("prolog", str(exc), job)
            raise InputRejected(str(exc)) from None
        if token is None:
            self.spool.append("job.action", job_id=job_id, uid=uid, user=user,
                              action="grant_without_authd", outcome="allowed",
                              reason="authd unreachable; auth.unreachable_action is allow")

    def revoke_user(self, user: str, reason: str, at: str) -> list[str]:
        """Take the GPUs of ``user``'s jobs granted before ``at``, prove it, end the jobs."""
        cutoff = _parse_time(at)

        def granted_before(record: JobRecord) -> bool:
            granted = _parse_time(record.granted_at)
            return cutoff is None or granted is None or granted <= cutoff

        with self.lock:
            targets = [live for live in self.jobs.values()
                       if live.record.user == user and granted_before(live.record)
                       and live.record.job_id not in self.revoked_jobs]
            for live in targets:
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
            cgroups = set(live.hardened)
            mine = self.devices.path(f"{self.own_cgroup}/job_{record.job_id}")
            if mine.exists():
                cgroups.add(mine)
            for cgroup in cgroups:
                with contextlib.suppress(CgroupError):
                    self.devices.deny(cgroup, own)
        self.spool.append("job.action", job_id=record.job_id, uid=record.uid,
                          user=record.user, action="revoke", outcome="access_removed",
                          reason=f"access revoked: {reason}"[:300])
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
        return {"job_id": job_id, "released": _gpu_fields(held)}

    def _stale(self, record: JobRecord) -> bool:
        """A grant whose job has left no trace on this node for a while (its
        Epilog never reached the agent, e.g. while the agent was down)."""
        live = self.jobs.get(record.job_id)
        if live is None or (time.monotonic() - live.granted_mono
                            < self.config.isolation.stale_grant_s):
            return False
        found = job_cgroups.find_job_cgroups(self.config.cgroups.root, record.uid,
                                             record.job_id)
        return not found.freezer and not found.devices

    def _release_stale(self, record: JobRecord) -> None:
        self._release(self.jobs[record.job_id], "stale grant: the job has no processes on "
                      "this node and its Epilog never reached the agent")

    def _release(self, live: LiveJob, why: str) -> list[str]:
        """Undo the job's grant and record it; returns what could not be restored."""
        record = live.record
        held = [self.by_minor[m] for m in record.minors if m in self.by_minor]
        problems = self._undo_grant(live)
        self.revoked_jobs.discard(record.job_id)
        self.spool.append("job.release", job_id=record.job_id, uid=record.uid,
                          user=record.user, gpus=_gpu_fields(held),
                          outcome="failed" if problems else "released",
                          reason="; ".join([why, *problems] if why else problems))
        return problems

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

    def _act_on_job(self, job_id: str, reason: str) -> None:
        """End the job in the background (Slurm commands may take seconds)."""
        def work() -> None:
            try:
                self.slurm.cancel(job_id, reason)
                outcome, detail = "cancelled", reason
            except SlurmError as exc:
                outcome, detail = "failed", f"{reason}; cancel failed: {exc}"
                log.error("could not cancel job %s: %s", job_id, exc)
            self.spool.append("job.action", job_id=job_id, action="cancel_job",
                              outcome=outcome, reason=detail)
        threading.Thread(target=work, name=f"cancel-{job_id}", daemon=True).start()

    def status(self) -> dict[str, Any]:
        with self.lock:
            jobs = [{"job_id": j.record.job_id, "user": j.record.user, "uid": j.record.uid,
                     "gpus": [self.by_minor[m].index for m in j.record.minors
                              if m in self.by_minor],
                     "confined": j.confined, "verified_cgroups": len(j.probed),
                     "violated": j.violated}
                    for j in self.jobs.values()]
        audit: dict[str, Any] = {"forwarding": self.audit_status is not None}
        if self.audit_status is not None:
            audit.update(self.audit_status())
        return {"node": self.config.node_name, "backend": self.backend.name,
                "simulated": self.backend.simulated,
                "gpus": _gpu_fields(list(self.inventory)), "jobs": jobs, "audit": audit}

    def on_spool_full(self) -> None:
        """The guard's hook: with ``cancel_jobs``, end every running GPU job here."""
        if self.config.audit.spool_full_action != "cancel_jobs":
            return
        with self.lock:
            running = list(self.jobs)
        for job_id in running:
            self._act_on_job(job_id, "ztgpu: the node's audit spool is full; GPU work "
                             "cannot be accounted for")

    # ---- confinement --------------------------------------------------
    def _denied_for(self, record: JobRecord) -> list[CharDevice]:
        revoked = record.job_id in self.revoked_jobs
        return [CharDevice(self.major, g.minor) for g in self.inventory
                if revoked or g.minor not in record.minors]

    def _prepare_own_cgroup(self, record: JobRecord) -> None:
        if not self.devices.available():
            return
        cgroup = self.devices.ensure(f"{self.own_cgroup}/job_{record.job_id}")
        self.devices.deny(cgroup, self._denied_for(record))

    def sweep(self) -> None:
        """Confine every process of every local job (and retry leftover cgroup removals)."""
        with self.work_lock:
            with self.lock:
                jobs = list(self.jobs.values())
            for live in jobs:
                try:
                    self._confine(live)
                except CgroupError as exc:
                    self.spool.append("enforcement.failed", job_id=live.record.job_id,
                                      uid=live.record.uid, user=live.record.user,
                                      outcome="error", reason=str(exc))
            for cgroup in list(self.stale_cgroups):
                if self.devices.remove(cgroup, attempts=1):
                    self.stale_cgroups.discard(cgroup)

    def _place(self, live: LiveJob, pid: int) -> Path | None:
        """Make sure *pid* sits in a devices cgroup that denies the job's other GPUs.

        A pid already in one of Slurm's cgroups for this job gets our denies
        added there (once per cgroup); any other pid is moved into the agent's
        own cgroup for the job. Returns the cgroup, or None if the pid is
        gone or the job was released meanwhile (its cgroup is not recreated).
        """
        record = live.record
        path = job_cgroups.devices_cgroup_of(pid)
        if path is None:
            return None
        if job_cgroups.in_job_cgroup(path, record.job_id):
            cgroup = self.devices.path(path)
            if cgroup not in live.hardened:
                self.devices.deny(cgroup, self._denied_for(record))
                live.hardened.add(cgroup)
            return cgroup
        own = self.devices.path(f"{self.own_cgroup}/job_{record.job_id}")
        with self.lock:
            if record.job_id not in self.jobs:
                return None
            if not own.exists():
                self._prepare_own_cgroup(record)
        return own if self.devices.attach(own, pid) else None

    def _confine(self, live: LiveJob) -> None:
        record = live.record
        if not self.devices.available():
            return
        found = job_cgroups.find_job_cgroups(self.config.cgroups.root, record.uid,
                                             record.job_id)
        # Slurm confines the job itself: add our denies at every level, so that
        # narrowing holds even for cgroups no process has entered yet.
        for job_dir in found.devices:
            for cgroup in job_cgroups.subdirs(job_dir):
                if cgroup not in live.hardened:
                    with contextlib.suppress(CgroupError):
                        self.devices.deny(cgroup, self._denied_for(record))
                        live.hardened.add(cgroup)
        pids: set[int] = set()
        for freezer_dir in found.freezer:
            pids |= job_cgroups.cgroup_pids(freezer_dir)
        for pid in sorted(pids):
            placed = self._place(live, pid)
            if placed is None or placed in live.probed:
                continue
            # Probe where the job's user runs code, not where only root
            # processes (slurmstepd, the extern step's holder) live.
            info = job_cgroups.proc_info(pid)
            if info is not None and info[1] == record.uid:
                live.probed.setdefault(placed, 0.0)
        if pids:
            live.confined = True

    def confine_task(self, pid: int, uid: int) -> dict[str, Any]:
        """Place the calling TaskProlog's task in its job's devices cgroup.

        *pid* and *uid* come from the kernel (SO_PEERCRED), not from the
        request. The caller must be in a Slurm job's freezer cgroup, of its
        own uid, for a job this agent granted; its parent (the task that will
        exec the user's program once the TaskProlog returns) is confined too
        when it belongs to the same job and user. Only ever narrows access.

        Raises:
            Denied: the caller is not a task of a job known here.
        """
        owner = job_cgroups.job_of_pid(pid)
        if owner is None:
            raise Denied("caller is not a process of a Slurm job")
        job_uid, job_id = owner
        if job_uid != uid:
            raise Denied("caller's uid does not own its job")
        with self.lock:
            live = self.jobs.get(job_id)
        if live is None or live.record.uid != uid:
            raise Denied(f"job {job_id} was not granted on this node by ztgpu")
        targets = [pid]
        caller = job_cgroups.proc_info(pid)
        if caller is not None:
            ppid = caller[0]
            theirs = job_cgroups.proc_info(ppid)
            if theirs is not None and theirs[1] == uid and job_cgroups.job_of_pid(ppid) == owner:
                targets.append(ppid)
        if not self.devices.available():
            return {"job_id": job_id, "confined": [], "cgroup": None}
        placed = {target: self._place(live, target) for target in targets}
        mine = placed[pid]
        if mine is None:
            raise Denied(f"job {job_id} is no longer granted on this node")
        live.probed.setdefault(mine, 0.0)
        live.confined = True
        return {"job_id": job_id, "confined": [t for t, cg in placed.items() if cg],
                "cgroup": str(mine.relative_to(self.devices.root))}

    # ---- probing ------------------------------------------------------
    def probe_paths(self) -> list[Path]:
        paths = [self.device_path(g) for g in self.inventory]
        ctl = self.config.paths.device_dir / "nvidiactl"
        if ctl.exists():
            paths.append(ctl)
        return paths

    def run_probes(self, targets: list[tuple[Path, int, int]]
                   ) -> list[dict[str, dict[str, str]] | str]:
        """Open every GPU from inside each (cgroup, uid, gid), as root and as uid:gid.

        One helper process serves the whole batch (it forks per target).
        Each entry is ``{"cgroup_only": {...}, "user": {...}}`` mapping a path
        to ``open`` or the errno name that refused it, or an error string.

        Raises:
            Fault: the helper could not run or answered garbage.
        """
        request = json.dumps({
            "paths": [str(p) for p in self.probe_paths()],
            "targets": [{"cgroup_procs": [str(cg / "cgroup.procs")], "uid": uid, "gid": gid}
                        for cg, uid, gid in targets]})
        timeout = self.config.isolation.probe_timeout_s * max(1, len(targets))
        try:
            res = subprocess.run([sys.executable, "-I", "-S", str(PROBE_CHILD)],
                                 input=request, capture_output=True, text=True,
                                 timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise Fault(f"isolation probe timed out after {timeout:g}s") from None
        try:
            answers = json.loads(res.stdout)
        except ValueError:
            raise Fault(f"isolation probe failed: {res.stderr.strip()[-300:]}") from None
        if not isinstance(answers, list) or len(answers) != len(targets):
            raise Fault("isolation probe answered garbage")
        results: list[dict[str, dict[str, str]] | str] = []
        for answer in answers:
            if (isinstance(answer, dict)
                    and all(isinstance(answer.get(k), dict) for k in ("cgroup_only", "user"))):
                results.append({layer: {str(k): str(v) for k, v in answer[layer].items()}
                                for layer in ("cgroup_only", "user")})
            else:
                error = answer.get("error") if isinstance(answer, dict) else None
                results.append(str(error or "malformed probe answer"))
        return results

    def compare(self, record: JobRecord, outcome: Mapping[str, Mapping[str, str]]
                ) -> list[str]:
        """Differences between a probe's outcome and the job's allocation.

        The job's user must open exactly its GPUs (and nvidiactl); on its own,
        the cgroup must refuse every other GPU with EPERM, so that isolation
        does not rest on file permissions alone.
        """
        problems = []
        user, cgroup_only = outcome.get("user", {}), outcome.get("cgroup_only", {})
        allocated = set() if record.job_id in self.revoked_jobs else set(record.minors)
        for gpu in self.inventory:
            path = str(self.device_path(gpu))
            got = user.get(path, "missing")
            layer = cgroup_only.get(path, "missing")
            if gpu.minor in allocated:
                if got != "open":
                    problems.append(f"allocated GPU {gpu.index} (minor {gpu.minor}) gave {got}")
                continue
            if got not in ("EPERM", "EACCES"):
                problems.append(f"GPU {gpu.index} (minor {gpu.minor}) not allocated "
                                f"but {'opened' if got == 'open' else 'gave ' + got}")
            if self.devices.available() and layer != "EPERM":
                problems.append(f"cgroup does not deny GPU {gpu.index} (minor {gpu.minor}): "
                                f"{'opened' if layer == 'open' else layer} as root")
        ctl = str(self.config.paths.device_dir / "nvidiactl")
        if ctl in user and user[ctl] != "open":
            problems.append(f"nvidiactl gave {user[ctl]}")
        return problems

    def verify(self, job_id: str | None = None, *, due_only: bool = False) -> list[dict[str, Any]]:
        """Probe jobs' cgroups now; record and act on the outcome; return per-cgroup results.

        With *due_only* (the background loop), only cgroups never probed or
        not probed for ``verify_interval_s`` are probed, and a passing
        re-probe is not recorded again (violations always are).
        """
        with self.work_lock:
            return self._verify(job_id, due_only)

    def _verify(self, job_id: str | None, due_only: bool) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self.lock:
            jobs = [j for j in self.jobs.values() if job_id in (None, j.record.job_id)]
        due: list[tuple[LiveJob, Path, float]] = []
        for live in jobs:
            for cgroup, last in list(live.probed.items()):
                if due_only and last and now - last < self.config.isolation.verify_interval_s:
                    continue
                if not cgroup.exists():
                    live.probed.pop(cgroup, None)
                    continue
                due.append((live, cgroup, last))
        if not due:
            return []
        try:
            outcomes = self.run_probes([(cg, live.record.uid, live.record.gid)
                                        for live, cg, _ in due])
        except Fault as exc:
            outcomes = [str(exc)] * len(due)
        results = []
        for (live, cgroup, last), outcome in zip(due, outcomes, strict=True):
            if isinstance(outcome, str):
                if not cgroup.exists():  # the step ended while being probed
                    live.probed.pop(cgroup, None)
                    continue
                layers: dict[str, dict[str, str]] = {"cgroup_only": {}, "user": {}}
                problems = [f"probe failed: {outcome}"]
            else:
                layers, problems = outcome, self.compare(live.record, outcome)
            live.probed[cgroup] = time.monotonic()
            results.append(self._record_probe(live, cgroup, layers, problems,
                                              announce=not (due_only and last)))
        return results

    def _record_probe(self, live: LiveJob, cgroup: Path,
                      outcome: Mapping[str, Mapping[str, str]],
                      problems: list[str], announce: bool = True) -> dict[str, Any]:
        record = live.record
        gpus = _gpu_fields([self.by_minor[m] for m in record.minors if m in self.by_minor])
        rel = str(cgroup.relative_to(self.devices.root))
        probe = {"cgroup": rel,
                 **{layer: {Path(k).name: v for k, v in result.items()}
                    for layer, result in outcome.items()}}
        if not problems:
            if announce and not live.violated:
                self.spool.append("isolation.verified", job_id=record.job_id, uid=record.uid,
                                  user=record.user, gpus=gpus, probe=probe, outcome="ok",
                                  reason="")
            return {"job_id": record.job_id, "cgroup": rel, "ok": True, **probe}
        action = self.config.isolation.on_violation
        first = not live.violated
        live.violated = True
        self.spool.append("isolation.violated", job_id=record.job_id, uid=record.uid,
                          user=record.user, gpus=gpus, probe=probe, action=action,
                          outcome="violation", reason="; ".join(problems))
        log.critical("isolation violated for job %s in %s: %s", record.job_id, rel,
                     "; ".join(problems))
        if action == "cancel_job" and first:
            self._act_on_job(record.job_id, "GPU isolation could not be verified: "
                             + problems[0])
        return {"job_id": record.job_id, "cgroup": rel, "ok": False, "problems": problems,
                **probe}

    # ---- drift --------------------------------------------------------
    def check_drift(self) -> list[dict[str, Any]]:
        """Find device files someone else changed, record and restore them."""
        found = []
        with self.lock:
            for gpu in self.inventory:
                path = self.device_path(gpu)
                wanted, _ = self._expected_state(gpu.minor)
                try:
                    current = read_state(path, self.major, gpu.minor)
                except DeviceError as exc:
                    self.spool.append("device.drift", path=str(path), expected=wanted.describe(),
                                      found=str(exc), action="none", outcome="unrecoverable",
                                      reason=str(exc))
                    found.append({"path": str(path), "found": str(exc)})
                    continue
                if current == wanted:
                    continue
                try:
                    apply_state(path, self.major, gpu.minor, wanted)
                    outcome = "restored"
                except DeviceError as exc:
                    outcome = f"restore failed: {exc}"
                self.spool.append("device.drift", path=str(path), expected=wanted.describe(),
                                  found=current.describe(), action="restore", outcome=outcome,
                                  reason="device file changed outside ztgpu (e.g. the driver "
                                         "with NVreg_ModifyDeviceFiles=1)")
                found.append({"path": str(path), "found": current.describe(),
                              "expected": wanted.describe(), "outcome": outcome})
        return found

    # ---- background loop ----------------------------------------------
    def run_background(self) -> None:
        """Start the sweep/verify/drift loop in a thread."""
        thread = threading.Thread(target=self._loop, name="ztgpu-sweep", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _loop(self) -> None:
        iso = self.config.isolation
        next_drift = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sweep()
                if self.guard is not None:
                    self.guard.check()
                if self.jobs:
                    self.verify(due_only=True)
                now = time.monotonic()
                if now >= next_drift:
                    self.check_drift()
                    next_drift = now + iso.drift_interval_s
            except Exception:
                log.exception("background check failed")
            self._stop.wait(self._interval())

    def _interval(self) -> float:
        now = time.monotonic()
        with self.lock:
            waiting = any(not j.confined and now - j.granted_mono < FAST_SWEEP_WINDOW_S
                          for j in self.jobs.values())
        return FAST_SWEEP_S if waiting else self.config.isolation.sweep_interval_s

    def stop(self, reason: str) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.spool.append("agent.stop", reason=reason, outcome="ok")
