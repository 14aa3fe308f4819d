"""Configuration: one YAML file, validated by a schema that rejects unknown keys.

The file is ``/etc/ztgpu/ztgpu.yaml`` unless ``ZTGPU_CONFIG`` names another.
:func:`load_config` is the only way in; it returns a frozen, typed object and
raises :class:`~ztgpu.errors.ConfigError` naming the file, the key and what
was expected.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ztgpu.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/ztgpu/ztgpu.yaml")
CONFIG_ENV = "ZTGPU_CONFIG"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$")
_UUID_RE = re.compile(r"^(GPU|MIG)-[0-9A-Fa-f-]{8,64}$")
_PCI_RE = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _absolute(value: Path) -> Path:
    if not value.is_absolute():
        raise ValueError("must be an absolute path")
    return value


def _abs_path(value: Any) -> Any:
    """YAML gives strings: make them paths, absolute and without NUL bytes."""
    if isinstance(value, str):
        value = Path(value)
    if isinstance(value, Path):
        if "\0" in str(value):
            raise ValueError("must not contain a NUL byte")
        return _absolute(value)
    return value


def _service_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return value


#: Every path in the config: absolute, given as a string in YAML.
AbsPath = Annotated[Path, BeforeValidator(_abs_path)]
#: A node or service name as it appears in audit events.
ServiceName = Annotated[str, AfterValidator(_service_name)]


class NodeConfig(_Strict):
    #: Node name used in audit events; defaults to the short host name, which
    #: is what Slurm uses unless NodeName differs.
    name: ServiceName | None = None


class PathsConfig(_Strict):
    #: Root/Slurm-only socket for the Prolog, Epilog and admin commands.
    socket: AbsPath = Path("/run/ztgpu/noded.sock")
    #: Socket any user may reach; it serves only the TaskProlog's request to
    #: confine the caller's own task (the agent checks who is asking).
    task_socket: AbsPath = Path("/run/ztgpu/task.sock")
    state_dir: AbsPath = Path("/var/lib/ztgpu")
    spool_dir: AbsPath = Path("/var/spool/ztgpu")
    device_dir: AbsPath = Path("/dev")
    hooks_dir: AbsPath = Path("/usr/libexec/ztgpu")
    log_file: AbsPath | None = None



class SimulatedGpu(_Strict):
    index: int = Field(ge=0, le=63)
    minor: int = Field(ge=0, le=254)
    uuid: str
    pci_bus_id: str
    name: str = "Simulated GPU"
    memory_mib: int = Field(default=81559, ge=1)

    @field_validator("uuid")
    @classmethod
    def _check_uuid(cls, value: str) -> str:
        if not _UUID_RE.fullmatch(value):
            raise ValueError("must look like GPU-xxxxxxxx-xxxx-... (as nvidia-smi -L prints)")
        return value

    @field_validator("pci_bus_id")
    @classmethod
    def _check_pci(cls, value: str) -> str:
        if not _PCI_RE.fullmatch(value):
            raise ValueError("must look like 00000000:3B:00.0")
        return value


class GpuBaselineConfig(_Strict):
    """The state every GPU returns to after a job, and the health it must be in
    (``ztgpu.noded.hygiene``); a setting left None is not checked."""

    compute_mode: Literal["default", "exclusive_process", "prohibited"] | None = "default"
    persistence: bool | None = None
    accounting: bool | None = None
    #: Put application clocks back to the GPU's defaults.
    reset_app_clocks: bool = True
    #: ECC (volatile uncorrectable), retired pages / remapped rows pending and
    #: Xid events since the job started: any of them drains the node.
    health: bool = True
    #: The kernel log the Xid events are read from.
    kmsg: AbsPath = Path("/dev/kmsg")


class GpuConfig(_Strict):
    #: ``auto``: NVML when the NVIDIA driver is loaded, else the simulated
    #: inventory if one is declared; ``nvml`` or ``simulated`` force one.
    backend: Literal["auto", "nvml", "simulated"] = "auto"
    nvml_timeout_s: float = Field(default=10.0, gt=0, le=300)
    simulated: list[SimulatedGpu] = Field(default_factory=list)
    #: For the simulated backend: a file standing in for the driver's
    #: ``/proc/driver/nvidia/params`` (``Key: value`` lines). Unset: the
    #: simulated node has no driver that could change device files.
    simulated_driver_params: AbsPath | None = None
    #: For the simulated backend: the major number its device files carry.
    #: Unset: the NVIDIA major (no driver behind it, so opens reach nothing).
    #: Tests use the kernel's memory devices (major 1), which really open,
    #: to show what a process holding a GPU open can and cannot keep.
    simulated_major: int | None = Field(default=None, ge=1, le=4095)
    #: For the simulated backend: a JSON file of each GPU's settings and
    #: health by UUID (``ztgpu.gpu.device_state.DeviceState`` fields), read
    #: at each check and written when a setting is restored. Unset: nothing
    #: to check.
    simulated_state: AbsPath | None = None
    #: For the simulated backend: a JSON file of scripted telemetry by UUID
    #: (``ztgpu.gpu.telemetry.ScriptedTelemetry``: a sample, or a list given
    #: one per look). Unset: every simulated GPU is idle.
    simulated_telemetry: AbsPath | None = None
    baseline: GpuBaselineConfig = GpuBaselineConfig()

    @model_validator(mode="after")
    def _check_unique(self) -> GpuConfig:
        for attr in ("index", "minor", "uuid", "pci_bus_id"):
            values = [getattr(g, attr) for g in self.simulated]
            if len(values) != len(set(values)):
                raise ValueError(f"simulated GPUs must have distinct '{attr}' values")
        if self.backend == "simulated" and not self.simulated:
            raise ValueError("backend 'simulated' needs at least one entry under 'simulated'")
        return self


class DevicesConfig(_Strict):
    #: Mode, owner and group of GPU device files while no job holds them.
    #: Sites with root-run monitoring (e.g. DCGM in a group) may relax these.
    rest_mode: str = "0600"
    rest_owner: str = "root"
    rest_group: str = "root"
    #: Accounts whose processes may keep GPU device files open while no job
    #: holds the GPU (root always may). nvidia-persistenced holds every GPU by
    #: design; DCGM's host engine runs as root. A name that does not exist on
    #: the node exempts nobody.
    holder_exempt_users: list[str] = Field(default_factory=lambda: ["nvidia-persistenced"],
                                           max_length=32)

    @field_validator("holder_exempt_users")
    @classmethod
    def _check_exempt(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _USER_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a user name")
        return value

    @field_validator("rest_mode")
    @classmethod
    def _check_mode(cls, value: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", value):
            raise ValueError("must be an octal mode string such as '0600'")
        if int(value, 8) & 0o007:
            raise ValueError("must grant nothing to 'other' (last digit 0): "
                             "otherwise any user could open an idle GPU")
        return value

    @field_validator("rest_owner", "rest_group")
    @classmethod
    def _check_account(cls, value: str) -> str:
        if not _USER_RE.fullmatch(value):
            raise ValueError("must be a user or group name")
        return value

    @property
    def rest_mode_bits(self) -> int:
        return int(self.rest_mode, 8)


class CgroupsConfig(_Strict):
    #: Where the cgroups are mounted: the v1 controllers (``<root>/devices``)
    #: or, on a pure cgroup v2 node, the unified hierarchy itself.
    root: AbsPath = Path("/sys/fs/cgroup")
    #: Which device mechanism the agent uses: ``auto`` picks v1 where the v1
    #: devices controller is mounted (v1 and hybrid nodes: Slurm uses v1
    #: there too), else v2 where ``root`` is a cgroup2 hierarchy.
    mode: Literal["auto", "v1", "v2"] = "auto"
    #: The cgroup2 hierarchy to use in v2 mode, if not ``root`` (a hybrid
    #: node's /sys/fs/cgroup/unified; tests use a private part of it).
    unified_root: AbsPath | None = None
    #: Also guard the DRM render nodes (/dev/dri/renderD*), as GPUs of their own:
    #: only for sites whose GPU jobs never use them (v2 only).
    guard_dri_render: bool = False
    #: Name of the agent's own directory in the devices hierarchy, used for
    #: jobs that Slurm does not confine itself (ConstrainDevices=no; v1 only).
    name: str = "ztgpu"


    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("must be a plain directory name")
        return value


class IsolationConfig(_Strict):
    #: What to do when a probe finds a job can open more (or less) than Slurm
    #: allocated: end the job (default), or only record it.
    on_violation: Literal["cancel_job", "record_only"] = "cancel_job"
    #: How often running jobs are re-probed, in seconds.
    verify_interval_s: float = Field(default=60.0, ge=1, le=86400)
    #: How often the agent looks for new job processes to confine.
    sweep_interval_s: float = Field(default=0.25, ge=0.01, le=60)
    #: How often device files are checked for changes made by others.
    drift_interval_s: float = Field(default=5.0, ge=0.1, le=3600)
    probe_timeout_s: float = Field(default=5.0, gt=0, le=60)
    #: A grant whose job has had no cgroup on the node for this long (its
    #: Epilog never reached the agent) may be reclaimed for a new job.
    stale_grant_s: float = Field(default=30.0, ge=1, le=86400)
    #: When a GPU is taken back, processes still holding it are killed and
    #: waited for this long; one that outlives it keeps the GPU out of use
    #: (and drains the node) until it is gone. Keep it well inside the hooks'
    #: 10 s budget.
    holder_kill_timeout_s: float = Field(default=5.0, gt=0, le=8)


WipeMode = Literal["off", "verify", "wipe"]


class WipeConfig(_Strict):
    """GPU memory hygiene between jobs (``ztgpu.noded.hygiene``)."""

    #: ``wipe``: after each job, fill every GPU's memory with a pattern, check
    #: it, fill with zeros and check again (through libcuda); ``verify``: only
    #: check that the memory handed out reads as zeros (the driver's scrub on
    #: free happened); ``off``: neither.
    mode: WipeMode = "wipe"
    #: Per Slurm partition, overriding ``mode``.
    partitions: dict[str, WipeMode] = Field(default_factory=dict)
    #: The CUDA driver library (tests point it at a stand-in of host memory).
    libcuda: str = "libcuda.so.1"


Response = Literal["record", "alert", "end_process", "end_job", "drain", "hold_user"]
#: One response, or several carried out in order (e.g. [end_process, hold_user]).
Responses = Response | list[Response]
_HOURS = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-4]):([0-5][0-9])")


def _hour_windows(value: list[str]) -> list[str]:
    """Local time-of-day windows, each ``HH:MM-HH:MM`` (``ztgpu.hours``)."""
    for window in value:
        if not _HOURS.fullmatch(window):
            raise ValueError(f"{window!r}: each window must be HH:MM-HH:MM (24 h)")
    return value


class TelemetryResponses(_Strict):
    """What the agent does when a telemetry rule fires (``ztgpu.noded.telemetry``),
    besides the critical audit event it always records: ``record`` (only the
    event), ``alert`` (also logged as critical and counted in
    ``ztgpu_alerts_total``), ``end_process`` (SIGKILL the processes that
    should not be there, never root's), ``end_job`` (cancel the job holding
    the GPU), ``drain`` (drain the node), ``hold_user`` (authd refuses the
    user's GPU jobs until an admin runs `ztgpu admin hold release`: the
    owner of the processes, else the job's user; needs auth.authd_url), or a
    list of them, carried out in order."""

    #: A process on a GPU that is not in the cgroup of the job holding it.
    foreign_process: Responses = "end_process"
    #: Processes or memory in use on a GPU that no job holds.
    unallocated_use: Responses = "end_process"
    #: A GPU busy while no process of the job holding it is left.
    busy_without_job: Responses = "end_process"
    #: Use outside ``telemetry.allowed_hours``.
    off_hours: Responses = "record"
    #: An Xid event of the GPU in the kernel log.
    xid: Responses = "record"

    @model_validator(mode="after")
    def _check_lists(self) -> TelemetryResponses:
        for rule, chosen in self:
            if isinstance(chosen, list) and (not chosen or len(set(chosen)) != len(chosen)):
                raise ValueError(f"{rule}: a list of responses must name each at least once "
                                 "and none twice")
        return self

    def uses(self, response: str) -> list[str]:
        """The rules whose responses include *response*."""
        return [rule for rule, chosen in self
                if response in ([chosen] if isinstance(chosen, str) else chosen)]


class TelemetryConfig(_Strict):
    """GPU telemetry tied to jobs, and the allocation-aware rules on the node."""

    enabled: bool = True
    #: Seconds between two looks at every GPU.
    interval_s: float = Field(default=5.0, ge=0.1, le=5)
    #: A GPU counts as busy above this utilisation (percent) ...
    busy_util_pct: float = Field(default=5.0, ge=0, le=100)
    #: ... or with more memory in use than this (MiB; the driver's own
    #: reservation on an idle GPU stays below it).
    busy_memory_mib: int = Field(default=256, ge=0)
    #: Local times of day GPU use is allowed, e.g. ["07:00-22:00"]; empty:
    #: any time. Use outside them fires ``off_hours``.
    allowed_hours: list[str] = Field(default_factory=list)
    responses: TelemetryResponses = TelemetryResponses()
    #: Processes of these uids are recorded but never ended (root's: the
    #: driver's helpers, persistenced, DCGM).
    spared_uids: list[int] = Field(default_factory=lambda: [0])
    #: dcgm-exporter's ``--hpc-job-mapping-dir``: the agent keeps a file per
    #: GPU (named by its NVML index) listing the job holding it. Unset: none.
    dcgm_job_mapping_dir: AbsPath | None = None
    #: Where ``/metrics`` is served (Prometheus text format), ``host:port``;
    #: unset: not served. Plain HTTP unless ``metrics_cert`` is set: bind it
    #: to loopback then (the metrics name jobs and users).
    metrics_listen: str | None = "127.0.0.1:9402"
    #: HTTPS for /metrics: a ``service`` certificate for this host's name
    #: (``ztgpu pki issue --role service --name <host>``; the node's own
    #: certificate is for clients only) and its key; a client must present a
    #: ``monitor`` or ``auditor`` certificate of the site CA (``tls.ca_cert``).
    metrics_cert: AbsPath | None = None
    metrics_key: AbsPath | None = None

    @field_validator("allowed_hours")
    @classmethod
    def _check_hours(cls, value: list[str]) -> list[str]:
        return _hour_windows(value)

    @model_validator(mode="after")
    def _check_metrics_tls(self) -> TelemetryConfig:
        if (self.metrics_cert is None) != (self.metrics_key is None):
            raise ValueError("metrics_cert and metrics_key go together")
        return self

    @field_validator("metrics_listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port, e.g. 0.0.0.0:9402")
        return value


class SlurmConfig(_Strict):
    #: Besides root, the one account allowed on the agent's socket: set it only
    #: when slurm.conf's SlurmdUser is not root. None (the default): root only
    #: (slurmd runs as root; SlurmUser, the controller's account, must not be
    #: able to grant GPUs on a node).
    user: str | None = None
    #: slurm.conf the agent's own Slurm commands (scancel) use; None means
    #: Slurm's default lookup.
    conf: AbsPath | None = None
    #: The node's gres.conf, checked at start against the agent's mapping of
    #: gres indices to device files. None: gres.conf beside ``conf`` (or
    #: /etc/slurm/gres.conf).
    gres_conf: AbsPath | None = None
    bin_dir: AbsPath = Path("/usr/bin")
    command_timeout_s: float = Field(default=10.0, gt=0, le=120)

    @property
    def gres_conf_path(self) -> Path:
        if self.gres_conf is not None:
            return self.gres_conf
        return (self.conf.parent if self.conf is not None else Path("/etc/slurm")) / "gres.conf"


class NodedConfig(_Strict):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    request_max_bytes: int = Field(default=65536, ge=1024, le=4 * 1024 * 1024)
    request_timeout_s: float = Field(default=5.0, gt=0, le=60)


_HTTPS_URL = re.compile(r"https://[A-Za-z0-9.\-\[\]:]+(:[0-9]{1,5})?/?")


def _https_url(value: str | None) -> str | None:
    """A service URL: https only (TLS is mandatory), without a trailing slash."""
    if value is None:
        return None
    if not _HTTPS_URL.fullmatch(value):
        raise ValueError("must be https://host[:port] (TLS is mandatory)")
    return value.rstrip("/")


def _needs_dsn(store: str, dsn_file: Path | None) -> None:
    if store == "postgres" and dsn_file is None:
        raise ValueError("store 'postgres' needs postgres_dsn_file")


class TlsConfig(_Strict):
    #: The site CA certificate that every peer's certificate must chain to.
    ca_cert: AbsPath = Path("/etc/ztgpu/pki/ca.crt")
    #: This host's certificate and key (``ztgpu pki issue``); the key is 0600.
    cert: AbsPath | None = None
    key: AbsPath | None = None



class AuditConfig(_Strict):
    #: https://host:port of ztgpu-collectord; None keeps events local only.
    collector_url: str | None = None
    #: Unacknowledged events the spool may hold before ``spool_full_action``.
    spool_max_events: int = Field(default=1_000_000, ge=100, le=1_000_000_000)
    #: ``stop_granting``: refuse GPUs to new jobs until the spool drains.
    #: ``cancel_jobs``: also end the node's running GPU jobs.
    spool_full_action: Literal["stop_granting", "cancel_jobs"] = "stop_granting"
    #: Acknowledged events kept locally for ``ztgpu audit tail --local``.
    keep_acked_events: int = Field(default=100_000, ge=0, le=1_000_000_000)
    batch_max_events: int = Field(default=1000, ge=1, le=5000)
    retry_min_s: float = Field(default=0.5, gt=0, le=60)
    retry_max_s: float = Field(default=30.0, gt=0, le=3600)
    request_timeout_s: float = Field(default=10.0, gt=0, le=300)
    #: How often the node signs its chain head for the collector.
    checkpoint_interval_s: float = Field(default=60.0, ge=1, le=86400)

    @field_validator("collector_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return _https_url(value)

    @model_validator(mode="after")
    def _check_retry(self) -> AuditConfig:
        if self.retry_min_s > self.retry_max_s:
            raise ValueError("retry_min_s must not exceed retry_max_s")
        return self


class SyslogConfig(_Strict):
    #: host:port of an RFC 5425 (syslog over TLS) receiver; None disables it.
    target: str | None = None
    #: CA that the receiver's certificate must chain to (default: tls.ca_cert).
    ca_cert: AbsPath | None = None
    #: Expected name in the receiver's certificate (default: the host).
    server_name: str | None = None
    #: Use tls.cert/tls.key as a client certificate towards the receiver.
    client_cert: bool = True
    app_name: str = "ztgpu"

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}", value):
            raise ValueError("must be host:port")
        return value



class AnomalyConfig(_Strict):
    """Learned per-user baselines over the nodes' ``gpu.usage`` summaries
    (``ztgpu.collector.anomaly``): robust z-scores (median and MAD)."""

    enabled: bool = True
    #: A figure is anomalous above this robust z-score (and its floor).
    threshold: float = Field(default=5.0, ge=2, le=100)
    #: Past summaries a baseline needs before it judges anything.
    min_history: int = Field(default=10, ge=3, le=10_000)
    #: The scale is never below this share of the median.
    min_relative_scale: float = Field(default=0.1, ge=0, le=10)
    #: Local times counted as peak; busy time outside them is off-peak.
    peak_hours: list[str] = Field(default_factory=lambda: ["08:00-20:00"])

    @field_validator("peak_hours")
    @classmethod
    def _check_hours(cls, value: list[str]) -> list[str]:
        return _hour_windows(value)


class CollectorConfig(_Strict):
    #: Name of this collector in its own audit events.
    name: ServiceName = "collector"
    listen_host: str = "0.0.0.0"  # noqa: S104 - the service is reached over the network
    listen_port: int = Field(default=8443, ge=1, le=65535)
    store: Literal["sqlite", "postgres"] = "sqlite"
    sqlite_path: AbsPath = Path("/var/lib/ztgpu-collector/audit.db")
    #: File holding a libpq connection string (it may contain a password, so
    #: it is read from a 0600 file, never from this config).
    postgres_dsn_file: AbsPath | None = None
    #: Largest request body accepted, in bytes.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=4096, le=256 * 1024 * 1024)
    max_batch_events: int = Field(default=5000, ge=1, le=100_000)
    #: Largest page the query API returns.
    max_page_events: int = Field(default=10_000, ge=1, le=1_000_000)
    #: Processes that parse, check and store incoming batches; 0 = one per CPU.
    ingest_processes: int = Field(default=0, ge=0, le=256)
    #: Also append every stored event to this file as JSON Lines.
    jsonl_path: AbsPath | None = None
    syslog: SyslogConfig = SyslogConfig()
    anomaly: AnomalyConfig = AnomalyConfig()

    @model_validator(mode="after")
    def _check_store(self) -> CollectorConfig:
        _needs_dsn(self.store, self.postgres_dsn_file)
        return self


class AuthdConfig(_Strict):
    #: Name of this authd in its own audit events.
    name: ServiceName = "authd"
    listen_host: str = "0.0.0.0"  # noqa: S104 - the service is reached over the network
    listen_port: int = Field(default=8444, ge=1, le=65535)
    store: Literal["sqlite", "postgres"] = "sqlite"
    sqlite_path: AbsPath = Path("/var/lib/ztgpu-authd/authd.db")
    postgres_dsn_file: AbsPath | None = None
    #: Key-encryption key file (0600): TOTP secrets and grant-signing keys
    #: are stored encrypted under it.
    kek_file: AbsPath = Path("/etc/ztgpu/authd/kek")
    policy_file: AbsPath = Path("/etc/ztgpu/policy.yaml")
    #: The gate asks Slurm (squeue) whose job it is asked about and denies when
    #: that is not the user named in the request. Turn off only for an authd
    #: with no Slurm to ask; then any controller certificate is believed.
    gate_checks_job_owner: bool = True
    #: What an MFA login opens. ``user``: every login of the user may start
    #: GPU jobs for the session's lifetime. ``login_session``: only jobs
    #: submitted from the login session that ran `ztgpu login` (bound to it by
    #: the submit hosts' cli_filter, `ztgpu install --cli-filter`); the job
    #: gate (`ztgpu install --gate`) enforces it.
    mfa_binding: Literal["user", "login_session"] = "user"
    #: login_session: how long the gate waits for a just-submitted job's binding.
    bind_wait_s: float = Field(default=3.0, ge=0, le=30)
    #: munged's socket used to check login credentials; None = munge's default.
    munge_socket: AbsPath | None = None
    #: Failed TOTP codes in a row that lock an account, and for how long.
    login_max_failures: int = Field(default=5, ge=1, le=100)
    login_lockout_s: float = Field(default=900.0, ge=1, le=86400)
    #: Logins (each costs an unmunge) accepted per source address, and per
    #: user, per minute; more are refused (429) and recorded, rate-limited.
    login_per_address_per_min: int = Field(default=30, ge=1, le=100_000)
    login_per_user_per_min: int = Field(default=10, ge=1, le=10_000)
    #: Logins and status calls waiting for or on their own workers; beyond it
    #: a login is refused at once (503). Grants and the gate never wait for them.
    login_max_pending: int = Field(default=32, ge=1, le=10_000)
    #: Distinct users one node may hold (telemetry response ``hold_user``)
    #: per hour; more are refused and recorded.
    node_holds_per_hour: int = Field(default=5, ge=1, le=1000)
    #: An admin action needs an MFA login at most this old.
    admin_mfa_max_age_s: float = Field(default=900.0, ge=30, le=86400)
    #: A grant lives at least the job's time limit; jobs without one get this.
    default_grant_s: float = Field(default=86400.0, ge=60, le=30 * 86400)
    max_body_bytes: int = Field(default=65536, ge=1024, le=4 * 1024 * 1024)
    #: A unix socket on which authd also answers the job gate (``POST
    #: /v1/gate``, nothing else) for a PrologSlurmctld on the same host: no
    #: TLS and no certificate; the caller's uid from the kernel (SO_PEERCRED)
    #: must be root, authd's own or one of ``gate_socket_users``. Set, `ztgpu
    #: install --gate` points the gate at it (a gate start then costs no
    #: ``ssl`` import and no handshake).
    gate_socket: AbsPath | None = None
    gate_socket_users: list[str] = Field(default_factory=lambda: ["slurm"], max_length=16)

    @field_validator("gate_socket_users")
    @classmethod
    def _check_gate_users(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not _USER_RE.fullmatch(name)]
        if bad:
            raise ValueError(f"not user names: {', '.join(bad)}")
        return value

    @model_validator(mode="after")
    def _check_store(self) -> AuthdConfig:
        _needs_dsn(self.store, self.postgres_dsn_file)
        return self


class AuthConfig(_Strict):
    #: https://host:port of ztgpu-authd. Set, the node agent grants a job its
    #: GPUs only with a valid signed grant from authd.
    authd_url: str | None = None
    #: authd unreachable when a job starts: ``deny`` (no GPU, job ended, node
    #: stays up) or ``allow`` (grant by Slurm's allocation alone, recorded).
    unreachable_action: Literal["deny", "allow"] = "deny"
    request_timeout_s: float = Field(default=5.0, gt=0, le=60)
    #: How often the agent asks authd for new revocations.
    revocation_poll_s: float = Field(default=1.0, ge=0.1, le=60)
    #: The grant-signing public keys (a JWKS file from `ztgpu admin keys
    #: export`, root-owned, distributed by the site). Set, grants are verified
    #: against it alone, never against what authd serves; unset, the agent
    #: takes authd's /v1/jwks over the mutually authenticated connection.
    grant_keys_file: AbsPath | None = None

    @field_validator("authd_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return _https_url(value)


class Config(_Strict):
    node: NodeConfig = NodeConfig()
    paths: PathsConfig = PathsConfig()
    gpu: GpuConfig = GpuConfig()
    devices: DevicesConfig = DevicesConfig()
    cgroups: CgroupsConfig = CgroupsConfig()
    isolation: IsolationConfig = IsolationConfig()
    wipe: WipeConfig = WipeConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    slurm: SlurmConfig = SlurmConfig()
    noded: NodedConfig = NodedConfig()
    tls: TlsConfig = TlsConfig()
    audit: AuditConfig = AuditConfig()
    collector: CollectorConfig = CollectorConfig()
    auth: AuthConfig = AuthConfig()
    authd: AuthdConfig = AuthdConfig()

    @property
    def node_name(self) -> str:
        return self.node.name or socket.gethostname().split(".")[0]

    @model_validator(mode="after")
    def _check_hold_has_authd(self) -> Config:
        rules = self.telemetry.responses.uses("hold_user")
        if rules and self.auth.authd_url is None:
            raise ValueError(f"telemetry.responses: {', '.join(rules)} hold the user at "
                             "authd (hold_user), which needs auth.authd_url")
        return self


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: *explicit*, else ``$ZTGPU_CONFIG``, else the default."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def _describe(loc: tuple[int | str, ...]) -> str:
    # Key names come from the file: escape them so a message stays one line.
    text = ".".join(str(part) for part in loc) or "(top level)"
    return text.encode("unicode_escape").decode("ascii")[:200]


def _expected(error: Any) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling"
    msg = str(error.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


def parse_config(data: Any, source: str) -> Config:
    """Validate already-parsed YAML *data*; errors name *source* and the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping of sections, "
                          f"got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: {_describe(err['loc'])}: {_expected(err)}"
                 for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would
    silently keep the last, hiding a setting the admin thinks is active)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the configuration.

    A missing default file yields the built-in defaults; a missing file that
    was named explicitly (argument or ``ZTGPU_CONFIG``) is an error.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key or bad value.
    """
    explicit = path is not None or bool(os.environ.get(CONFIG_ENV))
    file = config_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{file}: no such file") from None
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(parse)"
        raise ConfigError(f"{file}: {where}: not valid YAML: "
                          f"{getattr(exc, 'problem', None) or exc}") from None
    return parse_config(data, str(file))


def dump_effective(config: Config) -> str:
    """The effective configuration as YAML (defaults filled in)."""
    data = config.model_dump(mode="json")
    data["node"]["name"] = config.node_name
    return yaml.safe_dump(data, sort_keys=False)


def read_secret_file(path: Path, what: str) -> str:
    """Read a one-line secret from a file only its owner can read.

    Raises ConfigError naming the file (never its content) if it is missing,
    empty, or readable by group or others.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot open: {exc.strerror}") from None
    try:
        if os.fstat(fd).st_mode & 0o077:
            raise ConfigError(f"{what} {path}: must not be readable by group or others "
                              "(chmod 600)")
        data = os.read(fd, 65536).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    if not data:
        raise ConfigError(f"{what} {path}: is empty")
    return data
