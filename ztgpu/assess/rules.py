"""The rules ``ztgpu assess`` checks: stable ids, severities, principles, NIST controls.

A rule's id never changes meaning (SARIF ``ruleId``); a retired rule's id is
not reused. Each names the zero-trust principles it serves, the NIST SP
800-53 Rev. 5 controls it evidences (the controls SP 800-234's HPC overlay
tailors), and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: The six principles the suite is built on, each in a word and in a line.
PRINCIPLES: dict[str, str] = {
    "identity": "verify every identity explicitly: GPU work only for an MFA-backed identity",
    "least_privilege": "per-job least privilege: a job opens only the GPUs it was allocated",
    "isolation": "isolation proven, not assumed: cgroups, device files and probes agree",
    "hygiene": "nothing outlives its job: GPU memory is wiped before the next job",
    "monitoring": "continuous monitoring: what runs on each GPU is watched and answered",
    "audit": "every decision recorded, attributable, tamper-evident and delivered",
}

#: Severities, weakest first (SARIF levels: note, note, warning, error, error).
SEVERITIES = ("info", "low", "medium", "high", "critical")
SARIF_LEVEL = {"info": "note", "low": "note", "medium": "warning", "high": "error",
               "critical": "error"}


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    severity: str
    principles: tuple[str, ...]
    #: NIST SP 800-53 Rev. 5 controls.
    controls: tuple[str, ...]
    summary: str
    fix: str


def _r(rule_id: str, name: str, severity: str, principles: str, controls: str, summary: str,
       fix: str) -> Rule:
    return Rule(rule_id, name, severity, tuple(principles.split()), tuple(controls.split()),
                summary, fix)


RULES: dict[str, Rule] = {rule.id: rule for rule in (
    # ---- Slurm ---------------------------------------------------------------
    _r("ZT101", "slurm-conf-missing", "critical", "least_privilege isolation", "CM-6 AC-3",
       "slurm.conf cannot be read, so nothing about the node's job hooks can be known.",
       "Point slurm.conf at the file slurmd reads (--slurm-conf or slurm.conf in the "
       "config's slurm section)."),
    _r("ZT102", "suite-hooks-not-installed", "critical", "least_privilege isolation audit",
       "AC-3 AC-6 AU-2",
       "slurm.conf does not run the suite's Prolog and Epilog: jobs start without a grant "
       "and their GPUs are never taken back.",
       "Run `ztgpu install --slurm-conf /etc/slurm/slurm.conf`, then restart slurmctld and "
       "slurmd (`ztgpu install --check` proves they run it)."),
    _r("ZT103", "prolog-flags-contain", "high", "isolation", "AC-4 SC-7",
       "PrologFlags lacks Contain (or Alloc): SSH logins have no extern step to be adopted "
       "into, and the grant may come after the job's first step.",
       "Set PrologFlags=Alloc,Contain (`ztgpu install` does)."),
    _r("ZT104", "prolog-epilog-timeout", "low", "isolation", "SI-17",
       "PrologEpilogTimeout is unset: a hung hook holds the allocation forever.",
       "Set PrologEpilogTimeout=60 or more (wipes of large GPUs need their time)."),
    _r("ZT105", "proctrack-not-cgroup", "high", "isolation monitoring", "AC-4 SI-4",
       "ProctrackType is not proctrack/cgroup: a job's processes are not kept in the "
       "job's cgroup, so neither the device allowlist nor pid -> job attribution holds.",
       "Set ProctrackType=proctrack/cgroup."),
    _r("ZT106", "task-plugin-not-cgroup", "medium", "isolation", "AC-4",
       "TaskPlugin does not include task/cgroup: Slurm's own device confinement is off.",
       "Set TaskPlugin=task/cgroup,task/affinity."),
    _r("ZT107", "constrain-devices-off", "medium", "isolation", "AC-4 SC-39",
       "cgroup.conf does not set ConstrainDevices=yes: the suite's own allowlist is the "
       "only layer (it holds, but there is no second one).",
       "Set ConstrainDevices=yes in cgroup.conf (defence in depth)."),
    _r("ZT108", "gres-devices-mismatch", "high", "least_privilege", "CM-8 AC-3",
       "gres.conf names GPU device files that are not on the node, or the node has GPU "
       "device files gres.conf does not name: Slurm's allocation and the devices disagree.",
       "Make gres.conf's File= lines list exactly the node's /dev/nvidiaN files."),
    # ---- the NVIDIA driver and device files ----------------------------------
    _r("ZT201", "driver-scrub-disabled", "high", "hygiene", "SC-4",
       "The NVIDIA driver's RMDisableScrubOnFree is set: freed GPU memory is not scrubbed, "
       "so the next job can read what the last one left.",
       "Remove RMDisableScrubOnFree from the modprobe options (and keep the suite's wipe "
       "on: wipe.mode verify)."),
    _r("ZT202", "driver-device-file-mode", "high", "least_privilege", "AC-3 AC-6",
       "The driver creates GPU device files readable and writable by others "
       "(DeviceFileMode): any process outside a job can open every GPU until the agent "
       "resets them.",
       "Set `options nvidia NVreg_DeviceFileMode=0660 NVreg_DeviceFileGID=0` (or "
       "ModifyDeviceFiles=0 and let the agent own the files)."),
    _r("ZT203", "gpu-device-open-to-all", "critical", "least_privilege isolation",
       "AC-3 AC-6",
       "A GPU device file is open to other users (mode o+rw) right now.",
       "Start ztgpu-noded (it keeps idle GPUs root-only) and find who changed the mode "
       "(`ztgpu audit trail --code device.drift`)."),
    # ---- cgroups -----------------------------------------------------------------
    _r("ZT301", "cgroup-mode-unknown", "high", "isolation", "AC-4",
       "No cgroup hierarchy the suite enforces through was found (neither v1 devices nor "
       "a cgroup2 mount).",
       "Boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1) or a v1 devices "
       "controller."),
    # ---- PAM and sshd ---------------------------------------------------------------
    _r("ZT401", "pam-module-missing", "high", "identity isolation audit", "AC-17 IA-2 AU-2",
       "sshd's PAM stack does not call the suite's module: an SSH login is a way to the "
       "GPUs that no job allowed, and it is not recorded.",
       "Run `ztgpu install --pam sshd` (keep a root shell open until a test login works)."),
    _r("ZT402", "pam-slurm-adopt-fails-open", "high", "isolation", "AC-17 SI-17",
       "pam_slurm_adopt is used with its fail-open defaults (action_adopt_failure=allow, "
       "action_generic_failure=ignore): a login it cannot adopt gets in unconfined.",
       "Add action_adopt_failure=deny action_generic_failure=deny, or use the suite's "
       "module instead."),
    _r("ZT403", "pam-systemd-with-adoption", "high", "isolation", "AC-4",
       "pam_systemd runs in the same sshd stack as adoption: logind moves the shell out of "
       "the job's cgroup again (every GPU visible after ssh).",
       "Remove or comment out pam_systemd.so in /etc/pam.d/sshd's session lines on compute "
       "nodes."),
    _r("ZT404", "sshd-without-pam", "critical", "identity isolation", "AC-17 IA-2",
       "sshd runs with UsePAM no: no PAM module (the suite's or pam_slurm_adopt) sees a "
       "login.",
       "Set UsePAM yes in sshd_config."),
    _r("ZT405", "sshd-root-password-login", "medium", "identity", "IA-2 AC-17",
       "sshd lets root log in with a password (PermitRootLogin yes).",
       "Set PermitRootLogin prohibit-password (or no)."),
    _r("ZT406", "sshd-password-authentication", "low", "identity", "IA-2(1) IA-5",
       "sshd accepts passwords: a stolen password alone opens a login (the suite still "
       "keeps it off the GPUs without a job).",
       "Set PasswordAuthentication no and use keys (plus `ztgpu install --pam-mfa`)."),
    # ---- munge --------------------------------------------------------------------------
    _r("ZT501", "munge-key-exposed", "critical", "identity", "IA-5 SC-12",
       "The munge key is readable by users other than munge: whoever reads it can forge "
       "any uid to Slurm and to authd.",
       "chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; restart "
       "munge everywhere after replacing the key."),
    _r("ZT502", "munge-key-missing", "high", "identity", "IA-5",
       "No munge key was found: job identity cannot be proven on this node.",
       "Install the site's munge key (0400, owned by munge) and start munge."),
    # ---- the suite's services and certificates ----------------------------------
    _r("ZT601", "agent-not-running", "critical", "least_privilege isolation audit",
       "AC-3 AU-12",
       "ztgpu-noded does not answer on its socket: no grant, probe, wipe or audit on this "
       "node.",
       "systemctl enable --now ztgpu-noded; `journalctl -u ztgpu-noded` says why it stopped."),
    _r("ZT602", "agent-refusing-grants", "high", "isolation hygiene", "SI-17",
       "The agent refuses grants on this node (a GPU failed a wipe, a stuck holder, an "
       "audit backlog): jobs cannot start here.",
       "Read `ztgpu status`; `ztgpu node recover` once the cause is fixed."),
    _r("ZT603", "certificate-expiring", "high", "identity audit", "SC-17 IA-5(2)",
       "A certificate of the suite expires within 14 days (or has): mTLS to authd and the "
       "collector stops then.",
       "Renew it (`ztgpu pki renew`, or the ztgpu-pki-renew timer)."),
    _r("ZT604", "certificate-unreadable", "medium", "identity", "SC-17",
       "A certificate the config names cannot be read or parsed.",
       "Fix the path in tls.cert or reissue the certificate."),
    _r("ZT605", "no-authd", "medium", "identity", "IA-2(1) AC-3",
       "auth.authd_url is not set: GPU jobs need no MFA-backed identity or signed grant on "
       "this node.",
       "Set auth.authd_url (and tls.cert/tls.key: a node certificate)."),
    _r("ZT606", "wipe-off", "high", "hygiene", "SC-4 MP-6",
       "wipe.mode is off: GPU memory is not wiped between jobs by the suite.",
       "Set wipe.mode: verify (or per partition in wipe.partitions)."),
    _r("ZT607", "telemetry-off", "medium", "monitoring", "SI-4 CA-7",
       "telemetry.enabled is false: nothing watches what runs on the GPUs.",
       "Set telemetry.enabled: true."),
    # ---- audit ----------------------------------------------------------------------------
    _r("ZT701", "audit-not-forwarded", "high", "audit", "AU-4(1) AU-9(2)",
       "audit.collector_url is not set: the node's events stay on the node, where root can "
       "remove them.",
       "Set audit.collector_url to the site's ztgpu-collectord."),
    _r("ZT702", "audit-backlog", "high", "audit", "AU-5 AU-12",
       "Events wait on the node for the collector: the backlog is large or its oldest event "
       "old.",
       "Check the collector's reachability and certificate (`ztgpu status` shows the "
       "forwarder's last error)."),
)}


def rule(rule_id: str) -> Rule:
    return RULES[rule_id]


def count_severities(severities: Iterable[str]) -> dict[str, int]:
    """How many of each severity, most severe first (every severity listed)."""
    seen = list(severities)
    return {sev: seen.count(sev) for sev in reversed(SEVERITIES)}


def describe_counts(counts: dict[str, int]) -> str:
    """``1 critical, 4 high`` (only those present), or ``no findings``."""
    return ", ".join(f"{n} {sev}" for sev, n in counts.items() if n) or "no findings"


def at_least(severity: str, floor: str) -> bool:
    return SEVERITIES.index(severity) >= SEVERITIES.index(floor)
