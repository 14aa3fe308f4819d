"""Confinement: every process of a granted job in a devices cgroup that denies
the GPUs it was not given.

On cgroup v1, with Slurm's ``ConstrainDevices=yes`` the agent adds its
denies to Slurm's job and step cgroups; otherwise it moves job processes
into its own per-job cgroup. On cgroup v2 every process of a job already
sits in Slurm's job directory, and the agent puts a device program of its
own on each of the job's steps (:mod:`ztgpu.noded.step_programs`). It only
ever narrows access.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ztgpu.cgroups.device_allowlist import CharDevice
from ztgpu.errors import CgroupError, Denied
from ztgpu.noded import holders, job_cgroups
from ztgpu.noded.core import AgentCore, LiveJob
from ztgpu.noded.state import JobRecord


class Confinement(AgentCore):
    """The sweep and the TaskProlog's placement."""

    def _denied_for(self, record: JobRecord) -> list[CharDevice]:
        revoked = record.job_id in self.revoked_jobs
        return [CharDevice(self.major, g.minor) for g in self.inventory
                if revoked or g.minor not in record.minors]

    def _prepare_own_cgroup(self, record: JobRecord) -> None:
        if not self.v1:
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
        return own if self._attach_job_process(own, pid, record) else None

    def _attach_job_process(self, cgroup: Path, pid: int, record: JobRecord) -> bool:
        """Move *pid* into *cgroup* only while it is still a process of the job.

        The pid was read a while ago; the process is pinned by a pidfd, its
        job re-read, and the pidfd checked for an exit before the move, so a
        pid reused meanwhile by another process is never moved.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone
            return False
        try:
            if (job_cgroups.job_of_pid(pid) != (record.uid, record.job_id)
                    or holders.exited(pidfd)):
                return False
            return self.devices.attach(cgroup, pid)
        finally:
            os.close(pidfd)

    def _confine(self, live: LiveJob) -> None:
        record = live.record
        if self.steps is not None:
            self._confine_v2(live)
            return
        if not self.v1:
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
        if self.steps is not None:
            return self._confine_task_v2(pid, uid)
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
        if not self.v1:
            return {"job_id": job_id, "confined": [], "cgroup": None}
        placed = {target: self._place(live, target) for target in targets}
        mine = placed[pid]
        if mine is None:
            raise Denied(f"job {job_id} is no longer granted on this node")
        live.probed.setdefault(mine, 0.0)
        live.confined = True
        return {"job_id": job_id, "confined": [t for t, cg in placed.items() if cg],
                "cgroup": self.cgroup_name(mine)}

    # ---- cgroup v2 ------------------------------------------------------
    def _v2_job_dirs(self, job_id: str) -> tuple[Path, ...]:
        return job_cgroups.v2_job_dirs(self.layer.root, job_id)

    def _cover_step(self, live: LiveJob, step: Path) -> bool:
        """Put the job's program on *step* once; False if it cannot be put there."""
        assert self.steps is not None
        if step in live.hardened:
            return True
        if step in live.unconfinable:
            return False
        record = live.record
        try:
            self.steps.restrict(step, record.job_id, record.minors,
                                revoked=record.job_id in self.revoked_jobs)
        except CgroupError as exc:
            if not step.exists():
                return False  # the step ended meanwhile
            live.unconfinable.add(step)
            self.spool.append("enforcement.failed", job_id=record.job_id, uid=record.uid,
                              user=record.user, outcome="error", reason=str(exc)[:500])
            return False
        live.hardened.add(step)
        return True

    def _confine_v2(self, live: LiveJob) -> None:
        record = live.record
        found = False
        for job_dir in self._v2_job_dirs(record.job_id):
            for step in job_cgroups.v2_step_dirs(job_dir):
                self._cover_step(live, step)
            for leaf, pids in job_cgroups.populated_leaves(job_dir).items():
                found = True
                covering = job_cgroups.v2_step_of(job_dir, leaf)
                if (covering is None or covering not in live.hardened or leaf in live.probed
                        or not job_cgroups.v2_is_user_leaf(covering, leaf)):
                    continue
                # Probe where the job's user runs code, not where only root
                # processes (slurmstepd, the extern step's holder) live.
                if any((info := job_cgroups.proc_info(pid)) is not None and info[1] == record.uid
                       for pid in pids):
                    live.probed.setdefault(leaf, 0.0)
        if found:
            live.confined = True

    def _confine_task_v2(self, pid: int, uid: int) -> dict[str, Any]:
        path = job_cgroups.unified_path_of(pid)
        owner = job_cgroups.v2_job_of_path(path) if path else None
        if path is None or owner is None:
            raise Denied("caller is not a process of a Slurm job")
        job_id, job_path = owner
        with self.lock:
            live = self.jobs.get(job_id)
        if live is None or live.record.uid != uid:
            raise Denied(f"job {job_id} was not granted on this node by ztgpu")
        job_dir = self.layer.mount / job_path.lstrip("/")
        leaf = self.layer.mount / path.lstrip("/")
        if job_dir not in self._v2_job_dirs(job_id):
            raise Denied(f"job {job_id}'s cgroup is not under {self.layer.root}")
        step = job_cgroups.v2_step_of(job_dir, leaf)
        if step is None:
            raise Denied("caller is not in a step of its job")
        if not self._cover_step(live, step):
            raise Denied(f"job {job_id}'s step cannot be confined on this node")
        if job_cgroups.v2_is_user_leaf(step, leaf):
            live.probed.setdefault(leaf, 0.0)
        live.confined = True
        return {"job_id": job_id, "confined": [pid], "cgroup": self.cgroup_name(leaf)}
