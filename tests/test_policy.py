"""The central GPU access policy: every decision and its order, selectors,
time windows across zones and DST, defaults and overrides, admin roles,
schema errors that name the key path, the shipped example, and the
`ztgpu policy check|explain` commands."""

from __future__ import annotations

import dataclasses
import grp
import hashlib
import os
import pwd
import re
import subprocess
import sys
import textwrap
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ztgpu import policy as policy_module
from ztgpu.cli import policy as policy_cli
from ztgpu.cli.main import main
from ztgpu.errors import ConfigError, InputRejected
from ztgpu.policy import (
    ADMIN_ROLES,
    DECISION_CODES,
    DEFAULT_POLICY_PATH,
    DEFAULT_RULE,
    AccessRequest,
    Decision,
    Policy,
    admin_roles,
    evaluate,
    load_policy,
    parse_policy,
    policy_warnings,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "configs" / "policy.yaml"
ZTGPU = Path(sys.executable).with_name("ztgpu")
SOURCE = "/etc/ztgpu/policy.yaml"
MONDAY_10Z = datetime(2024, 6, 3, 10, 0, tzinfo=UTC)


def parse(text: str) -> Policy:
    return parse_policy(textwrap.dedent(text), SOURCE)


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def request(**changes: Any) -> AccessRequest:
    base: dict[str, Any] = {
        "user": "bob", "groups": frozenset({"ml", "users"}), "account": "proj1",
        "partition": "gpu", "gpus": 2, "gpus_held_on_node": 0, "mfa_age_s": 600.0,
        "now": MONDAY_10Z}
    base.update(changes)
    return AccessRequest(**base)


ML_POLICY = """\
version: 1
defaults:
  mfa_max_age_h: 12
  max_gpus_per_job: 8
  max_gpus_per_user_per_node: 8
rules:
  - name: blocked
    users: [mallory]
    allow: false
    reason: "your account is locked; mail hpc-support"
  - name: ml-team
    groups: [ml]
    accounts: [proj1]
    partitions: [gpu]
    allow: true
    max_gpus_per_job: 4
    max_gpus_per_user_per_node: 6
    mfa_max_age_h: 8
    allowed_hours: {days: [mon, tue, wed, thu, fri], from: "07:00", to: "22:00",
                    tz: Europe/Berlin}
  - name: no-gpus
    partitions: [cpu]
    allow: false
default: deny
"""


# ---- every decision code ------------------------------------------------------

DECISION_CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    # code: (request changes, deciding rule, reason)
    "allowed": ({}, "ml-team", "allowed by rule ml-team"),
    "no_rule": ({"partition": "other"}, DEFAULT_RULE,
                "no policy rule gives user bob GPU access (account proj1, partition other); "
                "ask your HPC support team for access"),
    "rule_denies": ({"user": "mallory"}, "blocked", "your account is locked; mail hpc-support"),
    "too_many_gpus_job": ({"gpus": 6}, "ml-team",
                          "job asks for 6 GPUs; rule ml-team allows at most 4 per job"),
    "too_many_gpus_node": ({"gpus": 3, "gpus_held_on_node": 4}, "ml-team",
                           "job asks for 3 GPUs and you already hold 4 on this node; "
                           "rule ml-team allows at most 6 per user per node"),
    "mfa_required": ({"mfa_age_s": None}, "ml-team", "MFA session required: run `ztgpu login`"),
    "mfa_too_old": ({"mfa_age_s": 9 * 3600.0}, "ml-team",
                    "MFA session is 9h old; rule ml-team accepts at most 8h: run `ztgpu login`"),
    "outside_hours": ({"now": datetime(2024, 6, 1, 10, 0, tzinfo=UTC)}, "ml-team",
                      "rule ml-team allows GPU jobs only mon-fri 07:00-22:00 Europe/Berlin; "
                      "it is now sat 12:00 there"),
}


def test_the_cases_cover_every_decision_code() -> None:
    assert set(DECISION_CASES) == set(DECISION_CODES)


@pytest.mark.parametrize("code", sorted(DECISION_CASES))
def test_each_decision_code_with_its_rule_and_reason(code: str) -> None:
    changes, rule, reason = DECISION_CASES[code]
    decision = evaluate(parse(ML_POLICY), request(**changes))
    assert decision.code == code
    assert decision.allow is (code == "allowed")
    assert decision.rule == rule
    assert decision.reason == reason


def test_a_deny_rule_without_reason_says_which_rule_and_what_to_do() -> None:
    decision = evaluate(parse(ML_POLICY), request(partition="cpu"))
    assert (decision.allow, decision.code, decision.rule) == (False, "rule_denies", "no-gpus")
    assert decision.reason == ("GPU access denied by policy rule no-gpus; ask your HPC support "
                               "team for access")


def test_limit_checks_run_in_the_documented_order() -> None:
    pol = parse(ML_POLICY)
    saturday = datetime(2024, 6, 1, 10, 0, tzinfo=UTC)
    everything_wrong = {"now": saturday, "gpus": 6, "gpus_held_on_node": 4, "mfa_age_s": None}
    order = ["outside_hours", "too_many_gpus_job", "too_many_gpus_node", "mfa_required"]
    fixes: list[dict[str, Any]] = [{"now": MONDAY_10Z}, {"gpus": 3}, {"gpus_held_on_node": 0},
                                   {"mfa_age_s": 60.0}]
    for expected, fix in zip(order, fixes, strict=True):
        assert evaluate(pol, request(**everything_wrong)).code == expected
        everything_wrong.update(fix)
    assert evaluate(pol, request(**everything_wrong)).code == "allowed"
    # A deny rule wins over every limit.
    assert evaluate(pol, request(user="mallory", **{k: v for k, v in everything_wrong.items()
                                                     if k != "user"})).code == "rule_denies"


