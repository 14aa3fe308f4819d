"""What ``ztgpu assess`` reads from a node, as one JSON document.

The checks (``ztgpu.assess.checks``) judge these facts and nothing else, so
a node's facts can be recorded (``ztgpu assess --record FILE``) and judged
again elsewhere (``--facts FILE``): that is how the rules are tested on
recorded good and bad configurations, and how an admin shows an auditor what
the judgement was based on. Gathering only reads: files, ``stat``, the
agent's socket, ``systemctl is-active`` and ``sshd -T``.

Every path is read under ``root`` (default ``/``), so a node image or a
copied ``/etc`` can be assessed too; the agent and the services are asked
only when ``root`` is ``/``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ztgpu.config import Config

#: Version of the facts document (a reader refuses a newer one).
FACTS_VERSION = 1
SERVICES = ("ztgpu-noded", "munge", "slurmd", "sshd")
_NVIDIA_DEVICE = re.compile(r"nvidia[0-9]+")


def gather(config: Config, *, root: Path = Path("/"), slurm_conf: Path | None = None,
           live: bool | None = None) -> dict[str, Any]:
    """Read this node's facts (``live``: also ask the agent and services;
    default: when ``root`` is ``/``)."""
    live = root == Path("/") if live is None else live
    conf_path = slurm_conf or config.slurm.conf or Path("/etc/slurm/slurm.conf")
    gres_path = (config.slurm.gres_conf if config.slurm.gres_conf is not None
                 else conf_path.with_name("gres.conf"))
    facts: dict[str, Any] = {
        "version": FACTS_VERSION,
        "node": config.node_name,
        "gathered_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "root": str(root),
        "slurm_conf": _text(root, conf_path),
        "cgroup_conf": _text(root, conf_path.with_name("cgroup.conf")),
        "gres_conf": _text(root, gres_path),
        "devices": _devices(root),
        "nvidia_params": _text(root, Path("/proc/driver/nvidia/params")),
        "modprobe": _modprobe(root),
        **_cgroup_mode(root, config),
        "pam_sshd": _text(root, Path("/etc/pam.d/sshd")),
        "sshd": _sshd(root, live),
        "munge_key": _stat(root, Path("/etc/munge/munge.key")),
        "suite": _suite(config),
        "certificates": _certificates(root, config),
        "services": _services() if live else None,
        "agent": _agent(config) if live else None,
    }
    return facts


def load(path: Path) -> dict[str, Any]:
    """Recorded facts; raises ValueError when they are not a facts document."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("version"), int):
        raise ValueError(f"{path}: not a facts document of `ztgpu assess --record`")
    if document["version"] > FACTS_VERSION:
        raise ValueError(f"{path}: facts version {document['version']} is newer than this "
                         f"ztgpu reads ({FACTS_VERSION})")
    return document


# ---- files ---------------------------------------------------------------------
def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/") if path.is_absolute() else root / path


def _text(root: Path, path: Path, limit: int = 1 << 20) -> dict[str, Any] | None:
    """``{path, text}`` of a file (None: absent); an unreadable one says why."""
    where = _under(root, path)
    try:
        with open(where, "rb") as fh:
            data = fh.read(limit)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"path": str(path), "error": exc.strerror or str(exc)}
    return {"path": str(path), "text": data.decode("utf-8", "replace")}


def _stat(root: Path, path: Path) -> dict[str, Any] | None:
    try:
        st = os.stat(_under(root, path))
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"path": str(path), "error": exc.strerror or str(exc)}
    return {"path": str(path), "mode": f"{stat.S_IMODE(st.st_mode):04o}", "uid": st.st_uid,
            "gid": st.st_gid, "owner": _user(st.st_uid)}


