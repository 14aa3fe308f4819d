"""The one registry of audit event types, and the hash-chain definition.

Every audit event is a flat JSON object. Node events carry an *envelope*
(``v``, ``code``, ``severity``, ``node``, ``seq``, ``ts``, ``prev``, ``hash``)
written by the spool, plus the fields the caller supplies. The caller's
fields are checked here, in one place, just before an event is spooled.

Chain definition (a collector recomputes exactly this, so it is part of the
wire format and must not change without bumping ``SCHEMA_VERSION``):

* ``canonical_bytes(event)`` is the UTF-8 JSON encoding of the event without
  its ``hash`` key, with sorted keys, separators ``(",", ":")`` and
  ``ensure_ascii=False``;
* ``hash`` is the lower-case hex SHA-256 of those bytes;
* ``prev`` is the ``hash`` of the event with ``seq - 1`` on the same node, or
  ``GENESIS_PREV`` (64 zeros) for ``seq == 1``.

Standard library only: the thin clients may import this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from ztgpu.errors import Fault

SCHEMA_VERSION = 1
GENESIS_PREV = "0" * 64
#: Sequence numbers stay below this (64-bit signed in every store).
MAX_SEQ = 2**62

#: Keys the spool writes; a caller may not supply them.
ENVELOPE_FIELDS = frozenset({"v", "code", "severity", "node", "seq", "ts", "prev", "hash"})

_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]*")
_JOB_ID = re.compile(r"[0-9]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_GPU_KEYS = frozenset({"index", "uuid", "minor"})


class EventError(Fault):
    """An event could not be built or read: unknown code, missing or bad field."""


class Severity(StrEnum):
    """How urgently a human should look at an event."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class EventType:
    """One registered event type: its code and the fields it must carry."""

    code: str
    severity: Severity
    category: str
    required: frozenset[str]
    description: str


def _t(code: str, severity: Severity, required: str, description: str) -> EventType:
    return EventType(
        code=code,
        severity=severity,
        category=code.split(".", 1)[0],
        required=frozenset(required.split()),
        description=description,
    )


_INFO, _WARN, _CRIT = Severity.INFO, Severity.WARNING, Severity.CRITICAL
_ACCESS = "job_id uid user gpus"

