"""Render audit events for humans (one line each) and for tools (JSON lines).

Both renderings are guaranteed to be a single line with no control
characters, whatever the event holds: a hostile ``reason`` cannot forge a
second log line or drive the terminal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

_TS = re.compile(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.(\d+))?Z")
# Shown in fixed places, or not at all (chain bookkeeping).
_LAID_OUT = frozenset(
    {"v", "code", "severity", "node", "seq", "ts", "prev", "hash"}
    | {"job_id", "uid", "user", "gpus", "outcome", "reason"}
)


def printable_line(text: str) -> str:
    """``text`` with every non-printable character escaped (one terminal-safe line)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _escape(text: str) -> str:
    """Backslash-escape quotes, backslashes and every non-printable character."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ascii(ch)[1:-1] if ord(ch) > 0x7F else f"\\x{ord(ch):02x}")
    return "".join(out)


def _word(text: str) -> str:
    """``text`` as one token: bare when plain, otherwise quoted and escaped."""
    if text and all(ch.isprintable() and not ch.isspace() and ch not in '"\\' for ch in text):
        return text
    return f'"{_escape(text)}"'


def _value(value: Any) -> str:
    if isinstance(value, str):
        return _word(value)
    if isinstance(value, list) and all(
        isinstance(item, int | float | str) and not isinstance(item, bool) for item in value
    ):
        return _word(",".join(str(item) for item in value))
    # ASCII JSON is printable; it needs quotes only if a string inside has a space.
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f'"{_escape(text)}"' if " " in text else text


def _gpus(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(g, dict) and "index" in g for g in value):
        return _value([g["index"] for g in value])
    return _value(value)


def _when(ts: Any) -> str:
    match = _TS.fullmatch(ts) if isinstance(ts, str) else None
    if match is None:
        return _value(ts)
    day, clock, frac = match.groups()
    return f"{day} {clock}.{(frac or '').ljust(3, '0')[:3]}Z"


def format_event(event: Mapping[str, Any], *, show_node: bool = False) -> str:
    """One readable line, e.g.

    ``2026-11-26 12:00:00.123Z  #42  CRITICAL  isolation.violated  job=17
    user=alice(1001) gpus=0,2  outcome=killed probe=open reason="opened GPU 3"``

    Identity (job, user, GPU indexes) comes first, then ``outcome``, the other
    fields sorted by name, and ``reason`` last. Values with spaces or odd
    characters are quoted and escaped. Never raises for odd events.
    """
    head = [
        _when(event.get("ts")),
        f"#{_value(event.get('seq'))}",
        str(event.get("severity", "?")).upper().ljust(8),
        _value(event.get("code", "?")),
    ]
    if show_node:
        head.insert(2, f"node={_value(event.get('node'))}")

    who = []
    if "job_id" in event:
        who.append(f"job={_value(event['job_id'])}")
    if "user" in event:
        uid = f"({_value(event['uid'])})" if "uid" in event else ""
        who.append(f"user={_value(event['user'])}{uid}")
    elif "uid" in event:
        who.append(f"uid={_value(event['uid'])}")
    if "gpus" in event:
        who.append(f"gpus={_gpus(event['gpus'])}")

    what = [f"outcome={_value(event['outcome'])}"] if "outcome" in event else []
    what += [f"{_word(key)}={_value(event[key])}" for key in sorted(event) if key not in _LAID_OUT]
    if "reason" in event:
        what.append(f"reason={_value(event['reason'])}")

    groups = [*head, " ".join(who), " ".join(what)]
    return "  ".join(group for group in groups if group)


def format_json(event: Mapping[str, Any]) -> str:
    """The event as one line of JSON (sorted keys, ASCII only, no newline).

    Raises TypeError/ValueError only if ``event`` is not JSON data, which an
    event read from a spool always is.
    """
    return json.dumps(dict(event), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
