"""The configuration file: the shipped example, defaults, lookup order, and
errors that name the file and the key; the `ztgpu config check` command; and
the shipped systemd unit."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from ztgpu import config as config_module
from ztgpu.config import (
    CONFIG_ENV,
    Config,
    dump_effective,
    load_config,
    parse_config,
)
from ztgpu.errors import ConfigError
from ztgpu.testing.prerequisites import require

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "configs" / "ztgpu.yaml"
UNIT = REPO_ROOT / "configs" / "ztgpu-noded.service"
ZTGPU = Path(sys.executable).with_name("ztgpu")
SHORT_HOSTNAME = socket.gethostname().split(".")[0]

GPU0 = {"index": 0, "minor": 0, "uuid": "GPU-0a1b2c3d-0000-1111-2222-333344445555",
        "pci_bus_id": "00000000:3B:00.0"}
GPU1 = {"index": 1, "minor": 1, "uuid": "GPU-0a1b2c3d-0000-1111-2222-333344446666",
        "pci_bus_id": "00000000:86:00.0"}


@pytest.fixture(autouse=True)
def _no_site_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may read this machine's /etc/ztgpu/ztgpu.yaml or inherit ZTGPU_CONFIG."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "etc" / "ztgpu.yaml")


def write(tmp_path: Path, text: str, name: str = "ztgpu.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# ---- the shipped example ----------------------------------------------------

def test_shipped_example_validates_and_is_exactly_the_defaults() -> None:
    assert load_config(SHIPPED) == Config()


def _fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def test_shipped_example_documents_every_section_and_key() -> None:
    text = SHIPPED.read_text()
    missing = []
    for section, field in Config.model_fields.items():
        if not re.search(rf"^{section}:", text, re.MULTILINE):
            missing.append(section)
        annotation = field.annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
        for key in _fields(annotation):
            # Shown set or commented out, indented under its section.
            if not re.search(rf"^ +(# *)?{key}:", text, re.MULTILINE):
                missing.append(f"{section}.{key}")
    for key in _fields(config_module.SimulatedGpu):
        if not re.search(rf"^ +# +(- )?{key}:", text, re.MULTILINE):
            missing.append(f"gpu.simulated[].{key}")
    assert missing == []


def test_shipped_example_simulated_block_validates_when_uncommented(tmp_path: Path) -> None:
    lines = SHIPPED.read_text().splitlines()
    start = lines.index("  # simulated:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append("  " + line.removeprefix("  # "))
    text = "\n".join(line for line in lines[:start] if line != "  simulated: []")
    text += "\n" + "\n".join(block) + "\n" + "\n".join(lines[start + len(block):]) + "\n"
    text = text.replace("backend: auto", "backend: simulated")
    config = load_config(write(tmp_path, text))
    assert [g.minor for g in config.gpu.simulated] == [0, 1]
    assert config.gpu.backend == "simulated"


def test_shipped_example_has_no_tabs() -> None:
    # YAML forbids tabs for indentation; one in a comment today becomes an
    # error the day an admin uncomments that line.
    assert "\t" not in SHIPPED.read_text()


# ---- where the configuration comes from --------------------------------------

def test_no_file_anywhere_gives_the_defaults() -> None:
    config = load_config()
    assert config == Config()
    assert config.paths.socket == Path("/run/ztgpu/noded.sock")
    assert config.devices.rest_mode_bits == 0o600
    assert config.isolation.on_violation == "cancel_job"
    assert config.node_name == SHORT_HOSTNAME


def test_default_file_is_read_when_present(tmp_path: Path) -> None:
    default = tmp_path / "etc" / "ztgpu.yaml"
    default.parent.mkdir()
    default.write_text("isolation:\n  on_violation: record_only\n")
    assert load_config().isolation.on_violation == "record_only"


def test_ztgpu_config_env_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "noded:\n  log_level: debug\n", "other.yaml")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert load_config().noded.log_level == "debug"


def test_explicit_path_beats_ztgpu_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(write(tmp_path, "noded:\n  log_level: debug\n", "a.yaml")))
    explicit = write(tmp_path, "noded:\n  log_level: error\n", "b.yaml")
    assert load_config(explicit).noded.log_level == "error"


def test_empty_ztgpu_config_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "")
    assert load_config() == Config()


def test_missing_file_named_by_ztgpu_config_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.yaml"
    monkeypatch.setenv(CONFIG_ENV, str(missing))
    with pytest.raises(ConfigError, match="no such file") as info:
        load_config()
    assert str(missing) in str(info.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert config_error(missing) == f"{missing}: no such file"


def test_directory_instead_of_file_is_an_error(tmp_path: Path) -> None:
    message = config_error(tmp_path)
    assert message.startswith(f"{tmp_path}: cannot read")


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("node:\n  name: g\xe9pu\n".encode("latin-1"))
    assert config_error(path).startswith(f"{path}: cannot read")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file_gives_the_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text)) == Config()


def test_settings_are_applied(tmp_path: Path) -> None:
    text = f"""\