#: Every event type, in one literal table. Codes are dotted and lower case.
EVENT_TYPES: tuple[EventType, ...] = (
    _t("agent.start", _INFO, "version gpu_backend gpus", "The node agent started."),
    _t("agent.stop", _INFO, "reason", "The node agent stopped."),
    _t("agent.recovered", _INFO, "jobs", "The agent reloaded its job state after a restart."),
    _t("job.grant", _INFO, f"{_ACCESS} outcome", "A job was given access to its GPUs."),
    _t("job.release", _INFO, f"{_ACCESS} outcome", "A job's GPU access was taken back."),
    _t(
        "job.refused",
        _WARN,
        "outcome reason",
        "Hook input was rejected (bad job id, uid/user mismatch, GPU out of range).",
    ),
    _t("job.action", _WARN, "job_id action outcome reason", "The agent acted on a job."),
    _t(
        "isolation.verified",
        _INFO,
        f"{_ACCESS} probe",
        "A probe confirmed the job sees only its GPUs.",
    ),
    _t(
        "isolation.violated",
        _CRIT,
        f"{_ACCESS} probe action reason",
        "A probe found the job could reach a GPU it was not given.",
    ),
    _t("enforcement.failed", _CRIT, "job_id reason", "Access control could not be applied."),
    _t(
        "device.drift",
        _WARN,
        "path expected found action",
        "A GPU device file's owner or mode differed from the allowlist.",
    ),
    _t("device.holder", _WARN, "pid uid command gpus context outcome",
       "A process still held a GPU being taken back (descriptor, mapping or driver "
       "context) and was ended."),
    _t("device.held", _CRIT, "gpus pids reason",
       "A process would not let go of a GPU: it is granted to no job until the process "
       "is gone, and the node is drained."),
    _t("device.freed", _INFO, "gpus reason", "A GPU held by a stuck process is free again."),
    _t("node.drain", _WARN, "node_name outcome reason",
       "The agent drained its node in Slurm (or tried to)."),
    _t("node.recover", _WARN, "node_name outcome resumed reason",
       "An admin's `ztgpu node recover`: grants of ended jobs released, the node checked "
       "and, if safe, resumed in Slurm."),
    _t("node.assessed", _INFO, "counts findings outcome reason",
       "`ztgpu assess` judged the node's zero-trust posture (rule ids, severities, "
       "evidence)."),
    _t("node.unsafe", _CRIT, "check reason",
       "A start-up check failed: the agent grants no GPU on this node until it is fixed."),
    _t("hook.error", _WARN, "hook reason", "A Slurm hook or PAM client failed."),
    _t("gpu.misuse", _CRIT, "gpus rule response outcome reason",
       "Telemetry showed a GPU used against its allocation (a process outside the job "
       "holding it, use of a GPU no job holds, a busy GPU whose job has no process left, "
       "use outside the allowed hours); the evidence and the response taken."),
    _t("gpu.xid", _CRIT, "gpus xids response outcome reason",
       "An Xid event of a GPU appeared in the kernel log while the agent watched."),
    _t("gpu.hold", _CRIT, "user job_id rule outcome reason",
       "authd answered a hold (response hold_user) the agent had to ask again for."),
    _t("gpu.usage", _INFO, "job_id gpus samples outcome",
       "What a job did with one GPU, summed over its run (samples, mean and peak "
       "utilisation, peak memory, energy, busy time): what the collector's baselines "
       "learn from."),
    _t("anomaly.usage", _WARN, "source_node job_id user figure value baseline score reason",
       "The collector's learned baseline found a job's GPU use far from what is usual for "
       "its user (or partition): the figure, the baseline and the robust z-score."),
    _t("gpu.wipe", _INFO, "gpus mode outcome",
       "A GPU's memory was wiped and verified (or verified only) after a job: bytes "
       "covered and not reachable, per-pass times and bandwidths, a digest of the result."),
    _t("gpu.wipe_failed", _CRIT, "gpus mode outcome reason",
       "A GPU's wipe failed or found memory it could not clear: the GPU is not granted "
       "again until a wipe succeeds, and the node is drained."),
    _t("gpu.state", _INFO, "gpus setting was now outcome",
       "A GPU setting a job left changed (compute mode, persistence, accounting, "
       "application clocks) was put back to the node's baseline."),
    _t("gpu.unhealthy", _CRIT, "gpus check outcome reason",
       "After a job a GPU failed a check (ECC, retired pages, remapped rows, Xid events, "
       "a setting that cannot be put back): the node is drained."),
    _t("ssh.login", _INFO, "user rhost service outcome reason action",
       "An SSH login was let in by the PAM module's account check (a job of the user "
       "here, JIT admin access, root or a break-glass account)."),
    _t("ssh.denied", _WARN, "user rhost service outcome reason action",
       "An SSH login was refused by the PAM module's account check; ``action`` is what "
       "the module does with the refusal."),
    _t("ssh.session", _INFO, "user rhost service pid outcome reason",
       "An SSH session was put into a job's cgroups (or a JIT admin cgroup), could not "
       "be, or ended."),
    _t("ssh.mfa", _INFO, "user rhost service outcome reason",
       "The auth phase of a just-in-time SSH login checked a TOTP code with authd "
       "(passed or failed; authd records the check itself as well)."),
    _t("ssh.escaped", _CRIT, "user rhost service job_id pid cgroup action reason",
       "An adopted SSH session was found outside its job's cgroups."),
    _t(
        "request.rejected",
        _WARN,
        "peer_uid reason",
        "A socket request was garbage, oversized or unauthorised.",
    ),
    _t(
        "spool.full",
        _CRIT,
        "unacked limit action",
        "The audit spool reached its limit; the node stops granting GPUs.",
    ),
    _t("spool.drained", _INFO, "unacked limit", "The audit spool drained; grants resume."),
    _t("collector.start", _INFO, "version store", "The audit collector started."),
    _t("collector.stop", _INFO, "reason", "The audit collector stopped."),
    _t(
        "audit.gap",
        _CRIT,
        "source_node expected_seq received_seq",
        "A node's events arrived with seqs missing before them.",
    ),
    _t(
        "audit.chain_broken",
        _CRIT,
        "source_node bad_seq reason",
        "A node's batch did not continue its hash chain; nothing of it was stored.",
    ),
    _t(
        "audit.rejected",
        _WARN,
        "peer reason",
        "A collector request was malformed, oversized or held invalid events.",
    ),
    _t("auth.start", _INFO, "version store", "ztgpu-authd started."),
    _t("auth.stop", _INFO, "reason", "ztgpu-authd stopped."),
    _t("auth.enrolled", _INFO, "user by outcome", "A user was enrolled for MFA (TOTP)."),
    _t("auth.login", _INFO, "user outcome reason", "An MFA login was attempted."),
    _t("auth.locked", _WARN, "user failures until",
       "Repeated failed codes locked an account for a while."),
    _t("auth.decision", _INFO, "job_id user outcome reason rule",
       "The policy decided whether a job may have GPUs (gate or grant)."),
    _t("auth.grant", _INFO, "job_id uid user target_node gpus jti expires",
       "A signed grant was issued for a job on a node."),
    _t("auth.released", _INFO, "user jobs", "Jobs held for MFA were released by a login."),
    _t("auth.bound", _INFO, "user job_id outcome reason",
       "A job was bound to the MFA login session that submitted it (or the proof failed)."),
    _t("auth.revoked", _CRIT, "user reason by", "A user's access was revoked."),
    _t("auth.jit", _WARN, "user target_node approver reason expires",
       "Just-in-time admin access to a node was granted."),
    _t("auth.user_held", _CRIT, "user target_node job_id rule reason outcome",
       "A node's telemetry rule asked to hold a user's GPU jobs (or was refused: too many)."),
    _t("auth.hold_released", _WARN, "user holds by reason",
       "An admin released a user's hold; their held jobs went back to the gate."),
    _t("auth.keys_rotated", _WARN, "kid by", "The grant-signing key was rotated."),
    _t("auth.policy_loaded", _INFO, "policy_hash source",
       "A new version of the policy was loaded."),
    _t("auth.refused", _WARN, "peer reason",
       "An authd connection or request was refused: certificate, identity or malformed."),
    _t(
        "audit.refused",
        _WARN,
        "peer reason",
        "A collector connection or request was refused: certificate or identity.",
    ),
)

