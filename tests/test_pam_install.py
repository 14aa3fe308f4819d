"""`ztgpu install --pam`: the stack block written once, with a backup and a
diff; the module's option parsing refuses what it does not know."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ztgpu.pam import session
from ztgpu.pam.install import BEGIN, END

ZTGPU = str(Path(sys.executable).with_name("ztgpu"))
DEBIAN_SSHD = """\
@include common-auth
account    required     pam_nologin.so
@include common-account
session    optional     pam_keyinit.so force revoke
@include common-session
"""
COMMON_SESSION = "session required pam_unix.so\nsession optional pam_systemd.so\n"


def setup(tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "ztgpu.yaml"
    config.write_text(yaml.safe_dump({"paths": {"hooks_dir": str(tmp_path / "libexec"),
                                                "socket": str(tmp_path / "noded.sock")}}))
    pam_dir = tmp_path / "pam.d"
    pam_dir.mkdir()
    (pam_dir / "sshd").write_text(DEBIAN_SSHD)
    (pam_dir / "common-session").write_text(COMMON_SESSION)
    return config, pam_dir


def run(config: Path, pam_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ZTGPU, "--config", str(config), "install", "--pam", "sshd",
                           "--pam-dir", str(pam_dir), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_install_pam_dry_run_then_real_then_rerun_then_other_options(tmp_path):
    config, pam_dir = setup(tmp_path)
    dry = run(config, pam_dir, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    module = tmp_path / "libexec" / "pam_ztgpu.so"
    assert f"+account required {module} socket=" in dry.stdout
    assert (pam_dir / "sshd").read_text() == DEBIAN_SSHD and not module.exists()
    assert "pam_systemd" in dry.stderr  # found through @include common-session

    real = run(config, pam_dir, "--pam-option=break_glass=hpcadmin")
    assert real.returncode == 0, real.stderr
    text = (pam_dir / "sshd").read_text()
    assert text.startswith(DEBIAN_SSHD) and text.rstrip().endswith(END)
    block = text[text.index(BEGIN):]
    assert f"socket={tmp_path / 'noded.sock'} break_glass=hpcadmin" in block
    assert [line.split()[0] for line in block.splitlines()[1:-1]] == ["account", "session"]
    assert module.stat().st_mode & 0o777 == 0o644 and module.stat().st_uid == 0
    loaded = ctypes.CDLL(str(module))  # what libpam looks up in it
    for name in ("pam_sm_acct_mgmt", "pam_sm_open_session", "pam_sm_close_session"):
        assert getattr(loaded, name) is not None
    built = module.stat().st_mtime_ns
    backups = list(pam_dir.glob("sshd.ztgpu-backup-*"))
    assert len(backups) == 1 and backups[0].read_text() == DEBIAN_SSHD

    again = run(config, pam_dir, "--pam-option=break_glass=hpcadmin")
    assert again.returncode == 0 and f"unchanged: {pam_dir / 'sshd'}" in again.stdout
    assert (pam_dir / "sshd").read_text() == text
    # The same source and flags build the same bytes: the module is left alone.
    assert f"unchanged: {module}" in again.stdout and module.stat().st_mtime_ns == built

    python = run(config, pam_dir, "--pam-module", "python")
    assert python.returncode == 0, python.stderr
    loader = tmp_path / "libexec" / "pam_ztgpu.py"
    assert loader.stat().st_mode & 0o777 == 0o644 and "pam_sm_acct_mgmt" in loader.read_text()
    new = (pam_dir / "sshd").read_text()
    assert new.count(BEGIN) == 1 and f"account required pam_python.so {loader}" in new

    exec_ = run(config, pam_dir, "--pam-module", "exec")
    assert exec_.returncode == 0, exec_.stderr
    new = (pam_dir / "sshd").read_text()
    assert new.count(BEGIN) == 1 and "pam_exec.so stdout quiet" in new
    assert "pam_python.so" not in new and "break_glass" not in new
    assert str(module) not in new
    assert (tmp_path / "libexec" / "pam_exec").stat().st_mode & 0o777 == 0o755


def test_install_pam_compiled_says_what_is_missing_without_a_compiler(tmp_path):
    config, pam_dir = setup(tmp_path)
    bare = tmp_path / "bin"
    bare.mkdir()
    res = subprocess.run([ZTGPU, "--config", str(config), "install", "--pam", "sshd",
                          "--pam-dir", str(pam_dir)], capture_output=True, text=True,
                         timeout=60, check=False, env={"PATH": str(bare)})
    assert res.returncode != 0, res
    assert "needs gcc" in res.stderr and "--pam-module python" in res.stderr, res.stderr
    assert (pam_dir / "sshd").read_text() == DEBIAN_SSHD


def test_install_pam_refuses_bad_options_and_broken_blocks_and_writes_nothing(tmp_path):
    config, pam_dir = setup(tmp_path)
    bad = run(config, pam_dir, "--pam-option=action_no_jbo=allow")
    assert bad.returncode != 0 and "unknown option 'action_no_jbo'" in bad.stderr, bad.stderr
    assert (pam_dir / "sshd").read_text() == DEBIAN_SSHD
    assert not (tmp_path / "libexec").exists()
    (pam_dir / "sshd").write_text(DEBIAN_SSHD + BEGIN + "\naccount required pam_deny.so\n")
    broken = run(config, pam_dir)
    assert broken.returncode != 0 and "has no" in broken.stderr, broken.stderr
    missing = subprocess.run([ZTGPU, "--config", str(config), "install", "--pam", "nosuch",
                              "--pam-dir", str(pam_dir)], capture_output=True, text=True,
                             timeout=60, check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    neither = subprocess.run([ZTGPU, "--config", str(config), "install"], capture_output=True,
                             text=True, timeout=60, check=False)
    assert neither.returncode != 0 and "--pam SERVICE" in neither.stderr


@pytest.mark.parametrize("words, problem", [
    (["socket"], "has no '='"),
    (["socket=relative"], "not an absolute path"),
    (["timeout=0"], "more than 0"),
    (["timeout=soon"], "not a number"),
    (["action_no_job=maybe"], "'deny' or 'allow'"),
    (["action_bogus=deny"], "unknown option"),
    (["break_glass=a,,b"], "not a comma-separated list"),
])
def test_option_errors_name_the_word(words, problem):
    with pytest.raises(session.OptionError, match=problem):
        session.parse_options(words)


def test_defaults_all_fail_closed_and_break_glass_survives_other_typos():
    opts = session.parse_options([])
    assert opts.actions == dict.fromkeys(session.ACTION_NAMES, "deny")
    assert session.break_glass_of(["actoin_x=1", "break_glass=ops,hpc"]) == {"ops", "hpc"}
    assert session.break_glass_of(["break_glass=bad name"]) == frozenset()
    outcome = session.account(["actoin_no_job=allow"], "alice", "10.0.0.1", "sshd")
    assert not outcome.allowed and outcome.error
    assert session.account(["actoin_no_job=allow"], "root", "10.0.0.1", "sshd").allowed


def test_an_unreachable_agent_takes_the_named_action(tmp_path):
    sock = f"socket={tmp_path / 'none.sock'}"
    assert not session.account([sock], "alice", "", "sshd").allowed
    assert session.account([sock, "action_no_agent=allow"], "alice", "", "sshd").allowed
    assert session.account([sock, "break_glass=alice"], "alice", "", "sshd").allowed
