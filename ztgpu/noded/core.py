"""The node agent's shared state and the primitives every part of it uses.

``AgentCore`` holds what the agent knows (the GPU inventory in Slurm's
order, the granted jobs, the revoked ones, the rest state of device files)
and the few operations the other parts share: the state a device file
should be in, restoring every file to it, and ending a job in the
background. The parts that act on it live beside it, one responsibility
each, and :class:`ztgpu.noded.agent.Agent` puts them together:

* ``lifecycle``: Prolog grants, Epilog releases, refusals, revocation;
* ``confinement``: placing every job process in a devices cgroup;
* ``probing``: proving isolation by opening every GPU from inside it;
* ``reconcile``: start-up recovery and device-file drift.
"""

from __future__ import annotations

import contextlib
import logging
import pwd
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from ztgpu.cgroups.device_allowlist import DevicesV1
from ztgpu.cgroups.device_bpf import DevicesV2
from ztgpu.cgroups.device_files import FileState, apply_state
from ztgpu.config import Config
from ztgpu.errors import CgroupError, DeviceError, GpuError, SlurmError
from ztgpu.gpu.backend import GpuBackend, GpuInfo, slurm_order
from ztgpu.gpu.devices import gpu_device_path
from ztgpu.noded import cgroup_layer, checks, holders, job_cgroups
from ztgpu.noded.backlog import SpoolGuard
from ztgpu.noded.grant_check import GrantChecker
from ztgpu.noded.probe_helper import ProbeHelper
from ztgpu.noded.state import JobRecord, StateStore
from ztgpu.noded.step_programs import StepPrograms
from ztgpu.slurm.client import LIVE_JOB_STATES, SlurmClient

log = logging.getLogger("ztgpu.noded")

#: Cancelling a job: attempts, and the pause between them (doubling up to the maximum).
CANCEL_ATTEMPTS = 12
CANCEL_FIRST_PAUSE_S = 1.0
CANCEL_MAX_PAUSE_S = 30.0


