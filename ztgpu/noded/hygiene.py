"""GPU memory hygiene between jobs: the wipe, and the dirty mark that outlives crashes.

When a job's GPUs are taken back (Epilog, revocation, a stale grant), and
once every process holding them has been ended (``Core._take_back``), the
agent wipes each GPU's memory, all GPUs of the job at once, through the CUDA
driver (:mod:`ztgpu.gpu.cuda`; ``wipe.mode``, per partition in
``wipe.partitions``):

* before it touches a GPU it marks it **dirty** in its state (sqlite,
  synchronous): a GPU whose wipe did not finish (a failure, an agent crash,
  a reboot) stays dirty;
* a dirty GPU is never granted: the Prolog wipes it first and refuses the
  job if that fails; at start the agent wipes the GPUs it finds dirty;
* a wipe that completes clean clears the mark and is a ``gpu.wipe`` event
  with its figures and the digest of the verify result; one that fails, or
  finds a word it could not clear, is ``gpu.wipe_failed`` (critical): the
  GPU stays out of every grant and the node is drained with a reason naming
  the GPU.

A GPU in MIG mode (its backend lists MIG devices) is wiped MIG device by
MIG device, each in a child process limited to it
(:func:`ztgpu.gpu.cuda.wipe_instances`); one whose MIG mode cannot be read
is not wiped at all (a wipe of one CUDA device could miss the others).

A GPU a process still holds (``held_gpus``) is not wiped: it is out of use
anyway until the holder is gone, and its next grant waits for a wipe.

Then the GPU's **state** goes back to the baseline (``gpu.baseline``):
compute mode, persistence, accounting and application clocks are put back
where a job changed them (``gpu.state``, recorded), and its **health** is
checked: volatile uncorrectable ECC errors, retired pages or remapped rows
pending a reset, and Xid events in the kernel log since the job's grant.
Anything wrong, and any setting that cannot be put back, is a critical
``gpu.unhealthy`` event and drains the node with a reason naming the GPU
and the check. ECC counts are read at the grant too (kept in the state):
only errors during the job count, or any, where there is no count from the
grant (it could not be read).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ztgpu.errors import GpuError
from ztgpu.gpu.backend import GpuInfo
from ztgpu.noded.core import AgentCore, gpu_fields
from ztgpu.noded.state import JobRecord

log = logging.getLogger("ztgpu.noded")


class Hygiene(AgentCore):
    """The wipe after each job and the dirty marks (see the module docs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._driver: Any = None
        self._driver_lock = threading.Lock()

    def wipe_mode(self, partition: str | None) -> str:
        cfg = self.config.wipe
        return str(cfg.partitions.get(partition or "", cfg.mode))

    def _cuda(self) -> Any:
        """The driver library, loaded at the first wipe (raises GpuError)."""
        with self._driver_lock:
            if self._driver is None:
                from ztgpu.errors import ConfigError
                from ztgpu.gpu.cuda import Driver
                from ztgpu.trust.safe_paths import require_trusted

                path = self.config.wipe.libcuda
                if "/" in path:  # root loads it: nobody else may change it
                    try:
                        require_trusted(Path(path), "wipe.libcuda")
                    except ConfigError as exc:
                        raise GpuError(str(exc)) from None
                self._driver = Driver(path)
            return self._driver

    def wipe_problem(self) -> str | None:
        """At start: with wipes on, the CUDA driver must load and show every
        GPU of the inventory (else no GPU could ever be cleaned)."""
        cfg = self.config.wipe
        if cfg.mode == "off" and all(m == "off" for m in cfg.partitions.values()):
            return None
        from ztgpu.gpu.cuda import normalise_bus_id

        try:
            buses = self._cuda().devices()
        except GpuError as exc:
            return (f"GPU memory wipes are on (wipe.mode: {cfg.mode}) but the CUDA driver "
                    f"cannot be used: {exc}; install the NVIDIA driver's libcuda, point "
                    f"wipe.libcuda at it, or set wipe.mode: off")
        missing = [g for g in self.inventory if normalise_bus_id(g.pci_bus_id) not in buses]
        if missing:
            return (f"the CUDA driver shows no device at PCI "
                    f"{', '.join(g.pci_bus_id for g in missing)} (GPU "
                    f"{', '.join(str(g.index) for g in missing)}): those GPUs could not be "
                    f"wiped (CUDA_VISIBLE_DEVICES in the agent's environment?)")
        return None

    def wipe(self, minors: Collection[int], *, job_id: str, mode: str,
             context: str) -> list[str]:
        """Wipe (or verify) the GPUs of *minors*; returns a problem per GPU
        that is still dirty afterwards. Marks them dirty first."""
        if mode == "off":
            return []
        gpus = [self.by_minor[m] for m in sorted(set(minors))
                if m in self.by_minor and m not in self.held_gpus]
        if not gpus:
            return []
        for gpu in gpus:
            self.state.put_dirty(gpu.minor, job_id, f"used by job {job_id}; {context}")
            with self.lock:
                self.dirty_gpus[gpu.minor] = (job_id, context)
        problems = []
        reports = self._run_wipes(gpus, mode)
        for gpu in gpus:
            report = reports.get(gpu.uuid)
            if report is not None and report.ok:
                self.state.delete_dirty(gpu.minor)
                with self.lock:
                    self.dirty_gpus.pop(gpu.minor, None)
                parts = f" of {len(report.instances)} MIG devices" if report.instances else ""
                summary = (f"{mode}{parts}: {report.covered_bytes / 2**30:.2f} GiB covered, "
                           f"{report.unreachable_bytes >> 20} MiB not reachable, no word left "
                           f"unclean, {report.total_s * 1000:.0f} ms; digest "
                           f"{report.digest[:16]}")
                self.spool.append("gpu.wipe", job_id=job_id, gpus=gpu_fields([gpu]), mode=mode,
                                  context=context, outcome="clean", reason=summary,
                                  **_figures(report))
                continue
            reason = self._wipe_reason(gpu, mode, report)
            problems.append(reason)
            self.spool.append("gpu.wipe_failed", job_id=job_id, gpus=gpu_fields([gpu]),
                              mode=mode, context=context, outcome="dirty", reason=reason[:500],
                              **(_figures(report) if report is not None else {}))
            log.critical("%s", reason)
        if problems:
            self._drain("; ".join(problems))
        return problems

    def _run_wipes(self, gpus: list[GpuInfo], mode: str) -> dict[str, Any]:
        """A report per GPU (by UUID): whole GPUs in this process, one thread
        each; a GPU in MIG mode instance by instance, in child processes; all
        at once."""
        from ztgpu.gpu.cuda import WipeReport, normalise_bus_id, wipe_gpus, wipe_instances

        reports: dict[str, Any] = {}
        whole: list[GpuInfo] = []
        mig: dict[str, tuple[str, ...]] = {}
        for gpu in gpus:
            try:
                instances = self.backend.device_state(gpu).mig_devices
            except GpuError as exc:  # MIG or not is unknown: no wipe can be trusted
                reports[gpu.uuid] = WipeReport(gpu=gpu.uuid, mode=mode,
                                               error=f"cannot tell whether it is in MIG "
                                                     f"mode: {exc}")
                continue
            if instances:
                mig[gpu.uuid] = instances
            else:
                whole.append(gpu)

        def by_instance(uuid: str, instances: tuple[str, ...]) -> None:
            reports[uuid] = wipe_instances(self.config.wipe.libcuda, list(instances), mode,
                                           uuid)

        threads = [threading.Thread(target=by_instance, args=item, name=f"wipe-{item[0]}")
                   for item in mig.items()]
        for thread in threads:
            thread.start()
        try:
            if whole:
                try:
                    driver = self._cuda()
                    ordinals = driver.devices()
                except GpuError as exc:
                    reports.update({gpu.uuid: WipeReport(gpu=gpu.uuid, mode=mode, error=str(exc))
                                    for gpu in whole})
                else:
                    targets = {}
                    for gpu in whole:
                        ordinal = ordinals.get(normalise_bus_id(gpu.pci_bus_id))
                        if ordinal is None:
                            reports[gpu.uuid] = WipeReport(
                                gpu=gpu.uuid, mode=mode,
                                error=f"the CUDA driver shows no device at PCI {gpu.pci_bus_id}")
                        else:
                            targets[gpu.uuid] = ordinal
                    if targets:
                        reports.update(wipe_gpus(driver, targets, mode))
        finally:
            for thread in threads:
                thread.join()
        return reports

    def _wipe_reason(self, gpu: GpuInfo, mode: str, report: Any) -> str:
        what = f"GPU {gpu.index} (minor {gpu.minor}, {gpu.uuid})"
        if report is None:
            why = "no wipe report"
        elif report.error:
            why = report.error
        else:
            why = (f"{report.mismatched_words} words did not read back as written (first at "
                   f"byte {report.first_mismatch_offset})" if mode == "wipe" else
                   f"{report.mismatched_words} words left by the last job were not zero "
                   f"(first at byte {report.first_mismatch_offset}): the driver did not "
                   f"scrub; set wipe.mode: wipe")
        return f"{what}: memory {mode} failed: {why}; it is not granted again until a wipe " \
               f"succeeds"

    def check_dirty(self, minors: Collection[int], *, job_id: str,
                    context: str | None = None) -> list[str]:
        """Before a grant (or at ``ztgpu node recover``): wipe the dirty GPUs
        among *minors* now; returns the problems of those that stay dirty."""
        problems = []
        for minor in sorted(set(minors) & set(self.dirty_gpus)):
            # A full wipe whatever the mode: a verify cannot clean what is left.
            problems += self.wipe([minor], job_id=self.dirty_gpus[minor][0], mode="wipe",
                                  context=context or f"dirty before job {job_id}'s grant")
        return problems


    def ecc_counts(self, gpus: Collection[GpuInfo]) -> tuple[tuple[int, int], ...]:
        """Volatile uncorrectable ECC counts of *gpus* (minor, count) at a
        grant, those that can be read: the release counts only what is new."""
        if not self.config.gpu.baseline.health:
            return ()
        counts = []
        for gpu in gpus:
            try:
                count = self.backend.ecc_uncorrected(gpu)
            except GpuError as exc:
                log.warning("cannot read the ECC count of GPU %s at the grant: %s",
                            gpu.index, exc)
                continue
            if count is not None:
                counts.append((gpu.minor, count))
        return tuple(counts)

    def check_state(self, job: JobRecord) -> list[str]:
        """Put the settings of *job*'s GPUs back and check their health after
        it; returns a problem per check that failed (the node is drained)."""
        from ztgpu.gpu.device_state import short_bus, xids_since

        base = self.config.gpu.baseline
        gpus = [self.by_minor[m] for m in sorted(set(job.minors))
                if m in self.by_minor and m not in self.held_gpus]
        problems: list[str] = []
        xids: dict[str, list[int]] = {}
        if base.health and gpus:
            try:
                xids = xids_since({short_bus(g.pci_bus_id) for g in gpus}, job.granted_us,
                                  base.kmsg)
            except OSError as exc:
                log.warning("cannot read the kernel log %s for Xid events: %s", base.kmsg, exc)
        at_grant = dict(job.ecc_at_grant)
        for gpu in gpus:
            found = self._gpu_state_problems(gpu, job.job_id,
                                             xids.get(short_bus(gpu.pci_bus_id)),
                                             at_grant.get(gpu.minor))
            for check, detail in found:
                what = f"GPU {gpu.index} (minor {gpu.minor}, {gpu.uuid}): {check}: {detail}"
                problems.append(what)
                self.spool.append("gpu.unhealthy", job_id=job.job_id, gpus=gpu_fields([gpu]),
                                  check=check, outcome="drain", reason=what[:500])
                log.critical("%s", what)
        if problems:
            self._drain("; ".join(problems))
        return problems

    def _gpu_state_problems(self, gpu: GpuInfo, job_id: str, xids: list[int] | None,
                            ecc_at_grant: int | None) -> list[tuple[str, str]]:
        base = self.config.gpu.baseline
        try:
            state = self.backend.device_state(gpu)
        except GpuError as exc:
            return [("state", f"cannot be read: {exc}")]
        found: list[tuple[str, str]] = []
        wanted: list[tuple[str, object, object]] = [
            ("compute_mode", state.compute_mode, base.compute_mode),
            ("persistence", state.persistence, base.persistence),
            ("accounting", state.accounting, base.accounting)]
        if base.reset_app_clocks and state.default_app_clocks is not None:
            wanted.append(("app_clocks", state.app_clocks, state.default_app_clocks))
        for setting, now, want in wanted:
            if want is None or now is None or now == want:
                continue
            try:
                self.backend.restore(gpu, setting, want)
            except GpuError as exc:
                found.append((setting, f"is {now}, should be {want}, and cannot be put back: "
                                       f"{exc}"))
                continue
            self.spool.append("gpu.state", job_id=job_id, gpus=gpu_fields([gpu]),
                              setting=setting, was=str(now), now=str(want), outcome="restored")
        if not base.health:
            return found
        if state.ecc_uncorrected and ecc_at_grant is None:
            found.append(("ecc", f"{state.ecc_uncorrected} volatile uncorrectable ECC errors "
                                 f"since the driver loaded (no count at the grant)"))
        elif state.ecc_uncorrected and state.ecc_uncorrected > (ecc_at_grant or 0):
            found.append(("ecc", f"{state.ecc_uncorrected - (ecc_at_grant or 0)} volatile "
                                 f"uncorrectable ECC errors during job {job_id} "
                                 f"({state.ecc_uncorrected} since the driver loaded)"))
        if state.retired_pages_pending:
            found.append(("retired_pages", "page retirement pending: the GPU needs a reset"))
        if state.remapped_rows_pending:
            found.append(("remapped_rows", "row remapping pending: the GPU needs a reset"))
        if state.remap_failure:
            found.append(("remapped_rows", "a row remapping failed: the GPU needs service"))
        if xids:
            found.append(("xid", f"Xid {', '.join(map(str, xids))} in the kernel log during "
                                 f"job {job_id}"))
        return found


def _figures(report: Any) -> dict[str, Any]:
    fields: dict[str, Any] = report.as_event()
    fields.pop("gpu", None)
    fields.pop("mode", None)
    return fields
