"""The job gate: Slurm's PrologSlurmctld, a thin client of ztgpu-authd.

slurmctld runs this (as SlurmUser, on the controller) once a job has been
given nodes and before anything of it starts. It reads the job from the
environment, asks Slurm how many GPUs the job holds, and asks authd
(``POST /v1/gate``, mutual TLS 1.3 with the controller's ``service``
certificate) whether the job may start. Exit 0 lets the job start; any
other exit makes slurmctld requeue a batch job (or cancel an interactive
one) without draining a node. A job that asks for no GPU is let through
without asking authd. The gate is optional (``ztgpu install --gate``):
high-throughput sites may leave it out and rely on the node-side grants.

Observed on Slurm 22.05.8 (private test cluster, select/cons_tres):

* Environment: SLURM_JOB_ID, SLURM_JOBID, SLURM_JOB_UID, SLURM_JOB_USER,
  SLURM_JOB_GID, SLURM_JOB_GROUP, SLURM_JOB_PARTITION, SLURM_JOB_ACCOUNT
  (the literal string ``(null)`` when the job has none), SLURM_JOB_NAME,
  SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES, SLURM_JOB_CPUS_PER_NODE,
  SLURM_JOB_COMMENT, SLURM_JOB_RESTART_COUNT, SLURM_JOB_WORK_DIR,
  SLURM_JOB_STDIN/STDOUT, SLURM_CLUSTER_NAME,
  SLURM_SCRIPT_CONTEXT=prolog_slurmctld. Nothing about GPUs (no
  SLURM_JOB_GPUS, gres or tres-per-node), no time limit, no PATH and no
  SLURM_CONF. So the gate asks ``squeue -h -j JOB -O ...`` (with the
  slurm.conf path baked in by the installer; ~5 ms) for tres-per-job/node/
  socket/task, node and task counts, the allocated TRES and the time limit.
  ``squeue --json -j JOB`` cannot be used: 22.05 ignores ``-j`` there.
  ``scontrol -o show job`` is not parsed: user text (Comment, JobName) can
  carry spaces and ``Key=Value`` look-alikes. Array tasks get
  SLURM_ARRAY_JOB_ID/SLURM_ARRAY_TASK_ID, and ``squeue -j ID`` with the
  task whose id is the array's id lists every task of the array, so the
  gate asks for ``A_T``. (Het jobs, ``H+O``, could not be run on the
  one-node test cluster; if squeue printed more than one line the gate
  would deny.)
* During the PrologSlurmctld the job is CONFIGURING and the node "mixed".
* Non-zero exit, batch job: slurmctld logs "prolog_slurmctld JobId=N prolog
  exit status 1:0" and "Requeuing JobId=N"; the job is PENDING again at
  once with Reason=None, then BeginTime, Restarts=1 and EligibleTime =
  failure + 121 s. It does loop: without a hold the gate runs again once
  the job is eligible (about every two minutes, with no retry limit in
  22.05). No node is drained; the node goes back to idle.
* ``scontrol hold JOB`` + ``scontrol update JobId=JOB AdminComment=...`` work
  both while the job is CONFIGURING (the hold survives the requeue) and
  after the requeue: the job stays PENDING with Reason=JobHeldAdmin,
  Priority=0, and its owner reads the AdminComment in ``scontrol show job``
  (``squeue -o '%i %T %r'`` shows only "JobHeldAdmin"). ``scontrol update
  ... Reason=`` is refused ("Update of this parameter is not supported").
* ``scontrol release JOB`` after the gate now allows: the job goes to
  Reason=BeginTime and waits out the rest of the 121 s; ``scontrol update
  JobId=JOB StartTime=now`` (operator) makes it start at once; it then
  runs to COMPLETED (Restarts=1).
* srun/salloc: the job is cancelled ("unable to requeue JobId=N: Only batch
  jobs are accepted"); the terminal shows only Slurm's own text, e.g.
  "srun: PrologSlurmctld failed, job killed" (plus "Nodes ... are still not
  ready"), "salloc: PrologSlurmctld failed, job killed / Job allocation N
  has been revoked." The prolog's stdout and stderr reach neither the
  terminal nor slurmctld's log (slurmscriptd drops them, even at
  SlurmctldDebug=debug). The gate therefore also writes to syslog, and
  puts what the user should know into the job's AdminComment.
* ``scontrol notify JOB TEXT`` from the PrologSlurmctld does reach a
  waiting ``srun``/``salloc`` (22.05 and 24.11: "srun: ztgpu: MFA session
  required: run ztgpu login" just before Slurm's own lines), so the gate
  tells every refused job's owner the reason that way too. For a batch job
  it succeeds and shows nowhere (nothing of the job runs yet); the
  AdminComment is what batch users read.

Standard library (ssl, socket, json, subprocess, syslog; not http.client, whose
imports alone cost ~25 ms) plus
:mod:`ztgpu.slurm.env` only: this runs for every job start, under
``python -I -S``.
"""

