"""`ztgpu assess` on a live node of the real test cluster: before and after
`ztgpu install`, recorded in the node's audit trail, and read back from the
collector with `ztgpu assess --cluster`."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from conftest import needs_slurm

from ztgpu.testing.collector_process import audit_site
from ztgpu.testing.slurm_cluster import ClusterSpec, SlurmTestCluster, wait_for
from ztgpu.testing.suite_cluster import suite_cluster

pytestmark = needs_slurm


def rules(stdout: str) -> dict[str, dict[str, Any]]:
    return {f["rule"]: f for f in json.loads(stdout)["findings"]}


def test_assess_before_and_after_install_and_from_the_collector(tmp_path: Path) -> None:
    before_conf = tmp_path / "slurm.conf.before-install"
    with contextlib.ExitStack() as stack:
        sites: list[Any] = []

        def prepare(cluster: SlurmTestCluster) -> dict[str, Any]:
            # slurm.conf as it is before `ztgpu install` writes the hooks.
            shutil.copy(cluster.slurm_conf, before_conf)
            sites.append(stack.enter_context(audit_site(cluster.node)))
            return dict(sites[0].node_config)

        suite = stack.enter_context(suite_cluster(ClusterSpec(constrain_devices=True),
                                                  prepare=prepare))
        site = sites[0]
        before = suite.ztgpu("assess", "--slurm-conf", str(before_conf), "--format", "json",
                             "--fail-on", "critical", "--no-event", check=False)
        assert before.returncode == 1, before.stderr  # no hooks: critical
        found = rules(before.stdout)
        assert "Prolog=(unset)" in found["ZT102"]["evidence"], found["ZT102"]
        assert found["ZT102"]["path"] == str(before_conf)
        assert "lacks Alloc, Contain" in found["ZT103"]["evidence"]

        after = suite.ztgpu("assess", "--format", "json", "--fail-on", "critical",
                            check=False)
        assert after.returncode in (0, 1), after.stderr
        live = rules(after.stdout)
        # Hooks, flags, timeout written by install; the agent answers; the
        # events go to the collector; the harness runs without wipes.
        assert not {"ZT101", "ZT102", "ZT103", "ZT104", "ZT107", "ZT601", "ZT701"} & set(live)
        assert "wipe.mode: off" in live["ZT606"]["evidence"]
        assert "ZT605" in live  # no authd in this cluster

        event = suite.wait_event("node.assessed")
        assert {f["rule"] for f in event["findings"]} == set(live)
        assert event["outcome"] == "findings" and "ZT606" in event["reason"]
        out: list[str] = []

        def at_collector() -> bool:
            res = suite.ztgpu("assess", "--cluster", "--format", "json", *site.auditor_args,
                              check=False)
            out[:] = [res.stdout + res.stderr]
            return res.returncode in (0, 1) and suite.cluster.node in res.stdout

        wait_for(at_collector, 60, "the assessment at the collector")
        nodes = json.loads(out[0])["nodes"]
        mine = next(n for n in nodes if n["node"] == suite.cluster.node)
        assert {f["rule"] for f in mine["findings"]} == set(live)
        assert mine["event"]["hash"] == event["hash"]
        table = suite.ztgpu("assess", "--cluster", "--fail-on", "critical",
                            *site.auditor_args, check=False)
        assert suite.cluster.node in table.stdout and "ZT606" in table.stdout, table
        # The agent checks what it records: an unknown rule id is refused.
        from ztgpu.errors import InputRejected
        from ztgpu.node_client import call

        try:
            call(str(suite.config["paths"]["socket"]), "assessed", facts_sha256="0" * 64,
                 findings=[{"rule": "ZT999", "evidence": "x"}])
        except InputRejected as exc:
            assert "known rule id" in str(exc)
        else:
            raise AssertionError("an unknown rule id was recorded")
        # Only root records an assessment: a user cannot plant a clean one.
        import subprocess
        import sys

        code = ("import sys; from ztgpu.node_client import call; "
                "call(sys.argv[1], 'assessed', facts_sha256='0' * 64, findings=[])")
        planted = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", code,
                                  str(suite.config["paths"]["socket"])],
                                 capture_output=True, text=True, timeout=60, check=False,
                                 cwd="/")
        # (Here the socket itself admits only root and SlurmUser, which is root;
        # test_node_agent.py shows a non-root SlurmdUser admitted and refused this.)
        assert planted.returncode != 0, planted
        assert ("only root may record an assessment" in planted.stderr
                or "only root and the Slurm user may talk" in planted.stderr), planted.stderr