def test_limits_are_inclusive_at_the_boundary() -> None:
    pol = parse(ML_POLICY)
    assert evaluate(pol, request(gpus=4)).allow
    assert evaluate(pol, request(gpus=5)).code == "too_many_gpus_job"
    assert evaluate(pol, request(gpus=2, gpus_held_on_node=4)).allow
    assert evaluate(pol, request(gpus=3, gpus_held_on_node=4)).code == "too_many_gpus_node"
    assert evaluate(pol, request(mfa_age_s=8 * 3600.0)).allow
    assert evaluate(pol, request(mfa_age_s=8 * 3600.0 + 1)).code == "mfa_too_old"


def test_decision_carries_the_effective_limits_and_a_trace() -> None:
    pol = parse(ML_POLICY)
    decision = evaluate(pol, request())
    assert (decision.max_gpus_per_job, decision.max_gpus_per_user_per_node,
            decision.mfa_max_age_s) == (4, 6, 8 * 3600.0)
    assert decision.trace == (
        "rule blocked: no match: user bob not in users [mallory]",
        "rule ml-team: matches (allow)")
    none = evaluate(pol, request(partition="other"))
    assert (none.max_gpus_per_job, none.max_gpus_per_user_per_node, none.mfa_max_age_s) == (
        8, 8, 12 * 3600.0)
    assert none.trace[-1] == "no rule matched: default deny"
    assert len(none.trace) == len(pol.rules) + 1
    assert "rule ml-team: no match: partition other not in partitions [gpu]" in none.trace


def test_decision_is_frozen() -> None:
    decision = evaluate(parse(ML_POLICY), request())
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.allow = False  # type: ignore[misc]


# ---- matching ------------------------------------------------------------------

def test_first_matching_rule_wins() -> None:
    pol = parse("""\
        version: 1
        rules:
          - {name: small, groups: [ml], allow: true, max_gpus_per_job: 1}
          - {name: big, groups: [ml], allow: true, max_gpus_per_job: 8}
        """)
    decision = evaluate(pol, request(gpus=2))
    assert (decision.rule, decision.code) == ("small", "too_many_gpus_job")
    assert decision.trace == ("rule small: matches (allow)",)
    swapped = parse("""\
        version: 1
        rules:
          - {name: big, groups: [ml], allow: true, max_gpus_per_job: 8}
          - {name: small, groups: [ml], allow: true, max_gpus_per_job: 1}
        """)
    assert evaluate(swapped, request(gpus=2)).rule == "big"


def test_a_rule_matches_only_when_every_selector_matches() -> None:
    pol = parse("""\
        version: 1
        rules:
          - name: narrow
            users: [bob]
            groups: [ml]
            accounts: [proj1]
            partitions: [gpu]
            allow: true
        """)
    assert evaluate(pol, request()).rule == "narrow"
    for changes, why in [
        ({"user": "carol"}, "user carol not in users [bob]"),
        ({"groups": frozenset({"users"})}, "none of the user's groups in groups [ml]"),
        ({"account": "proj2"}, "account proj2 not in accounts [proj1]"),
        ({"partition": "debug"}, "partition debug not in partitions [gpu]"),
        ({"account": None}, "request has no account; rule needs accounts [proj1]"),
        ({"partition": None}, "request has no partition; rule needs partitions [gpu]"),
    ]:
        decision = evaluate(pol, request(**changes))
        assert decision.code == "no_rule", changes
        assert decision.trace[0] == f"rule narrow: no match: {why}"


def test_star_matches_any_name_but_not_a_missing_one() -> None:
    pol = parse("""\
        version: 1
        rules:
          - {name: any-account, accounts: ["*"], partitions: ["gpu", "*"], allow: true}
        """)
    assert evaluate(pol, request(account="whatever", partition="p9")).allow
    assert evaluate(pol, request(account=None)).code == "no_rule"
    assert evaluate(pol, request(partition=None)).code == "no_rule"
    users = parse('version: 1\nrules: [{name: all, users: ["*"], groups: ["*"], allow: true}]')
    assert evaluate(users, request(user="zed", groups=frozenset({"x"}))).allow
    assert evaluate(users, request(groups=frozenset())).code == "no_rule"


def test_group_selector_matches_any_of_the_users_groups() -> None:
    pol = parse('version: 1\nrules: [{name: dl, groups: [ml, dl], allow: true}]')
    assert evaluate(pol, request(groups=frozenset({"users", "dl"}))).allow
    assert evaluate(pol, request(groups={"ml"})).allow  # a plain set is accepted too
    assert evaluate(pol, request(groups=frozenset({"users", "wheel"}))).code == "no_rule"
    assert evaluate(pol, request(groups=frozenset())).code == "no_rule"