REGISTRY: Mapping[str, EventType] = MappingProxyType({t.code: t for t in EVENT_TYPES})


def validate_fields(code: str, fields: Mapping[str, Any], *, parsed_json: bool = False
                    ) -> EventType:
    """Check caller-supplied fields for an event of type ``code``.

    Guarantees on return: ``code`` is registered; every required field is
    present; no envelope key is supplied; field names are lower-case
    identifiers; every value is JSON data (str, finite int/float, bool, None,
    list/tuple, dict with str keys); the common fields have their documented
    types (``job_id`` a string of digits, ``uid`` an int >= 0, ``user`` a
    non-empty str, ``gpus`` a list of ``{"index", "uuid", "minor"}``,
    ``outcome``/``reason`` str).

    Raises EventError naming the code and the offending field.
    """
    etype = REGISTRY.get(code)
    if etype is None:
        raise EventError(f"unknown event code {code!r}")
    envelope = ENVELOPE_FIELDS.intersection(fields)
    if envelope:
        raise EventError(f"{code}: envelope fields are set by the spool: {sorted(envelope)}")
    _check_fields(etype, fields, fields.keys(), parsed_json)
    return etype


#: Field names already seen to be well formed (there are few distinct ones).
_GOOD_NAMES: set[str] = set()


def _check_fields(etype: EventType, event: Mapping[str, Any], names: Iterable[Any],
                  parsed_json: bool) -> None:
    """Check the fields ``names`` of ``event`` (see ``validate_fields``)."""
    code = etype.code
    missing = etype.required.difference(event)
    if missing:
        raise EventError(f"{code}: missing required fields {sorted(missing)}")
    for name in names:
        if name not in _GOOD_NAMES:
            if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
                raise EventError(f"{code}: bad field name {name!r}")
            if len(_GOOD_NAMES) < 10_000:
                _GOOD_NAMES.add(name)
        value = event[name]
        if not parsed_json:  # what parse_json returns is JSON data already
            _check_json(code, name, value)
        if name in _COMMON_FIELDS:
            problem = _check_common(name, value)
            if problem:
                raise EventError(f"{code}: field {name!r} {problem}")