from __future__ import annotations

import os
import sys

from ztgpu.errors import Fault, InputRejected
from ztgpu.slurm.env import check_user, parse_job_id, parse_uid, printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    import ssl
    from collections.abc import Mapping

EXIT_ALLOW = 0
EXIT_DENY = 1

#: Codes for which authd itself holds the job and writes its AdminComment.
MFA_CODES = frozenset({"mfa_required", "mfa_too_old"})
#: The squeue fields the gate reads, in order. Every one is produced by
#: Slurm (no user free text); admin_comment, set only by operators, is last.
SQUEUE_FIELDS = ("NumNodes", "NumTasks", "Sockets", "tres-per-job", "tres-per-node",
                 "tres-per-socket", "tres-per-task", "tres-alloc", "TimeLimit",
                 "admin_comment")
#: Sharing gres (MPS, shards) that give a job part of a GPU: counted as one
#: GPU per node, so such jobs are still asked about.
SHARING_GRES = frozenset({"mps", "shard"})
COMMENT_PREFIX = "ztgpu:"
#: How long the best-effort AdminComment update may take after the decision.
NOTE_TIMEOUT_S = 2.0
MAX_REPLY_BYTES = 65536
_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_COMMENT_CHARS = _WORD_CHARS | frozenset(" ,:;()/+=`")
_TRES_CHARS = _WORD_CHARS | frozenset(":/=")


class GateFault(Fault):
    """The gate could not get its answer (authd unreachable, Slurm query failed)."""


class _Expired(Exception):
    """The gate's deadline passed (raised from the SIGALRM handler)."""


# --------------------------------------------------------------------------
# What the gate knows about a job


class GateJob:
    """The job as the PrologSlurmctld environment describes it, checked.

    ``selector`` names exactly this job to squeue: ``A_T`` for an array task
    and ``H+O`` for a heterogeneous job component, whose plain job id would
    also select the array's (or het job's) other members.
    """

    __slots__ = ("account", "job_id", "partition", "selector", "uid", "user")

    def __init__(self, job_id: str, uid: int, user: str, partition: str | None,
                 account: str | None, selector: str | None = None) -> None:
        self.job_id = job_id
        self.uid = uid
        self.user = user
        self.partition = partition
        self.account = account
        self.selector = selector or job_id

    def _key(self) -> tuple[str, int, str, str | None, str | None, str]:
        return (self.job_id, self.uid, self.user, self.partition, self.account, self.selector)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GateJob) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"GateJob(job_id={self.job_id!r}, uid={self.uid}, user={self.user!r}, "
                f"partition={self.partition!r}, account={self.account!r}, "
                f"selector={self.selector!r})")


class JobResources:
    """What Slurm says the job holds: GPUs, time limit, current AdminComment."""

    __slots__ = ("admin_comment", "gpus", "time_limit_s")

    def __init__(self, gpus: int, time_limit_s: float | None, admin_comment: str) -> None:
        self.gpus = gpus
        self.time_limit_s = time_limit_s
        self.admin_comment = admin_comment

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobResources) and (
            (self.gpus, self.time_limit_s, self.admin_comment)
            == (other.gpus, other.time_limit_s, other.admin_comment))

    def __hash__(self) -> int:
        return hash((self.gpus, self.time_limit_s, self.admin_comment))

    def __repr__(self) -> str:
        return (f"JobResources(gpus={self.gpus}, time_limit_s={self.time_limit_s!r}, "
                f"admin_comment={self.admin_comment!r})")


