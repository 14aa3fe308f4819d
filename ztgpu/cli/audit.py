"""``ztgpu audit``: the local spool (tail, verify --local) and the collector's
view for auditors (trail, verify, export), with their output formats.

Only the standard library is imported at module level: building the parser
must stay cheap. The collector client, the spool and the PKI load with the
command that needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

from ztgpu.audit.view import printable_line
from ztgpu.errors import Fault, UsageError


class ExportError(Fault):
    """The export file could not be written."""


# ------------------------------------------------------------------ trail

TrailFormat = Literal["table", "json", "csv"]
TRAIL_COLUMNS = ("time", "node", "event", "user", "gpus", "outcome", "reason")
_REASON_WIDTH = 60


def _gpu_indices(value: Any) -> str:
    if isinstance(value, list) and value:
        return ",".join(str(g.get("index", "?")) if isinstance(g, dict) else str(g)
                        for g in value)
    return "-"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def trail_row(event: Mapping[str, Any]) -> tuple[str, ...]:
    """The full (untruncated, unescaped) values of ``TRAIL_COLUMNS`` for one event."""
    return (_text(event.get("ts")), _text(event.get("node")), _text(event.get("code")),
            _text(event.get("user")), _gpu_indices(event.get("gpus")),
            _text(event.get("outcome")), _text(event.get("reason")))


def _table_time(ts: str) -> str:
    # 2026-11-26T12:00:00.123456Z -> 2026-11-26 12:00:00.123Z
    match = re.fullmatch(r"(\S{10})T(\S{8})(?:\.([0-9]+))?Z", ts)
    if match is None:
        return ts
    day, clock, frac = match.groups()
    return f"{day} {clock}.{(frac or '').ljust(3, '0')[:3]}Z"


def write_trail(events: Iterable[Mapping[str, Any]], fmt: TrailFormat, out: IO[str]) -> int:
    """Write ``events`` (already in timeline order) to ``out``; return how many.

    ``table``: aligned columns with a header, every cell escaped to one
    printable line and ``reason`` cut to 60 characters. ``json``: one JSON
    array of the full events (ASCII, so safe on a terminal). ``csv``: a
    header and one row per event with the full values (``csv`` module
    quoting). ``json`` and ``csv`` are streamed; ``table`` holds the rows
    to align them.
    """
    count = 0
    if fmt == "json":
        out.write("[")
        for event in events:
            out.write(",\n" if count else "\n")
            out.write(json.dumps(dict(event), sort_keys=True, ensure_ascii=True))
            count += 1
        out.write("\n]\n" if count else "]\n")
        return count
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(TRAIL_COLUMNS)
        for event in events:
            writer.writerow(trail_row(event))
            count += 1
        return count
    rows: list[tuple[str, ...]] = []
    for event in events:
        cells = [printable_line(cell) for cell in trail_row(event)]
        cells[0] = _table_time(cells[0])
        if len(cells[-1]) > _REASON_WIDTH:
            cells[-1] = cells[-1][:_REASON_WIDTH - 1] + "…"
        rows.append(tuple(cells))
    header = tuple(name.upper() for name in TRAIL_COLUMNS)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                  .rstrip() + "\n")
    return len(rows)


# ----------------------------------------------------------------- export


def canonical_line(event: Mapping[str, Any]) -> bytes:
    """One JSON Lines record: canonical JSON (sorted keys, no spaces, UTF-8) and a newline."""
    return json.dumps(dict(event), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8") + b"\n"


def export_jsonl(events: Iterable[Mapping[str, Any]], path: Path | None,
                 stdout: IO[bytes]) -> int:
    """Write ``events`` as JSON Lines to ``path`` (or ``stdout``); return how many.

    A file is written to a temporary file beside it (mode 0640), flushed to
    disk and renamed over ``path``, so it is either complete or absent; on
    any failure the temporary file is removed. Raises ExportError naming the
    file; errors of ``events`` (e.g. CollectorError) pass through unchanged.
    """
    if path is None:
        count = 0
        for event in events:
            stdout.write(canonical_line(event))
            count += 1
        stdout.flush()
        return count
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                   suffix=".tmp")
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o640)
            count = 0
            for event in events:
                handle.write(canonical_line(event))
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return count


# ---------------------------------------------------------------- commands


def _open_local_spool(args: argparse.Namespace) -> Any:
    from ztgpu.audit.spool import Spool
    from ztgpu.config import load_config

    config = load_config(args.config)
    path = config.paths.spool_dir / "events.db"
    if not path.exists():
        raise UsageError(f"no local audit spool at {path} (is ztgpu-noded running here?)")
    return Spool.open(path, config.node_name)


def _cmd_audit_tail(args: argparse.Namespace) -> int:
    from ztgpu.audit.view import format_event, format_json

    if not args.local:
        raise UsageError("audit tail reads this node's spool: add --local; for the "
                         "central view use `ztgpu audit trail` (e.g. --since 1h)")
    fmt = format_json if args.json else format_event
    with _open_local_spool(args) as spool:
        if args.job:
            events = spool.read(job_id=args.job, limit=1_000_000)[-args.lines:]
        else:
            events = spool.last(args.lines)
        for event in events:
            print(fmt(event))
        last = events[-1]["seq"] if events else spool.head()[0]
        while args.follow:
            time.sleep(0.5)
            for event in spool.read(after_seq=last):
                if not args.job or event.get("job_id") == args.job:
                    print(fmt(event), flush=True)
                last = event["seq"]
    return 0


def _cmd_audit_verify_local(args: argparse.Namespace) -> int:
    with _open_local_spool(args) as spool:
        result = spool.verify()
    if result.ok:
        print(f"OK: {result.checked} events, chain intact")
        return 0
    where = "" if result.first_bad_seq is None else f" at seq {result.first_bad_seq}"
    print(f"BROKEN{where}: {result.problem}")
    return 1


_CONNECTION_OPTIONS = ("collector", "cert", "key", "ca_cert")


def _collector_settings(args: argparse.Namespace) -> Any:
    """``ConnectionSettings`` from --collector/--cert/--key/--ca-cert over the config."""
    from ztgpu.audit.client import ConnectionSettings
    from ztgpu.config import config_path, load_config

    return ConnectionSettings.resolve(
        load_config(args.config), config_path(args.config), collector=args.collector,
        cert=args.cert, key=args.key, ca_cert=args.ca_cert)


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    if args.local:
        given = [f"--{name.replace('_', '-')}" for name in _CONNECTION_OPTIONS
                 if getattr(args, name) is not None]
        if given:
            raise UsageError(f"--local verifies this node's spool; drop {', '.join(given)}")
        return _cmd_audit_verify_local(args)
    from ztgpu.audit.client import open_client
    from ztgpu.audit.collector_verify import verify_collector
    from ztgpu.trust.pki import load_cert

    settings = _collector_settings(args)
    ca = load_cert(settings.ca_cert)
    with open_client(settings) as client:
        report = verify_collector(
            client, ca, on_chain=lambda chain: print("\n".join(chain.lines()), flush=True))
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_audit_trail(args: argparse.Namespace) -> int:
    from ztgpu.audit.client import EventQuery, open_client

    query = EventQuery.from_options(node=args.node, job=args.job, user=args.user,
                                    code=args.code, since=args.since, until=args.until)
    if query.is_empty():
        raise UsageError("audit trail needs a filter: --job, --user, --node, --code, "
                         "--since or --until")
    with open_client(_collector_settings(args)) as client:
        write_trail(client.events(query), args.format, sys.stdout)
    return 0


def _cmd_audit_export(args: argparse.Namespace) -> int:
    from ztgpu.audit.client import EventQuery, open_client

    query = EventQuery.from_options(since=args.since, until=args.until)
    output = Path(args.output) if args.output else None
    with open_client(_collector_settings(args)) as client:
        count = export_jsonl(client.events(query), output, sys.stdout.buffer)
    where = f" to {output}" if output else ""
    print(f"exported {count} event{'s' if count != 1 else ''}{where}", file=sys.stderr)
    return 0


def _add_collector_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "collector connection (defaults: audit.collector_url, tls.cert, tls.key, tls.ca_cert)")
    group.add_argument("--collector", metavar="URL", help="https://HOST:PORT of ztgpu-collectord")
    group.add_argument("--cert", metavar="FILE", help="auditor certificate (PEM)")
    group.add_argument("--key", metavar="FILE", help="its private key (mode 0600)")
    group.add_argument("--ca-cert", metavar="FILE", help="the site CA certificate")


def add_audit_parser(sub: Any) -> None:
    """Add ``audit tail|verify|trail|export`` to the top-level subparsers."""
    audit = sub.add_parser("audit", help="audit events").add_subparsers(
        dest="audit_command", required=True)
    tail = audit.add_parser("tail", help="print recent audit events")
    tail.add_argument("--local", action="store_true", help="read this node's spool")
    tail.add_argument("-n", "--lines", type=int, default=50)
    tail.add_argument("--job", help="only events of this job id")
    tail.add_argument("-f", "--follow", action="store_true")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.set_defaults(func=_cmd_audit_tail)
    verify = audit.add_parser(
        "verify", help="recompute the hash chains (every node's at the collector, or --local)")
    verify.add_argument("--local", action="store_true", help="verify this node's spool")
    _add_collector_options(verify)
    verify.set_defaults(func=_cmd_audit_verify)
    trail = audit.add_parser("trail", help="a job's (or filter's) timeline across all nodes")
    trail.add_argument("--job", help="job id")
    trail.add_argument("--user", help="user name")
    trail.add_argument("--node", help="node name")
    trail.add_argument("--code", help="event code, e.g. job.grant")
    trail.add_argument("--since", metavar="TIME",
                       help="from TIME (RFC 3339, a date, or ago: 30m, 12h, 7d)")
    trail.add_argument("--until", metavar="TIME", help="before TIME (same forms)")
    trail.add_argument("--format", choices=["table", "json", "csv"], default="table")
    _add_collector_options(trail)
    trail.set_defaults(func=_cmd_audit_trail)
    export = audit.add_parser("export", help="events of a time range as JSON Lines")
    export.add_argument("--since", metavar="TIME",
                        help="from TIME (RFC 3339, a date, or ago: 30m, 12h, 7d)")
    export.add_argument("--until", metavar="TIME", help="before TIME (same forms)")
    export.add_argument("-o", "--output", metavar="FILE",
                        help="write FILE (mode 0640, replaced atomically); default stdout")
    _add_collector_options(export)
    export.set_defaults(func=_cmd_audit_export)