_COMMON_FIELDS = frozenset({"job_id", "uid", "user", "outcome", "reason", "gpus"})


def _check_json(code: str, path: str, value: Any) -> None:
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EventError(f"{code}: field {path!r} is not a finite number")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(code, f"{path}[{i}]", item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EventError(f"{code}: field {path!r} has a non-string key {key!r}")
            _check_json(code, f"{path}.{key}", item)
        return
    raise EventError(f"{code}: field {path!r} is not JSON data ({type(value).__name__})")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_common(name: str, value: Any) -> str | None:
    """Return what is wrong with a common field's value, or None."""
    if name == "job_id":
        ok = isinstance(value, str) and _JOB_ID.fullmatch(value) is not None
        return None if ok else "must be a string of digits"
    if name == "uid":
        return None if _is_count(value) else "must be an int >= 0"
    if name == "user":
        return None if isinstance(value, str) and value else "must be a non-empty str"
    if name in ("outcome", "reason"):
        return None if isinstance(value, str) else "must be a str"
    if name == "gpus":
        if not isinstance(value, list | tuple):
            return "must be a list of GPUs"
        for gpu in value:
            if not (
                isinstance(gpu, dict)
                and gpu.keys() == _GPU_KEYS
                and _is_count(gpu["index"])
                and _is_count(gpu["minor"])
                and isinstance(gpu["uuid"], str)
                and gpu["uuid"]
            ):
                return 'entries must be {"index": int, "uuid": str, "minor": int}'
    return None


def build_event(
    etype: EventType, node: str, seq: int, prev: str, ts: str, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """The next chained event: envelope plus already validated ``fields``, with its hash."""
    event: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "code": etype.code,
        "severity": etype.severity.value,
        "node": node,
        "seq": seq,
        "ts": ts,
        "prev": prev,
        **fields,
    }
    event["hash"] = event_hash(event)
    return event


_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


def check_envelope(event: Any, *, parsed_json: bool = False) -> str | None:
    """What is wrong with a received event's envelope and fields, or None.

    ``parsed_json``: the event comes straight from ``parse_json`` (so its
    values are JSON data and need not be walked again).

    Checks that ``event`` is a dict with the envelope types (``v`` this
    schema, ``code`` registered with its ``severity``, ``node`` a non-empty
    str, ``seq`` an int >= 1, ``ts`` RFC 3339 UTC with microseconds, ``prev``
    and ``hash`` 64 lower-case hex) and that the remaining fields pass
    ``validate_fields``. It does not recompute the hash.
    """
    if not isinstance(event, dict):
        return "event is not a JSON object"
    if event.get("v") != SCHEMA_VERSION or isinstance(event.get("v"), bool):
        return f"unsupported schema version {event.get('v')!r}"
    code = event.get("code")
    etype = REGISTRY.get(code) if isinstance(code, str) else None
    if etype is None or not isinstance(code, str):
        return f"unknown event code {code!r}"
    if event.get("severity") != etype.severity.value:
        return f"{code}: severity must be {etype.severity.value!r}"
    node, seq = event.get("node"), event.get("seq")
    if not isinstance(node, str) or not node:
        return f"{code}: node must be a non-empty str"
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq < MAX_SEQ:
        return f"{code}: seq must be an int from 1 to {MAX_SEQ - 1}"
    ts = event.get("ts")
    if not isinstance(ts, str) or not _TS.fullmatch(ts):
        return f"{code}: ts must be RFC 3339 UTC with microseconds"
    for key in ("prev", "hash"):
        value = event.get(key)
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            return f"{code}: {key} must be 64 lower-case hex digits"
    try:
        _check_fields(etype, event, event.keys() - ENVELOPE_FIELDS, parsed_json)
    except EventError as exc:
        return str(exc)
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON data")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def parse_json(data: bytes | str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and overflowing numbers.

    What it returns is JSON data in the sense of ``validate_fields``, so
    received events need not be walked again. Raises ValueError (and
    RecursionError for absurd nesting).
    """
    return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)


CHECKPOINT_PREFIX = b"ztgpu-checkpoint-v1\n"
CHECKPOINT_FIELDS = ("node", "seq", "hash", "ts")


def checkpoint_message(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes a node signs to vouch for its chain head (a checkpoint).

    ``CHECKPOINT_PREFIX`` followed by the JSON object of the payload's
    ``node``, ``seq``, ``hash`` and ``ts`` (other keys such as ``sig`` are left
    out) with sorted keys, separators ``(",", ":")`` and ASCII escapes. The
    fixed prefix means a checkpoint signature can never pass for a signature
    over anything else. Raises ValueError if a field is missing or a value is
    not JSON data.
    """
    missing = [key for key in CHECKPOINT_FIELDS if key not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {', '.join(missing)}")
    body = {key: payload[key] for key in CHECKPOINT_FIELDS}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except TypeError as exc:
        raise ValueError(f"checkpoint payload is not JSON data: {exc}") from exc
    return CHECKPOINT_PREFIX + text.encode("ascii")


def format_timestamp(moment: datetime) -> str:
    """Render an aware datetime as RFC 3339 UTC with microseconds.

    Example: ``2026-11-26T12:00:00.123456Z``. Raises EventError for a naive
    datetime (its zone would be a guess).
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise EventError("event timestamps need a timezone-aware datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_bytes(event: Mapping[str, Any]) -> bytes:
    """The bytes the chain hash covers: the event without ``hash``, canonical JSON.

    Raises EventError if the event is not JSON data.
    """
    if "hash" in event:
        event = {key: value for key, value in event.items() if key != "hash"}
    try:
        return _CANONICAL.encode(event).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError: a lone surrogate
        raise EventError(f"event is not JSON data: {exc}") from exc


# One shared encoder: json.dumps with non-default options builds a new one
# per call, which is a measurable share of the collector's ingest time.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def event_hash(event: Mapping[str, Any]) -> str:
    """Lower-case hex SHA-256 of ``canonical_bytes(event)``."""
    return hashlib.sha256(canonical_bytes(event)).hexdigest()


@dataclass(frozen=True)
class ChainResult:
    """Outcome of a chain check.

    ``checked`` counts the events that passed before the first problem (all of
    them when ``ok``). ``first_bad_seq`` is the ``seq`` of the event where the
    chain first breaks (None when ok, or when that event has no usable seq).
    """

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    problem: str | None = None


def _link_problem(event: Mapping[str, Any], before: Mapping[str, Any] | None) -> str | None:
    """What breaks the link from ``before`` (None at the start) to ``event``."""
    seq, prev, digest = event.get("seq"), event.get("prev"), event.get("hash")
    if not isinstance(prev, str) or not isinstance(digest, str):
        return "missing prev or hash"
    if event.get("v") != SCHEMA_VERSION:
        return f"unsupported schema version {event.get('v')!r}"
    if before is None:
        if seq == 1 and prev != GENESIS_PREV:
            return "first event's prev is not the genesis value"
    else:
        expected = before["seq"] + 1
        if seq != expected:
            if isinstance(seq, int) and seq > expected:
                return f"gap: expected seq {expected}, found {seq}"
            return f"out of order: expected seq {expected}, found {seq}"
        if event.get("node") != before.get("node"):
            return f"node changed from {before.get('node')!r} to {event.get('node')!r}"
        if prev != before["hash"]:
            return f"prev does not match the hash of seq {before['seq']}"
    try:
        recomputed = event_hash(event)
    except EventError as exc:
        return str(exc)
    if not _HEX64.fullmatch(digest) or recomputed != digest:
        return "hash mismatch: the event was altered"
    return None


def verify_chain(events: Iterable[Mapping[str, Any]]) -> ChainResult:
    """Check a node's events, in stored order, as one unbroken hash chain.

    Checks that ``seq`` is gapless from the first event seen, that each
    ``prev`` is the previous event's ``hash`` (or the genesis value at
    seq 1), that the node never changes, and that every ``hash`` recomputes.
    Stops at the first broken link and names it; never raises for bad data.
    """
    before: Mapping[str, Any] | None = None
    checked = 0
    for event in events:
        seq = event.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return ChainResult(False, checked, None, f"event after {checked} good ones has no seq")
        problem = _link_problem(event, before)
        if problem:
            return ChainResult(False, checked, seq, problem)
        before = event
        checked += 1
    return ChainResult(True, checked)