class GateSettings:
    """What the installer baked into the wrapper (no config file is read here)."""

    __slots__ = ("authd_socket", "authd_url", "ca_cert", "cert", "key", "scontrol",
                 "slurm_conf", "squeue", "timeout_s", "unreachable")

    def __init__(self, *, authd_url: str, ca_cert: str, cert: str, key: str,
                 squeue: str, scontrol: str, slurm_conf: str | None,
                 timeout_s: float = 5.0, unreachable: str = "deny",
                 authd_socket: str | None = None) -> None:
        #: authd's gate socket on this host; when set, used instead of the URL.
        self.authd_socket = authd_socket
        self.authd_url = authd_url
        self.ca_cert = ca_cert
        self.cert = cert
        self.key = key
        self.squeue = squeue
        self.scontrol = scontrol
        self.slurm_conf = slurm_conf
        self.timeout_s = timeout_s
        self.unreachable = unreachable


def _name_or_none(variable: str, value: str | None) -> str | None:
    """A partition/account name, or None for unset, empty or Slurm's ``(null)``."""
    if value is None or value in ("", "(null)"):
        return None
    if len(value) > 64 or not set(value) <= _WORD_CHARS:
        raise InputRejected(f"{variable} {printable(value)} is not a partition or account "
                            "name (letters, digits, '_', '.', '-')")
    return value


def _member(env: Mapping[str, str], group: str, index: str, sep: str) -> str | None:
    """``GROUP<sep>INDEX`` when both variables are set, None when neither is."""
    first, second = env.get(group), env.get(index)
    if first is None and second is None:
        return None
    if (first is None or second is None
            or not all(0 < len(v) <= 10 and v.isascii() and v.isdigit()
                       for v in (first, second))):
        raise InputRejected(f"{group}/{index} {printable(first)}/{printable(second)} "
                            "are not two numbers")
    return f"{int(first)}{sep}{int(second)}"


