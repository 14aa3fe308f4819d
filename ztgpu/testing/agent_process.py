"""A real ``ztgpu-noded`` process for tests, the demo and benchmarks.

:class:`AgentProcess` runs the daemon from a config file; the standalone
flavour below needs no Slurm and serves the socket and hook tests.

Simulated GPU device nodes and every path the agent writes live under one
private directory; the agent's devices cgroup gets a unique name and is
removed afterwards. Needs root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ztgpu.testing.slurm_cluster import (
    CGROUP_ROOT,
    NVIDIA_MAJOR,
    ClusterError,
    _rmdir_tree,
    wait_for,
)

#: NVML enumeration order deliberately differs from minor numbers, as it can
#: on real nodes: the suite must never assume index == minor.
SIM_INDEX_FOR_MINOR = (2, 0, 3, 1, 6, 4, 7, 5)


#: Minors of two of the kernel's memory devices (major 1: full, random):
#: stand-ins for GPUs that really open, so a test can hold one. Not null,
#: zero or urandom: services keep those open, and the agent ends every
#: non-exempt process that holds a GPU it takes back.
OPENABLE_MAJOR = 1
OPENABLE_MINORS = (7, 8)


def gpu_minors(count: int, openable: bool = False) -> tuple[int, ...]:
    """The minors of *count* simulated GPUs: 0..count-1, or memory-device minors."""
    if openable and count > len(OPENABLE_MINORS):
        raise ValueError(f"at most {len(OPENABLE_MINORS)} openable simulated GPUs")
    return OPENABLE_MINORS[:count] if openable else tuple(range(count))


def make_gpu_nodes(dev_dir: Path, count: int, openable: bool = False) -> None:
    """Character devices nvidia<minor> for *count* GPUs and nvidiactl (195:255), mode 0666.

    The GPUs carry the NVIDIA major (195; opens reach no driver) or, with
    *openable*, the memory devices' (major 1), which really open.
    """
    dev_dir.mkdir(parents=True, exist_ok=True)
    dev_dir.chmod(0o755)
    major = OPENABLE_MAJOR if openable else NVIDIA_MAJOR
    nodes = [*((f"nvidia{m}", major, m) for m in gpu_minors(count, openable)),
             ("nvidiactl", NVIDIA_MAJOR, 255)]
    for name, node_major, minor in nodes:
        path = dev_dir / name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.mknod(path, 0o666 | 0o020000, os.makedev(node_major, minor))
        path.chmod(0o666)


def simulated_gpus(count: int, openable: bool = False) -> list[dict[str, Any]]:
    """Config entries for *count* simulated GPUs (on the minors :func:`gpu_minors` gives)."""
    return [{"index": SIM_INDEX_FOR_MINOR[pos], "minor": m,
             "uuid": f"GPU-5{m:07d}-0000-4000-8000-0000000000{m:02d}",
             "pci_bus_id": f"00000000:{0x17 + m * 0x10:02X}:00.0", "name": "Simulated H100"}
            for pos, m in enumerate(gpu_minors(count, openable))]


@dataclass
class AgentProcess:
    """A ``ztgpu-noded`` child process run from *config_path*."""

    base: Path
    config: dict[str, Any]
    config_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.config["paths"]["socket"])

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["ZTGPU_CONFIG"] = str(self.config_path)
        return env

    def start(self) -> None:
        """Start the agent (if not running) and wait for its socket."""
        if self.alive():
            return
        with contextlib.suppress(FileNotFoundError):
            Path(self.socket).unlink()
        log = open(self.base / "noded.stdout", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("ztgpu-noded")), "--config",
             str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=self.env(), start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while not Path(self.socket).exists():
            if self.proc.poll() is not None:
                raise ClusterError("ztgpu-noded exited at start:\n" + self.log())
            if time.monotonic() > deadline:
                raise ClusterError("ztgpu-noded did not open its socket in 30s")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the agent with *sig*; returns its exit code (None if not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        path = self.base / "noded.stdout"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def call(self, op: str, **payload: Any) -> Any:
        from ztgpu.node_client import call

        return call(self.socket, op, timeout=60, **payload)

    def events(self, code: str | None = None, job_id: str | None = None
               ) -> list[dict[str, Any]]:
        from ztgpu.audit.spool import Spool

        with Spool.open(Path(self.config["paths"]["spool_dir"]) / "events.db",
                        str(self.config["node"]["name"])) as spool:
            return spool.read(limit=1_000_000, code=code, job_id=job_id)

    def wait_event(self, code: str, job_id: str | None = None, timeout: float = 30
                   ) -> dict[str, Any]:
        """The latest *code* event (for *job_id*), waiting up to *timeout* for one."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = self.events(code, job_id)
            return bool(found)

        try:
            wait_for(seen, timeout, f"a {code} event for job {job_id}")
        except ClusterError as exc:
            raise ClusterError(f"{exc}; agent log:\n{self.log()}") from None
        return found[-1]


@dataclass
class StandaloneAgent(AgentProcess):
    """An agent on simulated device nodes, with no Slurm around it."""

    @property
    def dev_dir(self) -> Path:
        return Path(self.config["paths"]["device_dir"])

    @property
    def hooks_dir(self) -> Path:
        return Path(self.config["paths"]["hooks_dir"])

    def run_hook(self, hook: str, env: dict[str, str], timeout: float = 30
                 ) -> subprocess.CompletedProcess[str]:
        """Run the installed hook executable as slurmd would, with *env* only."""
        return subprocess.run([str(self.hooks_dir / hook)], env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)


@contextlib.contextmanager
def standalone_agent(base: Path, gpus: int = 4, openable: bool = False,
                     **overrides: Any) -> Iterator[StandaloneAgent]:
    from ztgpu.config import parse_config
    from ztgpu.slurm.hooks_install import write_hooks

    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    dev_dir = base / "dev"
    make_gpu_nodes(dev_dir, gpus, openable)
    config: dict[str, Any] = {
        "node": {"name": "testnode"},
        "paths": {"socket": str(base / "run" / "noded.sock"),
                  "task_socket": str(base / "run" / "task.sock"), "state_dir": str(base / "state"),
                  "spool_dir": str(base / "spool"), "device_dir": str(dev_dir),
                  "hooks_dir": str(base / "libexec")},
        "gpu": {"backend": "simulated", "simulated": simulated_gpus(gpus, openable),
                **({"simulated_major": OPENABLE_MAJOR} if openable else {})},
        "cgroups": {"name": f"ztgpu_test_{secrets.token_hex(4)}"},
        "isolation": {"sweep_interval_s": 0.2, "drift_interval_s": 0.5},
        # No libcuda here: the tests that wipe point it at the stand-in.
        "wipe": {"mode": "off"},
        "telemetry": {"metrics_listen": None},
        "slurm": {"user": "root", "bin_dir": "/nonexistent-slurm-bin",
                  "gres_conf": str(base / "gres.conf")},
    }
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    path = base / "ztgpu.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    write_hooks(parse_config(config, str(path)), dry_run=False)
    agent = StandaloneAgent(base=base, config=config, config_path=path)
    try:
        agent.start()
        yield agent
    finally:
        agent.stop()
        _rmdir_tree(CGROUP_ROOT / "devices" / str(config["cgroups"]["name"]))
