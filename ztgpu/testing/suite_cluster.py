"""The suite installed on a private real Slurm cluster: the node agent, its
config, and the Prolog/Epilog written into slurm.conf by ``ztgpu install``.

Used by the integration tests, the demo and the benchmark. All paths the
agent writes (socket, state, spool, hooks, its devices cgroup) are private to
one run.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ztgpu.testing.agent_process import AgentProcess, simulated_gpus
from ztgpu.testing.slurm_cluster import ClusterError, ClusterSpec, SlurmTestCluster, slurm_cluster


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
        # No libcuda here: the tests that wipe point it at the stand-in.
        "wipe": {"mode": "off"},
        # One port per test that scrapes; not the default one for all.
        "telemetry": {"metrics_listen": None},
    }
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    return config


@dataclass(kw_only=True)
class SuiteCluster(AgentProcess):
    """The agent of a private cluster, with the cluster it serves."""

    cluster: SlurmTestCluster

    @property
    def cgroup_name(self) -> str:
        return str(self.config["cgroups"]["name"])

    def ztgpu(self, *args: str, check: bool = True, timeout: float = 60
              ) -> subprocess.CompletedProcess[str]:
        """Run the ``ztgpu`` CLI against this cluster's config."""
        res = subprocess.run([str(Path(sys.executable).with_name("ztgpu")), "--config",
                              str(self.config_path), *args], capture_output=True, text=True,
                             timeout=timeout, check=False, env=self.env())
        if check and res.returncode != 0:
            raise ClusterError(f"ztgpu {' '.join(args)} failed ({res.returncode}): "
                               f"{res.stderr.strip()}")
        return res

    # The names the tests and the demo use for the agent's life cycle.
    def start_agent(self) -> None:
        self.start()

    def stop_agent(self, sig: int = signal.SIGTERM) -> int | None:
        return self.stop(sig)

    def agent_log(self) -> str:
        return self.log()


@contextlib.contextmanager
def suite_cluster(spec: ClusterSpec | None = None, *, start_agent: bool = True,
                  prepare: Callable[[SlurmTestCluster], dict[str, Any]] | None = None,
                  installed: Callable[[SuiteCluster], None] | None = None,
                  **overrides: Any) -> Iterator[SuiteCluster]:
    """A private cluster with the suite installed and its agent running.

    ``prepare(cluster)`` runs once the cluster's directories exist and before
    anything is installed; the config sections it returns are merged into
    the agent's config. ``installed(suite)`` runs after ``ztgpu install`` and
    before the Slurm daemons start (e.g. to add a PrologSlurmctld).
    """
    holder: dict[str, SuiteCluster] = {}

    def install(cluster: SlurmTestCluster) -> None:
        base = cluster.root / "ztgpu"
        base.mkdir(mode=0o755)
        extra = prepare(cluster) if prepare is not None else {}
        config = agent_config(cluster, base, **overrides)
        for section, values in extra.items():
            config.setdefault(section, {}).update(values)
        path = base / "ztgpu.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        suite = SuiteCluster(base=base, config=config, config_path=path, cluster=cluster)
        suite.ztgpu("install", "--slurm-conf", str(cluster.slurm_conf))
        if installed is not None:
            installed(suite)
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