node:
  name: gpu01
paths:
  socket: /run/site/agent.sock
  log_file: /var/log/ztgpu.log
gpu:
  backend: simulated
  simulated:
    - {GPU0}
    - {GPU1}
devices:
  rest_mode: "0660"
  rest_group: dcgm
isolation:
  on_violation: record_only
  verify_interval_s: 30
slurm:
  user: slurmd
  conf: /etc/slurm-llnl/slurm.conf
"""
    config = load_config(write(tmp_path, text))
    assert config.node_name == "gpu01"
    assert config.paths.socket == Path("/run/site/agent.sock")
    assert config.paths.task_socket == Path("/run/ztgpu/task.sock")  # default kept
    assert config.paths.log_file == Path("/var/log/ztgpu.log")
    assert [g.uuid for g in config.gpu.simulated] == [GPU0["uuid"], GPU1["uuid"]]
    assert config.devices.rest_mode_bits == 0o660
    assert config.devices.rest_group == "dcgm"
    assert config.isolation.on_violation == "record_only"
    assert config.isolation.verify_interval_s == 30.0
    assert config.slurm.conf == Path("/etc/slurm-llnl/slurm.conf")


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(ValidationError):
        config.isolation.on_violation = "record_only"  # type: ignore[misc]
    assert config.isolation.on_violation == "cancel_job"


def test_effective_dump_round_trips_with_node_name_filled_in(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, sim(GPU0)))
    data = yaml.safe_load(dump_effective(config))
    assert data["node"]["name"] == SHORT_HOSTNAME
    assert data["paths"]["spool_dir"] == "/var/spool/ztgpu"
    again = parse_config(data, "dump")
    assert again.gpu == config.gpu
    assert again.model_copy(update={"node": config.node}) == config


# ---- errors name the file and the key ----------------------------------------

def sim(*gpus: dict[str, Any]) -> str:
    """YAML text declaring *gpus* under gpu.simulated."""
    return yaml.safe_dump({"gpu": {"simulated": list(gpus)}})


# (YAML text, dotted key, words the message must contain)
BAD: list[tuple[str, str, str]] = [
    ("bogus: 1\n", "bogus", "unknown key"),
    ("gpu:\n  backnd: nvml\n", "gpu.backnd", "unknown key"),
    (sim({**GPU0, "colour": "red"}), "gpu.simulated.0.colour", "unknown key"),
    ("isolation:\n  verify_interval_s: '60'\n", "isolation.verify_interval_s", "number"),
    ("gpu:\n  nvml_timeout_s: true\n", "gpu.nvml_timeout_s", "number"),
    ("noded:\n  request_max_bytes: 1.5\n", "noded.request_max_bytes", "integer"),
    ("paths:\n  - /run/ztgpu\n", "paths", "dictionary"),
    ("devices: /dev\n", "devices", "dictionary"),
    ("paths:\n  socket: run/ztgpu/noded.sock\n", "paths.socket", "absolute"),
    ("paths:\n  task_socket: task.sock\n", "paths.task_socket", "absolute"),
    ("paths:\n  log_file: ztgpu.log\n", "paths.log_file", "absolute"),
    ("cgroups:\n  root: sys/fs/cgroup\n", "cgroups.root", "absolute"),
    ("slurm:\n  bin_dir: bin\n", "slurm.bin_dir", "absolute"),
    ("slurm:\n  conf: slurm.conf\n", "slurm.conf", "absolute"),
    ("devices:\n  rest_mode: '0604'\n", "devices.rest_mode", "'other'"),
    ("devices:\n  rest_mode: '0666'\n", "devices.rest_mode", "'other'"),
    ("devices:\n  rest_mode: '4600'\n", "devices.rest_mode", "octal"),
    ("devices:\n  rest_mode: 'rw-------'\n", "devices.rest_mode", "octal"),
    # Unquoted, YAML reads 0600 as the integer 384: refused, not guessed at.
    ("devices:\n  rest_mode: 0600\n", "devices.rest_mode", "string"),
    ("devices:\n  rest_group: 'DCGM group'\n", "devices.rest_group", "group name"),
    ("isolation:\n  on_violation: cancel\n", "isolation.on_violation", "cancel_job"),
    ("isolation:\n  on_violation: ignore\n", "isolation.on_violation", "record_only"),
    ("noded:\n  log_level: INFO\n", "noded.log_level", "'info'"),
    ("isolation:\n  verify_interval_s: 0\n", "isolation.verify_interval_s", "greater"),
    ("noded:\n  request_max_bytes: 100\n", "noded.request_max_bytes", "greater"),
    ("node:\n  name: gpu 01\n", "node.name", "letters"),
    ("cgroups:\n  name: ../escape\n", "cgroups.name", "directory name"),
    (sim(GPU0, {**GPU1, "minor": 0}), "gpu", "distinct 'minor'"),
    (sim(GPU0, {**GPU1, "uuid": GPU0["uuid"]}), "gpu", "distinct 'uuid'"),
    (sim(GPU0, {**GPU1, "index": 0}), "gpu", "distinct 'index'"),
    (sim(GPU0, {**GPU1, "pci_bus_id": GPU0["pci_bus_id"]}), "gpu", "distinct 'pci_bus_id'"),
    (sim({**GPU0, "uuid": "0a1b2c3d-0000-1111"}), "gpu.simulated.0.uuid", "nvidia-smi"),
    (sim({**GPU0, "uuid": "GPU-xyz!"}), "gpu.simulated.0.uuid", "nvidia-smi"),
    (sim({**GPU0, "uuid": 12345678}), "gpu.simulated.0.uuid", "string"),
    (sim({**GPU0, "pci_bus_id": "3b:00.0"}), "gpu.simulated.0.pci_bus_id", "00000000:3B:00.0"),
    (sim({**GPU0, "pci_bus_id": "0000:3B:00.8"}), "gpu.simulated.0.pci_bus_id",
     "00000000:3B:00.0"),
    (sim({**GPU0, "minor": 255}), "gpu.simulated.0.minor", "less than or equal to 254"),
    (sim({**GPU0, "index": -1}), "gpu.simulated.0.index", "greater than or equal to 0"),
    (sim({k: v for k, v in GPU0.items() if k != "uuid"}), "gpu.simulated.0.uuid", "required"),
    ("gpu:\n  backend: simulated\n", "gpu", "at least one entry under 'simulated'"),
    ("gpu:\n  backend: fake\n", "gpu.backend", "'simulated'"),
    ("gpu:\n  simulated:\n    index: 0\n", "gpu.simulated", "list"),
    ("telemetry:\n  responses:\n    xid: reboot\n", "telemetry.responses.xid", "'hold_user'"),
    ("telemetry:\n  responses:\n    xid: []\n", "telemetry.responses", "at least once"),
    ("telemetry:\n  responses:\n    xid: [drain, drain]\n", "telemetry.responses",
     "none twice"),
    # Holding a user is authd's to do: a node without authd cannot.
    ("telemetry:\n  responses:\n    foreign_process: [end_process, hold_user]\n", "",
     "foreign_process hold the user at authd (hold_user), which needs auth.authd_url"),
]


@pytest.mark.parametrize(("text", "key", "words"), BAD,
                         ids=[f"{key}:{words}" for _, key, words in BAD])
def test_bad_value_names_file_and_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: {key}")
    assert words in message
    # Every line (one per problem) names the file.
    assert all(line.startswith(f"{path}: ") for line in message.splitlines())


def test_unknown_key_message_is_actionable(tmp_path: Path) -> None:
    path = write(tmp_path, "isolation:\n  on_violaton: record_only\n")
    assert config_error(path) == (f"{path}: isolation.on_violaton: unknown key; "
                                  "remove it or check its spelling")


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "bogus: 1\nslurm:\n  bin_dir: bin\n  user: 7\n")
    lines = config_error(path).splitlines()
    assert sorted(line.split(": ")[1] for line in lines) == ["bogus", "slurm.bin_dir",
                                                             "slurm.user"]


@pytest.mark.parametrize(("text", "line"), [
    ("node:\n  name: gpu01\n paths: x\n", 3),
    ("gpu:\n  backend: [nvml\n", 3),
    ("isolation:\n  on_violation: cancel_job\n\tverify_interval_s: 5\n", 3),
    ("node: {name: gpu01\n", 2),
    ("a: 1\nb: 2\nc: : :\n", 3),
])
def test_invalid_yaml_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: line {line}: not valid YAML")


def test_yaml_tags_that_would_run_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = write(tmp_path, f"node: !!python/object/apply:os.system ['touch {marker}']\n")
    message = config_error(path)
    assert message.startswith(f"{path}: line 1: not valid YAML")
    assert not marker.exists()


@pytest.mark.parametrize(("text", "kind"), [
    ("- node\n- paths\n", "list"),
    ("just a string\n", "str"),
    ("42\n", "int"),
])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    assert config_error(path) == (f"{path}: (top level): expected a mapping of sections, "
                                  f"got {kind}")


def test_non_string_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "1: 2\n")
    assert config_error(path).startswith(f"{path}: 1: ")


@pytest.mark.parametrize("data", [
    {"node": {"name": "gpu01\n"}},
    {"cgroups": {"name": "ztgpu\n"}},
    {"devices": {"rest_owner": "root\n"}},
    {"devices": {"rest_group": "root\n"}},
    {"gpu": {"simulated": [{**GPU0, "uuid": GPU0["uuid"] + "\n"}]}},
    {"gpu": {"simulated": [{**GPU0, "pci_bus_id": GPU0["pci_bus_id"] + "\n"}]}},
])
def test_identifiers_with_a_trailing_newline_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_config(data, "test.yaml")


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "isolation:\n  on_violation: record_only\n"
                           "isolation:\n  verify_interval_s: 30\n")
    assert "isolation" in config_error(path)


def test_nul_byte_in_path_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, 'paths:\n  socket: "/run/ztgpu/a\\0b.sock"\n')
    assert "paths.socket" in config_error(path)


@pytest.mark.parametrize("key", ["bad\nkey", "\x1b[31mred", "tab\tkey", "vt\x0bkey"])
def test_unknown_key_with_control_characters_is_reported_escaped(tmp_path: Path,
                                                                 key: str) -> None:
    path = write(tmp_path, yaml.safe_dump({"isolation": {key: 1}}))
    message = config_error(path)
    assert message.isprintable()


# ---- property: only ConfigError escapes ---------------------------------------

_KNOWN_KEYS = sorted({*Config.model_fields,
                      *(k for f in Config.model_fields.values()
                        for k in f.annotation.model_fields),  # type: ignore[union-attr]
                      *config_module.SimulatedGpu.model_fields})
_KEYS = st.one_of(st.sampled_from(_KNOWN_KEYS), st.text(max_size=12))
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                     st.floats(allow_nan=True), st.sampled_from(
                         ["/run/x", "0600", "0666", "nvml", "simulated", "cancel_job", "root",
                          GPU0["uuid"], GPU0["pci_bus_id"]]))
_JSONISH = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=5)), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.dictionaries(_KEYS, _JSONISH, max_size=6), _JSONISH))
def test_any_data_gives_a_config_or_a_config_error(data: Any) -> None:
    try:
        result = parse_config(data, "/etc/ztgpu/fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("/etc/ztgpu/fuzz.yaml: ")
    else:
        assert isinstance(result, Config)


# ---- `ztgpu config check` and other commands ---------------------------------

def run_ztgpu(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    return subprocess.run([str(ZTGPU), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **env}, check=False)


def test_config_check_prints_effective_config_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "isolation:\n  on_violation: record_only\n"
                           "devices:\n  rest_mode: '0640'\n")
    result = run_ztgpu("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{path}: OK" in result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["isolation"]["on_violation"] == "record_only"
    assert effective["devices"]["rest_mode"] == "0640"
    # Defaults filled in:
    assert effective["isolation"]["verify_interval_s"] == 60.0
    assert effective["paths"]["task_socket"] == "/run/ztgpu/task.sock"
    assert effective["node"]["name"] == SHORT_HOSTNAME
    assert list(effective) == list(Config.model_fields)


def test_config_check_of_shipped_example_prints_the_defaults() -> None:
    result = run_ztgpu("config", "check", str(SHIPPED))
    assert result.returncode == 0, result.stderr
    assert result.stdout == dump_effective(Config())


def test_config_check_uses_ztgpu_config(tmp_path: Path) -> None:
    path = write(tmp_path, "noded:\n  log_level: warning\n")
    result = run_ztgpu("config", "check", ZTGPU_CONFIG=str(path))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["noded"]["log_level"] == "warning"


def test_config_check_of_bad_file_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "gpu:\n  backnd: nvml\n")
    result = run_ztgpu("config", "check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"{path}: gpu.backnd: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_of_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_ztgpu("config", "check", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert f"{tmp_path / 'absent.yaml'}: no such file" in result.stderr


def test_config_check_honours_global_config_option(tmp_path: Path) -> None:
    bad = write(tmp_path, "bogus: 1\n", "bad.yaml")
    good = write(tmp_path, "", "good.yaml")
    result = run_ztgpu("--config", str(bad), "config", "check", ZTGPU_CONFIG=str(good))
    assert result.returncode == 2


def test_status_with_bad_config_exits_2_before_contacting_agent(tmp_path: Path) -> None:
    bad = write(tmp_path, "paths:\n  socket: relative.sock\n")
    result = run_ztgpu("--config", str(bad), "status", "--node")
    assert result.returncode == 2
    assert f"{bad}: paths.socket: must be an absolute path" in result.stderr
    assert "ztgpu-noded" not in result.stderr  # it never got as far as the socket


# ---- the systemd unit ---------------------------------------------------------

def unit_settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def test_unit_runs_the_agent_before_slurmd() -> None:
    unit = unit_settings()
    assert unit["Service.Type"] == ["simple"]
    assert unit["Service.ExecStart"] == ["/opt/ztgpu/venv/bin/ztgpu-noded"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert "slurmd.service" in unit["Unit.Before"][0].split()
    assert "local-fs.target" in unit["Unit.After"][0].split()
    assert unit["Service.RuntimeDirectory"] == ["ztgpu"]
    assert unit["Service.RuntimeDirectoryMode"] == ["0755"]
    assert unit["Service.StateDirectory"] == ["ztgpu"]


def test_unit_hardening_keeps_what_the_agent_needs() -> None:
    unit = unit_settings()
    # Settings that would hide /dev/nvidia*, make cgroupfs read-only, hide
    # job processes or stop the agent being root.
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock",
                "ProtectKernelTunables", "ProtectControlGroups", "ProtectProc", "ProcSubset",
                "PrivateUsers", "DynamicUser", "MemoryDenyWriteExecute"):
        assert f"Service.{key}" not in unit, key
    assert unit.get("Service.User", ["root"]) == ["root"]
    if unit["Service.ProtectSystem"] == ["strict"]:
        writable = " ".join(unit.get("Service.ReadWritePaths", [])).split()
        for path in ("/var/lib/ztgpu", "/var/spool/ztgpu", "/run/ztgpu", "/sys/fs/cgroup",
                     "/dev"):
            assert path in writable
    caps = set(" ".join(unit["Service.CapabilityBoundingSet"]).split())
    assert {"CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_SYS_ADMIN", "CAP_SETUID",
            "CAP_SETGID", "CAP_KILL"} <= caps
    assert unit["Service.NoNewPrivileges"] == ["yes"]
    assert "AF_UNIX" in unit["Service.RestrictAddressFamilies"][0].split()


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    require("systemd-analyze")  # fails naming the package if make setup missed it
    # The shipped ExecStart exists only on an installed node: point it at
    # this venv's agent, which is the same program.
    agent = Path(sys.executable).with_name("ztgpu-noded")
    unit = tmp_path / "ztgpu-noded.service"
    unit.write_text(UNIT.read_text().replace("/opt/ztgpu/venv/bin/ztgpu-noded", str(agent)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    problems = [line for line in result.stderr.splitlines() if "ztgpu-noded.service" in line]
    assert result.returncode == 0 and problems == [], result.stderr


# ---- `ztgpu config check` checks what the node agent checks ------------------

def test_config_check_says_when_it_shows_the_defaults() -> None:
    result = run_ztgpu("config", "check")
    default = Path("/etc/ztgpu/ztgpu.yaml")
    if default.exists():
        assert f"{default}: OK" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert f"{default}: no such file; showing the built-in defaults" in result.stderr
        assert "OK" not in result.stderr.splitlines()[0]


def _sim_node(tmp_path: Path, extra: str = "") -> Path:
    dev = tmp_path / "dev"
    dev.mkdir(parents=True)
    for minor in range(2):
        os.mknod(dev / f"nvidia{minor}", 0o600 | 0o020000, os.makedev(195, minor))
    gpus = "".join(f"    - {{index: {m}, minor: {m}, uuid: GPU-00000000-0000-0000-0000-00000000000"
                   f"{m}, pci_bus_id: '00000000:0{m}:00.0'}}\n" for m in range(2))
    return write(tmp_path, f"paths:\n  device_dir: {dev}\n  state_dir: {tmp_path}/state\n"
                           f"gpu:\n  backend: simulated\n  simulated:\n{gpus}"
                           f"slurm:\n  gres_conf: {tmp_path}/gres.conf\n{extra}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (device nodes)")
def test_config_check_runs_the_agents_checks_and_fails_where_the_agent_would(
        tmp_path: Path) -> None:
    path = _sim_node(tmp_path)
    good = run_ztgpu("config", "check", str(path))
    assert good.returncode == 0, good.stderr
    assert "# ok    devices: 2 GPUs (simulated)" in good.stderr
    # A rest group that does not exist: the agent would not start at all.
    bad = run_ztgpu("config", "check", str(_sim_node(tmp_path / "g", "devices:\n"
                                                     "  rest_group: no-such-group\n")))
    assert bad.returncode == 1
    assert "FAIL  rest_state: devices.rest_group: group no-such-group does not exist" \
        in bad.stderr
    # gres.conf naming the GPUs in another order, and a device file missing.
    (tmp_path / "gres.conf").write_text(
        f"NodeName={SHORT_HOSTNAME} Name=gpu File={tmp_path}/dev/nvidia1,{tmp_path}/dev/nvidia0\n")
    (tmp_path / "dev" / "nvidia1").unlink()
    bad = run_ztgpu("config", "check", str(path))
    assert bad.returncode == 1
    assert "FAIL  devices:" in bad.stderr and "nvidia1 does not exist" in bad.stderr
    assert "FAIL  gres_order:" in bad.stderr
    # A state directory others may change.
    (tmp_path / "state").mkdir(mode=0o777)
    (tmp_path / "state").chmod(0o777)
    bad = run_ztgpu("config", "check", str(path))
    assert "FAIL  trusted_path: paths.state_dir" in bad.stderr
