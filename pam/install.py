"""``ztgpu install --pam SERVICE``: the module's loader and its stack lines.

Writes the loader (pam_python) or the ``pam_exec`` wrapper into
``paths.hooks_dir`` (root-owned, checked like the Slurm hooks) and one
marked block at the *end* of ``/etc/pam.d/SERVICE``::

    # BEGIN ztgpu (written by `ztgpu install --pam`; rerun it instead of editing)
    account required pam_python.so /usr/libexec/ztgpu/pam_ztgpu.py socket=...
    session required pam_python.so /usr/libexec/ztgpu/pam_ztgpu.py socket=...
    # END ztgpu

At the end, the account line runs after the site's own account checks, and
the session line after every other session module, pam_systemd included:
logind moves a session into its own scope when pam_systemd runs, and a
later adoption puts it back into the job. Rerunning replaces the block in
place (idempotent: an unchanged file is not rewritten); a changed file is
backed up beside itself first and the diff printed.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ztgpu.pam.session import OptionError, parse_options

from ztgpu.config import Config
from ztgpu.errors import ConfigError

BEGIN = "# BEGIN ztgpu (written by `ztgpu install --pam`; rerun it instead of editing)"
END = "# END ztgpu"
LOADER = "pam_ztgpu.py"
EXEC_WRAPPER = "pam_exec"
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _site() -> str:
    import ztgpu

    return str(Path(ztgpu.__file__).resolve().parents[1])


def render_loader() -> str:
    """The file pam_python loads: the suite on sys.path, then the module's functions."""
    site = _site()
    return (
        "# ztgpu PAM module loader for pam_python: written by `ztgpu install --pam`;\n"
        "# rerun it instead of editing.\n"
        "import sys\n"
        f"if {site!r} not in sys.path:\n"
        f"    sys.path.insert(0, {site!r})\n"
        "from ztgpu.pam.pam_ztgpu import (  # noqa: F401 - pam_python looks these up\n"
        "    pam_sm_acct_mgmt, pam_sm_authenticate, pam_sm_close_session,\n"
        "    pam_sm_open_session, pam_sm_setcred)\n"
    )


def render_exec_wrapper(python: str = sys.executable) -> str:
    return (
        f"#!{python} -IS\n"
        "# ztgpu PAM module for pam_exec: written by `ztgpu install --pam --pam-exec`;\n"
        "# rerun it instead of editing.\n"
        "import sys\n"
        f"sys.path.insert(0, {_site()!r})\n"
        "from ztgpu.pam.exec_entry import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )


def stack_lines(config: Config, *, use_exec: bool, options: list[str]) -> list[str]:
    """The block's account and session lines. Raises ConfigError for a bad option."""
    words = [f"socket={config.paths.socket}", *options]
    try:
        parse_options(words)
    except OptionError as exc:
        raise ConfigError(f"--pam-option: {exc}") from None
    args = " ".join(words)
    if use_exec:
        program = config.paths.hooks_dir / EXEC_WRAPPER
        return [f"account required pam_exec.so stdout quiet {program} {args}",
                f"session required pam_exec.so stdout quiet {program} {args}"]
    loader = config.paths.hooks_dir / LOADER
    return [f"account required pam_python.so {loader} {args}",
            f"session required pam_python.so {loader} {args}"]


@dataclass
class PamPlan:
    path: Path
    old: str
    new: str
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def diff(self) -> str:
        return "".join(difflib.unified_diff(
            self.old.splitlines(keepends=True), self.new.splitlines(keepends=True),
            fromfile=str(self.path), tofile=f"{self.path} (ztgpu)"))


def _module_lines(text: str, pam_dir: Path, seen: set[Path] | None = None) -> list[str]:
    """Non-comment lines of a stack, with ``@include`` files expanded."""
    seen = set() if seen is None else seen
    lines = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("@include"):
            name = line.split(None, 1)[1] if len(line.split()) > 1 else ""
            included = pam_dir / name
            if included in seen or not _SERVICE.fullmatch(name):
                continue
            seen.add(included)
            try:
                lines.extend(_module_lines(included.read_text(), pam_dir, seen))
            except OSError:
                continue
        elif line:
            lines.append(line)
    return lines


def _in_session(lines: list[str], module: str) -> bool:
    return any(line.split()[0].lstrip("-") == "session" and module in line for line in lines)


def plan(service: str, pam_dir: Path, lines: list[str]) -> PamPlan:
    """The file's new text with the block in place; raises ConfigError when
    the file cannot be read or the block markers are broken."""
    if not _SERVICE.fullmatch(service):
        raise ConfigError(f"--pam {service!r} is not a PAM service name")
    path = pam_dir / service
    try:
        old = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: --pam names the service whose stack gets "
                          f"the module (sshd on a compute node)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    kept: list[str] = []
    inside = False
    for line in old.splitlines():
        if line.strip() == BEGIN:
            if inside:
                raise ConfigError(f"{path}: two '{BEGIN}' lines without an '{END}'")
            inside = True
        elif line.strip() == END and inside:
            inside = False
        elif not inside:
            kept.append(line)
    if inside:
        raise ConfigError(f"{path}: '{BEGIN}' has no '{END}': fix the file by hand")
    while kept and not kept[-1].strip():
        kept.pop()
    new = "\n".join([*kept, "", BEGIN, *lines, END]) + "\n"
    result = PamPlan(path=path, old=old, new=new)
    others = _module_lines("\n".join(kept), pam_dir)
    if _in_session(others, "pam_systemd.so"):
        result.warnings.append(
            f"{path}: pam_systemd runs in this stack (directly or through @include): logind "
            "moves each session into its own scope. The ztgpu session line is placed after "
            "it, so the session ends up in the job again, and the agent records and undoes "
            "any later move (ssh.escaped); on compute nodes, consider removing pam_systemd "
            "from this service as Slurm's pam_slurm_adopt documentation advises")
    if any("pam_slurm_adopt.so" in line for line in others):
        result.warnings.append(
            f"{path}: pam_slurm_adopt is in the same stack: both modules adopt sessions. "
            "Keep one (the ztgpu module records every decision and fails closed); run both "
            "only to compare them")
    return result


def apply(result: PamPlan) -> Path | None:
    """Write the planned file (after a backup); returns the backup's path."""
    if not result.changed:
        return None
    path = result.path
    st = os.stat(path)
    backup = path.with_name(f"{path.name}.ztgpu-backup-{time.strftime('%Y%m%d%H%M%S')}")
    backup.write_text(result.old)
    os.chmod(backup, st.st_mode & 0o777)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(result.new)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, st.st_mode & 0o777)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, path)
    return backup
