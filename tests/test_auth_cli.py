"""`ztgpu admin`/`login` argument handling that needs no running authd."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ztgpu.cli.auth import parse_ttl
from ztgpu.cli.main import main
from ztgpu.errors import UsageError


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h", 3600),
                                               ("2d", 172800)])
def test_ttl_units(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "1w", "-1h", "1.5h", "h", "1 h x"])
def test_bad_ttl_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--ttl"):
        parse_ttl(text)


def test_kek_init_creates_a_private_file_once(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ztgpu.yaml"
    kek = tmp_path / "authd" / "kek"
    kek.parent.mkdir()
    config.write_text(f"authd:\n  kek_file: {kek}\n")
    assert main(["--config", str(config), "admin", "kek", "init"]) == 0
    assert "created key-encryption key" in capsys.readouterr().out
    assert stat.S_IMODE(kek.stat().st_mode) == 0o600
    first = kek.read_text()
    assert main(["--config", str(config), "admin", "kek", "init"]) != 0
    assert kek.read_text() == first  # never replaced
    assert first.split()[1] not in capsys.readouterr().err


def test_login_without_authd_configured_says_what_to_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    config = tmp_path / "ztgpu.yaml"
    config.write_text("{}\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("123456\n"))
    assert main(["--config", str(config), "login", "--code-stdin"]) == 2
    assert "auth.authd_url" in capsys.readouterr().err
