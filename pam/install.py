"""``ztgpu install --pam SERVICE``: the module's loader and its stack lines.

Puts the module into ``paths.hooks_dir`` (root-owned, checked like the
Slurm hooks) and one marked block at the *end* of ``/etc/pam.d/SERVICE``::

    # BEGIN ztgpu (written by `ztgpu install --pam`; rerun it instead of editing)
    account required /usr/libexec/ztgpu/pam_ztgpu.so socket=...
    session required /usr/libexec/ztgpu/pam_ztgpu.so socket=...
    # END ztgpu

Three forms of the same module (``--pam-module``):

``compiled`` (the default)
    ``pam_ztgpu.so``, built here from the C source shipped in the package
    (gcc and the PAM headers, libpam0g-dev): a login pays a few
    milliseconds, as with pam_slurm_adopt.
``python``
    ``pam_ztgpu.py``, a loader for pam_python (libpam-python), which also
    has the auth phase (TOTP on login nodes and for JIT admins).
``exec``
    a ``pam_exec`` wrapper, for sites with neither.

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
COMPILED = "pam_ztgpu.so"
MODULE_KINDS = ("compiled", "python", "exec")
PAM_HEADER = Path("/usr/include/security/pam_modules.h")
#: Hardening as Debian builds its own PAM modules, and no warning let through.
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-Wformat=2", "-Wshadow", "-fPIC",
          "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2")
#: Control-flow protection where gcc has it (x86; aarch64 uses -mbranch-protection).
ARCH_CFLAGS = {"x86_64": ("-fcf-protection",), "aarch64": ("-mbranch-protection=standard",)}
LDFLAGS = ("-shared", "-Wl,-z,relro,-z,now", "-Wl,-z,noexecstack")
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
        "# ztgpu PAM module for pam_exec: written by `ztgpu install --pam --pam-module exec`;\n"
        "# rerun it instead of editing.\n"
        "import sys\n"
        f"sys.path.insert(0, {_site()!r})\n"
        "from ztgpu.pam.exec_entry import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )


def source_path() -> Path:
    """The C source of the compiled module, shipped in the package."""
    return Path(__file__).with_name("pam_ztgpu.c")


def build_compiled(dest: Path, *, dry_run: bool) -> bool:
    """Compile the C module into *dest* (root's, 0644, atomically); returns
    whether it changed. gcc's output is the same for the same source and
    flags, so an unchanged module is not replaced. Raises ConfigError when
    the compiler or the PAM headers are missing."""
    import platform
    import shutil
    import subprocess

    from ztgpu.slurm.hooks_install import write_root_file

    gcc = shutil.which("gcc")
    if gcc is None or not PAM_HEADER.exists():
        missing = "gcc" if gcc is None else f"the PAM headers ({PAM_HEADER})"
        raise ConfigError(f"--pam-module compiled needs {missing}: apt-get install gcc "
                          f"libpam0g-dev, or use --pam-module python (pam_python)")
    with tempfile.TemporaryDirectory(prefix="ztgpu-pam-") as tmp:
        built = Path(tmp) / COMPILED
        arch = ARCH_CFLAGS.get(platform.machine(), ())
        res = subprocess.run([gcc, *CFLAGS, *arch, *LDFLAGS, "-o", str(built), str(source_path()),
                              "-lpam"], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise ConfigError(f"compiling {source_path()} failed:\n{res.stderr[-2000:]}")
        data = built.read_bytes()
    return write_root_file(dest, data, dry_run=dry_run, mode=0o644)


def module_path(config: Config, kind: str) -> Path:
    """Where the module of *kind* lives (in the hooks directory)."""
    name = {"compiled": COMPILED, "python": LOADER, "exec": EXEC_WRAPPER}[kind]
    return config.paths.hooks_dir / name


def stack_lines(config: Config, *, kind: str, options: list[str],
                mfa: str | None = None) -> list[str]:
    """The block's lines. *mfa* ``login``: a login node's auth (TOTP) and
    session (key into the keyring) lines, through pam_python; ``jit``: a
    compute node's lines with an auth line asking JIT logins for TOTP.
    Raises ConfigError for a bad option."""
    words = [f"socket={config.paths.socket}", *options]
    if mfa == "login":
        words.append("mode=login")
    elif mfa == "jit":
        words.append("mfa=jit")
    try:
        parse_options(words)
    except OptionError as exc:
        raise ConfigError(f"--pam-option: {exc}") from None
    args = " ".join(words)
    loader = module_path(config, "python")
    if mfa == "login":
        return [f"auth required pam_python.so {loader} {args}",
                f"session required pam_python.so {loader} {args}"]
    program = module_path(config, kind)
    auth = [f"auth required pam_python.so {loader} {args}"] if mfa == "jit" else []
    if kind == "exec":
        module = f"pam_exec.so stdout quiet {program}"
    elif kind == "python":
        module = f"pam_python.so {program}"
    else:
        module = str(program)
    return [*auth, f"account required {module} {args}", f"session required {module} {args}"]


def kinds_used(kind: str, mfa: str | None) -> list[str]:
    """The module files a block of *kind* (and *mfa*) needs."""
    if mfa == "login":
        return ["python"]
    return sorted({kind, "python"}) if mfa == "jit" else [kind]


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


def plan(service: str, pam_dir: Path, lines: list[str], *, mfa: str | None = None) -> PamPlan:
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
    if mfa is not None:
        result.warnings.append(
            "the TOTP line runs in the auth phase, which sshd reaches only with "
            "`KbdInteractiveAuthentication yes` and `AuthenticationMethods "
            "publickey,keyboard-interactive` in sshd_config")
        if any(line.split()[0].lstrip("-") == "auth" and "pam_unix.so" in line
               for line in others):
            result.warnings.append(
                f"{path}: pam_unix runs in this stack's auth phase (directly or through "
                "@include common-auth): with keyboard-interactive it asks for the password "
                "as well; for key plus TOTP, remove it from this service's auth lines")
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
