"""``ztgpu assess``: this node's zero-trust posture, as findings with stable rule ids.

Reads the node as it is (``ztgpu.assess.facts``), judges it against the
rules (``ztgpu.assess.rules``, ``ztgpu.assess.checks``) and prints a table,
JSON or SARIF 2.1.0. Exit status: 0 when no finding is at or above
``--fail-on`` (default ``high``), 1 when one is, 2 on a usage or config
error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ztgpu.assess.rules import SEVERITIES


def add_parser(sub: Any) -> None:
    assess = sub.add_parser("assess", help="check this node's zero-trust posture (findings "
                            "with stable rule ids; table, JSON or SARIF)")
    assess.add_argument("--format", choices=("table", "json", "sarif"), default="table")
    assess.add_argument("--out", help="write the report to this file instead of stdout")
    assess.add_argument("--fail-on", choices=SEVERITIES, default="high",
                        help="exit 1 when a finding is at least this severe (default high)")
    assess.add_argument("--slurm-conf", help="slurm.conf to read (default: slurm.conf in "
                        "the config, else /etc/slurm/slurm.conf)")
    assess.add_argument("--root", default="/",
                        help="read the node's files under this directory (a node image); "
                        "the agent and services are asked only for /")
    assess.add_argument("--record", metavar="FILE",
                        help="also write the facts the judgement was based on (JSON)")
    assess.add_argument("--facts", metavar="FILE",
                        help="judge recorded facts (of --record) instead of this node")
    assess.add_argument("--no-event", action="store_true",
                        help="do not record the assessment in the node's audit trail (by "
                        "default a live node's agent records it: node.assessed)")
    assess.add_argument("--rules", action="store_true", help="list the rules and exit")
    assess.add_argument("--cluster", action="store_true",
                        help="every node's last assessment, from the collector (an auditor "
                        "certificate; see `ztgpu audit trail`)")
    assess.add_argument("--since", default="30d",
                        help="with --cluster: assessments from this long ago on (default 30d)")
    from ztgpu.cli.audit import _add_collector_options

    _add_collector_options(assess)
    assess.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ztgpu.assess import checks, facts, report
    from ztgpu.assess.rules import RULES, at_least

    if args.rules:
        for rule in RULES.values():
            print(f"{rule.id} {rule.severity:<8} {rule.name}: {rule.summary}")
        return 0
    if args.cluster:
        return _cluster(args)
    if args.facts:
        try:
            known = facts.load(Path(args.facts))
        except ValueError as exc:
            print(f"ztgpu assess: {exc}", file=sys.stderr)
            return 2
    else:
        from ztgpu.config import load_config

        root = Path(args.root)
        if not root.is_dir():
            print(f"ztgpu assess: --root {root} is not a directory", file=sys.stderr)
            return 2
        known = facts.gather(load_config(args.config), root=root,
                             slurm_conf=Path(args.slurm_conf) if args.slurm_conf else None)
    if args.record:
        Path(args.record).write_text(json.dumps(known, indent=2) + "\n", encoding="utf-8")
    findings = checks.judge(known)
    node, when = str(known.get("node", "?")), known.get("gathered_at")
    if not args.facts and known.get("agent") and "error" not in known["agent"] \
            and not args.no_event:
        _record_event(known, findings)
    if args.format == "table":
        text = report.table(node, findings)
    elif args.format == "json":
        text = json.dumps(report.as_json(node, findings, when), indent=2)
    else:
        text = json.dumps(report.sarif(node, findings, when), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 1 if any(at_least(f.severity, args.fail_on) for f in findings) else 0


def _record_event(known: dict[str, Any], findings: list[Any]) -> None:
    """The agent records the assessment (node.assessed) in the node's chain."""
    import hashlib

    from ztgpu.errors import ZtgpuError
    from ztgpu.node_client import call

    digest = hashlib.sha256(json.dumps(known, sort_keys=True).encode()).hexdigest()
    try:
        call(str(known["suite"]["socket"]), "assessed", facts_sha256=digest,
             findings=[{"rule": f.rule.id, "evidence": f.evidence} for f in findings])
    except ZtgpuError as exc:
        print(f"ztgpu assess: the agent did not record the assessment: {exc}",
              file=sys.stderr)


def _cluster(args: argparse.Namespace) -> int:
    """The newest ``node.assessed`` of each node at the collector, judged again
    against ``--fail-on`` (the findings are the rules' own, by id)."""
    from ztgpu.assess import report
    from ztgpu.assess.checks import Finding
    from ztgpu.assess.rules import RULES, at_least, describe_counts
    from ztgpu.audit.client import EventQuery, open_client
    from ztgpu.cli.audit import _collector_settings

    query = EventQuery.from_options(code="node.assessed", since=args.since)
    latest: dict[str, dict[str, Any]] = {}
    with open_client(_collector_settings(args)) as client:
        for event in client.events(query):  # in time order: the last one wins
            latest[str(event.get("node"))] = event
    nodes: dict[str, list[Finding]] = {}
    for node, event in sorted(latest.items()):
        nodes[node] = [Finding(RULES[f["rule"]], str(f.get("evidence", "")))
                       for f in event.get("findings", [])
                       if isinstance(f, dict) and f.get("rule") in RULES]
    if args.format == "json":
        text = json.dumps({"nodes": [
            {**report.as_json(node, found, latest[node].get("ts")),
             "event": {"seq": latest[node].get("seq"), "hash": latest[node].get("hash")}}
            for node, found in nodes.items()]}, indent=2)
    elif args.format == "sarif":
        runs = [report.sarif(node, found, latest[node].get("ts"))["runs"][0]
                for node, found in nodes.items()]
        text = json.dumps({"$schema": report.SARIF_SCHEMA, "version": "2.1.0", "runs": runs},
                          indent=2)
    else:
        lines = [f"{'node':<16} {'assessed':<28} findings"]
        for node, found in nodes.items():
            ids = " ".join(sorted({f.rule.id for f in found}))
            lines.append(f"{node:<16} {latest[node].get('ts', ''):<28} "
                         f"{describe_counts(report.counts(found))}{'  ' + ids if ids else ''}")
        if not nodes:
            lines.append(f"(no node.assessed event at the collector since {args.since})")
        text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    worst = [f for found in nodes.values() for f in found if at_least(f.severity, args.fail_on)]
    return 1 if worst else 0