def _user(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _devices(root: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(glob.glob(str(_under(root, Path("/dev/nvidia*"))))):
        name = os.path.basename(path)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISCHR(st.st_mode) and root == Path("/"):
            continue
        found.append({"path": f"/dev/{name}", "gpu": bool(_NVIDIA_DEVICE.fullmatch(name)),
                      "mode": f"{stat.S_IMODE(st.st_mode):04o}", "uid": st.st_uid,
                      "gid": st.st_gid})
    return found


def _modprobe(root: Path) -> dict[str, str]:
    """The modprobe.d files that mention nvidia, by their path on the node."""
    out = {}
    for path in sorted(glob.glob(str(_under(root, Path("/etc/modprobe.d"))) + "/*.conf")):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = Path(path).read_text(encoding="utf-8")
            if "nvidia" in text.lower():
                out[f"/etc/modprobe.d/{os.path.basename(path)}"] = text
    return out


def _cgroup_mode(root: Path, config: Config) -> dict[str, str]:
    """``cgroup_mode`` (v1, v2, hybrid or unknown) and why. On the node itself,
    the agent's own detection (``cgroups.mode``, ``cgroups.root``): what it
    enforces through; under another root, what the hierarchy there shows."""
    if root == Path("/"):
        from ztgpu.noded.cgroup_layer import detect

        layer = detect(config.cgroups)
        return {"cgroup_mode": "unknown" if layer.mode == "none" else layer.mode,
                "cgroup_detail": layer.detail}
    base = _under(root, Path("/sys/fs/cgroup"))
    if (base / "cgroup.controllers").exists():
        mode = "v2"
    elif (base / "devices").is_dir():
        mode = "hybrid" if (base / "unified").is_dir() else "v1"
    else:
        mode = "unknown"
    return {"cgroup_mode": mode, "cgroup_detail": f"{base}: {mode}"}


# ---- sshd --------------------------------------------------------------------------
def _sshd(root: Path, live: bool) -> dict[str, Any] | None:
    """sshd's effective settings: ``sshd -T`` on a live node (what sshd itself
    computes, Match blocks and includes done), else sshd_config's own lines."""
    if live and shutil.which("sshd") is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            res = subprocess.run(["sshd", "-T"], capture_output=True, text=True, timeout=10,
                                 check=False)
            if res.returncode == 0:
                return {"source": "sshd -T", "settings": _sshd_settings(res.stdout)}
    config = _text(root, Path("/etc/ssh/sshd_config"))
    if config is None or "text" not in config:
        return None
    return {"source": "/etc/ssh/sshd_config", "settings": _sshd_settings(config["text"],
                                                                         first_wins=True)}


def _sshd_settings(text: str, *, first_wins: bool = False) -> dict[str, str]:
    """Keywords lower-cased; in sshd_config the first value counts (until a Match)."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        key = words[0].lower()
        if key == "match":
            break
        value = words[1].strip() if len(words) > 1 else ""
        if first_wins and key in settings:
            continue
        settings[key] = value.lower()
    return settings


# ---- the suite ------------------------------------------------------------------------
def _suite(config: Config) -> dict[str, Any]:
    from ztgpu.slurm.hooks_install import hook_path

    return {"prolog": str(hook_path("prolog", config)),
            "epilog": str(hook_path("epilog", config)),
            "authd_url": config.auth.authd_url, "collector_url": config.audit.collector_url,
            "wipe_mode": config.wipe.mode, "wipe_partitions": dict(config.wipe.partitions),
            "telemetry": config.telemetry.enabled, "socket": str(config.paths.socket)}


def _certificates(root: Path, config: Config) -> list[dict[str, Any]]:
    from cryptography import x509

    out = []
    for name, path in (("tls.cert", config.tls.cert), ("tls.ca_cert", config.tls.ca_cert),
                       ("telemetry.metrics_cert", config.telemetry.metrics_cert)):
        if path is None:
            continue
        entry: dict[str, Any] = {"name": name, "path": str(path)}
        try:
            cert = x509.load_pem_x509_certificate(_under(root, Path(path)).read_bytes())
            entry["not_after"] = cert.not_valid_after_utc.isoformat()
            entry["subject"] = cert.subject.rfc4514_string()
        except FileNotFoundError:
            if name == "tls.ca_cert" and config.tls.cert is None:
                continue  # the default CA path, with no certificate configured at all
            entry["error"] = "no such file"
        except (OSError, ValueError) as exc:
            entry["error"] = str(exc)[:200]
        out.append(entry)
    return out


def _services() -> dict[str, str]:
    states = {}
    for name in SERVICES:
        try:
            res = subprocess.run(["systemctl", "is-active", name], capture_output=True,
                                 text=True, timeout=10, check=False)
            states[name] = res.stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            states[name] = "unknown"
    return states


def _agent(config: Config) -> dict[str, Any]:
    from ztgpu.errors import ZtgpuError
    from ztgpu.node_client import call

    try:
        status = call(str(config.paths.socket), "status")
    except (ZtgpuError, OSError) as exc:
        return {"error": str(exc)[:300]}
    return {"refusing_grants": status.get("refusing_grants", []),
            "cgroups": status.get("cgroups"), "audit": status.get("audit", {}),
            "simulated": status.get("simulated"), "backend": status.get("backend")}
