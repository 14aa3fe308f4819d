"""GPU telemetry tied to jobs, and the allocation-aware rules that watch it.

Every ``telemetry.interval_s`` (≤ 5 s) the agent looks at each GPU through
its backend (NVML: utilisation, memory, power, SM clock, the processes with
a context on it; simulated: a scripted file) and ties what it sees to the
grant: each process is mapped pid -> cgroup -> Slurm job, and the GPU to
the job holding it. Sampling runs in a thread of its own and takes the
agent's lock only to copy which job holds which GPU: it never delays a
grant, and a grant never waits for NVML.

The rules are exact, not learned (the collector learns baselines):

``foreign_process``
    a process on a GPU that is not in the cgroup of the job holding it;
``unallocated_use``
    a process, or memory or utilisation above the busy thresholds, on a GPU
    that no job holds;
``busy_without_job``
    a GPU busy while not one process of the job holding it is left;
``off_hours``
    a busy GPU outside ``telemetry.allowed_hours``;
``xid``
    an Xid event of the GPU in the kernel log.

Each finding is one critical audit event (``gpu.misuse``, ``gpu.xid``)
with the evidence (the sample, the process: pid, uid, command, its job),
recorded once while it lasts, after the response ``telemetry.responses``
names: ``record``, ``alert``, ``end_process`` (never a process of
``spared_uids``), ``end_job``, ``drain`` or ``hold_user`` (authd refuses
the user's GPU jobs until an admin releases them), or several of them in
order. A hold authd could not be told of is asked again every round until
it answers (``gpu.hold`` records the late answer).

What each job did with each GPU is summed as it runs (samples, mean and
peak utilisation, peak memory, energy, busy time) and recorded at its
release as one ``gpu.usage`` event: the compact summary the collector's
baselines learn from, never the raw samples.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from ztgpu.errors import GpuError
from ztgpu.gpu.backend import GpuInfo
from ztgpu.gpu.telemetry import GpuSample
from ztgpu.hours import in_hours
from ztgpu.noded import holders, job_cgroups
from ztgpu.noded.core import AgentCore, LiveJob, gpu_fields
from ztgpu.noded.state import JobRecord

log = logging.getLogger("ztgpu.noded")

#: How long an ended process is waited for.
END_PROCESS_WAIT_S = 2.0


@dataclass(frozen=True)
class Proc:
    """A process a GPU reported, as the agent found it in /proc."""

    pid: int
    start: int
    uid: int
    command: str
    #: The Slurm job whose cgroup holds it, if any.
    job_id: str | None

    def describe(self) -> str:
        where = f"job {self.job_id}" if self.job_id else "no job"
        return f"pid {self.pid} (uid {self.uid}, {self.command!r}, {where})"


@dataclass
class Usage:
    """What one job did with one GPU so far."""

    samples: int = 0
    util_sum: float = 0.0
    util_max: float = 0.0
    memory_max_bytes: int = 0
    energy_j: float = 0.0
    busy_s: float = 0.0
    processes_max: int = 0
    first: str = ""
    last: str = ""

    def add(self, sample: GpuSample, seconds: float, busy: bool, at: str) -> None:
        self.samples += 1
        util = sample.util_pct or 0.0
        self.util_sum += util
        self.util_max = max(self.util_max, util)
        self.memory_max_bytes = max(self.memory_max_bytes, sample.memory_used_bytes or 0)
        self.energy_j += (sample.power_w or 0.0) * seconds
        self.busy_s += seconds if busy else 0.0
        self.processes_max = max(self.processes_max, len(sample.pids))
        self.first = self.first or at
        self.last = at

    def fields(self) -> dict[str, Any]:
        return {"samples": self.samples,
                "util_mean_pct": round(self.util_sum / self.samples, 2) if self.samples else 0,
                "util_max_pct": round(self.util_max, 2),
                "memory_max_bytes": self.memory_max_bytes,
                "energy_j": round(self.energy_j, 1), "busy_s": round(self.busy_s, 1),
                "processes_max": self.processes_max, "first_sample": self.first,
                "last_sample": self.last}


@dataclass
class Finding:
    rule: str
    gpu: GpuInfo
    job: JobRecord | None
    sample: GpuSample
    procs: list[Proc] = field(default_factory=list)
    xids: list[int] = field(default_factory=list)
    detail: str = ""

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.rule, self.gpu.minor, self.job.job_id if self.job else None,
                tuple((p.pid, p.start) for p in self.procs))


class Telemetry(AgentCore):
    """Sampling, the rules, the responses and the per-job summaries."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from ztgpu.gpu.device_state import boot_clock_us

        #: The last sample of each GPU (by minor), for /metrics and status.
        self.last_samples: dict[int, GpuSample] = {}
        #: CPU seconds the agent spent sampling, and how many rounds.
        self.sample_cpu_s = 0.0
        self.sample_rounds = 0
        self._active: set[tuple[Any, ...]] = set()
        self._usage: dict[tuple[str, int], Usage] = {}
        self._xid_since_us = boot_clock_us()
        self._last_round = time.monotonic()
        self._sample_errors: set[int] = set()
        #: Findings whose response was ``alert`` (``ztgpu_alerts_total``).
        self.alerts = 0
        #: Holds authd has not answered yet: user -> (job id, rule, reason).
        self.pending_holds: dict[str, tuple[str, str, str]] = {}

    # ---- the loop ------------------------------------------------------
    def run_telemetry(self) -> None:
        """Start the sampling thread (when ``telemetry.enabled``)."""
        import threading

        if not self.config.telemetry.enabled:
            return
        thread = threading.Thread(target=self._telemetry_loop, name="ztgpu-telemetry",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _telemetry_loop(self) -> None:
        interval = self.config.telemetry.interval_s
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.sample_all()
            except Exception:
                log.exception("telemetry round failed")
            self._stop.wait(max(0.0, interval - (time.monotonic() - began)))

    # ---- one round -----------------------------------------------------
    def sample_all(self) -> list[dict[str, Any]]:
        """Look at every GPU once; returns the events recorded."""
        cpu_before = time.process_time()
        now = time.monotonic()
        seconds, self._last_round = now - self._last_round, now
        cfg = self.config.telemetry
        with self.lock:
            holding: dict[int, LiveJob] = {
                minor: live for live in self.jobs.values()
                if live.record.job_id not in self.releasing for minor in live.record.minors}
        samples: dict[int, GpuSample] = {}
        for gpu in self.inventory:
            try:
                samples[gpu.minor] = self.backend.sample(gpu)
                self._sample_errors.discard(gpu.minor)
            except GpuError as exc:
                if gpu.minor not in self._sample_errors:  # once until it recovers
                    log.warning("cannot sample GPU %s: %s", gpu.index, exc)
                    self._sample_errors.add(gpu.minor)
        self.last_samples = samples
        at = self.clock().isoformat()
        memory = cfg.busy_memory_mib << 20
        findings: list[Finding] = []
        for minor, sample in samples.items():
            gpu = self.by_minor[minor]
            live = holding.get(minor)
            busy = sample.busy(cfg.busy_util_pct, memory)
            procs = [p for p in (self._proc(pid) for pid in sample.pids) if p is not None]
            if live is not None:
                job = live.record
                self._usage.setdefault((job.job_id, minor), Usage()).add(
                    sample, seconds, busy, at)
                findings += [Finding("foreign_process", gpu, job, sample, [p],
                                     detail=f"{p.describe()} is on GPU {gpu.index}, held by "
                                            f"job {job.job_id} of {job.user}")
                             for p in procs if p.job_id != job.job_id]
                if busy and now - live.granted_mono > 2 * cfg.interval_s \
                        and not self._job_pids(job):
                    findings.append(Finding(
                        "busy_without_job", gpu, job, sample, procs,
                        detail=f"GPU {gpu.index} is busy ({_figures(sample)}) but job "
                               f"{job.job_id} has no process left"))
                if busy and not in_hours(cfg.allowed_hours, self.clock().astimezone()):
                    findings.append(Finding(
                        "off_hours", gpu, job, sample,
                        detail=f"job {job.job_id} of {job.user} uses GPU {gpu.index} "
                               f"({_figures(sample)}) outside the allowed hours "
                               f"{', '.join(cfg.allowed_hours)}"))
            elif procs:
                findings += [Finding("unallocated_use", gpu, None, sample, [p],
                                     detail=f"{p.describe()} is on GPU {gpu.index}, which "
                                            f"no job holds") for p in procs]
            elif busy:
                findings.append(Finding(
                    "unallocated_use", gpu, None, sample,
                    detail=f"GPU {gpu.index} is in use ({_figures(sample)}) but no job "
                           f"holds it"))
        findings += self._xid_findings(holding, samples)
        events = self._retry_holds()
        events += self._act(findings)
        self.sample_cpu_s += time.process_time() - cpu_before
        self.sample_rounds += 1
        return events

    def _xid_findings(self, holding: dict[int, LiveJob],
                      samples: dict[int, GpuSample]) -> list[Finding]:
        from ztgpu.gpu.device_state import boot_clock_us, short_bus, xids_since

        kmsg = self.config.gpu.baseline.kmsg
        buses = {short_bus(g.pci_bus_id): g for g in self.inventory}
        until = boot_clock_us()
        try:
            found = xids_since(set(buses), self._xid_since_us, kmsg)
        except OSError as exc:
            log.debug("cannot read the kernel log %s: %s", kmsg, exc)
            return []
        self._xid_since_us = until
        findings = []
        for bus, codes in found.items():
            gpu = buses[bus]
            live = holding.get(gpu.minor)
            holder = f", held by job {live.record.job_id}" if live else ""
            findings.append(Finding("xid", gpu, live.record if live else None,
                                    samples.get(gpu.minor, GpuSample()), xids=codes,
                                    detail=f"Xid {', '.join(map(str, codes))} on GPU "
                                           f"{gpu.index}{holder}"))
        return findings

    # ---- findings ------------------------------------------------------
    def _act(self, findings: list[Finding]) -> list[dict[str, Any]]:
        """Respond to and record each finding not already recorded."""
        seen = {f.key for f in findings if f.rule != "xid"}
        fresh = [f for f in findings if f.rule == "xid" or f.key not in self._active]
        self._active = seen
        return [self._respond(f) for f in fresh]

    def _respond(self, finding: Finding) -> dict[str, Any]:
        cfg = self.config.telemetry
        chosen = getattr(cfg.responses, finding.rule)
        steps = [chosen] if isinstance(chosen, str) else list(chosen)
        done = [self._carry_out(str(step), finding) for step in steps]
        response = "+".join(steps)
        outcome = "+".join(o for o, _ in done)
        note = "; ".join(n for _, n in done)
        job = finding.job
        sample = finding.sample
        fields: dict[str, Any] = {
            "gpus": gpu_fields([finding.gpu]), "response": response, "outcome": outcome,
            "reason": f"{finding.detail}; {note}"[:500],
            "util_pct": sample.util_pct, "memory_used_bytes": sample.memory_used_bytes,
            "power_w": sample.power_w,
            "processes": [{"pid": p.pid, "uid": p.uid, "command": p.command[:100],
                           "job_id": p.job_id} for p in finding.procs]}
        if job is not None:
            fields.update(job_id=job.job_id, uid=job.uid, user=job.user)
        if finding.rule == "xid":
            event = self.spool.append("gpu.xid", xids=finding.xids, **fields)
        else:
            event = self.spool.append("gpu.misuse", rule=finding.rule, **fields)
        log.critical("%s: %s", finding.rule, fields["reason"])
        return event

    def _carry_out(self, response: str, finding: Finding) -> tuple[str, str]:
        """(outcome, what was done, in words)."""
        if response == "record":
            return "recorded", "recorded"
        if response == "alert":
            self.alerts += 1
            return "alerted", "alert raised"
        if response == "drain":
            self._drain(f"{finding.rule}: {finding.detail}")
            return "drained", "node drained"
        if response == "hold_user":
            return self._hold_users(finding)
        if response == "end_job":
            if finding.job is None:
                return "recorded", "no job holds the GPU: nothing to cancel"
            self._act_on_job(finding.job.job_id, f"ztgpu: {finding.rule}: {finding.detail}")
            return "cancelling", f"job {finding.job.job_id} is being cancelled"
        # end_process
        spared = set(self.config.telemetry.spared_uids)
        if not finding.procs:
            return "recorded", "no process to end"
        results = []
        for proc in finding.procs:
            if proc.uid in spared:
                results.append(f"pid {proc.pid} spared (uid {proc.uid})")
                continue
            results.append(f"pid {proc.pid} " + holders.end_process(
                proc.pid, proc.start, END_PROCESS_WAIT_S))
        outcome = ("survived" if any(r.endswith("survived") for r in results)
                   else "spared" if all("spared" in r for r in results) else "ended")
        return outcome, "; ".join(results)

    # ---- holds at authd -------------------------------------------------
    def _hold_targets(self, finding: Finding) -> list[str]:
        """Whom a finding holds: the owners of its processes (never a spared
        uid), else the user of the job whose GPU it is."""
        import pwd

        spared = set(self.config.telemetry.spared_uids)
        names: list[str] = []
        for proc in finding.procs:
            if proc.uid in spared:
                continue
            try:
                name = pwd.getpwuid(proc.uid).pw_name
            except KeyError:
                continue  # no account to hold at authd
            if name not in names:
                names.append(name)
        if not names and not finding.procs and finding.job is not None \
                and finding.job.uid not in spared:
            names.append(finding.job.user)
        return names

    def _hold_users(self, finding: Finding) -> tuple[str, str]:
        if self.grant_checker is None:
            return "recorded", "hold_user: no authd configured (auth.authd_url)"
        users = self._hold_targets(finding)
        if not users:
            return "recorded", "hold_user: no user to hold"
        job_id = finding.job.job_id if finding.job is not None else ""
        outcomes, notes = [], []
        for user in users:
            outcome, note = self._ask_hold(user, job_id, finding.rule, finding.detail)
            outcomes.append(outcome)
            notes.append(note)
        worst = next((o for o in ("failed", "refused") if o in outcomes), "held")
        return worst, "; ".join(notes)

    def _ask_hold(self, user: str, job_id: str, rule: str, reason: str) -> tuple[str, str]:
        """(outcome, note) of one hold request; an unanswered one is kept to retry."""
        from ztgpu.auth_client import AuthdError, AuthdRefused

        assert self.grant_checker is not None
        try:
            reply = self.grant_checker.hold(user, job_id, rule, reason[:500])
        except AuthdRefused as exc:
            self.pending_holds.pop(user, None)
            return "refused", f"authd refused to hold {user}: {exc} ({exc.code})"
        except (AuthdError, KeyError, TypeError, ValueError) as exc:
            self.pending_holds[user] = (job_id, rule, reason)
            log.error("cannot ask authd to hold %s (retrying every round): %s", user, exc)
            return "failed", f"hold of {user} not delivered ({exc}); asked again every round"
        self.pending_holds.pop(user, None)
        return "held", (f"{user} held at authd (hold {reply.get('hold')})"
                        + ("" if reply.get("new", True) else ", already held"))

    def _retry_holds(self) -> list[dict[str, Any]]:
        events = []
        for user, (job_id, rule, reason) in list(self.pending_holds.items()):
            outcome, note = self._ask_hold(user, job_id, rule, reason)
            if outcome != "failed":
                events.append(self.spool.append("gpu.hold", user=user, job_id=job_id,
                                                rule=rule, outcome=outcome, reason=note))
        return events

    # ---- processes and jobs --------------------------------------------
    def _proc(self, pid: int) -> Proc | None:
        start = holders.start_time(pid)
        info = job_cgroups.proc_info(pid)
        if start is None or info is None:
            return None  # gone since the sample
        if self.layer.mode == "v2":
            job_id = job_cgroups.v2_job_of_pid(pid)
        else:
            found = job_cgroups.job_of_pid(pid)
            job_id = found[1] if found else None
        return Proc(pid=pid, start=start, uid=info[1], command=holders.command_of(pid),
                    job_id=job_id)

    def _job_pids(self, job: JobRecord) -> set[int]:
        """Every process of *job* on this node now."""
        pids: set[int] = set()
        if self.layer.mode == "v2":
            for job_dir in job_cgroups.v2_job_dirs(self.layer.root, job.job_id):
                pids |= job_cgroups.cgroup_pids(job_dir)
            return pids
        found = job_cgroups.find_job_cgroups(self.config.cgroups.root, job.uid, job.job_id)
        for directory in found.freezer:
            pids |= job_cgroups.cgroup_pids(directory)
        return pids

    # ---- dcgm-exporter's job mapping -----------------------------------
    def write_job_mapping(self) -> None:
        """Rewrite ``telemetry.dcgm_job_mapping_dir`` from the grants: a file
        per GPU a job holds, named by the GPU's NVML index, holding the job
        id (dcgm-exporter's ``--hpc-job-mapping-dir`` reads them and adds an
        ``hpc_job`` label); no file for a free GPU. Never fails a grant."""
        directory = self.config.telemetry.dcgm_job_mapping_dir
        if directory is None:
            return
        with self.lock:
            held = {minor: live.record.job_id for live in self.jobs.values()
                    for minor in live.record.minors}
        try:
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            st = directory.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
                raise OSError(f"{directory} must be a directory owned by root and writable "
                              f"by root alone")
            for gpu in self.inventory:
                path = directory / str(gpu.index)
                job = held.get(gpu.minor)
                if job is None:
                    path.unlink(missing_ok=True)
                    continue
                tmp = directory / f".{gpu.index}.tmp"
                tmp.unlink(missing_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "w") as out:
                    out.write(f"{job}\n")
                os.replace(tmp, path)  # replaces a link planted there, never follows it
        except OSError as exc:
            log.warning("cannot update the dcgm-exporter job mapping in %s: %s", directory, exc)

    # ---- summaries -----------------------------------------------------
    def record_usage(self, job: JobRecord) -> None:
        """At the job's release: one ``gpu.usage`` event per GPU it used."""
        for minor in job.minors:
            usage = self._usage.pop((job.job_id, minor), None)
            if usage is None or minor not in self.by_minor:
                continue
            self.spool.append("gpu.usage", job_id=job.job_id, uid=job.uid, user=job.user,
                              gpus=gpu_fields([self.by_minor[minor]]),
                              partition=job.partition, account=job.account,
                              outcome="summarised", **usage.fields())


def _figures(sample: GpuSample) -> str:
    parts = []
    if sample.util_pct is not None:
        parts.append(f"{sample.util_pct:g}% busy")
    if sample.memory_used_bytes is not None:
        parts.append(f"{sample.memory_used_bytes >> 20} MiB used")
    if sample.pids:
        parts.append(f"{len(sample.pids)} processes")
    return ", ".join(parts) or "in use"
