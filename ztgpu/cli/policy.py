"""``ztgpu policy``: check the central GPU access policy and explain decisions.

``ztgpu.policy`` (and with it pydantic and PyYAML) is imported inside the
handlers only, so that every other ``ztgpu`` command starts without them.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime
from typing import Any

# ztgpu.policy.DEFAULT_POLICY_PATH; a test keeps them equal.
_DEFAULT_POLICY = "/etc/ztgpu/policy.yaml"

_AGE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _mfa_age(text: str) -> float | None:
    """``none``, or an age such as ``90s``, ``30m``, ``2h``, ``1.5d``."""
    if text.strip().lower() == "none":
        return None
    match = _AGE_RE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"not an age: {text!r} (use e.g. 30m, 2h, 1d, or none for no MFA session)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _instant(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an RFC 3339 time: {text!r} (e.g. 2024-05-06T09:30:00+02:00)") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no UTC offset; add one, e.g. Z or +02:00")
    return when


def _system_groups(user: str) -> frozenset[str] | None:
    """The unix groups of *user* on this system, or None if there is no such user."""
    import grp
    import os
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    names = set()
    for gid in os.getgrouplist(user, entry.pw_gid):
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue  # a gid without a name cannot be listed in a policy
    return frozenset(names)


def _cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ztgpu.policy import load_policy, policy_warnings

    policy = load_policy(Path(args.file))
    print(f"OK: {len(policy.rules)} rule{'s' if len(policy.rules) != 1 else ''}, "
          f"sha256 {policy.content_hash}")
    for warning in policy_warnings(policy):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _limits_text(decision: Any, hours: Any) -> str:
    from ztgpu.policy import format_duration

    gpus = "GPU" if decision.max_gpus_per_job == 1 else "GPUs"
    return (f"at most {decision.max_gpus_per_job} {gpus} per job, "
            f"{decision.max_gpus_per_user_per_node} per user per node; "
            f"MFA session at most {format_duration(decision.mfa_max_age_s)} old; "
            f"hours: {hours.describe() if hours is not None else 'any time'}")


def _cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ztgpu.policy import (
        DEFAULT_RULE,
        AccessRequest,
        evaluate,
        format_duration,
        load_policy,
    )

    policy = load_policy(Path(args.policy))
    if args.group:
        groups = frozenset(args.group)
        group_note = ""
    else:
        found = _system_groups(args.user)
        groups = found or frozenset()
        group_note = (" (from this system)" if found is not None
                      else " (no such user here; give --group)")
    when = args.at or datetime.now(UTC)
    request = AccessRequest(user=args.user, groups=groups, account=args.account,
                            partition=args.partition, gpus=args.gpus,
                            gpus_held_on_node=args.held, mfa_age_s=args.mfa_age, now=when)
    decision = evaluate(policy, request)
    deciding = next((r for r in policy.rules if r.name == decision.rule), None)
    hours = deciding.allowed_hours if deciding is not None else policy.defaults.allowed_hours
    mfa = format_duration(args.mfa_age) + " old" if args.mfa_age is not None else "none"

    print(f"{'ALLOW' if decision.allow else 'DENY'} ({decision.code})")
    print(f"rule:    {decision.rule}" + (" (no rule matched)"
                                         if decision.rule == DEFAULT_RULE else ""))
    print(f"reason:  {decision.reason}")
    print(f"limits:  {_limits_text(decision, hours)}")
    print(f"request: user {args.user}, groups [{', '.join(sorted(groups))}]{group_note}, "
          f"account {args.account or '-'}, partition {args.partition or '-'}, "
          f"{args.gpus} GPU{'' if args.gpus == 1 else 's'} (holding {args.held} on the "
          f"node), MFA session {mfa}, "
          f"at {when.isoformat()}")
    print(f"policy:  {policy.source} sha256 {policy.content_hash}")
    print("trace:")
    for line in decision.trace:
        print(f"  {line}")
    return 0 if decision.allow else 1


def add_policy_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ztgpu policy {check,explain}`` to the top-level sub-parsers."""
    policy = sub.add_parser("policy", help="the central GPU access policy").add_subparsers(
        dest="policy_command", required=True)

    check = policy.add_parser(
        "check", help="validate a policy file",
        description="Validate a policy file; print the number of rules and its SHA-256, "
        "and warnings (rules that can never match, default: allow, ...) on stderr. "
        "Exits 0 when valid, 2 when not (naming the key and the problem).")
    check.add_argument("file", help="policy file to check")
    check.set_defaults(func=_cmd_check)

    explain = policy.add_parser(
        "explain", help="show how the policy decides one request",
        description="Evaluate one GPU request against the policy and print the decision, "
        "the deciding rule, the reason, the effective limits and each rule considered. "
        "Exits 0 when allowed, 1 when denied, 2 on a bad policy file.")
    explain.add_argument("--policy", default=_DEFAULT_POLICY, metavar="FILE",
                         help=f"policy file (default {_DEFAULT_POLICY})")
    explain.add_argument("--user", required=True)
    explain.add_argument("--group", action="append", default=[], metavar="GROUP",
                         help="a unix group of the user (repeatable; default: the user's "
                         "groups on this system)")
    explain.add_argument("--account", help="Slurm account")
    explain.add_argument("--partition", help="Slurm partition")
    explain.add_argument("--gpus", type=_count, required=True, help="GPUs the job asks for")
    explain.add_argument("--held", type=_count, default=0, metavar="N",
                         help="GPUs the user already holds on the node (default 0)")
    explain.add_argument("--mfa-age", type=_mfa_age, default=None, metavar="AGE",
                         help="age of the user's MFA session: 30m, 2h, 1d, or none "
                         "(default none)")
    explain.add_argument("--at", type=_instant, default=None, metavar="TIME",
                         help="decide as of TIME (RFC 3339; default now)")
    explain.set_defaults(func=_cmd_explain)

