"""The central GPU access policy: who may use GPUs, how many, when, and with
how fresh an MFA session; and who may run ``ztgpu admin`` commands.

The policy is one YAML file (``/etc/ztgpu/policy.yaml``), validated against a
schema that rejects unknown and duplicate keys. :func:`load_policy` and
:func:`parse_policy` are the only ways in; they return a frozen
:class:`Policy` whose selector sets and limits are resolved at load time, and
raise :class:`~ztgpu.errors.ConfigError` naming the file, the key path (e.g.
``rules[1].allowed_hours.from``) and what was expected.

:func:`evaluate` is the policy decision: pure (no I/O, no clock; the request
carries the time), first matching rule wins, and the :class:`Decision` says
why, in words for the user and as a machine code.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ztgpu.config import _UniqueKeyLoader
from ztgpu.errors import ConfigError, InputRejected

__all__ = [
    "ADMIN_ROLES",
    "DECISION_CODES",
    "DEFAULT_POLICY_PATH",
    "DEFAULT_RULE",
    "AccessRequest",
    "AdminGrant",
    "Decision",
    "Defaults",
    "HoursWindow",
    "Policy",
    "Rule",
    "Selector",
    "admin_roles",
    "evaluate",
    "format_duration",
    "load_policy",
    "parse_policy",
    "policy_warnings",
]

DEFAULT_POLICY_PATH = Path("/etc/ztgpu/policy.yaml")
POLICY_VERSION = 1

#: Roles an ``admins`` entry may grant (``ztgpu admin ...`` checks them).
ADMIN_ROLES = ("enroll", "revoke", "keys", "jit_approve", "policy", "audit")

#: Every value :attr:`Decision.code` can take.
DECISION_CODES = ("allowed", "no_rule", "rule_denies", "too_many_gpus_job",
                  "too_many_gpus_node", "mfa_required", "mfa_too_old", "outside_hours")

#: :attr:`Decision.rule` when no rule matched and the ``default`` decided.
DEFAULT_RULE = "(default)"

_Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[_Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,255}\$?")
_ACCOUNT_RE = re.compile(r"[A-Za-z0-9_.-]{1,256}")
_RULE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
# IANA zone names: no '.', no leading '/', so a name can never leave the
# zoneinfo directory.
_TZ_RE = re.compile(r"[A-Za-z0-9_+-]{1,64}(/[A-Za-z0-9_+-]{1,64}){0,3}")
_MAX_REASON = 300
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


# ---- the schema (what the file may say) -------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _check_user(value: str) -> str:
    if value != "*" and not _USER_RE.fullmatch(value):
        raise ValueError("must be '*' or a user name ([a-z_][a-z0-9_.-]*, optionally ending "
                         "in '$')")
    return value


def _check_group(value: str) -> str:
    if value != "*" and not _USER_RE.fullmatch(value):
        raise ValueError("must be '*' or a unix group name ([a-z_][a-z0-9_.-]*, optionally "
                         "ending in '$')")
    return value


def _check_account(value: str) -> str:
    if value != "*" and not _ACCOUNT_RE.fullmatch(value):
        raise ValueError("must be '*' or a Slurm name (letters, digits, '_', '.', '-')")
    return value


def _check_admin_name(value: str) -> str:
    if not _USER_RE.fullmatch(value):
        raise ValueError("must be a user or group name ([a-z_][a-z0-9_.-]*); '*' is not "
                         "allowed for admins")
    return value


_UserName = Annotated[str, AfterValidator(_check_user)]
_GroupName = Annotated[str, AfterValidator(_check_group)]
_SlurmName = Annotated[str, AfterValidator(_check_account)]
_AdminName = Annotated[str, AfterValidator(_check_admin_name)]
_MfaHours = Annotated[float, Field(ge=0.25, le=168)]
_GpuCount = Annotated[int, Field(ge=0, le=64)]


class _HoursSchema(_Strict):
    days: list[_Day] = Field(
        default_factory=lambda: list(DAYS), min_length=1)
    from_: str = Field(alias="from")
    to: str
    tz: str

    @field_validator("from_", "to", mode="before")
    @classmethod
    def _check_time(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError('must be a quoted "HH:MM" time, e.g. "22:00" (unquoted, YAML '
                             "reads 22:00 as the number 1320)")
        if isinstance(value, str) and not _TIME_RE.fullmatch(value):
            raise ValueError('must be a "HH:MM" time from "00:00" to "23:59"')
        return value

    @field_validator("tz")
    @classmethod
    def _check_tz(cls, value: str) -> str:
        _zone(value)
        return value

    @field_validator("days")
    @classmethod
    def _check_days(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names a day twice")
        return value

    @model_validator(mode="after")
    def _check_span(self) -> _HoursSchema:
        if self.from_ == self.to:
            raise ValueError(f"'from' and 'to' are both {self.from_}; give from < to, or "
                             "from > to for a window that runs past midnight (for any time "
                             "of day, use allowed_hours: null)")
        return self


class _DefaultsSchema(_Strict):
    mfa_max_age_h: _MfaHours = 12.0
    max_gpus_per_job: _GpuCount = 8
    max_gpus_per_user_per_node: _GpuCount = 8
    allowed_hours: _HoursSchema | None = None


class _AdminSchema(_Strict):
    user: _AdminName | None = None
    group: _AdminName | None = None
    roles: list[Literal["enroll", "revoke", "keys", "jit_approve", "policy", "audit"]] = Field(
        min_length=1)  # ADMIN_ROLES; a test keeps them equal

    @model_validator(mode="after")
    def _check_one(self) -> _AdminSchema:
        if (self.user is None) == (self.group is None):
            raise ValueError("give exactly one of 'user' or 'group'")
        return self


class _RuleSchema(_Strict):
    # Fields a rule leaves out are absent from model_fields_set: selectors
    # then match anything, limits come from `defaults`. The placeholder
    # defaults below are never used as values.
    name: str
    users: list[_UserName] = Field(default_factory=list, min_length=1)
    groups: list[_GroupName] = Field(default_factory=list, min_length=1)
    accounts: list[_SlurmName] = Field(default_factory=list, min_length=1)
    partitions: list[_SlurmName] = Field(default_factory=list, min_length=1)
    allow: bool
    reason: str | None = None
    mfa_max_age_h: _MfaHours = 0.0
    max_gpus_per_job: _GpuCount = 0
    max_gpus_per_user_per_node: _GpuCount = 0
    allowed_hours: _HoursSchema | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _RULE_NAME_RE.fullmatch(value):
            raise ValueError("must be 1-64 characters: a-z, 0-9, then also '_', '.', '-'")
        return value

    @field_validator("reason")
    @classmethod
    def _check_reason(cls, value: str | None) -> str | None:
        if value is not None:
            if not value.strip():
                raise ValueError("is empty; write what the user should do, or remove the key")
            if len(value) > _MAX_REASON or not value.isprintable():
                raise ValueError(f"must be one line of at most {_MAX_REASON} printable "
                                 "characters")
        return value

    @model_validator(mode="after")
    def _check_allow(self) -> _RuleSchema:
        limits = [key for key in ("mfa_max_age_h", "max_gpus_per_job",
                                  "max_gpus_per_user_per_node", "allowed_hours")
                  if key in self.model_fields_set]
        if not self.allow and limits:
            raise ValueError(f"a rule with allow: false grants nothing, so {', '.join(limits)} "
                             "would have no effect; remove it")
        if self.allow and self.reason is not None:
            raise ValueError("'reason' is shown when a rule denies; a rule with allow: true "
                             "takes none")
        return self


class _PolicySchema(_Strict):
    version: int
    defaults: _DefaultsSchema = _DefaultsSchema()
    admins: list[_AdminSchema] = Field(default_factory=list)
    rules: list[_RuleSchema] = Field(default_factory=list)
    default: Literal["deny", "allow"] = "deny"

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: int) -> int:
        if value != POLICY_VERSION:
            raise ValueError(f"must be {POLICY_VERSION} (this ztgpu reads policy version "
                             f"{POLICY_VERSION} only)")
        return value


def _zone(name: str) -> ZoneInfo:
    if not _TZ_RE.fullmatch(name):
        raise ValueError("must be an IANA time zone name such as 'Europe/Berlin' or 'UTC'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: a file under zoneinfo/ that is not a zone (leapseconds).
        raise ValueError(f"unknown time zone {name!r}; use an IANA name such as "
                         "'Europe/Berlin' or 'UTC'") from None


# ---- the compiled policy (what evaluation uses) ------------------------------

def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def _days_text(days: frozenset[int]) -> str:
    if len(days) == 7:
        return "every day"
    parts: list[str] = []
    ordered = sorted(days)
    start = prev = ordered[0]
    for day in [*ordered[1:], None]:
        if day is not None and day == prev + 1:
            prev = day
            continue
        if prev - start >= 2:
            parts.append(f"{DAYS[start]}-{DAYS[prev]}")
        else:
            parts.extend(DAYS[d] for d in range(start, prev + 1))
        if day is not None:
            start = prev = day
    return ",".join(parts)


@dataclass(frozen=True)
class HoursWindow:
    """When GPU jobs may start: on *days*, from *start* to *end* (minutes after
    local midnight, end exclusive), in wall-clock time of *tz*. If start > end
    the window runs past midnight and belongs to the day it starts on."""

    days: frozenset[int]  # 0 = Monday
    start: int
    end: int
    tz: ZoneInfo

    @property
    def overnight(self) -> bool:
        return self.start > self.end

    def contains(self, when: datetime) -> bool:
        """Whether aware *when* falls in the window (DST-correct via zoneinfo)."""
        local = when.astimezone(self.tz)
        minute = local.hour * 60 + local.minute
        weekday = local.weekday()
        if not self.overnight:
            return weekday in self.days and self.start <= minute < self.end
        if minute >= self.start:
            return weekday in self.days
        return minute < self.end and (weekday - 1) % 7 in self.days

    def describe(self) -> str:
        def hhmm(m: int) -> str:
            return f"{m // 60:02d}:{m % 60:02d}"
        span = f"{hhmm(self.start)}-{hhmm(self.end)}"
        if self.overnight:
            span += " (next day)"
        return f"{_days_text(self.days)} {span} {self.tz.key}"


@dataclass(frozen=True)
class Selector:
    """One selector list of a rule: names, or ``any_value`` for ``"*"``.
    ``"*"`` matches any name but not a request that has none."""

    names: frozenset[str]
    any_value: bool
    text: str  # for traces: "[a, b]" or "*"

    @classmethod
    def of(cls, values: list[str]) -> Selector:
        names = frozenset(v for v in values if v != "*")
        any_value = "*" in values
        if any_value:
            text = "*"
        else:
            shown = sorted(names)
            text = ", ".join(shown[:6]) + (f", ... (+{len(shown) - 6} more)"
                                           if len(shown) > 6 else "")
            text = f"[{text}]"
        return cls(names, any_value, text)

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        return self.any_value or value in self.names

    def matches_some(self, values: frozenset[str]) -> bool:
        if not values:
            return False
        return self.any_value or not self.names.isdisjoint(values)

    def covers(self, other: Selector) -> bool:
        """Whether every value *other* matches is matched by this selector."""
        return self.any_value or (not other.any_value and other.names <= self.names)


@dataclass(frozen=True)
class Defaults:
    """The ``defaults`` section: limits for rules that do not set their own."""

    mfa_max_age_h: float
    max_gpus_per_job: int
    max_gpus_per_user_per_node: int
    allowed_hours: HoursWindow | None


@dataclass(frozen=True)
class Rule:
    """One rule, with its limits already resolved against the defaults.
    A selector of ``None`` was not given and matches anything."""

    name: str
    index: int
    users: Selector | None
    groups: Selector | None
    accounts: Selector | None
    partitions: Selector | None
    allow: bool
    reason: str | None
    mfa_max_age_s: float
    max_gpus_per_job: int
    max_gpus_per_user_per_node: int
    allowed_hours: HoursWindow | None

    @property
    def catch_all(self) -> bool:
        return (self.users is None and self.groups is None and self.accounts is None
                and self.partitions is None)

    def mismatch(self, request: AccessRequest) -> str | None:
        """Why this rule does not match *request*, or None if it matches."""
        sel = self.users
        if sel is not None and not sel.matches(request.user):
            return f"user {request.user} not in users {sel.text}"
        sel = self.groups
        if sel is not None and not sel.matches_some(request.groups):
            return f"none of the user's groups in groups {sel.text}"
        sel = self.accounts
        if sel is not None and not sel.matches(request.account):
            if request.account is None:
                return f"request has no account; rule needs accounts {sel.text}"
            return f"account {request.account} not in accounts {sel.text}"
        sel = self.partitions
        if sel is not None and not sel.matches(request.partition):
            if request.partition is None:
                return f"request has no partition; rule needs partitions {sel.text}"
            return f"partition {request.partition} not in partitions {sel.text}"
        return None

    def shadows(self, later: Rule) -> bool:
        """Whether this rule matches every request *later* matches."""
        for mine, theirs in ((self.users, later.users), (self.groups, later.groups),
                             (self.accounts, later.accounts),
                             (self.partitions, later.partitions)):
            if mine is None:
                continue
            if theirs is None or not mine.covers(theirs):
                return False
        return True


@dataclass(frozen=True)
class AdminGrant:
    """One ``admins`` entry: a user or a group, and the roles it grants."""

    user: str | None
    group: str | None
    roles: frozenset[str]


@dataclass(frozen=True)
class Policy:
    """A validated policy. ``content_hash`` is the SHA-256 (hex) of the file's
    bytes, so audit events can name exactly which policy decided."""

    source: str
    content_hash: str
    version: int
    defaults: Defaults
    admins: tuple[AdminGrant, ...]
    rules: tuple[Rule, ...]
    default: Literal["deny", "allow"]
    # Lookup tables built at load time (derived from the fields above).
    _user_roles: dict[str, frozenset[str]] = field(repr=False, compare=False)
    _group_roles: dict[str, frozenset[str]] = field(repr=False, compare=False)
    # The defaults as a catch-all rule, used when default is allow.
    _default_rule: Rule = field(repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class AccessRequest:
    """A request for GPUs: who, for which account and partition, how many,
    how many the user already holds on the node, how old the user's MFA
    session is (None: none), and when (an aware datetime).

    Raises:
        InputRejected: negative counts, a bad MFA age, or a naive *now*.
    """

    user: str
    groups: frozenset[str]
    account: str | None
    partition: str | None
    gpus: int
    now: datetime
    gpus_held_on_node: int = 0
    mfa_age_s: float | None = None

    def __post_init__(self) -> None:
        if self.now.tzinfo is None or self.now.utcoffset() is None:
            raise InputRejected("access request: 'now' must carry a time zone")
        if self.gpus < 0 or self.gpus_held_on_node < 0:
            raise InputRejected("access request: GPU counts must not be negative")
        if self.mfa_age_s is not None and not (math.isfinite(self.mfa_age_s)
                                               and self.mfa_age_s >= 0):
            raise InputRejected("access request: MFA age must be a non-negative number")
        if not isinstance(self.groups, frozenset):
            object.__setattr__(self, "groups", frozenset(self.groups))


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`evaluate`. ``reason`` is for the user (short,
    says what to do); ``code`` is one of :data:`DECISION_CODES`; the limits
    are those of the deciding rule (or the defaults); ``trace`` has one line
    per rule considered."""

    allow: bool
    rule: str
    reason: str
    code: str
    mfa_max_age_s: float
    max_gpus_per_job: int
    max_gpus_per_user_per_node: int
    trace: tuple[str, ...]