def test_a_rule_without_selectors_matches_everyone() -> None:
    pol = parse('version: 1\nrules: [{name: all, allow: true}]')
    decision = evaluate(pol, request(user="x", groups=frozenset(), account=None,
                                     partition=None))
    assert (decision.allow, decision.rule) == (True, "all")


def test_default_allow_applies_the_default_limits() -> None:
    pol = parse("""\
        version: 1
        defaults: {max_gpus_per_job: 2, mfa_max_age_h: 1}
        rules: [{name: nobody, users: [nobody], allow: false}]
        default: allow
        """)
    ok = evaluate(pol, request(gpus=2))
    assert (ok.allow, ok.rule, ok.code, ok.reason) == (
        True, DEFAULT_RULE, "allowed", "allowed by the default policy")
    assert ok.trace[-1] == "no rule matched: default allow (limits from defaults)"
    too_many = evaluate(pol, request(gpus=3))
    assert (too_many.code, too_many.reason) == (
        "too_many_gpus_job", "job asks for 3 GPUs; the default policy allows at most 2 per job")
    assert evaluate(pol, request(mfa_age_s=7200.0)).code == "mfa_too_old"


def test_no_rules_means_the_default_decides() -> None:
    pol = parse("version: 1\n")
    assert pol.rules == () and pol.default == "deny"
    assert evaluate(pol, request()).code == "no_rule"
    assert policy_warnings(pol) == ["no rules: every request gets the default (deny)"]


# ---- defaults and overrides --------------------------------------------------

def test_rules_inherit_defaults_and_override_them_key_by_key() -> None:
    pol = parse("""\
        version: 1
        defaults:
          mfa_max_age_h: 2
          max_gpus_per_job: 3
          max_gpus_per_user_per_node: 5
          allowed_hours: {from: "08:00", to: "18:00", tz: UTC}
        rules:
          - {name: inherits, users: [ann], allow: true}
          - {name: overrides, users: [ben], allow: true, max_gpus_per_job: 1,
             mfa_max_age_h: 0.25, allowed_hours: null}
        """)
    inherits, overrides = pol.rules
    assert (inherits.max_gpus_per_job, inherits.max_gpus_per_user_per_node,
            inherits.mfa_max_age_s) == (3, 5, 7200.0)
    assert inherits.allowed_hours == pol.defaults.allowed_hours is not None
    assert (overrides.max_gpus_per_job, overrides.max_gpus_per_user_per_node,
            overrides.mfa_max_age_s, overrides.allowed_hours) == (1, 5, 900.0, None)
    night = datetime(2024, 6, 3, 23, 0, tzinfo=UTC)
    assert evaluate(pol, request(user="ann", gpus=1, now=night)).code == "outside_hours"
    assert evaluate(pol, request(user="ben", gpus=1, now=night, mfa_age_s=60.0)).allow
    assert evaluate(pol, request(user="ben", gpus=1, mfa_age_s=901.0)).code == "mfa_too_old"


def test_built_in_defaults() -> None:
    pol = parse('version: 1\nrules: [{name: all, allow: true}]')
    d = pol.defaults
    assert (d.mfa_max_age_h, d.max_gpus_per_job, d.max_gpus_per_user_per_node,
            d.allowed_hours) == (12.0, 8, 8, None)
    assert pol.default == "deny" and pol.admins == ()
    assert evaluate(pol, request(gpus=8, mfa_age_s=12 * 3600.0)).allow
    assert evaluate(pol, request(gpus=9)).code == "too_many_gpus_job"


# ---- time windows ----------------------------------------------------------------

def hours_policy(window: str) -> Policy:
    return parse(f"version: 1\nrules: [{{name: w, allow: true, allowed_hours: {window}}}]")


@pytest.mark.parametrize(("when", "inside"), [
    ("2024-06-07T22:00", True),    # Friday, window opens
    ("2024-06-07T23:59", True),
    ("2024-06-08T02:00", True),    # Saturday morning belongs to Friday's window
    ("2024-06-08T05:59", True),
    ("2024-06-08T06:00", False),   # end is exclusive
    ("2024-06-08T23:00", False),   # Saturday night: no window starts on Saturday
    ("2024-06-07T02:00", False),   # Friday morning belongs to Thursday
    ("2024-06-07T21:59", False),
])
def test_overnight_window_belongs_to_the_day_it_starts(when: str, inside: bool) -> None:
    pol = hours_policy('{days: [fri], from: "22:00", to: "06:00", tz: UTC}')
    now = datetime.fromisoformat(when).replace(tzinfo=UTC)
    assert evaluate(pol, request(now=now)).allow is inside
    if not inside:
        assert evaluate(pol, request(now=now)).code == "outside_hours"


def test_window_is_wall_clock_time_of_its_zone_across_dst() -> None:
    pol = hours_policy('{from: "07:00", to: "22:00", tz: Europe/Berlin}')
    # 05:30 UTC is 06:30 in Berlin in winter (UTC+1) but 07:30 in summer (UTC+2).
    assert evaluate(pol, request(now=datetime(2024, 1, 15, 5, 30, tzinfo=UTC))).code == (
        "outside_hours")
    assert evaluate(pol, request(now=datetime(2024, 7, 15, 5, 30, tzinfo=UTC))).allow
    # Across the spring change (2024-03-31 01:00 UTC) the same UTC time flips.
    assert not evaluate(pol, request(now=datetime(2024, 3, 30, 5, 30, tzinfo=UTC))).allow
    assert evaluate(pol, request(now=datetime(2024, 3, 31, 5, 30, tzinfo=UTC))).allow
    # Any aware input works: 22:30 in New York is 04:30 next day in Berlin.
    ny = ZoneInfo("America/New_York")
    denied = evaluate(pol, request(now=datetime(2024, 6, 3, 22, 30, tzinfo=ny)))
    assert denied.code == "outside_hours"
    assert denied.reason.endswith("it is now tue 04:30 there")


