"""The Prolog/Epilog/TaskProlog executables that `ztgpu install` writes."""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ztgpu.config import Config, parse_config
from ztgpu.slurm.hooks_install import HOOKS, hook_path, render, socket_for, write_hooks

OLD = 1_000_000_000  # 2001-09-09: any rewrite would give a newer mtime


def make_config(base: Path, socket_name: str = "noded.sock") -> Config:
    return parse_config({"paths": {
        "socket": str(base / "run" / socket_name),
        "task_socket": str(base / "run" / "task.sock"),
        "hooks_dir": str(base / "libexec" / "ztgpu"),
    }}, "test")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


def baked_call(text: str) -> tuple[str, str]:
    """The (hook, socket) arguments of the wrapper's ``main(...)`` call."""
    calls = [node for node in ast.walk(ast.parse(text))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id == "main"]
    assert len(calls) == 1
    args = [arg.value for arg in calls[0].args if isinstance(arg, ast.Constant)]
    assert len(args) == 2
    return str(args[0]), str(args[1])


def hook_env(**extra: str) -> dict[str, str]:
    """A slurmd-like environment: no SLURM_JOB_* unless given."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **extra}


def run_hook(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


# ---- rendering ------------------------------------------------------------------

def test_render_shebang_is_this_interpreter_isolated(config: Config) -> None:
    for hook in HOOKS:
        first = render(hook, config).splitlines()[0]
        assert first == f"#!{sys.executable} -IS"


def test_render_bakes_in_the_right_socket(config: Config) -> None:
    assert baked_call(render("prolog", config)) == ("prolog", str(config.paths.socket))
    assert baked_call(render("epilog", config)) == ("epilog", str(config.paths.socket))
    assert baked_call(render("task_prolog", config)) == ("task_prolog",
                                                         str(config.paths.task_socket))
    assert socket_for("task_prolog", config) == config.paths.task_socket
    assert socket_for("prolog", config) == config.paths.socket


def test_render_is_valid_python_that_imports_no_yaml_or_pydantic(config: Config) -> None:
    for hook in HOOKS:
        tree = ast.parse(render(hook, config))
        imported = {alias.name for node in ast.walk(tree)
                    if isinstance(node, ast.Import | ast.ImportFrom)
                    for alias in node.names} | {
            node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module}
        assert imported == {"sys", "main", "ztgpu.prolog_epilog.hook"}


def test_render_other_interpreter(config: Config) -> None:
    assert render("prolog", config, python="/opt/ztgpu/venv/bin/python").startswith(
        "#!/opt/ztgpu/venv/bin/python -IS\n")


def test_render_quotes_odd_socket_paths_safely(tmp_path: Path) -> None:
    config = make_config(tmp_path, socket_name="it's \"quoted\"\\.sock")
    assert baked_call(render("prolog", config))[1] == str(config.paths.socket)


# ---- writing ----------------------------------------------------------------------

def test_write_hooks_writes_three_executables(config: Config) -> None:
    results = write_hooks(config, dry_run=False)
    assert results == [(hook_path(hook, config), True) for hook in HOOKS]
    assert sorted(p.name for p in config.paths.hooks_dir.iterdir()) == sorted(HOOKS)
    for hook in HOOKS:
        path = hook_path(hook, config)
        info = path.lstat()
        assert stat.S_ISREG(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o755
        assert info.st_uid == os.geteuid()
        assert path.read_text() == render(hook, config)


def test_rerun_reports_unchanged_and_does_not_rewrite(config: Config) -> None:
    write_hooks(config, dry_run=False)
    before = {}
    for hook in HOOKS:
        path = hook_path(hook, config)
        os.utime(path, (OLD, OLD))
        before[hook] = (path.stat().st_ino, path.stat().st_mtime_ns)
    results = write_hooks(config, dry_run=False)
    assert results == [(hook_path(hook, config), False) for hook in HOOKS]
    for hook in HOOKS:
        path = hook_path(hook, config)
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == before[hook]


def test_rerun_after_socket_change_rewrites_only_affected_hooks(config: Config,
                                                                 tmp_path: Path) -> None:
    write_hooks(config, dry_run=False)
    moved = make_config(tmp_path, socket_name="moved.sock")
    results = dict(write_hooks(moved, dry_run=False))
    assert results == {hook_path("prolog", moved): True, hook_path("epilog", moved): True,
                       hook_path("task_prolog", moved): False}
    assert baked_call(hook_path("prolog", moved).read_text())[1].endswith("/moved.sock")
    assert stat.S_IMODE(hook_path("prolog", moved).stat().st_mode) == 0o755


def test_rerun_repairs_a_hook_whose_mode_was_changed(config: Config) -> None:
    write_hooks(config, dry_run=False)
    path = hook_path("prolog", config)
    path.chmod(0o777)
    write_hooks(config, dry_run=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


def test_write_leaves_no_temporary_files(config: Config, tmp_path: Path) -> None:
    write_hooks(config, dry_run=False)
    write_hooks(make_config(tmp_path, socket_name="other.sock"), dry_run=False)
    assert sorted(p.name for p in config.paths.hooks_dir.iterdir()) == sorted(HOOKS)


def test_dry_run_writes_nothing(config: Config) -> None:
    results = write_hooks(config, dry_run=True)
    assert results == [(hook_path(hook, config), True) for hook in HOOKS]
    assert not config.paths.hooks_dir.exists()


def test_dry_run_after_change_reports_but_keeps_old_files(config: Config,
                                                         tmp_path: Path) -> None:
    write_hooks(config, dry_run=False)
    old = {hook: hook_path(hook, config).read_text() for hook in HOOKS}
    moved = make_config(tmp_path, socket_name="moved.sock")
    assert dict(write_hooks(moved, dry_run=True))[hook_path("prolog", moved)] is True
    assert {hook: hook_path(hook, config).read_text() for hook in HOOKS} == old


# ---- running what was written -------------------------------------------------------

@pytest.fixture
def installed(config: Config) -> Config:
    write_hooks(config, dry_run=False)
    return config


def test_prolog_without_job_env_and_no_agent_reports_node_unsafe(installed: Config) -> None:
    assert not installed.paths.socket.exists()
    result = run_hook(hook_path("prolog", installed), hook_env())
    assert result.returncode == 1
    assert "node unsafe" in result.stderr
    assert str(installed.paths.socket) in result.stderr
    assert "Traceback" not in result.stderr


def test_prolog_with_good_job_env_and_no_agent_reports_node_unsafe(installed: Config) -> None:
    env = hook_env(SLURM_JOB_ID="77", SLURM_JOB_UID="0", SLURM_JOB_USER="root",
                   SLURM_JOB_GPUS="0")
    result = run_hook(hook_path("prolog", installed), env)
    assert result.returncode == 1
    assert "node unsafe" in result.stderr


def test_epilog_with_no_agent_reports_node_unsafe(installed: Config) -> None:
    result = run_hook(hook_path("epilog", installed), hook_env(SLURM_JOB_ID="77"))
    assert result.returncode == 1
    assert "node unsafe" in result.stderr


def test_task_prolog_with_no_agent_fails_the_task_and_prints_nothing(installed: Config) -> None:
    result = run_hook(hook_path("task_prolog", installed), hook_env())
    assert result.returncode == 1
    assert "cannot be confined" in result.stderr
    assert str(installed.paths.task_socket) in result.stderr
    assert result.stdout == ""  # slurmd reads a TaskProlog's stdout as commands


def test_hook_ignores_pythonpath_and_sitecustomize(installed: Config, tmp_path: Path) -> None:
    # Root runs these: nothing in the environment may change what they import.
    evil = tmp_path / "evil"
    (evil / "ztgpu" / "prolog_epilog").mkdir(parents=True)
    marker = tmp_path / "hijacked"
    payload = f"open({str(marker)!r}, 'w').close()\n"
    (evil / "sitecustomize.py").write_text(payload)
    (evil / "usercustomize.py").write_text(payload)
    (evil / "ztgpu" / "__init__.py").write_text(payload)
    (evil / "ztgpu" / "prolog_epilog" / "__init__.py").write_text(payload)
    (evil / "ztgpu" / "prolog_epilog" / "hook.py").write_text(
        payload + "def main(*a):\n    return 0\n")
    env = hook_env(PYTHONPATH=str(evil), PYTHONSTARTUP=str(evil / "sitecustomize.py"),
                   PYTHONHOME="/nonexistent", PYTHONINSPECT="1")
    result = run_hook(hook_path("prolog", installed), env)
    assert not marker.exists()
    assert result.returncode == 1
    assert "node unsafe" in result.stderr


class FakeAgent:
    """Answers each request on a unix socket with a fixed reply; records requests.

    The reply is encoded as ztgpu-noded encodes its answers (compact JSON,
    keys in the order given) unless *raw* gives the exact bytes.
    """

    def __init__(self, path: Path, answer: dict[str, Any], raw: bytes | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self._answer = raw if raw is not None else (
            json.dumps(answer, separators=(",", ":")).encode() + b"\n")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(4)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(json.loads(data))
                conn.sendall(self._answer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="zt-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(("answer", "code", "said"), [
    ({"ok": True, "result": {"granted": [0]}}, 0, ""),
    ({"ok": False, "kind": "denied", "error": "GPU 5 is not here"}, 0, "refused"),
    ({"ok": False, "kind": "fault", "error": "cgroupfs is read-only"}, 1, "node unsafe"),
])
def test_prolog_talks_to_the_baked_socket(short_dir: Path, answer: dict[str, Any], code: int,
                                          said: str) -> None:
    config = make_config(short_dir)
    config.paths.socket.parent.mkdir()
    write_hooks(config, dry_run=False)
    agent = FakeAgent(config.paths.socket, answer)
    try:
        env = hook_env(SLURM_JOB_ID="4242", SLURM_JOB_UID="0", SLURM_JOB_USER="root",
                       SLURM_JOB_GPUS="2,0")
        result = run_hook(hook_path("prolog", config), env)
    finally:
        agent.close()
    assert result.returncode == code, result.stderr
    assert said in result.stderr
    assert len(agent.requests) == 1
    request = agent.requests[0]
    assert request["op"] == "prolog"
    assert request["job"] == {"job_id": "4242", "uid": 0, "user": "root", "gpus": [0, 2]}


def run_prolog_against(short_dir: Path, raw: bytes) -> subprocess.CompletedProcess[str]:
    config = make_config(short_dir)
    config.paths.socket.parent.mkdir()
    write_hooks(config, dry_run=False)
    agent = FakeAgent(config.paths.socket, {}, raw=raw)
    try:
        return run_hook(hook_path("prolog", config),
                        hook_env(SLURM_JOB_ID="9", SLURM_JOB_UID="0", SLURM_JOB_USER="root"))
    finally:
        agent.close()


@pytest.mark.parametrize("raw", [b"not json\n", b"[]\n", b'{"ok":"yes"}\n', b""])
def test_prolog_treats_a_garbled_answer_as_node_unsafe(short_dir: Path, raw: bytes) -> None:
    result = run_prolog_against(short_dir, raw)
    assert result.returncode == 1
    assert "node unsafe" in result.stderr


@pytest.mark.parametrize("raw", [b'{"ok": true, "result": null}\n',
                                 b'{"result":null,"ok":true}\n'])
def test_prolog_accepts_any_valid_success_answer(short_dir: Path, raw: bytes) -> None:
    result = run_prolog_against(short_dir, raw)
    assert result.returncode == 0, result.stderr