# ---- loading -----------------------------------------------------------------

def _show(text: str) -> str:
    # Key names come from the file: escape them so a message stays one line.
    return text.encode("unicode_escape").decode("ascii")[:200]


def _key_path(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{_show(part)}" if out else _show(part)
    return out or "(top level)"


def _check_keys(root: yaml.Node, source: str) -> None:
    """Refuse duplicate and non-name keys, naming their key path (the loader
    alone knows only the line, and fails on a list as a key)."""
    stack: list[tuple[yaml.Node, tuple[int | str, ...]]] = [(root, ())]
    seen_nodes: set[int] = set()
    while stack:
        node, loc = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*loc, i)) for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if key_node.tag == _MERGE_TAG:
                    raise ConfigError(f"{source}: {_key_path(loc)}: line {line}: YAML merge "
                                      "keys (<<) are not supported here; write the keys out")
                if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR_TAG):
                    shown = _show(str(key_node.value)) if isinstance(
                        key_node, yaml.ScalarNode) else "(a list or mapping)"
                    raise ConfigError(f"{source}: {_key_path(loc)}: line {line}: key "
                                      f"{shown} is not a name; keys are words such as "
                                      "'rules' or 'users'")
                key = key_node.value
                if key in lines:
                    raise ConfigError(f"{source}: {_key_path((*loc, key))}: key given twice "
                                      f"(lines {lines[key]} and {line}); keep one")
                lines[key] = line
                stack.append((value_node, (*loc, key)))


