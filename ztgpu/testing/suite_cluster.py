"""The suite installed on a private real Slurm cluster: the node agent, its
config, and the Prolog/Epilog written into slurm.conf by ``ztgpu install``.

Used by the integration tests, the demo and the benchmark. All paths the
agent writes (socket, state, spool, hooks, its devices cgroup) are private to
one run.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ztgpu.testing.slurm_cluster import ClusterError, ClusterSpec, SlurmTestCluster, slurm_cluster

#: NVML enumeration order deliberately differs from minor numbers, as it can
#: on real nodes: the suite must never assume index == minor.
SIM_INDEX_FOR_MINOR = (2, 0, 3, 1, 6, 4, 7, 5)


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def simulated_gpus(count: int) -> list[dict[str, Any]]:
    return [{"index": SIM_INDEX_FOR_MINOR[m], "minor": m,
             "uuid": f"GPU-5{m:07d}-0000-4000-8000-0000000000{m:02d}",
             "pci_bus_id": f"00000000:{0x17 + m * 0x10:02X}:00.0", "name": "Simulated H100"}
            for m in range(count)]


def agent_config(cluster: SlurmTestCluster, base: Path, **overrides: Any) -> dict[str, Any]:
    """A node-agent config whose every path is under *base*."""
    config: dict[str, Any] = {
        "node": {"name": cluster.node},
        "paths": {"socket": str(base / "run" / "noded.sock"),
                  "task_socket": str(base / "run" / "task.sock"),
                  "state_dir": str(base / "state"), "spool_dir": str(base / "spool"),
                  "device_dir": str(cluster.dev_dir), "hooks_dir": str(base / "libexec"),
                  "log_file": str(base / "noded.log")},
        "gpu": {"backend": "simulated", "simulated": simulated_gpus(cluster.spec.gpus)},
        "cgroups": {"name": f"ztgpu_test_{secrets.token_hex(4)}"},
        "isolation": {"sweep_interval_s": 0.2, "verify_interval_s": 300,
                      "drift_interval_s": 1.0},
        "slurm": {"conf": str(cluster.slurm_conf), "user": "root"},
        "noded": {"log_level": "info"},
    }
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    return config


@dataclass
class SuiteCluster:
    cluster: SlurmTestCluster
    base: Path
    config_path: Path
    config: dict[str, Any]
    agent: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> str:
        return str(self.config["paths"]["socket"])

    @property
    def cgroup_name(self) -> str:
        return str(self.config["cgroups"]["name"])

    def ztgpu(self, *args: str, check: bool = True, timeout: float = 60
              ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([_bin("ztgpu"), "--config", str(self.config_path), *args],
                             capture_output=True, text=True, timeout=timeout, check=False,
                             env=self.env)
        if check and res.returncode != 0:
            raise ClusterError(f"ztgpu {' '.join(args)} failed ({res.returncode}): "
                               f"{res.stderr.strip()}")
        return res

    def start_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            return
        with contextlib.suppress(FileNotFoundError):
            Path(self.socket).unlink()
        log = open(self.base / "noded.stdout", "ab")  # noqa: SIM115
        self.agent = subprocess.Popen([_bin("ztgpu-noded"), "--config", str(self.config_path)],
                                      stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=self.env,
                                      start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30
        while not Path(self.socket).exists():
            if self.agent.poll() is not None:
                raise ClusterError("ztgpu-noded exited at start:\n" + self.agent_log())
            if time.monotonic() > deadline:
                raise ClusterError("ztgpu-noded did not open its socket in 30s")
            time.sleep(0.05)

    def stop_agent(self, sig: int = signal.SIGTERM) -> int | None:
        if self.agent is None:
            return None
        if self.agent.poll() is None:
            self.agent.send_signal(sig)
            try:
                self.agent.wait(20)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait(5)
        code = self.agent.returncode
        self.agent = None
        return code

    def agent_log(self) -> str:
        parts = []
        for name in ("noded.stdout",):
            path = self.base / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)[-5000:]

    def call(self, op: str, **payload: Any) -> Any:
        from ztgpu.node_client import call

        return call(self.socket, op, timeout=60, **payload)

    def events(self, code: str | None = None, job_id: str | None = None) -> list[dict[str, Any]]:
        from ztgpu.spool import Spool

        with Spool.open(Path(self.config["paths"]["spool_dir"]) / "events.db",
                        str(self.config["node"]["name"])) as spool:
            return [e for e in spool.read(limit=1_000_000, code=code, job_id=job_id)]

    def wait_event(self, code: str, job_id: str | None = None, timeout: float = 30
                   ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(code, job_id)
            if found:
                return found[-1]
            time.sleep(0.1)
        raise ClusterError(f"no {code} event for job {job_id} within {timeout}s; agent log:\n"
                           + self.agent_log())


@contextlib.contextmanager
def suite_cluster(spec: ClusterSpec | None = None, *, start_agent: bool = True,
                  **overrides: Any) -> Iterator[SuiteCluster]:
    """A private cluster with the suite installed and its agent running."""
    holder: dict[str, SuiteCluster] = {}

    def install(cluster: SlurmTestCluster) -> None:
        base = cluster.root / "ztgpu"
        base.mkdir(mode=0o755)
        config = agent_config(cluster, base, **overrides)
        path = base / "ztgpu.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["ZTGPU_CONFIG"] = str(path)
        suite = SuiteCluster(cluster=cluster, base=base, config_path=path, config=config,
                             env=env)
        suite.ztgpu("install", "--slurm-conf", str(cluster.slurm_conf))
        if start_agent:
            suite.start_agent()
        holder["suite"] = suite

    with slurm_cluster(spec or ClusterSpec(), before_start=install) as cluster:
        suite = holder["suite"]
        assert suite.cluster is cluster
        try:
            yield suite
        finally:
            # Cancel jobs while the agent still runs, so Epilogs release GPUs.
            cluster.slurm(["scancel", "--full", "-u", "root"], check=False)
            for user in cluster.spec.users:
                cluster.slurm(["scancel", "-u", user], check=False)
            with contextlib.suppress(ClusterError):
                deadline = time.monotonic() + 20
                while cluster.slurm(["squeue", "-h"], check=False).strip():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            suite.stop_agent()
            _remove_own_cgroups(suite.cgroup_name)


def _remove_own_cgroups(name: str) -> None:
    from ztgpu.testing.slurm_cluster import CGROUP_ROOT, _rmdir_tree

    _rmdir_tree(CGROUP_ROOT / "devices" / name)
