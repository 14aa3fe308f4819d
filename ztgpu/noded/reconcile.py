"""Reconciling: the agent's start (jobs reloaded, files put right) and device-file drift.

At start the agent reloads the grants it had (discarding them after a
reboot) and puts every device file in its expected state. The background
loop then restores any device file something else changed (e.g. the NVIDIA
driver with ``NVreg_ModifyDeviceFiles=1``), recording each change.
"""

from __future__ import annotations

from typing import Any

from ztgpu import __version__
from ztgpu.cgroups.device_files import apply_state, read_state
from ztgpu.errors import DeviceError
from ztgpu.noded.core import AgentCore, LiveJob, boot_id, gpu_fields, log


class Reconcile(AgentCore):
    """Start-up recovery and drift repair."""

    def start(self) -> None:
        """Reload jobs, put every device file in its expected state, record the start."""
        if not self.devices.available():
            log.critical("cgroup v1 devices controller not found under %s: only device-file "
                         "ownership protects GPUs; jobs of one user are not separated",
                         self.devices.root)
        recovered = self.state.all()
        rebooted = self.state.boot_changed(boot_id())
        if recovered and rebooted:
            for job_id in recovered:
                self.state.delete(job_id)
            self.spool.append("agent.recovered", jobs=sorted(recovered, key=int),
                              outcome="discarded",
                              reason="the node rebooted since these grants were made")
            recovered = {}
        revoked = {job_id: why for job_id, why in self.state.revoked().items()
                   if job_id in recovered}
        with self.lock:
            for job_id, record in recovered.items():
                self.jobs[job_id] = LiveJob(record=record)
            # Before any file is put right: a revoked job's GPUs stay at rest.
            self.revoked_jobs |= set(revoked)
            problems = self._reconcile_files()
        self.spool.append("agent.start", version=__version__, gpu_backend=self.backend.name,
                          gpus=gpu_fields(list(self.inventory)),
                          outcome="degraded" if problems else "ok",
                          reason="; ".join(problems) if problems else
                          ("simulated GPUs: no real device is protected"
                           if self.backend.simulated else ""))
        if recovered:
            self.spool.append("agent.recovered", jobs=sorted(recovered, key=int),
                              outcome="ok", reason="job grants reloaded from agent state")
        for job_id, why in sorted(revoked.items()):
            # The agent may have died between taking the GPUs and the cancel.
            self.spool.append("job.action", job_id=job_id, action="revoke",
                              outcome="access_removed",
                              reason=f"{why} (reapplied after an agent restart)"[:300])
            self._act_on_job(job_id, why)

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