def test_window_days_use_the_local_date_of_the_zone() -> None:
    pol = hours_policy('{days: [mon], from: "00:00", to: "12:00", tz: Asia/Tokyo}')
    # Sunday 20:00 UTC is Monday 05:00 in Tokyo.
    assert evaluate(pol, request(now=datetime(2024, 6, 2, 20, 0, tzinfo=UTC))).allow
    assert not evaluate(pol, request(now=datetime(2024, 6, 3, 20, 0, tzinfo=UTC))).allow


def test_window_to_midnight_and_describe() -> None:
    pol = hours_policy('{days: [sat, sun], from: "07:00", to: "00:00", tz: UTC}')
    window = pol.rules[0].allowed_hours
    assert window is not None and window.describe() == "sat,sun 07:00-00:00 (next day) UTC"
    assert evaluate(pol, request(now=datetime(2024, 6, 1, 23, 59, tzinfo=UTC))).allow
    # Saturday's window ended at midnight; Sunday's opens at 07:00.
    assert not evaluate(pol, request(now=datetime(2024, 6, 2, 0, 30, tzinfo=UTC))).allow
    assert evaluate(pol, request(now=datetime(2024, 6, 2, 7, 0, tzinfo=UTC))).allow
    assert not evaluate(pol, request(now=datetime(2024, 6, 3, 10, 0, tzinfo=UTC))).allow


# ---- admin roles -----------------------------------------------------------------

ADMINS = """\
version: 1
admins:
  - user: alice
    roles: [enroll, revoke]
  - group: hpc-admins
    roles: [enroll, revoke, keys, jit_approve, policy]
  - group: security
    roles: [audit]
  - user: alice
    roles: [audit]
"""


def test_admin_roles_via_user_via_group_and_their_union() -> None:
    pol = parse(ADMINS)
    assert admin_roles(pol, "alice", frozenset()) == {"enroll", "revoke", "audit"}
    assert admin_roles(pol, "dave", frozenset({"hpc-admins", "users"})) == {
        "enroll", "revoke", "keys", "jit_approve", "policy"}
    assert admin_roles(pol, "erin", frozenset({"hpc-admins", "security"})) == {
        "enroll", "revoke", "keys", "jit_approve", "policy", "audit"}
    assert admin_roles(pol, "bob", frozenset({"users"})) == frozenset()
    # A group named like an admin user grants nothing, and vice versa.
    assert admin_roles(pol, "hpc-admins", frozenset({"alice"})) == frozenset()


def test_admin_role_names_match_the_schema() -> None:
    field = policy_module._AdminSchema.model_fields["roles"]
    (literal,) = typing.get_args(field.annotation)
    assert typing.get_args(literal) == ADMIN_ROLES


