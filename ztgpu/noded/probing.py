"""Probing: isolation proven by opening every GPU from inside each job cgroup.

Once a job's processes exist, a helper process joins each of its devices
cgroups and opens every GPU first as root (the cgroup alone must refuse the
job's other GPUs with EPERM) and then as the job's user (the job must open
exactly its GPUs). A mismatch is a critical event and triggers
``isolation.on_violation``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ztgpu.errors import Fault
from ztgpu.noded import job_cgroups
from ztgpu.noded.core import AgentCore, LiveJob, gpu_fields, log
from ztgpu.noded.state import JobRecord


def user_groups(job: JobRecord) -> list[int]:
    """The job user's groups as a login would get them (initgroups), its gid first.

    A user the user database no longer knows gets its primary group only.
    """
    try:
        groups = os.getgrouplist(job.user, job.gid)
    except (KeyError, OSError):
        groups = [job.gid]
    return [job.gid, *sorted(set(groups) - {job.gid})]


class Probing(AgentCore):
    """Probes, their comparison with the allocation, and what follows."""

    def probe_paths(self) -> list[Path]:
        paths = [self.device_path(g) for g in self.inventory]
        ctl = self.config.paths.device_dir / "nvidiactl"
        if ctl.exists():
            paths.append(ctl)
        return paths

    def run_probes(self, targets: list[tuple[Path, JobRecord]]
                   ) -> list[dict[str, dict[str, str]] | str]:
        """Open every GPU from inside each (cgroup, job), as root and as the job's user
        (its uid, gid and supplementary groups).

        The agent's kept helper process (``ProbeHelper``) serves the whole
        batch; it forks per target.
        Each entry is ``{"cgroup_only": {...}, "user": {...}}`` mapping a path
        to ``open`` or the errno name that refused it, or an error string.

        Raises:
            Fault: the helper could not run or answered garbage.
        """
        request = json.dumps({
            "paths": [str(p) for p in self.probe_paths()],
            "targets": [{"cgroup_procs": [str(cg / "cgroup.procs")], "uid": job.uid,
                         "gid": job.gid, "groups": user_groups(job)}
                        for cg, job in targets]})
        timeout = self.config.isolation.probe_timeout_s * max(1, len(targets))
        line = self.probe_helper.ask(request, timeout)
        try:
            answers = json.loads(line)
        except ValueError:
            self.probe_helper.close()
            raise Fault("isolation probe answered garbage") from None
        if isinstance(answers, dict) and "error" in answers:
            raise Fault(f"isolation probe failed: {str(answers['error'])[:300]}")
        if not isinstance(answers, list) or len(answers) != len(targets):
            self.probe_helper.close()
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

        The job's user must open exactly its GPUs (and nvidiactl while it has
        any); on its own,
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
            if self.layer.mode != "none" and layer != "EPERM":
                problems.append(f"cgroup does not deny GPU {gpu.index} (minor {gpu.minor}): "
                                f"{'opened' if layer == 'open' else layer} as root")
        # The control node is the job's while it holds a GPU. On v2 the step's
        # program allows it only then (a revoked job loses it with its GPUs);
        # v1's allowlist keeps it for every job.
        ctl = str(self.config.paths.device_dir / "nvidiactl")
        if ctl in user:
            if allocated and user[ctl] != "open":
                problems.append(f"nvidiactl gave {user[ctl]}")
            elif not allocated and self.layer.mode == "v2" and user[ctl] == "open":
                problems.append("nvidiactl opened although the job holds no GPU")
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
            outcomes = self.run_probes([(cg, live.record) for live, cg, _ in due])
        except Fault as exc:
            outcomes = [str(exc)] * len(due)
        judged = [self._judge(live, cgroup, outcome) for (live, cgroup, _), outcome
                  in zip(due, outcomes, strict=True)]
        # A mismatch is critical only once confirmed: the job still holds its
        # grant, and a second probe finds the same. A job ending meanwhile (its
        # Epilog taking the GPUs back under the probe) is not a violation.
        doubtful = [i for i, (_, problems) in enumerate(judged)
                    if problems is not None and problems and self._in_force(due[i][0])]
        if doubtful:
            try:
                again = self.run_probes([(due[i][1], due[i][0].record) for i in doubtful])
            except Fault as exc:
                again = [str(exc)] * len(doubtful)
            for i, outcome in zip(doubtful, again, strict=True):
                judged[i] = self._judge(due[i][0], due[i][1], outcome)
        results = []
        for (live, cgroup, last), (layers, problems) in zip(due, judged, strict=True):
            if problems is None:
                continue
            if problems and not self._in_force(live):
                log.info("probe of job %s found %s while its grant ended; not a violation",
                         live.record.job_id, "; ".join(problems))
                continue
            live.probed[cgroup] = time.monotonic()
            results.append(self._record_probe(live, cgroup, layers, problems,
                                              announce=not (due_only and last)))
        return results

    def _in_force(self, live: LiveJob) -> bool:
        """Whether the job's grant still stands as it did when the probe began."""
        with self.lock:
            return (self.jobs.get(live.record.job_id) is live
                    and live.record.job_id not in self.releasing)

    def _judge(self, live: LiveJob, cgroup: Path, outcome: dict[str, dict[str, str]] | str
               ) -> tuple[dict[str, dict[str, str]], list[str] | None]:
        """A probe's layers and problems; problems None when there is nothing to judge
        (the probed cgroup is gone or empty: its step ended, and Slurm ending a
        step kills whatever is in its cgroup, a probe child included)."""
        if isinstance(outcome, str):
            if not cgroup.exists() or not job_cgroups.cgroup_pids(cgroup):
                live.probed.pop(cgroup, None)
                return {}, None
            return {"cgroup_only": {}, "user": {}}, [f"probe failed: {outcome}"]
        return outcome, self.compare(live.record, outcome)

    def _record_probe(self, live: LiveJob, cgroup: Path,
                      outcome: Mapping[str, Mapping[str, str]],
                      problems: list[str], announce: bool = True) -> dict[str, Any]:
        record = live.record
        gpus = gpu_fields([self.by_minor[m] for m in record.minors if m in self.by_minor])
        rel = self.cgroup_name(cgroup)
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
