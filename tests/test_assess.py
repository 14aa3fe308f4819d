"""`ztgpu assess`: every rule fires on its bad case and not on the recorded good node.

``fixtures/assess/good.json`` is the facts document of a well-configured GPU
node (what `ztgpu assess --record` writes). Each bad case changes it in the
one way its rule is about; the command judges it as an admin runs it
(`ztgpu assess --facts`), in every output format. The SARIF is checked
against the rules of SARIF 2.1.0 that code-scanning tools rely on.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ztgpu.assess.rules import PRINCIPLES, RULES, SEVERITIES

GOOD = Path(__file__).parent / "fixtures" / "assess" / "good.json"
ZTGPU = str(Path(sys.executable).with_name("ztgpu"))

Facts = dict[str, Any]


def good() -> Facts:
    return copy.deepcopy(json.loads(GOOD.read_text()))


def slurm_line(facts: Facts, old: str, new: str) -> None:
    text = facts["slurm_conf"]["text"]
    assert old in text, old
    facts["slurm_conf"]["text"] = text.replace(old, new)


def edit(key: str, old: str, new: str) -> Callable[[Facts], None]:
    def change(facts: Facts) -> None:
        text = facts[key]["text"]
        assert old in text, old
        facts[key]["text"] = text.replace(old, new)
    return change


def setting(path: str, value: Any) -> Callable[[Facts], None]:
    def change(facts: Facts) -> None:
        *parents, last = path.split(".")
        target = facts
        for name in parents:
            target = target[name]
        target[last] = value
    return change


def _device_open(facts: Facts) -> None:
    facts["devices"][2]["mode"] = "0666"


def _expiring(facts: Facts) -> None:
    facts["certificates"][0]["not_after"] = "2026-12-05T00:00:00+00:00"


def _backlog(facts: Facts) -> None:
    facts["agent"]["audit"].update(unacked=52_000, oldest_unacked_age_s=4000.0,
                                   last_error="collector refused the certificate")


def _extra_gpu(facts: Facts) -> None:
    facts["devices"].append({"path": "/dev/nvidia4", "gpu": True, "mode": "0600", "uid": 0,
                             "gid": 0})


def _adopt(options: str) -> Callable[[Facts], None]:
    return edit("pam_sshd", "account    required     /usr/libexec/ztgpu/pam_ztgpu.so",
                f"account    sufficient   pam_slurm_adopt.so {options}".rstrip())


#: rule id -> (the one change that breaks it, words its evidence must hold)
BAD: dict[str, tuple[Callable[[Facts], None], str]] = {
    "ZT101": (setting("slurm_conf", None), "no such file"),
    "ZT102": (lambda f: slurm_line(f, "Prolog=/usr/libexec/ztgpu/prolog",
                                   "Prolog=/etc/slurm/prolog.sh"),
              "Prolog=/etc/slurm/prolog.sh"),
    "ZT103": (lambda f: slurm_line(f, "PrologFlags=Alloc,Contain", "PrologFlags=Alloc"),
              "lacks Contain"),
    "ZT104": (lambda f: slurm_line(f, "PrologEpilogTimeout=120\n", ""), "not set"),
    "ZT105": (lambda f: slurm_line(f, "proctrack/cgroup", "proctrack/linuxproc"),
              "proctrack/linuxproc"),
    "ZT106": (lambda f: slurm_line(f, "TaskPlugin=task/cgroup,task/affinity",
                                   "TaskPlugin=task/affinity"), "task/affinity"),
    "ZT107": (edit("cgroup_conf", "ConstrainDevices=yes", "ConstrainDevices=no"),
              "ConstrainDevices=no"),
    "ZT108": (_extra_gpu, "not in gres.conf: /dev/nvidia4"),
    "ZT201": (edit("nvidia_params", 'RegistryDwords: ""',
                   'RegistryDwords: "RMDisableScrubOnFree=1"'), "RMDisableScrubOnFree=1"),
    "ZT202": (edit("nvidia_params", "DeviceFileMode: 432", "DeviceFileMode: 438"),
              "DeviceFileMode=438"),
    "ZT203": (_device_open, "/dev/nvidia2 mode 0666"),
    "ZT301": (setting("cgroup_mode", "unknown"), "cgroup.controllers"),
    "ZT401": (lambda f: [edit("pam_sshd", f"{kind}    required     /usr/libexec/ztgpu/"
                              "pam_ztgpu.so\n", "")(f) for kind in ("account", "session")],
              "calls the suite's module"),
    "ZT402": (_adopt(""), "action_adopt_failure=allow"),
    "ZT403": (edit("pam_sshd", "@include common-session",
                   "@include common-session\nsession optional pam_systemd.so"), "pam_systemd"),
    "ZT404": (setting("sshd.settings.usepam", "no"), "UsePAM no"),
    "ZT405": (setting("sshd.settings.permitrootlogin", "yes"), "PermitRootLogin yes"),
    "ZT406": (setting("sshd.settings.passwordauthentication", "yes"),
              "PasswordAuthentication yes"),
    "ZT501": (setting("munge_key.mode", "0644"), "mode 0644"),
    "ZT502": (setting("munge_key", None), "does not exist"),
    "ZT601": (setting("agent", {"error": "ztgpu-noded is not running"}), "not running"),
    "ZT602": (setting("agent.refusing_grants", ["GPU 1 is dirty: its wipe failed"]),
              "wipe failed"),
    "ZT603": (_expiring, "expires in"),
    "ZT604": (setting("certificates", [{"name": "tls.cert", "path": "/etc/ztgpu/node.crt",
                                        "error": "no such file"}]), "no such file"),
    "ZT605": (setting("suite.authd_url", None), "auth.authd_url"),
    "ZT606": (setting("suite.wipe_partitions", {"debug": "off"}), "wipe.partitions.debug: off"),
    "ZT607": (setting("suite.telemetry", False), "telemetry.enabled: false"),
    "ZT701": (setting("suite.collector_url", None), "audit.collector_url"),
    "ZT702": (_backlog, "52000 events unforwarded"),
}


def assess(tmp_path: Path, facts: Facts, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(facts))
    return subprocess.run([ZTGPU, "assess", "--facts", str(path), *args], capture_output=True,
                          text=True, timeout=60, check=False)


def findings(tmp_path: Path, facts: Facts) -> list[dict[str, Any]]:
    res = assess(tmp_path, facts, "--format", "json", "--fail-on", "critical")
    assert res.returncode in (0, 1), res.stderr
    return list(json.loads(res.stdout)["findings"])


def test_every_rule_has_a_bad_case_here_and_maps_to_principles_and_controls() -> None:
    assert set(BAD) == set(RULES)
    for rule in RULES.values():
        assert re.fullmatch(r"ZT[1-7][0-9]{2}", rule.id)
        assert rule.severity in SEVERITIES
        assert rule.principles and set(rule.principles) <= set(PRINCIPLES), rule.id
        assert rule.controls and all(re.fullmatch(r"[A-Z]{2}-[0-9]+(\([0-9]+\))?", c)
                                     for c in rule.controls), rule.id
        assert rule.fix and rule.summary


def test_the_recorded_good_node_has_no_findings(tmp_path: Path) -> None:
    res = assess(tmp_path, good(), "--fail-on", "info")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "node gpu01: no findings" in res.stdout


@pytest.mark.parametrize("rule_id", sorted(BAD))
def test_each_rule_fires_on_its_bad_case(tmp_path: Path, rule_id: str) -> None:
    facts = good()
    change, words = BAD[rule_id]
    change(facts)
    found = findings(tmp_path, facts)
    mine = [f for f in found if f["rule"] == rule_id]
    assert mine, (rule_id, found)
    assert any(words in f["evidence"] for f in mine), mine
    assert mine[0]["fix"] == RULES[rule_id].fix
    assert mine[0]["nist_800_53"] == list(RULES[rule_id].controls)
    # The change breaks this rule, not unrelated ones.
    others = {f["rule"] for f in found} - {rule_id}
    assert others <= {"ZT102", "ZT103", "ZT401"}, (rule_id, others)


def test_exit_status_follows_fail_on(tmp_path: Path) -> None:
    facts = good()
    BAD["ZT406"][0](facts)  # one low finding
    assert assess(tmp_path, facts).returncode == 0  # default: high
    assert assess(tmp_path, facts, "--fail-on", "low").returncode == 1
    assert assess(tmp_path, facts, "--fail-on", "medium").returncode == 0
    BAD["ZT501"][0](facts)  # and a critical one
    res = assess(tmp_path, facts)
    assert res.returncode == 1
    table = res.stdout
    assert table.index("ZT501 CRITICAL") < table.index("ZT406 LOW")  # most severe first
    assert "1 critical, 1 low" in table and "maps: identity; NIST SP 800-53 IA-5, SC-12" in table


def test_bad_facts_files_get_a_clear_error_and_exit_2(tmp_path: Path) -> None:
    for text, words in (("not json", "not JSON"), ('{"node": "x"}', "not a facts document"),
                        ('{"version": 99}', "newer than this ztgpu reads")):
        path = tmp_path / "bad.json"
        path.write_text(text)
        res = subprocess.run([ZTGPU, "assess", "--facts", str(path)], capture_output=True,
                             text=True, timeout=60, check=False)
        assert res.returncode == 2 and words in res.stderr, res
    res = subprocess.run([ZTGPU, "assess", "--facts", str(tmp_path / "none.json")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2 and "cannot read" in res.stderr


def test_sarif_has_stable_rule_ids_levels_and_locations(tmp_path: Path) -> None:
    facts = good()
    for rule_id in ("ZT103", "ZT501", "ZT701"):
        BAD[rule_id][0](facts)
    res = assess(tmp_path, facts, "--format", "sarif")
    assert res.returncode == 1
    document = json.loads(res.stdout)
    validate_sarif(document)
    run = document["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == list(RULES)  # every rule, in a stable order
    by_id = {r["ruleId"]: r for r in run["results"]}
    assert set(by_id) == {"ZT103", "ZT501", "ZT701"}
    flags = by_id["ZT103"]
    assert flags["level"] == "error" and rules[flags["ruleIndex"]]["id"] == "ZT103"
    location = flags["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == "file:///etc/slurm/slurm.conf"
    line = facts["slurm_conf"]["text"].splitlines().index("PrologFlags=Alloc") + 1
    assert location["region"]["startLine"] == line
    assert by_id["ZT701"]["locations"][0]["logicalLocations"][0]["name"] == "gpu01"
    assert rules[by_id["ZT501"]["ruleIndex"]]["properties"]["security-severity"] == "9.5"


def validate_sarif(document: dict[str, Any]) -> None:
    """Against the published SARIF 2.1.0 JSON schema (vendored in the fixtures)."""
    import jsonschema

    schema = json.loads((GOOD.parent / "sarif-schema-2.1.0.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-04/schema#"
    jsonschema.Draft4Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(document), key=str)
    assert not errors, [e.message for e in errors[:5]]


def test_record_then_judge_elsewhere_gives_the_same_findings(tmp_path: Path) -> None:
    """A node tree under --root: the facts are read from its files and modes,
    recorded, and judged again from the record."""
    root = tmp_path / "node"
    for rel, text in (("etc/slurm/slurm.conf", good()["slurm_conf"]["text"].replace(
            "PrologFlags=Alloc,Contain", "PrologFlags=Alloc")),
            ("etc/slurm/cgroup.conf", good()["cgroup_conf"]["text"]),
            ("etc/slurm/gres.conf", good()["gres_conf"]["text"]),
            ("etc/pam.d/sshd", good()["pam_sshd"]["text"]),
            ("etc/ssh/sshd_config", "UsePAM yes\nPasswordAuthentication no\n"
                                    "PasswordAuthentication yes\n"),
            ("etc/munge/munge.key", "k" * 64),
            ("etc/modprobe.d/nvidia.conf", "options nvidia NVreg_RegistryDwords="
                                           '"RMDisableScrubOnFree=1"\n')):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "etc/munge/munge.key").chmod(0o644)
    (root / "sys/fs/cgroup").mkdir(parents=True)
    (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpu memory pids\n")
    (root / "dev").mkdir()
    for n in range(4):
        (root / f"dev/nvidia{n}").write_text("")
        os.chmod(root / f"dev/nvidia{n}", 0o600 if n else 0o666)
    config = tmp_path / "ztgpu.yaml"
    config.write_text("node:\n  name: gpu07\n")
    record = tmp_path / "record.json"
    res = subprocess.run([ZTGPU, "--config", str(config), "assess", "--root", str(root),
                          "--record", str(record), "--format", "json", "--fail-on",
                          "critical"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 1, res.stderr  # /dev/nvidia0 open to all: critical
    live = {f["rule"] for f in json.loads(res.stdout)["findings"]}
    assert {"ZT103", "ZT201", "ZT203", "ZT501", "ZT605", "ZT701"} <= live, live
    # sshd takes the first PasswordAuthentication (no); v2 cgroups; gres.conf matches.
    assert not {"ZT406", "ZT301", "ZT108"} & live, live
    recorded = json.loads(record.read_text())
    assert recorded["node"] == "gpu07" and recorded["agent"] is None  # not asked: not /
    again = assess(tmp_path, recorded, "--format", "json", "--fail-on", "critical")
    assert {f["rule"] for f in json.loads(again.stdout)["findings"]} == live