# ---- schema errors ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "path", "problem"), [
    ("version: 1\nrules: [{name: a, allow: true, usres: [bob]}]",
     "rules[0].usres", "unknown key"),
    ("version: 1\nfoo: 1\n", "foo", "unknown key"),
    ("version: 1\nrules:\n  - {name: a, allow: true}\n  - name: b\n    allow: true\n"
     "    allowed_hours:\n      from: '07:00'\n      to: '09:00'\n      from: '08:00'\n"
     "      tz: UTC\n", "rules[1].allowed_hours.from", "key given twice (lines 7 and 9)"),
    ("version: 1\nversion: 1\n", "version", "key given twice (lines 1 and 2)"),
    ("version: 1\nrules:\n  - {name: a, allow: true}\n  - {name: b, allow: true}\n"
     "  - {name: a, allow: false}\n", "rules[2].name",
     "rule name 'a' is already used by rules[0]"),
    ("version: 1\nrules: [{name: a, allow: true, allowed_hours: "
     "{from: '25:00', to: '06:00', tz: UTC}}]", "rules[0].allowed_hours.from",
     '"HH:MM" time from "00:00" to "23:59"'),
    ("version: 1\nrules: [{name: a, allow: true, allowed_hours: "
     "{from: '07:00', to: 22:00, tz: UTC}}]", "rules[0].allowed_hours.to",
     "must be a quoted \"HH:MM\" time"),
    ("version: 1\ndefaults: {allowed_hours: {from: '07:00', to: '07:00', tz: UTC}}",
     "defaults.allowed_hours", "'from' and 'to' are both 07:00"),
    ("version: 1\ndefaults: {allowed_hours: {days: [mon, mon], from: '07:00', to: '08:00', "
     "tz: UTC}}", "defaults.allowed_hours.days", "names a day twice"),
    ("version: 1\ndefaults: {allowed_hours: {days: [monday], from: '07:00', to: '08:00', "
     "tz: UTC}}", "defaults.allowed_hours.days[0]", "'mon'"),
    ("version: 1\ndefaults: {allowed_hours: {from: '07:00', to: '08:00'}}",
     "defaults.allowed_hours.tz", "required key is missing"),
    ("version: 1\nrules: [{name: a, allow: true, allowed_hours: "
     "{from: '07:00', to: '22:00', tz: Mars/Olympus_Mons}}]", "rules[0].allowed_hours.tz",
     "unknown time zone 'Mars/Olympus_Mons'"),
    ("version: 1\ndefaults: {allowed_hours: {from: '07:00', to: '22:00', "
     "tz: ../../etc/passwd}}", "defaults.allowed_hours.tz", "IANA time zone name"),
    ("version: 1\ndefaults: {allowed_hours: {from: '07:00', to: '22:00', tz: leapseconds}}",
     "defaults.allowed_hours.tz", "unknown time zone 'leapseconds'"),
    ("version: 1\nrules: [{name: ML Team, allow: true}]", "rules[0].name", "1-64 characters"),
    ("version: 1\nrules: [{name: a, users: [bob, Bob], allow: true}]", "rules[0].users[1]",
     "user name"),
    ("version: 1\nrules: [{name: a, groups: ['ml team'], allow: true}]", "rules[0].groups[0]",
     "unix group name"),
    ("version: 1\nrules: [{name: a, accounts: ['proj 1'], allow: true}]",
     "rules[0].accounts[0]", "Slurm name"),
    ("version: 1\nrules: [{name: a, partitions: [2024], allow: true}]",
     "rules[0].partitions[0]", "expected text, got 2024; put the value in quotes"),
    ("version: 1\nrules: [{name: a, groups: [], allow: true}]", "rules[0].groups",
     "is an empty list"),
    ("version: 1\nrules:\n  - name: a\n    users:\n    allow: true\n", "rules[0].users",
     "is empty (null)"),
    ("version: 1\nrules: [{name: a}]", "rules[0].allow", "required key is missing"),
    ("version: 1\nrules: [{name: a, allow: 'yes please'}]", "rules[0].allow",
     "valid boolean"),
    ("version: 2\n", "version", "must be 1 (this ztgpu reads policy version 1 only)"),
    ("version: '1'\n", "version", "valid integer"),
    ("rules: []\n", "version", "required key is missing"),
    ("version: 1\ndefault: maybe\n", "default", "'deny' or 'allow'"),
    ("version: 1\ndefaults: {mfa_max_age_h: 0.1}", "defaults.mfa_max_age_h",
     "greater than or equal to 0.25"),
    ("version: 1\ndefaults: {max_gpus_per_job: 65}", "defaults.max_gpus_per_job",
     "less than or equal to 64"),
    ("version: 1\nrules: [{name: a, allow: true, max_gpus_per_user_per_node: true}]",
     "rules[0].max_gpus_per_user_per_node", "valid integer"),
    ("version: 1\nrules: [{name: a, allow: false, max_gpus_per_job: 2}]", "rules[0]",
     "allow: false grants nothing, so max_gpus_per_job would have no effect"),
    ("version: 1\nrules: [{name: a, allow: true, reason: hello}]", "rules[0]",
     "'reason' is shown when a rule denies"),
    ("version: 1\nrules: [{name: a, allow: false, reason: \"two\\nlines\"}]",
     "rules[0].reason", "one line"),
    ("version: 1\nadmins: [{user: alice, group: admins, roles: [audit]}]", "admins[0]",
     "exactly one of 'user' or 'group'"),
    ("version: 1\nadmins: [{roles: [audit]}]", "admins[0]", "exactly one of 'user' or 'group'"),
    ("version: 1\nadmins: [{group: '*', roles: [audit]}]", "admins[0].group",
     "'*' is not allowed for admins"),
    ("version: 1\nadmins: [{user: alice, roles: []}]", "admins[0].roles", "is an empty list"),
    ("version: 1\nadmins: [{user: alice, roles: [root]}]", "admins[0].roles[0]", "'enroll'"),
    ("version: 1\nrules: {name: a}\n", "rules", "valid list"),
    ("version: 1\n1: x\n", "(top level)", "key 1 is not a name"),
])
def test_schema_errors_name_file_key_path_and_problem(text: str, path: str,
                                                      problem: str) -> None:
    message = config_error(text)
    assert message.startswith(f"{SOURCE}: {path}: "), message
    assert problem in message


def test_every_error_is_reported_at_once() -> None:
    message = config_error("version: 3\nrules: [{name: a, allow: true, users: []}]\nx: 1\n")
    lines = message.splitlines()
    assert len(lines) == 3
    assert {line.split(": ")[1] for line in lines} == {"version", "rules[0].users", "x"}


@pytest.mark.parametrize(("text", "problem"), [
    ("", "got an empty file"),
    ("- a\n- b\n", "got list"),
    ("version: [1\n", "line 2: not valid YAML"),
    ("version: 1\n? [a, b]\n: x\n", "line 2: key (a list or mapping) is not a name"),
    ("version: 1\n---\nversion: 1\n", "not valid YAML"),
    ("version: !!python/object:os.system 1\n", "not valid YAML"),
    ("version: 1\nbase: &b {allow: true}\nrules: [{<<: *b, name: a}]\n",
     "rules[0]: line 3: YAML merge keys (<<) are not supported here"),
    ("version: 1\x1f\n", "(parse): not valid YAML: unacceptable character #x001f"),
])
def test_files_that_are_not_a_policy_mapping(text: str, problem: str) -> None:
    message = config_error(text)
    assert message.startswith(f"{SOURCE}: ")
    assert problem in message


