"""Writes the Prolog/Epilog executables that slurm.conf points at.

Each is a tiny Python script run with ``-I -S`` (isolated, no site
processing: nothing from the environment or .pth files can change what it
imports) that puts the suite's install location first on ``sys.path`` and
calls :func:`ztgpu.prolog_epilog.hook.main` with the agent socket baked in,
so the hot path reads no config file and imports no YAML.

The optional job gate (``ztgpu install --gate``) is written the same way:
a PrologSlurmctld wrapper calling :func:`ztgpu.slurm_plugins.gate.main`
with authd's URL, the controller's TLS files, the Slurm commands and the
unreachable action baked in.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

import ztgpu
from ztgpu.config import Config
from ztgpu.errors import ConfigError

HOOKS = ("prolog", "epilog", "task_prolog")
#: File name of the job gate (PrologSlurmctld) in ``paths.hooks_dir``.
GATE = "prolog_slurmctld"


def _site() -> str:
    return str(Path(ztgpu.__file__).resolve().parents[1])


def render(hook: str, config: Config, python: str = sys.executable) -> str:
    site = _site()
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
        results.append((path, write_root_file(path, render(hook, config), dry_run=dry_run)))
    return results


def gate_path(config: Config) -> Path:
    return config.paths.hooks_dir / GATE


def gate_settings(config: Config, slurm_conf: Path | None) -> dict[str, object]:
    """The arguments baked into the gate wrapper, from the config.

    ``slurm_conf`` is the file slurmctld reads (``slurm.conf`` in the config
    wins when set): the PrologSlurmctld environment has no SLURM_CONF.
    Raises ConfigError naming the keys the gate needs but the config lacks.
    """
    conf = config.slurm.conf or (Path(os.path.abspath(slurm_conf)) if slurm_conf else None)
    common: dict[str, object] = {
        "squeue": str(config.slurm.bin_dir / "squeue"),
        "scontrol": str(config.slurm.bin_dir / "scontrol"),
        "slurm_conf": str(conf) if conf is not None else None,
        "timeout_s": config.auth.request_timeout_s,
        "unreachable": config.auth.unreachable_action,
    }
    if config.authd.gate_socket is not None:
        # authd on this host: the kernel names the caller, no certificate needed.
        return {"authd_socket": str(config.authd.gate_socket), **common}
    missing = [name for name, value in (("auth.authd_url", config.auth.authd_url),
                                        ("tls.cert", config.tls.cert),
                                        ("tls.key", config.tls.key)) if value is None]
    if missing:
        raise ConfigError(
            f"the job gate needs {', '.join(missing)} set in the config (authd's URL and "
            "the controller's certificate, e.g. from "
            "`ztgpu pki issue --role controller --name slurmctld`), or authd.gate_socket "
            "when authd runs on this host")
    return {
        "authd_url": config.auth.authd_url,
        "ca_cert": str(config.tls.ca_cert),
        "cert": str(config.tls.cert),
        "key": str(config.tls.key),
        **common,
    }


def render_gate(config: Config, slurm_conf: Path | None,
                python: str = sys.executable) -> str:
    """The PrologSlurmctld wrapper's text. Raises ConfigError as gate_settings does."""
    args = "".join(f"    {name}={value!r},\n"
                   for name, value in gate_settings(config, slurm_conf).items())
    return (
        f"#!{python} -IS\n"
        "# ztgpu job gate (PrologSlurmctld): written by `ztgpu install --gate`; rerun it\n"
        "# instead of editing. Runs as SlurmUser, which must be able to read the key.\n"
        "import sys\n"
        f"sys.path.insert(0, {_site()!r})\n"
        "from ztgpu.slurm_plugins.gate import main\n"
        "sys.exit(main(\n"
        f"{args}"
        "))\n"
    )


def write_gate(config: Config, slurm_conf: Path | None, *,
               dry_run: bool) -> tuple[Path, bool]:
    """Write the gate wrapper (0755, atomically); returns (path, changed)."""
    path = gate_path(config)
    return path, write_root_file(path, render_gate(config, slurm_conf), dry_run=dry_run)


def write_root_file(path: Path, text: str | bytes, *, dry_run: bool, mode: int = 0o755) -> bool:
    """Make ``path`` a root-owned file (0755 unless *mode* says otherwise)
    holding ``text`` (or bytes, e.g. a compiled module); returns whether it
    changed."""
    data = text.encode() if isinstance(text, str) else text
    try:
        st = os.lstat(path)
        changed = (not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != mode
                   or st.st_uid != os.geteuid() or path.read_bytes() != data)
    except FileNotFoundError:
        changed = True
    if changed and not dry_run:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    return changed


#: File name Slurm's cli_filter/lua plugin reads, beside slurm.conf.
CLI_FILTER = "cli_filter.lua"


def render_cli_filter(config_file: Path | None, python: str = sys.executable) -> str:
    """The Lua cli_filter: after each sbatch/salloc/srun submission it runs
    ``ztgpu job bind JOB`` as the submitting user, so the job is bound to
    this login session's MFA key (authd's ``mfa_binding: login_session``)."""
    ztgpu = str(Path(python).with_name("ztgpu"))
    config = f" --config {config_file}" if config_file is not None else ""
    return (
        "-- ztgpu cli_filter: written by `ztgpu install --cli-filter`; rerun it instead of\n"
        "-- editing. Binds every job to the login session that submitted it.\n"
        f"local ZTGPU = {_lua_string(ztgpu + config)}\n"
        "function slurm_cli_setup_defaults(options, early_pass)\n"
        "    return slurm.SUCCESS\n"
        "end\n"
        "function slurm_cli_pre_submit(options, pack_offset)\n"
        "    return slurm.SUCCESS\n"
        "end\n"
        "function slurm_cli_post_submit(offset, job_id, step_id)\n"
        "    local id = tonumber(job_id)\n"
        "    if id ~= nil and offset == 0 then\n"
        "        -- A failure is the job's to report: the gate holds an unbound job.\n"
        "        os.execute(ZTGPU .. \" job bind --quiet \" .. string.format(\"%d\", id))\n"
        "    end\n"
        "    return slurm.SUCCESS\n"
        "end\n"
    )


def _lua_string(text: str) -> str:
    if any(c in text for c in "\"\\\n'$`") or not text.isprintable():
        raise ConfigError(f"{text!r} cannot be written into the cli_filter")
    return f'"{text}"'


def write_cli_filter(slurm_conf: Path, config_file: Path | None, *,
                     dry_run: bool) -> tuple[Path, bool]:
    """Write cli_filter.lua beside *slurm_conf* (0644); returns (path, changed)."""
    path = slurm_conf.parent / CLI_FILTER
    return path, write_root_file(path, render_cli_filter(config_file), dry_run=dry_run,
                                 mode=0o644)
