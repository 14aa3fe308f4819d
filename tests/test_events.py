"""The event registry, field checks and the hash-chain definition."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztgpu.audit.events import (
    ENVELOPE_FIELDS,
    EVENT_TYPES,
    GENESIS_PREV,
    REGISTRY,
    EventError,
    Severity,
    canonical_bytes,
    event_hash,
    format_timestamp,
    validate_fields,
    verify_chain,
)
from ztgpu.errors import Fault

GPU0 = {"index": 0, "uuid": "GPU-aaaa", "minor": 0}
GRANT = {"job_id": "17", "uid": 1001, "user": "alice", "gpus": [GPU0], "outcome": "granted"}


def make_chain(n: int, node: str = "gpu01") -> list[dict[str, Any]]:
    """A valid chain built by hand from the documented definition."""
    events: list[dict[str, Any]] = []
    prev = GENESIS_PREV
    for seq in range(1, n + 1):
        event: dict[str, Any] = {
            "v": 1,
            "code": "hook.error",
            "severity": "warning",
            "node": node,
            "seq": seq,
            "ts": f"2026-11-26T12:00:00.{seq:06d}Z",
            "prev": prev,
            "hook": "prolog",
            "reason": f"failure {seq}",
        }
        event["hash"] = prev = event_hash(event)
        events.append(event)
    return events


# --- registry -------------------------------------------------------------


def test_codes_are_unique_and_registry_holds_every_type() -> None:
    codes = [t.code for t in EVENT_TYPES]
    assert len(codes) == len(set(codes))
    assert set(REGISTRY) == set(codes)


def test_registry_entries_are_well_formed() -> None:
    for code, etype in REGISTRY.items():
        assert etype.code == code
        assert re.fullmatch(r"[a-z]+(\.[a-z_]+)+", code), code
        assert etype.category == code.split(".")[0]
        assert isinstance(etype.severity, Severity)
        assert etype.description.strip()
        assert not etype.required & ENVELOPE_FIELDS, code
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", f) for f in etype.required)


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        REGISTRY["x.y"] = REGISTRY["agent.start"]  # type: ignore[index]


def test_security_relevant_severities() -> None:
    assert REGISTRY["isolation.violated"].severity is Severity.CRITICAL
    assert REGISTRY["enforcement.failed"].severity is Severity.CRITICAL
    assert REGISTRY["device.drift"].severity is Severity.WARNING
    assert REGISTRY["request.rejected"].severity is Severity.WARNING
    assert REGISTRY["job.grant"].severity is Severity.INFO


def test_the_documented_codes_and_required_fields() -> None:
    assert REGISTRY["job.grant"].required == {"job_id", "uid", "user", "gpus", "outcome"}
    assert REGISTRY["job.refused"].required == {"outcome", "reason"}
    assert REGISTRY["isolation.violated"].required == {
        "job_id", "uid", "user", "gpus", "probe", "action", "reason",
    }  # fmt: skip
    assert set(REGISTRY) == {
        "agent.start", "agent.stop", "agent.recovered", "job.grant", "job.release",
        "job.refused", "job.action", "isolation.verified", "isolation.violated",
        "enforcement.failed", "device.drift", "device.holder", "device.held",
        "device.freed", "node.drain", "node.recover", "node.unsafe", "node.assessed", "hook.error",
        "request.rejected",
        "spool.full", "spool.drained", "collector.start", "collector.stop", "audit.gap",
        "audit.chain_broken", "audit.rejected", "audit.refused", "auth.enrolled",
        "auth.login", "auth.locked", "auth.decision", "auth.grant", "auth.released",
        "auth.revoked", "auth.jit", "auth.keys_rotated", "auth.policy_loaded", "auth.refused",
        "auth.start", "auth.stop", "auth.bound", "auth.user_held", "auth.hold_released",
        "ssh.login", "ssh.denied", "ssh.session", "ssh.escaped", "ssh.mfa",
        "gpu.wipe", "gpu.wipe_failed", "gpu.state", "gpu.unhealthy",
        "gpu.misuse", "gpu.xid", "gpu.hold", "gpu.usage", "anomaly.usage",
    }  # fmt: skip
    assert REGISTRY["auth.user_held"].severity is Severity.CRITICAL
    assert REGISTRY["gpu.hold"].required == {"user", "job_id", "rule", "outcome", "reason"}
    assert REGISTRY["gpu.misuse"].severity is Severity.CRITICAL
    assert REGISTRY["gpu.misuse"].required == {"gpus", "rule", "response", "outcome", "reason"}
    assert REGISTRY["ssh.escaped"].severity is Severity.CRITICAL
    assert REGISTRY["ssh.denied"].required == {
        "user", "rhost", "service", "outcome", "reason", "action"}
    assert REGISTRY["audit.gap"].severity is Severity.CRITICAL
    assert REGISTRY["audit.chain_broken"].severity is Severity.CRITICAL
    assert REGISTRY["spool.full"].severity is Severity.CRITICAL


# --- validate_fields ------------------------------------------------------


def test_valid_fields_return_the_event_type() -> None:
    assert validate_fields("job.grant", GRANT) is REGISTRY["job.grant"]


def test_event_error_is_a_fault() -> None:
    assert issubclass(EventError, Fault)


def test_unknown_code_is_rejected() -> None:
    with pytest.raises(EventError, match=r"unknown event code 'job\.granted'"):
        validate_fields("job.granted", GRANT)


@pytest.mark.parametrize("field", sorted(REGISTRY["job.grant"].required))
def test_each_missing_required_field_is_named(field: str) -> None:
    fields = {k: v for k, v in GRANT.items() if k != field}
    with pytest.raises(EventError, match=f"missing required fields \\['{field}'\\]"):
        validate_fields("job.grant", fields)


def test_optional_identity_may_be_left_out_of_a_refusal() -> None:
    assert validate_fields("job.refused", {"outcome": "refused", "reason": "bad job id"})


@pytest.mark.parametrize("field", sorted(ENVELOPE_FIELDS))
def test_caller_cannot_supply_envelope_fields(field: str) -> None:
    with pytest.raises(EventError, match="envelope"):
        validate_fields("job.grant", {**GRANT, field: 1})


@pytest.mark.parametrize(
    "bad",
    [
        {"job_id": 17},
        {"job_id": "17; rm -rf"},
        {"job_id": "\u0661\u0667"},  # Arabic-Indic digits are not a Slurm job id
        {"uid": "1001"},
        {"uid": -1},
        {"uid": True},
        {"user": ""},
        {"gpus": [0, 2]},
        {"gpus": [{"index": 0, "uuid": "GPU-a"}]},
        {"gpus": [{**GPU0, "extra": 1}]},
        {"gpus": [{**GPU0, "index": -1}]},
        {"outcome": None},
        {"reason": 3},
    ],
)
def test_common_fields_are_type_checked(bad: dict[str, Any]) -> None:
    (field,) = bad
    with pytest.raises(EventError, match=f"field '{field}'"):
        validate_fields("job.grant", {**GRANT, **bad})


@pytest.mark.parametrize(
    "value",
    [object(), {1, 2}, b"bytes", float("nan"), float("inf"), [1, object()], {1: "x"}],
)
def test_non_json_values_are_rejected(value: Any) -> None:
    with pytest.raises(EventError, match="probe"):
        validate_fields("isolation.verified", {**GRANT, "probe": value})


@pytest.mark.parametrize("name", ["Probe", "two words", "x-y", "", "_x"])
def test_field_names_must_be_lower_case_identifiers(name: str) -> None:
    with pytest.raises(EventError, match="bad field name"):
        validate_fields("job.grant", {**GRANT, name: 1})


def test_nested_json_values_are_accepted() -> None:
    fields = {**GRANT, "probe": {"opened": [0, 1], "ok": True, "note": None, "t": 0.5}}
    assert validate_fields("isolation.verified", fields).code == "isolation.verified"


# --- timestamps and hashing -------------------------------------------------


def test_timestamp_is_rfc3339_utc_with_microseconds() -> None:
    cet = timezone(timedelta(hours=1))
    moment = datetime(2026, 11, 26, 13, 0, 0, 123456, tzinfo=cet)
    assert format_timestamp(moment) == "2026-11-26T12:00:00.123456Z"
    assert format_timestamp(datetime(2026, 1, 2, tzinfo=UTC)) == "2026-01-02T00:00:00.000000Z"


def test_naive_timestamp_is_rejected() -> None:
    with pytest.raises(EventError, match="timezone-aware"):
        format_timestamp(datetime(2026, 11, 26, 12, 0))


def test_canonical_bytes_follow_the_documented_definition() -> None:
    event = {"b": "é", "a": 1, "hash": "ignored", "c": [1, {"y": 2, "x": 1}]}
    assert canonical_bytes(event) == '{"a":1,"b":"é","c":[1,{"x":1,"y":2}]}'.encode()
    assert event_hash(event) == hashlib.sha256(canonical_bytes(event)).hexdigest()


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=6,
    )
)
def test_hash_ignores_key_order_and_hash_key(event: dict[str, Any]) -> None:
    shuffled = dict(reversed(list(event.items())))
    shuffled["hash"] = "f" * 64
    assert event_hash(shuffled) == event_hash(event)
    assert json.loads(canonical_bytes(event)) == {k: v for k, v in event.items() if k != "hash"}


def test_canonical_bytes_reject_non_json() -> None:
    with pytest.raises(EventError):
        canonical_bytes({"x": float("nan")})


# --- verify_chain ---------------------------------------------------------


def test_valid_chain_links() -> None:
    events = make_chain(5)
    assert events[0]["prev"] == GENESIS_PREV
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(events))
    assert verify_chain(events) == verify_chain(iter(events))
    result = verify_chain(events)
    assert result.ok and result.checked == 5
    assert result.first_bad_seq is None and result.problem is None


def test_empty_chain_is_ok() -> None:
    assert verify_chain([]).ok


def test_a_tail_of_the_chain_verifies_on_its_own() -> None:
    result = verify_chain(make_chain(6)[3:])
    assert result.ok and result.checked == 3


def test_edited_body_is_named() -> None:
    events = make_chain(5)
    events[2]["reason"] = "nothing happened"
    result = verify_chain(events)
    assert not result.ok
    assert (result.first_bad_seq, result.checked) == (3, 2)
    assert "hash mismatch" in (result.problem or "")


def test_edited_body_with_recomputed_hash_breaks_the_next_link() -> None:
    events = make_chain(5)
    events[2]["reason"] = "nothing happened"
    events[2]["hash"] = event_hash(events[2])
    result = verify_chain(events)
    assert not result.ok and result.first_bad_seq == 4
    assert "prev does not match the hash of seq 3" in (result.problem or "")


def test_removed_event_is_named_as_a_gap() -> None:
    events = make_chain(5)
    del events[2]
    result = verify_chain(events)
    assert not result.ok and result.first_bad_seq == 4
    assert result.problem == "gap: expected seq 3, found 4"


def test_reordered_events_are_named() -> None:
    events = make_chain(5)
    events[1], events[2] = events[2], events[1]
    result = verify_chain(events)
    assert not result.ok and result.first_bad_seq == 3 and result.checked == 1
    assert "expected seq 2, found 3" in (result.problem or "")


def test_replayed_event_is_out_of_order() -> None:
    events = make_chain(3)
    result = verify_chain([*events, events[1]])
    assert not result.ok and result.first_bad_seq == 2
    assert result.problem == "out of order: expected seq 4, found 2"


def test_forged_genesis_is_detected() -> None:
    events = make_chain(2)
    events[0]["prev"] = "1" * 64
    events[0]["hash"] = event_hash(events[0])
    result = verify_chain(events)
    assert not result.ok and result.first_bad_seq == 1


def test_events_from_another_node_break_the_chain() -> None:
    events = make_chain(3)
    other = make_chain(3, node="gpu02")
    result = verify_chain([*events[:2], other[2]])
    assert not result.ok and result.first_bad_seq == 3
    assert "node changed" in (result.problem or "")


def test_missing_seq_or_hash_is_reported_not_raised() -> None:
    events = make_chain(2)
    del events[1]["hash"]
    assert verify_chain(events).problem == "missing prev or hash"
    assert verify_chain([{"code": "x"}]) == verify_chain([{"seq": None}])
    assert not verify_chain([{"code": "x"}]).ok


# ---- received events (collector side) ----------------------------------------

def _received() -> dict[str, Any]:
    from ztgpu.audit.events import GENESIS_PREV, build_event

    return build_event(REGISTRY["agent.stop"], "gpu01", 1, GENESIS_PREV,
                       "2026-11-26T12:00:00.000000Z", {"reason": "x"})


def test_check_envelope_accepts_a_built_event() -> None:
    from ztgpu.audit.events import check_envelope, event_hash

    event = _received()
    assert check_envelope(event) is None
    assert event["hash"] == event_hash(event)


@pytest.mark.parametrize(("change", "problem"), [
    ({"v": 2}, "schema version"),
    ({"v": True}, "schema version"),
    ({"code": "job.teleport"}, "unknown event code"),
    ({"severity": "critical"}, "severity must be 'info'"),
    ({"node": ""}, "node must be"),
    ({"seq": 0}, "seq must be"),
    ({"seq": 2**62}, "seq must be"),
    ({"seq": True}, "seq must be"),
    ({"ts": "2026-11-26 12:00:00"}, "ts must be"),
    ({"prev": "XYZ"}, "prev must be"),
    ({"hash": "0" * 63}, "hash must be"),
    ({"reason": 5}, "reason"),
    ({"Upper": 1}, "bad field name"),
])
def test_check_envelope_names_the_problem(change: dict[str, Any], problem: str) -> None:
    from ztgpu.audit.events import check_envelope

    assert problem in (check_envelope({**_received(), **change}) or "")


def test_check_envelope_of_non_objects() -> None:
    from ztgpu.audit.events import check_envelope

    for value in (None, [], "x", 1):
        assert check_envelope(value) == "event is not a JSON object"


def test_checkpoint_message_is_domain_separated_and_stable() -> None:
    from ztgpu.audit.events import checkpoint_message

    payload = {"node": "gpu01", "seq": 7, "hash": "ab" * 32, "ts": "2026-11-26T12:00:00Z",
               "sig": "ignored"}
    assert checkpoint_message(payload) == (
        b'ztgpu-checkpoint-v1\n{"hash":"' + b"ab" * 32 +
        b'","node":"gpu01","seq":7,"ts":"2026-11-26T12:00:00Z"}')
    with pytest.raises(ValueError, match="lacks hash"):
        checkpoint_message({"node": "gpu01", "seq": 7, "ts": "x"})


def test_lone_surrogate_is_an_event_error() -> None:
    from ztgpu.audit.events import EventError, canonical_bytes

    with pytest.raises(EventError, match="not JSON data"):
        canonical_bytes({"reason": "\ud800"})