def parse_gate_env(env: Mapping[str, str]) -> GateJob:
    """Read and check the job fields of the PrologSlurmctld environment.

    Raises:
        InputRejected: SLURM_JOB_ID/UID/USER missing or malformed, the user
            unknown here or not matching the uid, a partition/account name
            that is not a plain word, or half or malformed array/het job
            variables. The message names the variable.
    """
    job_id = parse_job_id(env.get("SLURM_JOB_ID"))
    uid = parse_uid(env.get("SLURM_JOB_UID"))
    check_user(env.get("SLURM_JOB_USER"), uid)
    array = _member(env, "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "_")
    het = _member(env, "SLURM_HET_JOB_ID", "SLURM_HET_JOB_OFFSET", "+")
    return GateJob(job_id=job_id, uid=uid, user=env["SLURM_JOB_USER"],
                   partition=_name_or_none("SLURM_JOB_PARTITION", env.get("SLURM_JOB_PARTITION")),
                   account=_name_or_none("SLURM_JOB_ACCOUNT", env.get("SLURM_JOB_ACCOUNT")),
                   selector=array or het)


# --------------------------------------------------------------------------
# Counting GPUs (pure)


_SUFFIX = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


def _count(value: str, what: str) -> int:
    if not (0 < len(value) <= 6 and value.isascii() and value.isdigit()):
        raise InputRejected(f"{what}: {printable(value)} is not a count")
    return int(value)


def _gres_count(value: str, what: str) -> int | None:
    """A gres count (``2``, ``1k``), or None when ``value`` is a type name, not a count."""
    if value.isascii() and value.isdigit():
        return _count(value, what)
    if len(value) > 1 and value[-1].lower() in _SUFFIX and value[:-1].isascii() \
            and value[:-1].isdigit():
        return _count(value[:-1], what) * _SUFFIX[value[-1].lower()]
    return None


def gpus_in_tres(spec: str, what: str = "tres") -> int:
    """GPUs in one tres-per-* value, e.g. ``gres:gpu:2`` or ``gres/gpu:a100:1,gres:nic:1``.

    ``N/A`` or empty means none. A ``gpu`` entry without a count is one GPU;
    the last field is the count when it is a number, else a type. Sharing
    gres (``mps``, ``shard``) count as one GPU. Other TRES are ignored.
    Raises InputRejected for text that is not a TRES list.
    """
    if spec in ("", "N/A", "(null)"):
        return 0
    total = 0
    for entry in spec.split(","):
        if not entry or not set(entry) <= _TRES_CHARS:
            raise InputRejected(f"{what}: {printable(spec)} is not a list of TRES")
        if not entry.startswith(("gres:", "gres/")):
            continue  # cpu=2, license/..., any TRES that is not a gres
        name_part, eq, eq_count = entry[5:].partition("=")
        parts = name_part.split(":") + ([eq_count] if eq else [])
        if not all(parts) or not set(parts[0]) <= _WORD_CHARS:
            raise InputRejected(f"{what}: {printable(spec)} is not a list of TRES")
        if parts[0] == "gpu":
            count = _gres_count(parts[-1], what) if len(parts) > 1 else None
            total += 1 if count is None else count
        elif parts[0] in SHARING_GRES:
            total += 1
    return total


def gpus_in_alloc(tres: str) -> int | None:
    """``gres/gpu=N`` of an allocated-TRES string, or None if it is not there.

    Slurm lists it only when AccountingStorageTRES includes gres/gpu; typed
    entries (``gres/gpu:a100=2``) are summed when the untyped one is absent.
    """
    untyped: int | None = None
    typed = 0
    seen_typed = False
    for entry in tres.split(","):
        key, sep, value = entry.partition("=")
        if not sep:
            continue
        if key == "gres/gpu":
            untyped = _count(value, "tres-alloc")
        elif key.startswith("gres/gpu:"):
            typed += _count(value, "tres-alloc")
            seen_typed = True
    if untyped is not None:
        return untyped
    return typed if seen_typed else None


def parse_time_limit(text: str) -> float | None:
    """Seconds of a Slurm time limit (``[D-]HH:MM:SS``, ``MM:SS``); None if unlimited."""
    if text in ("UNLIMITED", "NOT_SET", "INFINITE", "Partition_Limit", "N/A"):
        return None
    days_text, dash, clock = text.rpartition("-") if "-" in text else ("0", "", text)
    fields = clock.split(":")
    numbers = [days_text, *fields]
    if (len(fields) not in (2, 3) or (dash and len(fields) != 3)
            or not all(0 < len(n) <= 5 and n.isascii() and n.isdigit() for n in numbers)):
        raise InputRejected(f"TimeLimit {printable(text)} is not a Slurm time limit")
    if len(fields) == 2:
        fields = ["0", *fields]
    hours, minutes, seconds = (int(f) for f in fields)
    total = ((int(days_text) * 24 + hours) * 60 + minutes) * 60 + seconds
    return float(total) if total > 0 else None


def parse_squeue(output: str) -> JobResources:
    """The job's GPU count, time limit and AdminComment from the gate's squeue line.

    The count is the allocated ``gres/gpu`` when Slurm reports it, else the
    largest total the request implies (per job; per node x nodes; per task
    x tasks; per socket x sockets x nodes). Raises InputRejected when the
    line does not have the expected shape.
    """
    line = output.rstrip("\n")
    if not line or "\n" in line:
        raise InputRejected(f"squeue printed {printable(output)}, expected one job line")
    parts = line.split("|", len(SQUEUE_FIELDS) - 1)
    if len(parts) != len(SQUEUE_FIELDS):
        raise InputRejected(f"squeue printed {printable(output)}, expected "
                            f"{len(SQUEUE_FIELDS)} fields")
    fields = dict(zip(SQUEUE_FIELDS, parts, strict=True))
    comment = fields["admin_comment"]
    comment = comment[:-1] if comment.endswith("|") else comment
    nodes = _count(fields["NumNodes"], "NumNodes")
    per_job = gpus_in_tres(fields["tres-per-job"], "tres-per-job")
    per_node = gpus_in_tres(fields["tres-per-node"], "tres-per-node")
    per_socket = gpus_in_tres(fields["tres-per-socket"], "tres-per-socket")
    per_task = gpus_in_tres(fields["tres-per-task"], "tres-per-task")
    totals = [per_job, per_node * nodes]
    if per_task:
        totals.append(per_task * _count(fields["NumTasks"], "NumTasks"))
    if per_socket:
        # Slurm refuses --gpus-per-socket without --sockets-per-node.
        totals.append(per_socket * _count(fields["Sockets"], "Sockets") * nodes)
    gpus = max(totals)
    allocated = gpus_in_alloc(fields["tres-alloc"])
    if allocated is not None:
        gpus = max(gpus, allocated)
    return JobResources(gpus=gpus, time_limit_s=parse_time_limit(fields["TimeLimit"]),
                        admin_comment="" if comment == "(null)" else comment)


# --------------------------------------------------------------------------
# Talking to Slurm and authd (each under the gate's deadline)


class _Deadline:
    """Raise _Expired if the ``with`` body runs longer than ``seconds`` (SIGALRM; not nestable)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        import signal

        def expire(signum: int, frame: object) -> None:
            raise _Expired

        self._previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 0.001))

    def __exit__(self, *exc: object) -> None:
        import signal

        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)


def _slurm_env(settings: GateSettings) -> dict[str, str]:
    # A clean environment: nothing the job or the site's shell set (SQUEUE_FORMAT,
    # SLURM_TIME_FORMAT ...) may change what the commands print.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    if settings.slurm_conf:
        env["SLURM_CONF"] = settings.slurm_conf
    return env


def _run_slurm(argv: list[str], settings: GateSettings, timeout_s: float) -> str:
    import subprocess

    try:
        with _Deadline(timeout_s):
            proc = subprocess.run(argv, env=_slurm_env(settings), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
    except (_Expired, subprocess.TimeoutExpired):
        raise GateFault(f"{os.path.basename(argv[0])} did not answer within "
                        f"{timeout_s:.1f}s") from None
    except OSError as exc:
        raise GateFault(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        raise GateFault(f"{os.path.basename(argv[0])} failed ({proc.returncode}): "
                        f"{proc.stderr.strip()[:200]}")
    return proc.stdout


def query_job(selector: str, settings: GateSettings, timeout_s: float) -> JobResources:
    """Ask squeue what the job holds. Raises GateFault (Slurm) or InputRejected (its output)."""
    fmt = ",".join(f"{field}:|" for field in SQUEUE_FIELDS)
    out = _run_slurm([settings.squeue, "-h", "-j", selector, "-O", fmt], settings, timeout_s)
    return parse_squeue(out)


def set_comment(job_id: str, comment: str, settings: GateSettings,
                timeout_s: float = NOTE_TIMEOUT_S) -> str | None:
    """Set the job's AdminComment (what its owner reads); returns an error text or None."""
    safe = "".join(ch if ch in _COMMENT_CHARS else "_" for ch in comment)[:200]
    try:
        _run_slurm([settings.scontrol, "update", f"JobId={job_id}", f"AdminComment={safe}"],
                   settings, timeout_s)
    except GateFault as exc:
        return str(exc)
    return None


def tell_user(job_id: str, text: str, settings: GateSettings,
              timeout_s: float = NOTE_TIMEOUT_S) -> str | None:
    """Show ``text`` on the terminal of a waiting srun/salloc (``scontrol notify``);
    returns an error text or None."""
    # One argv element, shown as is: only what a terminal would act on is replaced.
    safe = "".join(ch if ch.isprintable() else "_" for ch in text)[:300]
    try:
        _run_slurm([settings.scontrol, "notify", job_id, safe], settings, timeout_s)
    except GateFault as exc:
        return str(exc)
    return None


def _client_context(settings: GateSettings) -> ssl.SSLContext:
    """TLS 1.3 client context with the controller's certificate (stdlib ssl only)."""
    import ssl

    try:
        mode = os.stat(settings.key).st_mode
    except OSError as exc:
        raise GateFault(f"cannot use key {settings.key}: {exc.strerror}") from None
    if mode & 0o077:
        raise GateFault(f"key {settings.key} is readable beyond its owner; chmod 600 it")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_verify_locations(cafile=settings.ca_cert)
        context.load_cert_chain(certfile=settings.cert, keyfile=settings.key)
    except OSError as exc:
        raise GateFault(f"cannot load the TLS files ({settings.ca_cert}, {settings.cert}): "
                        f"{exc}") from None
    return context


class Verdict:
    """authd's answer: allow or not, with its stable code and a reason for the user."""

    __slots__ = ("allow", "code", "detail", "reason")

    def __init__(self, allow: bool, code: str, reason: str, detail: str = "") -> None:
        self.allow = allow
        self.code = code
        self.reason = reason
        #: For operators' logs only (never shown to the job's owner).
        self.detail = detail

    def __repr__(self) -> str:
        return f"Verdict(allow={self.allow}, code={self.code!r}, reason={self.reason!r})"


def _host_port(url: str) -> tuple[str, int]:
    """(host, port) of ``https://host[:port]``; GateFault for anything else.

    Parsed by hand (no urllib): the installer wrote a checked URL, and this
    runs for every job start.
    """
    rest = url[len("https://"):] if url.startswith("https://") else ""
    rest = rest[:-1] if rest.endswith("/") else rest
    if rest.startswith("[") and rest.endswith("]"):  # [v6 address], default port
        host, port_text = rest[1:-1], "443"
    else:
        host, _, port_text = rest.rpartition(":") if ":" in rest else (rest, "", "443")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
    port = int(port_text) if port_text.isdigit() and len(port_text) <= 5 else 0
    if not host or not 0 < port < 65536 or any(c in host for c in "/?#@ "):
        raise GateFault(f"authd URL {url!r} is not https://host[:port]; rerun "
                        "`ztgpu install --gate` with auth.authd_url fixed")
    return host, port


def verdict_from_reply(status: int, raw: bytes) -> Verdict:
    """Map authd's HTTP reply to a verdict.

    200 with ``allow`` exactly ``true`` allows; 200 with ``false`` and any
    4xx deny (authd answered and did not allow). Raises GateFault for 5xx
    and for a 200 whose body is not the documented object.
    """
    import json

    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    if 400 <= status < 500:
        error = body.get("error") if isinstance(body, dict) else None
        code = body.get("code") if isinstance(body, dict) else None
        return Verdict(False, code if isinstance(code, str) else f"http_{status}",
                       f"the GPU access service refused this job's check (HTTP {status}); "
                       "ask your admins",
                       detail=str(error)[:300] if error is not None else "no reason given")
    if status != 200:
        raise GateFault(f"authd answered HTTP {status}")
    if not (isinstance(body, dict) and isinstance(body.get("allow"), bool)
            and isinstance(body.get("code"), str) and isinstance(body.get("reason"), str)):
        raise GateFault("authd's answer is not {allow, code, reason}")
    return Verdict(body["allow"], body["code"], body["reason"])


def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP connection to the first address of ``host`` that answers; never leaks a socket."""
    import socket

    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in socket.getaddrinfo(host, port,
                                                              type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout_s)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


#: Longest status line and headers accepted from authd.
MAX_REPLY_HEAD_BYTES = 8192


def _read_reply(tls: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 reply with a Content-Length body.

    Written for this one exchange instead of importing http.client (whose
    ``email`` imports cost ~25 ms of every job start): authd always answers
    with a status line, headers and a Content-Length body. Raises GateFault
    for anything else, for oversized replies, or a connection closed early.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_REPLY_HEAD_BYTES:
            raise GateFault("authd's reply headers are too long")
        chunk = tls.recv(4096)
        if not chunk:
            raise GateFault("authd closed the connection without a complete reply")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status_text = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not status_text.isdigit() or rest[3:4] not in (
            "", " "):
        raise GateFault(f"authd's reply is not HTTP: {lines[0][:80]!r}")
    length: int | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise GateFault(f"authd sent a malformed header: {line[:80]!r}")
        name, value = name.strip().lower(), value.strip()
        if name == "transfer-encoding":
            raise GateFault("authd's reply has no Content-Length")
        if name == "content-length":
            if not value.isdigit() or length is not None:
                raise GateFault("authd's reply has a bad Content-Length")
            length = int(value)
    if length is None or length > MAX_REPLY_BYTES:
        raise GateFault("authd's reply has no usable Content-Length")
    while len(body) < length:
        chunk = tls.recv(min(65536, length - len(body)))
        if not chunk:
            raise GateFault("authd closed the connection in the middle of its reply")
        body += chunk
    return int(status_text), body[:length]


def _gate_request(job: GateJob, resources: JobResources, authority: str) -> bytes:
    import json

    body = json.dumps({
        "job_id": job.job_id, "uid": job.uid, "user": job.user, "partition": job.partition,
        "account": job.account, "gpus_count": resources.gpus,
        "time_limit_s": resources.time_limit_s,
        # An array task counts as bound when its array was (one binding per sbatch).
        "array_job_id": (job.selector.split("_")[0]
                         if job.selector and "_" in job.selector else None),
    }).encode()
    return (f"POST /v1/gate HTTP/1.1\r\nHost: {authority}\r\n"
            "Content-Type: application/json\r\nAccept: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode("ascii") + body


def ask_authd(job: GateJob, resources: JobResources, settings: GateSettings,
              timeout_s: float) -> Verdict:
    """POST /v1/gate; the whole exchange ends within ``timeout_s``.

    Over ``settings.authd_socket`` when authd runs on this host (the kernel
    tells authd who is asking; no TLS), otherwise over mutual TLS to
    ``settings.authd_url``. Raises GateFault when authd cannot be reached,
    TLS fails, the answer is late or not the documented reply.
    """
    if settings.authd_socket is not None:
        return _ask_local(job, resources, settings.authd_socket, timeout_s)
    host, port = _host_port(settings.authd_url)
    context = _client_context(settings)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = _gate_request(job, resources, authority)
    tls: ssl.SSLSocket | None = None
    try:
        with _Deadline(timeout_s):
            sock = _connect(host, port, timeout_s)
            try:
                tls = context.wrap_socket(sock, server_hostname=host,
                                          do_handshake_on_connect=False)
            except BaseException:
                sock.close()
                raise
            tls.do_handshake()
            tls.sendall(request)
            status, raw = _read_reply(tls)
    except _Expired:
        raise GateFault(f"authd at {settings.authd_url} did not answer within "
                        f"{timeout_s:.1f}s") from None
    except OSError as exc:
        # ssl.SSLError is an OSError: a refused certificate lands here too.
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise GateFault(f"cannot reach authd at {settings.authd_url}: {reason}") from None
    finally:
        if tls is not None:
            tls.close()
    return verdict_from_reply(status, raw)


def _ask_local(job: GateJob, resources: JobResources, path: str, timeout_s: float) -> Verdict:
    """The same exchange over authd's gate socket on this host."""
    import socket

    request = _gate_request(job, resources, "localhost")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _Deadline(timeout_s):
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(request)
            status, raw = _read_reply(sock)
    except _Expired:
        raise GateFault(f"authd at {path} did not answer within {timeout_s:.1f}s") from None
    except OSError as exc:
        raise GateFault(f"cannot reach authd at {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    return verdict_from_reply(status, raw)


# --------------------------------------------------------------------------
# The decision sequence


def _log(priority: str, message: str) -> None:
    """To stderr (slurmctld may show it one day) and syslog (where operators look)."""
    print(f"ztgpu gate: {message}", file=sys.stderr, flush=True)
    try:
        import syslog

        syslog.openlog("ztgpu-gate", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(getattr(syslog, priority), message)
    except (ImportError, OSError):
        pass


def _clear_stale_comment(job_id: str, resources: JobResources, settings: GateSettings) -> None:
    if resources.admin_comment.startswith(COMMENT_PREFIX):
        error = set_comment(job_id, "", settings)
        if error is not None:
            _log("LOG_WARNING", f"job {job_id}: could not clear its AdminComment: {error}")


def _fault(job: GateJob, problem: str, settings: GateSettings) -> int:
    # Anything but exactly "allow" denies (a misspelt action never opens the gate).
    if settings.unreachable == "allow":
        _log("LOG_ERR", f"job {job.job_id} of {job.user} allowed without a gate decision "
                        f"(unreachable_action=allow): {problem}")
        return EXIT_ALLOW
    _log("LOG_ERR", f"job {job.job_id} of {job.user} not started, Slurm requeues it: {problem}")
    error = set_comment(job.job_id, f"{COMMENT_PREFIX} the GPU access service cannot be "
                        "reached; Slurm retries the job in about 2 minutes", settings)
    if error is not None:
        _log("LOG_WARNING", f"job {job.job_id}: could not set its AdminComment: {error}")
    _notify(job.job_id, f"{COMMENT_PREFIX} the GPU access service cannot be reached; "
            "try again later or ask your admins", settings)
    return EXIT_DENY


def _notify(job_id: str, text: str, settings: GateSettings) -> None:
    error = tell_user(job_id, text, settings)
    if error is not None:
        _log("LOG_WARNING", f"job {job_id}: could not tell its owner why: {error}")


def run_gate(env: Mapping[str, str], settings: GateSettings) -> int:
    """Decide whether the job in ``env`` may start; returns the exit code.

    Order: check the environment (malformed: deny), ask Slurm for the GPU
    count (no GPU: allow), ask authd (allow/deny). When Slurm or authd
    cannot answer, ``settings.unreachable`` decides (``deny`` unless it is
    exactly ``allow``). Never raises for a decision or a fault.
    """
    try:
        job = parse_gate_env(env)
    except InputRejected as exc:
        _log("LOG_ERR", f"job {printable(env.get('SLURM_JOB_ID'))} not started: {exc}")
        return EXIT_DENY
    try:
        resources = query_job(job.selector, settings, settings.timeout_s)
    except (GateFault, InputRejected) as exc:
        return _fault(job, f"cannot read the job's GPU request from squeue: {exc}", settings)
    if resources.gpus == 0:
        _clear_stale_comment(job.job_id, resources, settings)
        return EXIT_ALLOW
    try:
        verdict = ask_authd(job, resources, settings, settings.timeout_s)
    except GateFault as exc:
        return _fault(job, str(exc), settings)
    if verdict.allow:
        _log("LOG_INFO", f"job {job.job_id} of {job.user} ({resources.gpus} GPUs) allowed "
                         f"({verdict.code})")
        _clear_stale_comment(job.job_id, resources, settings)
        return EXIT_ALLOW
    _log("LOG_NOTICE", f"job {job.job_id} of {job.user} ({resources.gpus} GPUs) denied "
                       f"({verdict.code}): {verdict.reason}"
                       + (f" [{verdict.detail}]" if verdict.detail else ""))
    if verdict.code not in MFA_CODES:
        # authd holds MFA denials itself and writes their comment; for the
        # others the comment is how the job's owner learns why it waits.
        error = set_comment(job.job_id, f"{COMMENT_PREFIX} {verdict.reason}", settings)
        if error is not None:
            _log("LOG_WARNING", f"job {job.job_id}: could not set its AdminComment: {error}")
    # An interactive srun/salloc is cancelled, not held: its terminal is the
    # only place its owner looks.
    _notify(job.job_id, f"{COMMENT_PREFIX} {verdict.reason}", settings)
    return EXIT_DENY


def main(*, squeue: str, scontrol: str, slurm_conf: str | None, authd_url: str = "",
         ca_cert: str = "", cert: str = "", key: str = "", authd_socket: str | None = None,
         timeout_s: float = 5.0, unreachable: str = "deny") -> int:
    """Entry point used by the installed PrologSlurmctld wrapper."""
    settings = GateSettings(authd_url=authd_url, ca_cert=ca_cert, cert=cert, key=key,
                            squeue=squeue, scontrol=scontrol, slurm_conf=slurm_conf,
                            timeout_s=timeout_s, unreachable=unreachable,
                            authd_socket=authd_socket)
    return run_gate(os.environ, settings)