def _load_yaml(text: str, source: str) -> Any:
    try:
        # The reader checks the characters as it is built: inside the try.
        loader = _UniqueKeyLoader(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: (parse): not valid YAML: {exc}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_keys(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(parse)"
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(f"{source}: {where}: not valid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: (parse): not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _problem(error: Any) -> str:
    kind = error.get("type", "")
    given = error.get("input")
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling"
    if kind == "missing":
        return "required key is missing"
    if given is None and kind.endswith("_type"):
        return "is empty (null); give a value or remove the key"
    if kind == "string_type" and isinstance(given, bool | int | float):
        return f"expected text, got {given!r}; put the value in quotes"
    if kind == "too_short":
        return "is an empty list; list at least one entry, or remove the key"
    msg = str(error.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


def _window(schema: _HoursSchema | None) -> HoursWindow | None:
    if schema is None:
        return None
    return HoursWindow(days=frozenset(DAYS.index(d) for d in schema.days),
                       start=_minutes(schema.from_), end=_minutes(schema.to),
                       tz=_zone(schema.tz))


def _compile(schema: _PolicySchema, source: str, content_hash: str) -> Policy:
    names: dict[str, int] = {}
    for i, rule in enumerate(schema.rules):
        if rule.name in names:
            raise ConfigError(f"{source}: rules[{i}].name: rule name {rule.name!r} is "
                              f"already used by rules[{names[rule.name]}]; names must be "
                              "unique")
        names[rule.name] = i

    d = schema.defaults
    defaults = Defaults(mfa_max_age_h=d.mfa_max_age_h, max_gpus_per_job=d.max_gpus_per_job,
                        max_gpus_per_user_per_node=d.max_gpus_per_user_per_node,
                        allowed_hours=_window(d.allowed_hours))

    def selector(values: list[str], key: str, given: set[str]) -> Selector | None:
        return Selector.of(values) if key in given else None

    rules = []
    for i, r in enumerate(schema.rules):
        given = r.model_fields_set
        rules.append(Rule(
            name=r.name, index=i,
            users=selector(r.users, "users", given),
            groups=selector(r.groups, "groups", given),
            accounts=selector(r.accounts, "accounts", given),
            partitions=selector(r.partitions, "partitions", given),
            allow=r.allow, reason=r.reason,
            mfa_max_age_s=3600.0 * (r.mfa_max_age_h if "mfa_max_age_h" in given
                                    else defaults.mfa_max_age_h),
            max_gpus_per_job=(r.max_gpus_per_job if "max_gpus_per_job" in given
                              else defaults.max_gpus_per_job),
            max_gpus_per_user_per_node=(
                r.max_gpus_per_user_per_node if "max_gpus_per_user_per_node" in given
                else defaults.max_gpus_per_user_per_node),
            allowed_hours=(_window(r.allowed_hours) if "allowed_hours" in given
                           else defaults.allowed_hours)))

    admins = tuple(AdminGrant(user=a.user, group=a.group, roles=frozenset(a.roles))
                   for a in schema.admins)
    user_roles: dict[str, frozenset[str]] = {}
    group_roles: dict[str, frozenset[str]] = {}
    for grant in admins:
        if grant.user is not None:
            user_roles[grant.user] = user_roles.get(grant.user, frozenset()) | grant.roles
        if grant.group is not None:
            group_roles[grant.group] = group_roles.get(grant.group, frozenset()) | grant.roles

    default_rule = Rule(
        name=DEFAULT_RULE, index=len(rules), users=None, groups=None, accounts=None,
        partitions=None, allow=schema.default == "allow", reason=None,
        mfa_max_age_s=3600.0 * defaults.mfa_max_age_h,
        max_gpus_per_job=defaults.max_gpus_per_job,
        max_gpus_per_user_per_node=defaults.max_gpus_per_user_per_node,
        allowed_hours=defaults.allowed_hours)
    return Policy(source=source, content_hash=content_hash, version=schema.version,
                  defaults=defaults, admins=admins, rules=tuple(rules),
                  default=schema.default, _user_roles=user_roles, _group_roles=group_roles,
                  _default_rule=default_rule)


def parse_policy(text: str, source: str) -> Policy:
    """Validate policy YAML *text*; errors name *source* and the key path.

    ``content_hash`` is the SHA-256 of *text* encoded as UTF-8 (the file's
    bytes, for a file read with :func:`load_policy`).

    Raises:
        ConfigError: bad YAML, a duplicate or unknown key, or a bad value.
    """
    content_hash = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    data = _load_yaml(text, source)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise ConfigError(f"{source}: (top level): expected a mapping with 'version: "
                          f"{POLICY_VERSION}' and 'rules', got {got}")
    try:
        schema = _PolicySchema.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: {_key_path(err['loc'])}: {_problem(err)}" for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    except RecursionError:
        raise ConfigError(f"{source}: (top level): nested too deeply") from None
    return _compile(schema, source, content_hash)


def load_policy(path: Path) -> Policy:
    """Read and validate the policy file at *path*.

    Raises:
        ConfigError: missing or unreadable file, not UTF-8, or invalid.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_policy(text, str(path))


# ---- deciding ----------------------------------------------------------------

def format_duration(seconds: float) -> str:
    """A short human duration: ``45s``, ``30m``, ``8h``, ``2h30m``, ``3d4h``."""
    total = round(seconds)
    if total < 60:
        return f"{total}s"
    minutes = total // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _decide(rule: Rule, request: AccessRequest, trace: list[str]) -> Decision:
    label = "the default policy" if rule.name == DEFAULT_RULE else f"rule {rule.name}"

    def result(allow: bool, code: str, reason: str) -> Decision:
        return Decision(allow=allow, rule=rule.name, reason=reason, code=code,
                        mfa_max_age_s=rule.mfa_max_age_s,
                        max_gpus_per_job=rule.max_gpus_per_job,
                        max_gpus_per_user_per_node=rule.max_gpus_per_user_per_node,
                        trace=tuple(trace))

    if not rule.allow:
        return result(False, "rule_denies", rule.reason or (
            f"GPU access denied by policy {label}; ask your HPC support team for access"))
    hours = rule.allowed_hours
    if hours is not None and not hours.contains(request.now):
        local = request.now.astimezone(hours.tz)
        return result(False, "outside_hours",
                      f"{label} allows GPU jobs only {hours.describe()}; it is now "
                      f"{DAYS[local.weekday()]} {local:%H:%M} there")
    if request.gpus > rule.max_gpus_per_job:
        return result(False, "too_many_gpus_job",
                      f"job asks for {_plural(request.gpus, 'GPU')}; {label} allows at "
                      f"most {rule.max_gpus_per_job} per job")
    if request.gpus_held_on_node + request.gpus > rule.max_gpus_per_user_per_node:
        return result(False, "too_many_gpus_node",
                      f"job asks for {_plural(request.gpus, 'GPU')} and you already hold "
                      f"{request.gpus_held_on_node} on this node; {label} allows at most "
                      f"{rule.max_gpus_per_user_per_node} per user per node")
    if request.mfa_age_s is None:
        return result(False, "mfa_required", "MFA session required: run `ztgpu login`")
    if request.mfa_age_s > rule.mfa_max_age_s:
        return result(False, "mfa_too_old",
                      f"MFA session is {format_duration(request.mfa_age_s)} old; {label} "
                      f"accepts at most {format_duration(rule.mfa_max_age_s)}: run "
                      "`ztgpu login`")
    return result(True, "allowed", f"allowed by {label}")


def evaluate(policy: Policy, request: AccessRequest) -> Decision:
    """Decide *request* under *policy*: the first rule whose selectors all
    match decides; if none does, the policy's ``default``. Pure and total:
    no I/O, no clock, never raises for a valid request."""
    trace: list[str] = []
    for rule in policy.rules:
        why_not = rule.mismatch(request)
        if why_not is None:
            trace.append(f"rule {rule.name}: matches ({'allow' if rule.allow else 'deny'})")
            return _decide(rule, request, trace)
        trace.append(f"rule {rule.name}: no match: {why_not}")
    if policy.default == "deny":
        trace.append("no rule matched: default deny")
        where = ", ".join(f"{k} {v}" for k, v in (("account", request.account),
                                                  ("partition", request.partition)) if v)
        return Decision(
            allow=False, rule=DEFAULT_RULE, code="no_rule",
            reason=(f"no policy rule gives user {request.user} GPU access"
                    + (f" ({where})" if where else "")
                    + "; ask your HPC support team for access"),
            mfa_max_age_s=3600.0 * policy.defaults.mfa_max_age_h,
            max_gpus_per_job=policy.defaults.max_gpus_per_job,
            max_gpus_per_user_per_node=policy.defaults.max_gpus_per_user_per_node,
            trace=tuple(trace))
    trace.append("no rule matched: default allow (limits from defaults)")
    return _decide(policy._default_rule, request, trace)


def admin_roles(policy: Policy, user: str, groups: frozenset[str]) -> frozenset[str]:
    """The ``ztgpu admin`` roles *user* (a member of *groups*) holds."""
    roles = policy._user_roles.get(user, frozenset())
    for group in groups:
        extra = policy._group_roles.get(group)
        if extra:
            roles = roles | extra
    return roles


def policy_warnings(policy: Policy) -> list[str]:
    """Things that are valid but probably not meant (for ``policy check``)."""
    warnings: list[str] = []
    if policy.default == "allow":
        warnings.append("default: allow grants GPUs to anyone no rule matches; "
                        "zero-trust sites use default: deny with explicit allow rules")
    if not policy.rules:
        warnings.append(f"no rules: every request gets the default ({policy.default})")
    for i, later in enumerate(policy.rules):
        for earlier in policy.rules[:i]:
            if earlier.shadows(later):
                kind = "catch-all rule" if earlier.catch_all else "rule"
                warnings.append(f"rules[{i}] ({later.name}) can never match: earlier "
                                f"{kind} {earlier.name} matches every request it does")
                break
        if later.allow and later.max_gpus_per_job > later.max_gpus_per_user_per_node:
            warnings.append(f"rules[{i}] ({later.name}): max_gpus_per_job "
                            f"{later.max_gpus_per_job} exceeds max_gpus_per_user_per_node "
                            f"{later.max_gpus_per_user_per_node}, so larger jobs are "
                            "always denied")
    d = policy.defaults
    if policy.default == "allow" and d.max_gpus_per_job > d.max_gpus_per_user_per_node:
        warnings.append(f"defaults: max_gpus_per_job {d.max_gpus_per_job} exceeds "
                        f"max_gpus_per_user_per_node {d.max_gpus_per_user_per_node}")
    return warnings
