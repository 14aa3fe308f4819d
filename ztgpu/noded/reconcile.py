"""Reconciling: the agent's start (jobs reloaded, files put right) and device-file drift.

At start the agent reloads the grants it had (discarding them after a
reboot) and puts every device file in its expected state. The background
loop then restores any device file something else changed (e.g. the NVIDIA
driver with ``NVreg_ModifyDeviceFiles=1``), recording each change.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from ztgpu import __version__
from ztgpu.cgroups.device_files import apply_state, read_state
from ztgpu.errors import DeviceError, InputRejected, SlurmError
from ztgpu.noded import checks
from ztgpu.noded.core import AgentCore, LiveJob, boot_id, gpu_fields, log

#: Slurm states in which a job may still have processes on its node.
RUNNING_HERE = frozenset({"RUNNING", "CONFIGURING", "SUSPENDED"})


class Reconcile(AgentCore):
    """Start-up recovery and drift repair."""

    def start(self) -> None:
        """Reload jobs, put every device file in its expected state, record the start."""
        log.info("device layer: %s", self.layer.detail)
        recovered = self.state.all()
        rebooted = self.state.boot_changed(boot_id())
        if recovered and rebooted:
            for job_id in recovered:
                self.state.delete(job_id)
            self.spool.append("agent.recovered", jobs=sorted(recovered, key=int),
                              outcome="discarded",
                              reason="the node rebooted since these grants were made")
            recovered = {}
        held = self.state.held()
        if held and rebooted:  # a reboot ended whatever held them
            for minor in held:
                self.state.delete_held(minor)
                if minor in self.by_minor:
                    self.spool.append("device.freed", gpus=gpu_fields([self.by_minor[minor]]),
                                      outcome="freed", reason="the node rebooted")
            held = {}
        self.held_gpus.update(held)
        self.restore_dirty()
        self.unsafe = self._start_checks()
        revoked = {job_id: why for job_id, why in self.state.revoked().items()
                   if job_id in recovered}
        with self.lock:
            for job_id, record in recovered.items():
                self.jobs[job_id] = LiveJob(record=record)
            # Before any file is put right: a revoked job's GPUs stay at rest.
            self.revoked_jobs |= set(revoked)
            problems = self._reconcile_files()
        self.spool.append("agent.start", version=__version__, gpu_backend=self.backend.name,
                          gpus=gpu_fields(list(self.inventory)), cgroup_mode=self.layer.mode,
                          outcome="degraded" if problems or self.unsafe else "ok",
                          reason="; ".join(problems + self.unsafe) if problems or self.unsafe
                          else
                          ("simulated GPUs: no real device is protected"
                           if self.backend.simulated else ""))
        if recovered:
            self.spool.append("agent.recovered", jobs=sorted(recovered, key=int),
                              outcome="ok", reason="job grants reloaded from agent state")
        self.write_job_mapping()
        if recovered:
            threading.Thread(target=self.release_ended, args=(sorted(recovered, key=int),),
                             name="release-ended", daemon=True).start()
        for job_id, why in sorted(revoked.items()):
            # The agent may have died between taking the GPUs and the cancel.
            self.spool.append("job.action", job_id=job_id, action="revoke",
                              outcome="access_removed",
                              reason=f"{why} (reapplied after an agent restart)"[:300])
            self._act_on_job(job_id, why)

    def release_ended(self, job_ids: list[str]) -> list[str]:
        """Release the grants of jobs that ended while the agent was down; returns them.

        A job keeps its grant while it has cgroups on this node or Slurm
        shows it running here; otherwise (ended, gone, requeued) its GPUs are
        taken back at once, recorded. When Slurm cannot be asked, the job is
        left to the stale-grant rule.
        """
        released = []
        for job_id in job_ids:
            with self.lock:
                live = self.jobs.get(job_id)
            if live is None:
                continue
            if self._has_cgroups(live.record):
                continue
            try:
                state = self.slurm.job_state(job_id)
            except SlurmError as exc:
                log.warning("cannot ask Slurm about recovered job %s: %s", job_id, exc)
                continue
            if state in RUNNING_HERE:
                continue
            self._release(live, f"the job ended while the agent was down (Slurm: "
                                f"{state or 'no longer listed'})")
            released.append(job_id)
        return released

    def record_assessment(self, findings: Any, facts_sha256: Any) -> dict[str, Any]:
        """Record what `ztgpu assess` found (``node.assessed``): the collector
        then has every node's last assessment (`ztgpu assess --cluster`)."""
        from ztgpu.assess.rules import RULES, count_severities, describe_counts

        if not isinstance(findings, list) or len(findings) > 200:
            raise InputRejected("'findings' must be a list of at most 200 findings")
        if not isinstance(facts_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", facts_sha256):
            raise InputRejected("'facts_sha256' must be a SHA-256 in hex")
        kept = []
        for item in findings:
            if not isinstance(item, dict) or item.get("rule") not in RULES \
                    or not isinstance(item.get("evidence"), str):
                raise InputRejected("each finding must be {rule: a known rule id, evidence}")
            rule = RULES[item["rule"]]
            kept.append({"rule": rule.id, "severity": rule.severity,
                         "evidence": item["evidence"][:300]})
        counts = count_severities(f["severity"] for f in kept)
        words = describe_counts(counts)
        ids = ", ".join(sorted({f["rule"] for f in kept}))
        event = self.spool.append("node.assessed", counts=counts, findings=kept,
                                  facts_sha256=facts_sha256,
                                  outcome="findings" if kept else "clean",
                                  reason=(f"{words}: {ids}" if ids else words)[:500])
        return {"seq": event["seq"], "hash": event["hash"]}

    def recover(self, release_held: bool = True) -> dict[str, Any]:
        """Bring the node back after a crash, if it is safe: one command for an admin.

        Releases jobs that ended meanwhile, puts device files right, confines
        and probes every job; then, only when nothing is wrong (no start-up
        check failing, no GPU held by a stuck process, no violation, no
        device file that cannot be restored), resumes the node in Slurm and
        (with *release_held*) releases the jobs Slurm held after a failed
        launch. Recorded as ``node.recover``.
        """
        with self.lock:
            ids = sorted(self.jobs, key=int)
        released = self.release_ended(ids)
        drift = self.check_drift()
        self.sweep()
        probes = self.verify()
        problems = [*self.unsafe, *self.held_gpus.values()]
        with self.lock:
            dirty = sorted(m for m in self.dirty_gpus if not any(
                m in j.record.minors for j in self.jobs.values()))
        for minor in dirty:  # a wipe that never finished: try it now
            problems += self.check_dirty([minor], job_id=self.dirty_gpus[minor][0],
                                         context="dirty at ztgpu node recover")
        problems += [f"job {r['job_id']}: " + "; ".join(r.get("problems", []))
                     for r in probes if not r["ok"]]
        problems += [f"{d['path']}: {d['found']}" for d in drift
                     if d.get("outcome") != "restored"]
        node = self.config.node_name
        state, reason, resumed, jobs = "", "", False, []
        if not problems:
            try:
                state, reason = self.slurm.node_state(node)
                if "DRAIN" in state:
                    self.slurm.resume(node)
                    resumed = True
                if release_held:
                    for job_id in self.slurm.launch_failed_held():
                        self.slurm.release_held(job_id)
                        jobs.append(job_id)
            except SlurmError as exc:
                problems.append(f"Slurm: {exc}")
        self.spool.append("node.recover", node_name=node,
                          outcome="failed" if problems else "recovered",
                          released_grants=released, resumed=resumed, released_jobs=jobs,
                          was=f"{state} {reason}".strip()[:300],
                          reason="; ".join(problems)[:1000])
        return {"node": node, "ok": not problems, "problems": problems,
                "released_grants": released, "drift": drift, "probes": len(probes),
                "was": state, "was_reason": reason, "resumed": resumed,
                "released_jobs": jobs}

    def _start_checks(self) -> list[str]:
        """What makes this node unsafe to grant on (each recorded critical)."""
        problems = []
        for check, problem in (("cgroups", checks.cgroup_problem(self.layer)),
                               ("driver_params", self._driver_problem()),
                               ("gres_order", self._gres_problem()),
                               ("wipe", self.wipe_problem())):
            if problem:
                log.critical("%s", problem)
                self.spool.append("node.unsafe", check=check, outcome="refusing_grants",
                                  reason=problem[:1000])
                problems.append(problem)
        return problems

    def _driver_problem(self) -> str | None:
        return checks.driver_problem(self.backend, self.rest)

    def _gres_problem(self) -> str | None:
        problem, note = checks.gres_problem(self.config, self.inventory, self.major)
        if note:
            log.info("%s", note)
        return problem

    def check_drift(self) -> list[dict[str, Any]]:
        """Find device files someone else changed, record and restore them.

        Whoever opened a GPU while its file was wrong loses it: every process
        holding it is ended, but for the user of the job holding the GPU.
        """
        found = []
        drifted: dict[int, int | None] = {}
        with self.lock:
            for gpu in self.inventory:
                path = self.device_path(gpu)
                wanted, holder = self._expected_state(gpu.minor)
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
                    drifted[gpu.minor] = None if holder is None else holder.uid
                except DeviceError as exc:
                    outcome = f"restore failed: {exc}"
                self.spool.append("device.drift", path=str(path), expected=wanted.describe(),
                                  found=current.describe(), action="restore", outcome=outcome,
                                  reason="device file changed outside ztgpu (e.g. the driver "
                                         "with NVreg_ModifyDeviceFiles=1)")
                found.append({"path": str(path), "found": current.describe(),
                              "expected": wanted.describe(), "outcome": outcome})
        for minor, spare in sorted(drifted.items()):
            self._take_back([minor], context="drift", spare_uid=spare)
        return found