class EventSink(Protocol):
    """What the agent needs from the audit spool (``ztgpu.audit.spool.Spool`` fits)."""

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
    #: v2: step cgroups where our program could not be attached (recorded once).
    unconfinable: set[Path] = field(default_factory=set)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def parse_time(text: str) -> datetime | None:
    """An RFC 3339 / ISO time as an aware datetime (None if unreadable)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def gpu_fields(gpus: list[GpuInfo]) -> list[dict[str, Any]]:
    return [{"index": g.index, "uuid": g.uuid, "minor": g.minor} for g in gpus]


class AgentCore:
    """State and shared primitives for one node. Thread-safe."""

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
        #: The cgroup device mechanism in use (v1 allowlists, v2 programs, none).
        self.layer = cgroup_layer.detect(config.cgroups)
        self.v1 = self.layer.mode == "v1"
        #: v2 only: the job steps' device programs.
        self.steps: StepPrograms | None = None
        if self.layer.mode == "v2":
            self.steps = StepPrograms(DevicesV2(self.layer.mount), inventory=self.inventory,
                                      major=major, device_dir=config.paths.device_dir,
                                      guard_dri_render=config.cgroups.guard_dri_render)
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
        #: Jobs whose GPUs are being taken back (Epilog): their files stay at rest.
        self.releasing: set[str] = set()
        #: GPUs (by minor) a process would not let go of, and why: never granted
        #: until it is gone (kept in the state across restarts).
        self.held_gpus: dict[int, str] = {}
        #: GPUs (by minor) not wiped since a job used them: (job id, why);
        #: never granted until a wipe succeeds (kept in the state).
        self.dirty_gpus: dict[int, tuple[str, str]] = {}
        #: Why this node grants nothing at all (set at start), if anything.
        self.unsafe: list[str] = []
        #: Processes of these uids may hold idle GPUs (root, the rest owner,
        #: devices.holder_exempt_users that exist here).
        self.exempt_uids = self._exempt_uids()
        #: The isolation probe's helper process (started at the first probe).
        self.probe_helper = ProbeHelper()

    def _rest_state(self) -> FileState:
        return checks.rest_state(self.config)

    def _exempt_uids(self) -> frozenset[int]:
        uids = {0, self.rest.uid}
        for name in self.config.devices.holder_exempt_users:
            with contextlib.suppress(KeyError):
                uids.add(pwd.getpwnam(name).pw_uid)
        return frozenset(uids)

    def _held_state(self, job: JobRecord) -> FileState:
        return FileState(uid=job.uid, gid=self.rest.gid, mode=self.rest.mode | 0o600)

    def device_path(self, gpu: GpuInfo) -> Path:
        return gpu_device_path(self.config.paths.device_dir, gpu)

    @property
    def own_cgroup(self) -> str:
        return self.config.cgroups.name

    def _has_cgroups(self, record: JobRecord) -> bool:
        """Whether the job still has cgroups on this node (it may have processes)."""
        if self.steps is not None:
            return bool(job_cgroups.v2_job_dirs(self.layer.root, record.job_id))
        found = job_cgroups.find_job_cgroups(self.config.cgroups.root, record.uid,
                                             record.job_id)
        return bool(found.freezer or found.devices)

    def _job_steps(self, live: LiveJob) -> set[Path]:
        """v2: the job's step cgroups now, and those it was confined in."""
        steps = {s for s in live.hardened if s.exists()}
        for job_dir in job_cgroups.v2_job_dirs(self.layer.root, live.record.job_id):
            steps.update(job_cgroups.v2_step_dirs(job_dir))
        return steps

    def _revoke_steps(self, live: LiveJob) -> None:
        """v2: every step's program replaced by one that allows no GPU-class device."""
        assert self.steps is not None
        for step in self._job_steps(live):
            try:
                self.steps.restrict(step, live.record.job_id, (), revoked=True)
                live.hardened.add(step)
            except CgroupError as exc:
                if step.exists():
                    log.error("revoking job %s: %s", live.record.job_id, exc)

    def _release_steps(self, live: LiveJob) -> list[str]:
        """v2: detach the job's programs from the steps still there (Slurm
        removes a step's cgroup, and the kernel frees its programs, at its end)."""
        assert self.steps is not None
        try:
            detached = self.steps.release(self._job_steps(live))
        except CgroupError as exc:
            return [str(exc)]
        if detached:
            log.info("job %s: detached %d device program(s) from steps still present",
                     live.record.job_id, detached)
        return []

    def cgroup_name(self, cgroup: Path) -> str:
        """A cgroup as the events name it: its path below its hierarchy's mount."""
        base = self.layer.mount if self.layer.mode == "v2" else self.devices.root
        with contextlib.suppress(ValueError):
            return str(cgroup.relative_to(base))
        return str(cgroup)

    def _expected_state(self, minor: int) -> tuple[FileState, JobRecord | None]:
        for live in self.jobs.values():
            if (minor in live.record.minors and live.record.job_id not in self.revoked_jobs
                    and live.record.job_id not in self.releasing):
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

    def _take_back(self, minors: Collection[int], *, context: str,
                   job: JobRecord | None = None, spare_uid: int | None = None) -> list[str]:
        """End every process still holding these GPUs, recording each; returns
        one problem per GPU a process would not let go of.

        Call it once the GPUs' files are at rest and their cgroups deny them,
        so nothing new can open them meanwhile. Processes of *spare_uid* (the
        user of the job that holds the GPU now) are left alone. A GPU whose
        holder outlives ``isolation.holder_kill_timeout_s`` is held: recorded
        (critical), kept out of every grant, also across restarts, and the
        node is drained with a reason naming the process and the GPU.
        """
        targets = sorted(m for m in set(minors) if m in self.by_minor)
        if not targets:
            return []
        reported: dict[int, set[int]] = {}
        if not self.backend.simulated:
            for minor in targets:
                try:
                    for pid in self.backend.gpu_pids(self.by_minor[minor]):
                        reported.setdefault(pid, set()).add(minor)
                except GpuError as exc:
                    log.warning("cannot ask the driver what runs on minor %d: %s", minor, exc)
        paths = [self.device_path(self.by_minor[m]) for m in targets]
        found = holders.take_back(
            self.major, targets, nodes=holders.device_nodes(paths),
            exempt_uids=self.exempt_uids, spare_uid=spare_uid, reported=reported,
            timeout_s=self.config.isolation.holder_kill_timeout_s)
        job_fields: dict[str, Any] = {} if job is None else {"job_id": job.job_id}
        for holder in found.ended:
            self.spool.append(
                "device.holder", **job_fields, pid=holder.pid, uid=holder.uid,
                command=holder.command, how=list(holder.how), context=context,
                gpus=gpu_fields([self.by_minor[m] for m in sorted(holder.minors)]),
                outcome="ended", reason="held a GPU that was being taken back; killed")
        problems: list[str] = []
        fresh: list[int] = []
        for minor in targets:
            stuck = [h for h in found.survivors if minor in h.minors]
            if not stuck:
                continue
            gpu = self.by_minor[minor]
            if minor not in self.held_gpus:
                fresh.append(minor)
            reason = (f"GPU {gpu.index} (minor {minor}, {gpu.uuid}) is still held by "
                      + ", ".join(h.describe() for h in stuck) + " after SIGKILL; it is not "
                      "granted again until that process is gone")
            self.state.put_held(minor, reason)
            self.held_gpus[minor] = reason
            self.spool.append("device.held", **job_fields, gpus=gpu_fields([gpu]),
                              pids=[h.pid for h in stuck], context=context,
                              outcome="held", reason=reason[:500])
            log.critical("%s", reason)
            problems.append(reason)
        if fresh:
            self._drain("; ".join(self.held_gpus[m] for m in fresh))
        return problems

    def restore_dirty(self) -> None:
        """At start: the dirty marks of the state (wipes that never finished)."""
        self.dirty_gpus = {m: v for m, v in self.state.dirty().items() if m in self.by_minor}

    def _check_held(self, minors: Collection[int]) -> list[str]:
        """Problems for the GPUs among *minors* that a process still holds.

        A held GPU whose holder has gone (or is ended now) is freed, recorded.
        """
        problems = []
        for minor in sorted(set(minors) & set(self.held_gpus)):
            # Any holder was killed already; give a late one a short while.
            if self._take_back([minor], context="prolog"):
                problems.append(self.held_gpus[minor])
                continue
            del self.held_gpus[minor]
            self.state.delete_held(minor)
            self.spool.append("device.freed", gpus=gpu_fields([self.by_minor[minor]]),
                              outcome="freed", reason="the process that held it is gone")
        return problems

    def _drain(self, reason: str) -> None:
        """Drain this node in Slurm in the background, recorded."""
        node = self.config.node_name

        def work() -> None:
            try:
                self.slurm.drain(node, reason)
                outcome, why = "drained", reason
            except SlurmError as exc:
                outcome, why = "failed", f"{reason}; drain failed: {exc}"
                log.error("could not drain %s: %s", node, exc)
            self.spool.append("node.drain", node_name=node, outcome=outcome,
                              reason=why[:500])
        threading.Thread(target=work, name="drain", daemon=True).start()

    def _act_on_job(self, job_id: str, reason: str) -> None:
        """End the job in the background (Slurm commands may take seconds).

        ``scancel`` is repeated, with backoff, until Slurm no longer lists the
        job as live (a cancel can fail, or be undone by a requeue). Recorded:
        the first failure at once (``failed``, retrying), then the end
        (``cancelled`` once Slurm shows the job ended, or ``failed`` when the
        attempts ran out).
        """
        def work() -> None:
            pause, problem, told = CANCEL_FIRST_PAUSE_S, "", False
            # Resolved once, while the job still runs: the first task of an
            # array shares its id with the array, whose other tasks must live.
            try:
                target = self.slurm.job_ref(job_id)
            except SlurmError:
                target = job_id
            for attempt in range(1, CANCEL_ATTEMPTS + 1):
                try:
                    try:
                        self.slurm.cancel(target, reason)
                        failed = ""
                    except SlurmError as exc:
                        # E.g. "Job has already finished": ask before retrying.
                        failed = f"cancel failed: {exc}"
                    state = self.slurm.job_state(target)
                    if state is None or state not in LIVE_JOB_STATES:
                        note = f"; it had ended: {failed}" if failed else ""
                        why = f"{reason} (Slurm: {state or 'gone'}; attempt {attempt}{note})"
                        self.spool.append("job.action", job_id=job_id, action="cancel_job",
                                          outcome="ended" if failed else "cancelled",
                                          reason=why[:500])
                        return
                    problem = failed or f"still {state} after scancel"
                except SlurmError as exc:
                    problem = f"cancel failed: {exc}"
                if not told:
                    log.error("could not cancel job %s yet (retrying): %s", job_id, problem)
                    self.spool.append("job.action", job_id=job_id, action="cancel_job",
                                      outcome="failed",
                                      reason=f"{reason}; {problem}; retrying"[:500])
                    told = True
                if self._stop.wait(pause):
                    return
                pause = min(pause * 2, CANCEL_MAX_PAUSE_S)
            log.error("giving up cancelling job %s: %s", job_id, problem)
            self.spool.append("job.action", job_id=job_id, action="cancel_job",
                              outcome="failed",
                              reason=f"{reason}; {problem}; gave up after "
                                     f"{CANCEL_ATTEMPTS} attempts"[:500])
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
                "cgroups": {"mode": self.layer.mode, "detail": self.layer.detail},
                "refusing_grants": list(self.unsafe),
                "gpus": gpu_fields(list(self.inventory)), "jobs": jobs, "audit": audit}

    def on_spool_full(self) -> None:
        """The guard's hook: with ``cancel_jobs``, end every running GPU job here."""
        if self.config.audit.spool_full_action != "cancel_jobs":
            return
        with self.lock:
            running = list(self.jobs)
        for job_id in running:
            self._act_on_job(job_id, "ztgpu: the node's audit spool is full; GPU work "
                             "cannot be accounted for")

    # ---- provided by the parts ------------------------------------------
    def sweep(self) -> None:
        """Confine every process of every local job (``ztgpu.noded.confinement``)."""
        raise NotImplementedError

    def _release(self, live: LiveJob, why: str) -> list[str]:
        """Take the job's GPUs back and forget its grant (``ztgpu.noded.lifecycle``)."""
        raise NotImplementedError

    def wipe(self, minors: Collection[int], *, job_id: str, mode: str,
             context: str) -> list[str]:
        """Wipe the GPUs' memory after a job (``ztgpu.noded.hygiene``)."""
        raise NotImplementedError

    def wipe_mode(self, partition: str | None) -> str:
        """The wipe mode for a job of *partition* (``ztgpu.noded.hygiene``)."""
        raise NotImplementedError

    def check_dirty(self, minors: Collection[int], *, job_id: str,
                    context: str | None = None) -> list[str]:
        """Wipe dirty GPUs before a grant (``ztgpu.noded.hygiene``)."""
        raise NotImplementedError

    def wipe_problem(self) -> str | None:
        """Why GPUs could not be wiped here, at start (``ztgpu.noded.hygiene``)."""
        raise NotImplementedError

    def check_state(self, job: JobRecord) -> list[str]:
        """GPU settings back to baseline, health checked (``ztgpu.noded.hygiene``)."""
        raise NotImplementedError

    def write_job_mapping(self) -> None:
        """dcgm-exporter's job files from the grants (``ztgpu.noded.telemetry``)."""
        raise NotImplementedError

    def record_usage(self, job: JobRecord) -> None:
        """The job's per-GPU usage summary, at its release (``ztgpu.noded.telemetry``)."""
        raise NotImplementedError

    def ecc_counts(self, gpus: Collection[GpuInfo]) -> tuple[tuple[int, int], ...]:
        """The GPUs' ECC counts at a grant (``ztgpu.noded.hygiene``)."""
        raise NotImplementedError

    def verify(self, job_id: str | None = None, *, due_only: bool = False
               ) -> list[dict[str, Any]]:
        """Probe jobs' cgroups now (``ztgpu.noded.probing``)."""
        raise NotImplementedError
