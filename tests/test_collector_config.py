"""Bad configuration of the audit pipeline: clear errors, nothing started, no secret shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ztgpu.config import parse_config, read_secret_file
from ztgpu.errors import ConfigError
from ztgpu.testing.collector_process import SitePki


def test_secret_file_must_be_private_and_is_never_echoed(tmp_path: Path) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("host=db password=hunter2-secret\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        read_secret_file(secret, "collector.postgres_dsn_file")
    assert "hunter2" not in str(info.value)
    secret.chmod(0o600)
    assert read_secret_file(secret, "x") == "host=db password=hunter2-secret"
    secret.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_secret_file(secret, "x")
    with pytest.raises(ConfigError, match="cannot open"):
        read_secret_file(tmp_path / "missing", "x")
    link = tmp_path / "link"
    link.symlink_to(secret)
    with pytest.raises(ConfigError, match="cannot open"):
        read_secret_file(link, "x")


@pytest.mark.parametrize(("section", "values", "expected"), [
    ("audit", {"collector_url": "http://collector:8443"}, "TLS is mandatory"),
    ("audit", {"collector_url": "https://c:1/../x"}, "https://host"),
    ("audit", {"retry_min_s": 10, "retry_max_s": 1}, "retry_min_s must not exceed"),
    ("audit", {"spool_max_events": 10}, "greater than or equal to 100"),
    ("audit", {"spool_full_action": "drop_events"}, "stop_granting"),
    ("collector", {"store": "postgres"}, "needs postgres_dsn_file"),
    ("collector", {"store": "mysql"}, "sqlite"),
    ("collector", {"name": "../c"}, "letters, digits"),
    ("collector", {"syslog": {"target": "siem"}}, "host:port"),
    ("tls", {"cert": "relative.pem"}, "absolute path"),
])
def test_bad_audit_settings_are_named(section: str, values: dict[str, object],
                                      expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({section: values}, "test.yaml")
    assert expected in str(info.value)
    assert f"test.yaml: {section}" in str(info.value)


def run_collector(config: dict[str, object], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "ztgpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "ztgpu.collector", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_collector_without_a_certificate_refuses_to_start(tmp_path: Path) -> None:
    res = run_collector({"collector": {"sqlite_path": str(tmp_path / "a.db")}}, tmp_path)
    assert res.returncode == 2
    assert "tls.cert and tls.key" in res.stderr
    assert not (tmp_path / "a.db").exists()


def test_collector_refuses_a_readable_key_or_dsn_file(tmp_path: Path) -> None:
    pki = SitePki(tmp_path / "pki")
    cert, key = pki.issue("service", "collector")
    tls = {"ca_cert": str(pki.ca_cert), "cert": str(cert), "key": str(key)}
    dsn = tmp_path / "dsn"
    dsn.write_text("host=/nonexistent password=topsecret-value")
    dsn.chmod(0o640)
    res = run_collector({"tls": tls, "collector": {
        "store": "postgres", "postgres_dsn_file": str(dsn)}}, tmp_path)
    assert res.returncode == 2 and "must not be readable by group or others" in res.stderr
    assert "topsecret" not in res.stderr
    os.chmod(key, 0o644)
    res = run_collector({"tls": tls, "collector": {"sqlite_path": str(tmp_path / "a.db")}},
                        tmp_path)
    assert res.returncode != 0 and str(key) in res.stderr


def test_audit_tail_without_local_points_to_the_trail(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    from ztgpu.cli.main import main

    config = tmp_path / "ztgpu.yaml"
    config.write_text("{}\n")
    assert main(["--config", str(config), "audit", "tail"]) == 2
    assert "ztgpu audit trail" in capsys.readouterr().err
