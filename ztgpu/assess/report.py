"""``ztgpu assess`` output: a table for people, JSON, and SARIF 2.1.0."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from ztgpu import __version__
from ztgpu.assess.checks import Finding
from ztgpu.assess.rules import (
    PRINCIPLES,
    RULES,
    SARIF_LEVEL,
    count_severities,
    describe_counts,
)

#: SARIF ``security-severity`` (0-10) by severity, as code scanners rank them.
SECURITY_SEVERITY = {"info": "0.0", "low": "3.0", "medium": "5.5", "high": "8.0",
                     "critical": "9.5"}
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def counts(findings: Sequence[Finding]) -> dict[str, int]:
    return count_severities(f.severity for f in findings)


def table(node: str, findings: Sequence[Finding], width: int = 100) -> str:
    """Findings, most severe first: id, severity, what was seen, the fix."""
    lines = [f"ztgpu assess: node {node}: {describe_counts(counts(findings))}"]
    for finding in findings:
        rule = finding.rule
        where = (f" [{finding.path}{f':{finding.line}' if finding.line else ''}]"
                 if finding.path else "")
        lines.append("")
        lines.append(f"{rule.id} {finding.severity.upper():<8} {rule.name}{where}")
        for label, text in (("seen", finding.evidence), ("why", rule.summary),
                            ("fix", rule.fix)):
            wrapped = textwrap.wrap(text, width - 10) or [""]
            lines.append(f"    {label + ':':<5} {wrapped[0]}")
            lines += [f"          {more}" for more in wrapped[1:]]
        lines.append(f"    {'maps:':<5} {', '.join(rule.principles)}; NIST SP 800-53 "
                     f"{', '.join(rule.controls)}")
    return "\n".join(lines)


def as_json(node: str, findings: Sequence[Finding], gathered_at: str | None) -> dict[str, Any]:
    return {"node": node, "gathered_at": gathered_at, "tool": f"ztgpu {__version__}",
            "counts": counts(findings), "findings": [f.as_dict() for f in findings]}


def sarif(node: str, findings: Sequence[Finding], gathered_at: str | None) -> dict[str, Any]:
    """One SARIF 2.1.0 run: every rule in the driver (stable ids), one result
    per finding, with a location where a file is to blame."""
    rules = list(RULES.values())
    index = {rule.id: n for n, rule in enumerate(rules)}
    descriptors = [{
        "id": rule.id, "name": rule.name,
        "shortDescription": {"text": rule.summary.split(": ")[0].rstrip(".") + "."},
        "fullDescription": {"text": rule.summary},
        "help": {"text": f"{rule.summary} Fix: {rule.fix}"},
        "defaultConfiguration": {"level": SARIF_LEVEL[rule.severity]},
        "properties": {"security-severity": SECURITY_SEVERITY[rule.severity],
                       "severity": rule.severity,
                       "tags": ["security", *rule.principles,
                                *(f"NIST-800-53/{c}" for c in rule.controls)],
                       "principles": {p: PRINCIPLES[p] for p in rule.principles},
                       "nist-800-53": list(rule.controls)},
    } for rule in rules]
    results = []
    for finding in findings:
        result: dict[str, Any] = {
            "ruleId": finding.rule.id, "ruleIndex": index[finding.rule.id],
            "level": SARIF_LEVEL[finding.severity],
            "message": {"text": f"{finding.evidence}. Fix: {finding.rule.fix}"},
            "properties": {"severity": finding.severity, "node": node}}
        if finding.path and finding.path.startswith("/"):
            physical: dict[str, Any] = {"artifactLocation": {"uri": f"file://{finding.path}"}}
            if finding.line:
                physical["region"] = {"startLine": finding.line}
            result["locations"] = [{"physicalLocation": physical}]
        else:
            result["locations"] = [{"logicalLocations": [
                {"name": node, "fullyQualifiedName": f"node/{node}", "kind": "resource"}]}]
        results.append(result)
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "ztgpu-assess", "version": __version__,
                            "rules": descriptors}},
        "results": results,
        "properties": {"node": node},
    }
    if gathered_at:
        run["invocations"] = [{"executionSuccessful": True, "endTimeUtc": _utc(gathered_at)}]
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}


def _utc(text: str) -> str:
    from datetime import UTC, datetime

    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
