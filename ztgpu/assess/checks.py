"""Judging a node's facts (``ztgpu.assess.facts``) against the rules.

Each check reads only the facts and returns findings: the rule, the
evidence (what was seen, quoted from the node), and where (a file, and a
line where one is to blame). A fact that was not gathered (``None``: the
agent and services are asked only on a live node) gives no finding either
way; a fact that says "absent" does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ztgpu.assess.rules import RULES, Rule

#: A certificate this close to its end is a finding.
CERT_WARN_DAYS = 14
#: An audit backlog this large, or this old, is a finding.
BACKLOG_EVENTS = 10_000
BACKLOG_AGE_S = 900.0


@dataclass(frozen=True)
class Finding:
    rule: Rule
    evidence: str
    path: str | None = None
    line: int | None = None

    @property
    def severity(self) -> str:
        return self.rule.severity

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.id, "name": self.rule.name, "severity": self.severity,
                "evidence": self.evidence, "path": self.path, "line": self.line,
                "fix": self.rule.fix, "principles": list(self.rule.principles),
                "nist_800_53": list(self.rule.controls)}


Check = Callable[[dict[str, Any]], Iterator[Finding]]
CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


def judge(facts: dict[str, Any]) -> list[Finding]:
    """Every finding for *facts*, most severe first (then by rule id)."""
    from ztgpu.assess.rules import SEVERITIES

    found = [finding for fn in CHECKS for finding in fn(facts)]
    return sorted(found, key=lambda f: (-SEVERITIES.index(f.severity), f.rule.id,
                                        f.path or "", f.line or 0))


def _f(rule_id: str, evidence: str, path: str | None = None,
       line: int | None = None) -> Finding:
    return Finding(RULES[rule_id], evidence, path, line)


def _line_of(text: str, pattern: str) -> int | None:
    """The 1-based number of the last line matching *pattern* (case-insensitive)."""
    found = None
    for number, line in enumerate(text.splitlines(), 1):
        if re.search(pattern, line.split("#", 1)[0], re.IGNORECASE):
            found = number
    return found


# ---- Slurm ---------------------------------------------------------------------------
def _settings(doc: dict[str, Any] | None) -> dict[str, str] | None:
    from ztgpu.slurm.conf import settings

    if doc is None or "text" not in doc:
        return None
    return settings(doc["text"])


@check
def _slurm(facts: dict[str, Any]) -> Iterator[Finding]:
    doc = facts.get("slurm_conf")
    conf = _settings(doc)
    if conf is None:
        why = doc.get("error") if doc else "no such file"
        yield _f("ZT101", f"slurm.conf: {why}", doc.get("path") if doc else None)
        return
    assert doc is not None
    path, text = doc["path"], doc["text"]
    suite = facts.get("suite") or {}
    hooks = {"prolog": suite.get("prolog"), "epilog": suite.get("epilog")}
    wrong = [f"{key.capitalize()}={conf.get(key, '(unset)')} (the suite's is {want})"
             for key, want in hooks.items() if want and conf.get(key) != want]
    if wrong:
        yield _f("ZT102", "; ".join(wrong), path, _line_of(text, r"^\s*prolog\s*="))
    flags = {f.strip().lower() for f in conf.get("prologflags", "").split(",") if f.strip()}
    missing = [f for f in ("Alloc", "Contain") if f.lower() not in flags]
    if missing:
        yield _f("ZT103", f"PrologFlags={conf.get('prologflags', '(unset)')}: lacks "
                 f"{', '.join(missing)}", path, _line_of(text, r"^\s*prologflags\s*="))
    if not conf.get("prologepilogtimeout"):
        yield _f("ZT104", "PrologEpilogTimeout is not set (Slurm waits forever)", path)
    proctrack = conf.get("proctracktype", "proctrack/cgroup")
    if proctrack.lower() != "proctrack/cgroup":
        yield _f("ZT105", f"ProctrackType={proctrack}", path,
                 _line_of(text, r"^\s*proctracktype\s*="))
    tasks = [t.strip().lower() for t in conf.get("taskplugin", "").split(",")]
    if "task/cgroup" not in tasks:
        yield _f("ZT106", f"TaskPlugin={conf.get('taskplugin', '(unset)')}", path,
                 _line_of(text, r"^\s*taskplugin\s*="))
    cgroup_doc = facts.get("cgroup_conf")
    cgroup = _settings(cgroup_doc) or {}
    if cgroup.get("constraindevices", "no").lower() != "yes":
        where = cgroup_doc.get("path") if cgroup_doc else None
        yield _f("ZT107", f"ConstrainDevices={cgroup.get('constraindevices', '(unset)')}"
                 + ("" if cgroup_doc else " (no cgroup.conf)"), where)


@check
def _gres(facts: dict[str, Any]) -> Iterator[Finding]:
    doc = facts.get("gres_conf")
    devices = {d["path"] for d in facts.get("devices") or [] if d.get("gpu")}
    if doc is None or "text" not in doc:
        if devices and facts.get("slurm_conf"):
            yield _f("ZT108", f"no gres.conf, but the node has {len(devices)} GPU device "
                     "files: Slurm allocates no GPU here", doc.get("path") if doc else None)
        return
    listed = set()
    for line in doc["text"].splitlines():
        body = line.split("#", 1)[0]
        if not re.search(r"(?i)\bname\s*=\s*gpu\b", body):
            continue
        match = re.search(r"(?i)\bfile\s*=\s*(\S+)", body)
        if match:
            listed |= set(_expand(match.group(1)))
    if not listed:
        return  # AutoDetect: the devices come from NVML, nothing to compare
    extra, absent = sorted(devices - listed), sorted(listed - devices)
    if extra or absent:
        parts = ([f"not in gres.conf: {', '.join(extra)}"] if extra else []) + \
                ([f"in gres.conf but absent: {', '.join(absent)}"] if absent else [])
        yield _f("ZT108", "; ".join(parts), doc["path"])


def _expand(pattern: str) -> list[str]:
    """``/dev/nvidia[0-3,5]`` -> the paths (one bracket group)."""
    match = re.fullmatch(r"(.*)\[([0-9,\-]+)\](.*)", pattern)
    if match is None:
        return [pattern]
    head, body, tail = match.groups()
    out = []
    for part in body.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += [f"{head}{n}{tail}" for n in range(int(lo), int(hi or lo) + 1)]
    return out


# ---- the driver and the device files ------------------------------------------------------
def _driver_options(facts: dict[str, Any]) -> dict[str, tuple[str, str, int | None]]:
    """NVreg options in force: the driver's own view, else the modprobe files'."""
    found: dict[str, tuple[str, str, int | None]] = {}
    for path, text in (facts.get("modprobe") or {}).items():
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "options" and words[1] == "nvidia":
                for option in words[2:]:
                    key, _, value = option.partition("=")
                    found[key.removeprefix("NVreg_").lower()] = (value, path, number)
    params = facts.get("nvidia_params")
    if params and "text" in params:
        for line in params["text"].splitlines():
            key, sep, value = line.partition(":")
            if sep:
                found[key.strip().lower()] = (value.strip(), params["path"], None)
    return found


@check
def _driver(facts: dict[str, Any]) -> Iterator[Finding]:
    options = _driver_options(facts)
    scrub = options.get("rmdisablescrubonfree")
    if scrub is None:
        registry = options.get("registrydwords")
        if registry and re.search(r"(?i)RMDisableScrubOnFree=(0x)?0*1\b", registry[0]):
            scrub = ("1", registry[1], registry[2])
    if scrub is not None and scrub[0].strip('"') not in ("0", ""):
        yield _f("ZT201", f"RMDisableScrubOnFree={scrub[0]}", scrub[1], scrub[2])
    mode = options.get("devicefilemode")
    if mode is not None:
        value = _c_number(mode[0])
        modify = options.get("modifydevicefiles", ("1", "", None))[0]
        if value & 0o006 and modify != "0":
            yield _f("ZT202", f"DeviceFileMode={mode[0]} (ModifyDeviceFiles={modify})",
                     mode[1], mode[2])
    for device in facts.get("devices") or []:
        if device.get("gpu") and int(device["mode"], 8) & 0o006:
            yield _f("ZT203", f"{device['path']} mode {device['mode']} (owner uid "
                     f"{device['uid']}, gid {device['gid']})", device["path"])


def _c_number(text: str) -> int:
    """A number as the driver reads its options: 0x hex, leading-0 octal, else decimal
    (/proc/driver/nvidia/params prints decimal). Unreadable: 0."""
    text = text.strip().strip('"').lower()
    try:
        if text.startswith("0x"):
            return int(text, 16)
        return int(text, 8) if text.startswith("0") and len(text) > 1 else int(text)
    except ValueError:
        return 0


@check
def _cgroups(facts: dict[str, Any]) -> Iterator[Finding]:
    if facts.get("cgroup_mode") == "unknown":
        yield _f("ZT301", str(facts.get("cgroup_detail") or "/sys/fs/cgroup has neither "
                              "cgroup.controllers nor a devices controller"))


# ---- PAM and sshd ------------------------------------------------------------------------
def _pam_lines(text: str) -> list[tuple[int, list[str]]]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if len(words) >= 3:
            out.append((number, words))
    return out


@check
def _pam(facts: dict[str, Any]) -> Iterator[Finding]:
    doc = facts.get("pam_sshd")
    if doc is None or "text" not in doc:
        return
    lines = _pam_lines(doc["text"])
    ours = [n for n, w in lines if any("ztgpu" in word for word in w[2:3])
            or (w[2].endswith("pam_python.so") and any("ztgpu" in x for x in w[3:]))
            or (w[2].endswith("pam_exec.so") and any("ztgpu" in x for x in w[3:]))]
    if not ours:
        yield _f("ZT401", "no line of /etc/pam.d/sshd calls the suite's module", doc["path"])
    adopt = [(n, w) for n, w in lines if w[2].endswith("pam_slurm_adopt.so")]
    for number, words in adopt:
        options = dict(o.partition("=")[::2] for o in words[3:])
        weak = [f"{key}={options.get(key, default)}" for key, default, bad in (
            ("action_adopt_failure", "allow", ("allow",)),
            ("action_generic_failure", "ignore", ("ignore", "allow")))
            if options.get(key, default) in bad]
        if weak:
            yield _f("ZT402", f"pam_slurm_adopt with {', '.join(weak)}", doc["path"], number)
    if adopt or ours:
        for number, words in lines:
            if words[0].lstrip("-") == "session" and words[2].endswith("pam_systemd.so"):
                yield _f("ZT403", "session ... pam_systemd.so in the adopting stack",
                         doc["path"], number)


@check
def _sshd(facts: dict[str, Any]) -> Iterator[Finding]:
    sshd = facts.get("sshd")
    if sshd is None:
        return
    settings, where = sshd.get("settings", {}), sshd.get("source")
    if settings.get("usepam", "no") != "yes":
        yield _f("ZT404", f"UsePAM {settings.get('usepam', 'no (the default)')}", where)
    if settings.get("permitrootlogin") == "yes":
        yield _f("ZT405", "PermitRootLogin yes", where)
    if settings.get("passwordauthentication", "yes") == "yes":
        yield _f("ZT406", f"PasswordAuthentication "
                 f"{settings.get('passwordauthentication', 'yes (the default)')}", where)


# ---- munge ------------------------------------------------------------------------------
@check
def _munge(facts: dict[str, Any]) -> Iterator[Finding]:
    key = facts.get("munge_key")
    if key is None:
        yield _f("ZT502", "/etc/munge/munge.key does not exist", "/etc/munge/munge.key")
        return
    if "error" in key:
        return  # unreadable to whoever gathered: not a finding about the key
    mode = int(key["mode"], 8)
    if mode & 0o077 or key.get("owner") not in ("munge", "root"):
        yield _f("ZT501", f"{key['path']} mode {key['mode']}, owner "
                 f"{key.get('owner') or key.get('uid')}", key["path"])


# ---- the suite --------------------------------------------------------------------------
@check
def _suite(facts: dict[str, Any]) -> Iterator[Finding]:
    suite = facts.get("suite") or {}
    if not suite.get("authd_url"):
        yield _f("ZT605", "auth.authd_url: null")
    partitions = suite.get("wipe_partitions") or {}
    if suite.get("wipe_mode") == "off" or "off" in partitions.values():
        where = ", ".join([*(["wipe.mode: off"] if suite.get("wipe_mode") == "off" else []),
                           *(f"wipe.partitions.{p}: off" for p, m in partitions.items()
                             if m == "off")])
        yield _f("ZT606", where)
    if suite.get("telemetry") is False:
        yield _f("ZT607", "telemetry.enabled: false")
    if not suite.get("collector_url"):
        yield _f("ZT701", "audit.collector_url: null")
    agent = facts.get("agent")
    if agent is not None:
        if "error" in agent:
            yield _f("ZT601", f"{suite.get('socket', 'the agent socket')}: {agent['error']}")
        else:
            if agent.get("refusing_grants"):
                yield _f("ZT602", "; ".join(map(str, agent["refusing_grants"]))[:500])
            audit = agent.get("audit") or {}
            unacked = audit.get("unacked") or 0
            age = audit.get("oldest_unacked_age_s") or 0.0
            if audit.get("forwarding") and (unacked > BACKLOG_EVENTS or age > BACKLOG_AGE_S):
                yield _f("ZT702", f"{unacked} events unforwarded, the oldest {age:.0f} s old"
                         + (f"; last error: {audit['last_error']}" if audit.get("last_error")
                            else ""))
    services = facts.get("services")
    if services is not None and agent is None and services.get("ztgpu-noded") != "active":
        yield _f("ZT601", f"systemctl is-active ztgpu-noded: {services.get('ztgpu-noded')}")


@check
def _certificates(facts: dict[str, Any]) -> Iterator[Finding]:
    gathered = _parse_time(facts.get("gathered_at")) or datetime.now(UTC)
    for cert in facts.get("certificates") or []:
        if "error" in cert:
            yield _f("ZT604", f"{cert['name']} {cert['path']}: {cert['error']}", cert["path"])
            continue
        ends = _parse_time(cert.get("not_after"))
        if ends is not None and ends - gathered < timedelta(days=CERT_WARN_DAYS):
            left = (ends - gathered).total_seconds() / 86400
            state = f"expired {-left:.0f} days ago" if left < 0 else f"expires in {left:.1f} days"
            yield _f("ZT603", f"{cert['name']} ({cert.get('subject', '')}) {state}: "
                     f"{cert['not_after']}", cert["path"])


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
