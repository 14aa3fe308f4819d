"""Writes the Prolog/Epilog executables that slurm.conf points at.

Each is a tiny Python script run with ``-I -S`` (isolated, no site
processing: nothing from the environment or .pth files can change what it
imports) that puts the suite's install location first on ``sys.path`` and
calls :func:`ztgpu.prolog_epilog.hook.main` with the agent socket baked in,
so the hot path reads no config file and imports no YAML.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

import ztgpu
from ztgpu.config import Config

HOOKS = ("prolog", "epilog", "task_prolog")


def render(hook: str, config: Config, python: str = sys.executable) -> str:
    site = str(Path(ztgpu.__file__).resolve().parents[1])
    return (
        f"#!{python} -IS\n"
        f"# ztgpu node {hook}: written by `ztgpu install`; rerun it instead of editing.\n"
        "import sys\n"
        f"sys.path.insert(0, {site!r})\n"
        "from ztgpu.prolog_epilog.hook import main\n"
        f"sys.exit(main({hook!r}, {str(socket_for(hook, config))!r}))\n"
    )


def socket_for(hook: str, config: Config) -> Path:
    return config.paths.task_socket if hook == "task_prolog" else config.paths.socket


def hook_path(hook: str, config: Config) -> Path:
    return config.paths.hooks_dir / hook


def write_hooks(config: Config, *, dry_run: bool) -> list[tuple[Path, bool]]:
    """Write both hook executables (0755, atomically); returns (path, changed) pairs."""
    results = []
    for hook in HOOKS:
        path = hook_path(hook, config)
        text = render(hook, config)
        try:
            st = os.lstat(path)
            changed = (path.read_text() != text or stat.S_IMODE(st.st_mode) != 0o755
                       or st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode))
        except FileNotFoundError:
            changed = True
        if changed and not dry_run:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{hook}.")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o755)  # noqa: S103 - an executable Slurm runs as root
            os.replace(tmp, path)
        results.append((path, changed))
    return results