def test_load_policy_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy.yaml: no such file"):
        load_policy(tmp_path / "policy.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text"):
        load_policy(bad)
    with pytest.raises(ConfigError, match=r"cannot read"):
        load_policy(tmp_path)


# ---- identity of a policy -------------------------------------------------------

def test_content_hash_is_the_sha256_of_the_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(ML_POLICY, encoding="utf-8")
    pol = load_policy(path)
    assert pol.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert pol.source == str(path)
    assert pol == parse_policy(ML_POLICY, str(path))
    path.write_text(ML_POLICY + "# a comment changes the hash too\n", encoding="utf-8")
    changed = load_policy(path)
    assert changed.content_hash != pol.content_hash
    assert changed.rules == pol.rules


def test_policy_is_frozen() -> None:
    pol = parse(ML_POLICY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pol.default = "allow"  # type: ignore[misc]


# ---- requests -------------------------------------------------------------------

@pytest.mark.parametrize(("changes", "problem"), [
    ({"now": datetime(2024, 6, 3, 10, 0)}, "time zone"),
    ({"gpus": -1}, "negative"),
    ({"gpus_held_on_node": -2}, "negative"),
    ({"mfa_age_s": float("nan")}, "MFA age"),
    ({"mfa_age_s": -5.0}, "MFA age"),
])
def test_malformed_requests_are_rejected(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(InputRejected, match=problem):
        request(**changes)


# ---- warnings ------------------------------------------------------------------

def test_warnings_for_unreachable_rules_default_allow_and_odd_limits() -> None:
    pol = parse("""\
        version: 1
        rules:
          - {name: ml, groups: [ml, dl], allow: true}
          - {name: ml-big, groups: [ml], accounts: [proj1], allow: true}
          - {name: not-shadowed, users: [bob], allow: true, max_gpus_per_job: 4,
             max_gpus_per_user_per_node: 2}
          - {name: rest, allow: false}
          - {name: after-catch-all, partitions: ["*"], allow: true}
        default: allow
        """)
    assert policy_warnings(pol) == [
        "default: allow grants GPUs to anyone no rule matches; zero-trust sites use "
        "default: deny with explicit allow rules",
        "rules[1] (ml-big) can never match: earlier rule ml matches every request it does",
        "rules[2] (not-shadowed): max_gpus_per_job 4 exceeds max_gpus_per_user_per_node 2, "
        "so larger jobs are always denied",
        "rules[4] (after-catch-all) can never match: earlier catch-all rule rest matches "
        "every request it does",
    ]


def test_a_star_rule_does_not_shadow_a_rule_that_matches_missing_values() -> None:
    pol = parse("""\
        version: 1
        rules:
          - {name: any-account, accounts: ["*"], allow: true}
          - {name: everyone, allow: false}
          - {name: named, accounts: [proj1], allow: true}
        """)
    assert policy_warnings(pol) == [
        "rules[2] (named) can never match: earlier rule any-account matches every request "
        "it does"]


# ---- the shipped example --------------------------------------------------------

def test_shipped_example_parses_without_warnings() -> None:
    pol = load_policy(SHIPPED)
    assert [r.name for r in pol.rules] == ["suspended", "ml-team", "courses", "projects",
                                          "everyone-else"]
    assert pol.default == "deny"
    assert policy_warnings(pol) == []
    assert admin_roles(pol, "alice", frozenset()) == {"enroll", "revoke"}
    assert evaluate(pol, request(gpus=4)).allow
    assert evaluate(pol, request(account="proj-suspended")).code == "rule_denies"
    assert evaluate(pol, request(groups=frozenset({"users"}))).reason == (
        "GPU access needs a project; ask hpc-support@example.org")


def test_shipped_example_documents_every_key() -> None:
    text = SHIPPED.read_text()
    schemas = (policy_module._PolicySchema, policy_module._DefaultsSchema,
               policy_module._RuleSchema, policy_module._AdminSchema,
               policy_module._HoursSchema)
    keys = [field.alias or name for schema in schemas
            for name, field in schema.model_fields.items()]
    missing = [key for key in keys if not re.search(rf"^\s*#.*\b{key}\b", text, re.MULTILINE)]
    assert missing == []
    assert all(f"#   {role}" in text for role in ADMIN_ROLES)


# ---- properties ----------------------------------------------------------------

_KNOWN_KEYS = ["version", "defaults", "admins", "rules", "default", "name", "users", "groups",
               "accounts", "partitions", "allow", "reason", "mfa_max_age_h",
               "max_gpus_per_job", "max_gpus_per_user_per_node", "allowed_hours", "days",
               "from", "to", "tz", "user", "group", "roles"]
_KEYS = st.one_of(st.sampled_from(_KNOWN_KEYS), st.text(max_size=10))
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2, max_value=70), st.integers(),
    st.text(max_size=16), st.floats(allow_nan=True),
    st.sampled_from(["07:00", "22:00", "24:00", "UTC", "Europe/Berlin", "Mars/X", "mon", "*",
                     "ml", "bob", "deny", "allow", "enroll", "audit", "proj1", 1]))
