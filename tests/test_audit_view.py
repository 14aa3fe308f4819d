"""Human and JSON-lines renderings of audit events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ztgpu.audit.events import GENESIS_PREV
from ztgpu.audit.view import format_event, format_json

VIOLATION: dict[str, Any] = {
    "v": 1,
    "code": "isolation.violated",
    "severity": "critical",
    "node": "gpu01",
    "seq": 42,
    "ts": "2026-11-26T12:00:00.123456Z",
    "prev": GENESIS_PREV,
    "job_id": "17",
    "uid": 1001,
    "user": "alice",
    "gpus": [
        {"index": 0, "uuid": "GPU-a", "minor": 0},
        {"index": 2, "uuid": "GPU-c", "minor": 2},
    ],
    "probe": "open",
    "action": "cancel",
    "outcome": "cancelled",
    "reason": "opened GPU 3",
    "hash": "ab" * 32,
}


def test_violation_line() -> None:
    assert format_event(VIOLATION) == (
        "2026-11-26 12:00:00.123Z  #42  CRITICAL  isolation.violated  "
        "job=17 user=alice(1001) gpus=0,2  outcome=cancelled action=cancel probe=open "
        'reason="opened GPU 3"'
    )


def test_chain_bookkeeping_is_not_shown() -> None:
    line = format_event(VIOLATION)
    assert "ab" * 32 not in line and GENESIS_PREV not in line and "v=" not in line


def test_node_is_shown_on_request() -> None:
    assert "#42  node=gpu01  CRITICAL" in format_event(VIOLATION, show_node=True)
    assert "gpu01" not in format_event(VIOLATION)


def test_event_without_identity() -> None:
    event = {
        "seq": 1, "ts": "2026-11-26T08:05:09.000001Z", "severity": "info",
        "code": "agent.start", "version": "0.1.0", "gpu_backend": "nvml", "gpus": [],
    }  # fmt: skip
    assert format_event(event) == (
        "2026-11-26 08:05:09.000Z  #1  INFO      agent.start  "
        'gpus=""  gpu_backend=nvml version=0.1.0'
    )


def test_uid_without_user_and_other_values() -> None:
    event = {
        "seq": 3, "ts": "bad-ts", "severity": "warning", "code": "request.rejected",
        "uid": 5, "found": {"mode": "0666"}, "flag": True, "nothing": None, "ratio": 0.5,
    }  # fmt: skip
    line = format_event(event)
    assert line.startswith("bad-ts  #3  WARNING   request.rejected  uid=5  ")
    assert 'found={"mode":"0666"}' in line
    assert r'x="{\"a\":\"b c\"}"' in format_event({**event, "x": {"a": "b c"}})
    assert "flag=true" in line and "nothing=null" in line and "ratio=0.5" in line


@pytest.mark.parametrize(
    ("reason", "shown"),
    [
        ("a\nseq=43 forged line", r'reason="a\x0aseq=43 forged line"'),
        ("\x1b[31mred", r'reason="\x1b[31mred"'),
        ('say "hi"', r'reason="say \"hi\""'),
        ("line\u2028sep", r'reason="line\u2028sep"'),
        ("", 'reason=""'),
        ("plain", "reason=plain"),
    ],
)
def test_hostile_values_cannot_break_the_line(reason: str, shown: str) -> None:
    line = format_event({**VIOLATION, "reason": reason})
    assert line.endswith(shown)
    assert len(line.splitlines()) == 1 and line.isprintable()


def test_user_with_space_is_quoted() -> None:
    assert 'user="a b"(1001)' in format_event({**VIOLATION, "user": "a b"})


def test_odd_event_does_not_raise() -> None:
    line = format_event({})
    assert line == "null  #null  ?         ?"


def test_format_json_is_one_line_and_round_trips() -> None:
    event = {**VIOLATION, "reason": "multi\nline \u2028 é"}
    line = format_json(event)
    assert len(line.splitlines()) == 1 and line.isascii()
    assert json.loads(line) == event
    assert line.startswith('{"action":"cancel",')