_YAMLISH = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=5)), max_leaves=30)
_RULEISH = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "Bad"]), "allow": st.booleans()},
    optional={k: _YAMLISH for k in ["users", "groups", "accounts", "partitions", "reason",
                                    "max_gpus_per_job", "allowed_hours", "mfa_max_age_h"]})
_POLICYISH = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 2, "1"])},
    optional={"rules": st.lists(_RULEISH, max_size=4), "defaults": _YAMLISH,
              "admins": _YAMLISH, "default": _YAMLISH})


def _policy_or_config_error(text: str) -> None:
    try:
        result = parse_policy(text, SOURCE)
    except ConfigError as exc:
        assert str(exc).startswith(f"{SOURCE}: ")
    else:
        assert isinstance(result, Policy)
        assert result.content_hash == hashlib.sha256(text.encode()).hexdigest()


@settings(max_examples=300, deadline=None)
@given(st.one_of(_POLICYISH, st.dictionaries(_KEYS, _YAMLISH, max_size=6), _YAMLISH))
def test_any_yamlish_data_gives_a_policy_or_a_config_error(data: Any) -> None:
    _policy_or_config_error(yaml.safe_dump(data))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("version:1 rules[]{}-,'\"*&!?|>#\n\t:ab")),
               max_size=60))
def test_any_text_gives_a_policy_or_a_config_error(text: str) -> None:
    _policy_or_config_error(text)


@settings(max_examples=200, deadline=None)
@given(user=st.sampled_from(["bob", "mallory", "carol"]),
       groups=st.frozensets(st.sampled_from(["ml", "students", "gpu-users", "x"])),
       account=st.one_of(st.none(), st.sampled_from(["proj1", "proj-suspended", "p2"])),
       partition=st.one_of(st.none(), st.sampled_from(["gpu", "gpu-teach", "cpu"])),
       gpus=st.integers(0, 70), held=st.integers(0, 70),
       mfa=st.one_of(st.none(), st.floats(0, 1e7)),
       now=st.datetimes(timezones=st.just(UTC), min_value=datetime(2000, 1, 1),
                        max_value=datetime(2100, 1, 1)))
def test_evaluation_is_total_and_consistent(user: str, groups: frozenset[str],
                                            account: str | None, partition: str | None,
                                            gpus: int, held: int, mfa: float | None,
                                            now: datetime) -> None:
    pol = _SHIPPED_POLICY
    req = AccessRequest(user=user, groups=groups, account=account, partition=partition,
                        gpus=gpus, gpus_held_on_node=held, mfa_age_s=mfa, now=now)
    decision = evaluate(pol, req)
    assert isinstance(decision, Decision)
    assert decision.code in DECISION_CODES
    assert decision.allow is (decision.code == "allowed")
    assert decision.reason
    if decision.allow:
        assert gpus <= decision.max_gpus_per_job
        assert held + gpus <= decision.max_gpus_per_user_per_node
        assert mfa is not None and mfa <= decision.mfa_max_age_s
    assert evaluate(pol, req) == decision  # pure


_SHIPPED_POLICY = load_policy(SHIPPED)


def test_the_last_of_100_rules_is_found_with_a_full_trace() -> None:
    # Speed is measured by bench/pdp_latency.py, never asserted here.
    rules = "\n".join(
        f"  - {{name: r{i}, users: [u{i}, v{i}], groups: [g{i}], accounts: [a{i}], "
        f"partitions: [gpu], allow: true}}" for i in range(100))
    pol = parse_policy(f"version: 1\nrules:\n{rules}\n", SOURCE)
    last = request(user="u99", groups=frozenset({"g99", "users"}), account="a99")
    assert evaluate(pol, last).rule == "r99"
    assert len(evaluate(pol, last).trace) == 100


# ---- `ztgpu policy check` ---------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_check_ok_prints_rules_and_hash(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, ML_POLICY)
    assert main(["policy", "check", str(path)]) == 0
    captured = capsys.readouterr()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert captured.out == f"OK: 3 rules, sha256 {digest}\n"
    assert captured.err == ""


def test_check_prints_warnings_and_still_passes(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, """\
        version: 1
        rules:
          - {name: all, allow: true}
          - {name: never, users: [bob], allow: false}
        default: allow
        """)
    assert main(["policy", "check", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("OK: 2 rules, sha256 ")
    assert "warning: default: allow grants GPUs to anyone" in captured.err
    assert ("warning: rules[1] (never) can never match: earlier catch-all rule all"
            in captured.err)


def test_check_fails_with_exit_2_naming_the_key(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "version: 1\nrules: [{name: a, allow: true, gpus: 3}]\n")
    assert main(["policy", "check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{path}: rules[0].gpus: unknown key" in captured.err
    assert main(["policy", "check", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


# ---- `ztgpu policy explain` ------------------------------------------------------

def test_explain_allow_exits_0_and_shows_rule_limits_and_trace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, ML_POLICY)
    code = main(["policy", "explain", "--policy", str(path), "--user", "bob", "--group", "ml",
                 "--account", "proj1", "--partition", "gpu", "--gpus", "2",
                 "--mfa-age", "30m", "--at", "2024-06-03T10:00:00Z"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "ALLOW (allowed)"
    assert lines[1] == "rule:    ml-team"
    assert lines[2] == "reason:  allowed by rule ml-team"
    assert lines[3] == ("limits:  at most 4 GPUs per job, 6 per user per node; MFA session at "
                        "most 8h old; hours: mon-fri 07:00-22:00 Europe/Berlin")
    assert "groups [ml], account proj1, partition gpu, 2 GPUs (holding 0 on the node), " \
           "MFA session 30m old, at 2024-06-03T10:00:00+00:00" in out
    assert f"policy:  {path} sha256 " in out
    assert out.endswith("trace:\n  rule blocked: no match: user bob not in users [mallory]\n"
                        "  rule ml-team: matches (allow)\n")


@pytest.mark.parametrize(("extra", "code_line", "reason"), [
    (["--gpus", "6", "--mfa-age", "1h"], "DENY (too_many_gpus_job)",
     "job asks for 6 GPUs; rule ml-team allows at most 4 per job"),
    (["--gpus", "2", "--held", "5", "--mfa-age", "1h"], "DENY (too_many_gpus_node)",
     "you already hold 5 on this node"),
    (["--gpus", "1"], "DENY (mfa_required)", "MFA session required: run `ztgpu login`"),
    (["--gpus", "1", "--mfa-age", "none"], "DENY (mfa_required)", "run `ztgpu login`"),
    (["--gpus", "1", "--mfa-age", "0.5d"], "DENY (mfa_too_old)", "MFA session is 12h old"),
    (["--gpus", "1", "--mfa-age", "90s", "--at", "2024-06-01T12:00:00+02:00"],
     "DENY (outside_hours)", "it is now sat 12:00 there"),
])
def test_explain_deny_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              extra: list[str], code_line: str, reason: str) -> None:
    path = write(tmp_path, ML_POLICY)
    argv = ["policy", "explain", "--policy", str(path), "--user", "bob", "--group", "ml",
            "--account", "proj1", "--partition", "gpu", "--at", "2024-06-03T10:00:00Z", *extra]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == code_line
    assert reason in out


def test_explain_no_rule_shows_the_default(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, ML_POLICY)
    assert main(["policy", "explain", "--policy", str(path), "--user", "bob", "--group", "x",
                 "--gpus", "1", "--mfa-age", "1m"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DENY (no_rule)\nrule:    (default) (no rule matched)\n")
    assert "  no rule matched: default deny\n" in out


def test_explain_takes_the_users_groups_from_the_system(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    path = write(tmp_path, f"version: 1\nrules: [{{name: mine, groups: ['{group}'], "
                           "allow: true}]\n")
    assert main(["policy", "explain", "--policy", str(path), "--user", me, "--gpus", "1",
                 "--mfa-age", "5m"]) == 0
    out = capsys.readouterr().out
    assert "rule:    mine" in out and "(from this system)" in out
    assert main(["policy", "explain", "--policy", str(path), "--user", "no-such-user-zz",
                 "--gpus", "1", "--mfa-age", "5m"]) == 1
    assert "groups [] (no such user here; give --group)" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [
    ["--at", "2024-06-03T10:00:00"], ["--at", "yesterday"], ["--mfa-age", "2 hours"],
    ["--gpus", "-1"], ["--held", "x"],
])
def test_explain_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     bad: list[str]) -> None:
    path = write(tmp_path, ML_POLICY)
    argv = ["policy", "explain", "--policy", str(path), "--user", "bob", "--gpus", "1", *bad]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_explain_with_a_bad_policy_exits_2(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "version: 2\n")
    assert main(["policy", "explain", "--policy", str(path), "--user", "bob",
                 "--gpus", "1"]) == 2
    assert f"{path}: version: must be 1" in capsys.readouterr().err


def test_installed_command_runs_check_and_explain(tmp_path: Path) -> None:
    path = write(tmp_path, ML_POLICY)
    check = subprocess.run([str(ZTGPU), "policy", "check", str(path)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("OK: 3 rules, sha256 ")
    explain = subprocess.run(
        [str(ZTGPU), "policy", "explain", "--policy", str(path), "--user", "mallory",
         "--group", "ml", "--gpus", "1"], capture_output=True, text=True, timeout=60,
        check=False)
    assert explain.returncode == 1, explain.stderr
    assert "DENY (rule_denies)" in explain.stdout


def test_cli_module_loads_no_policy_machinery_until_used() -> None:
    code = ("import sys, ztgpu.cli.policy, ztgpu.cli.main; ztgpu.cli.main.build_parser(); "
            "print('ztgpu.policy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "False"
    solo = subprocess.run([sys.executable, "-c", "import sys, ztgpu.cli.policy; "
                           "print('pydantic' in sys.modules, 'yaml' in sys.modules)"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert solo.stdout.strip() == "False False"


def test_cli_default_policy_path_matches_the_module() -> None:
    assert str(DEFAULT_POLICY_PATH) == policy_cli._DEFAULT_POLICY


def test_parse_durations_for_mfa_age() -> None:
    assert policy_cli._mfa_age("30m") == 1800
    assert policy_cli._mfa_age("2h") == 7200
    assert policy_cli._mfa_age("1.5d") == 1.5 * 86400
    assert policy_cli._mfa_age("none") is None
    assert policy_module.format_duration(timedelta(hours=2, minutes=30).total_seconds()) == (
        "2h30m")
    assert policy_module.format_duration(3 * 86400 + 4 * 3600) == "3d4h"
    assert policy_module.format_duration(45) == "45s"
