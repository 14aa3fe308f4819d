"""The Ansible roles (deploy/ansible) install the suite on a pure-v2 VM over ssh.

Real parts: ansible-playbook (ansible-core), a Debian 12 VM with Slurm from
its packages (ztgpu.testing.vm_cluster: systemd, munge, slurmctld, slurmd,
cgroup v2, four fake GPUs) reached over ssh, the site PKI made here. The VM
is both the service host (authd, the collector) and the GPU node. The play
is run twice (the second changes nothing), then against a node with a
critical weakness, which fails it with the finding, and with a bad variable.
tests/test_ansible.py runs the same play against container hosts at native
speed under `make test`; this run adds what only a VM shows (Slurm's cgroup
v2 plugins, a node that is its own controller).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import HAVE_ROOT

from ztgpu.testing.ansible_play import Controller, site_variables
from ztgpu.testing.collector_process import SitePki
from ztgpu.testing.vm_cluster import NODE, VENV, VmCluster, agent_config, vm_cluster

# Two full runs of the play take about 10 minutes under software emulation:
# outside `make test`, run by `make test-deploy`.
pytestmark = [pytest.mark.skipif(not HAVE_ROOT, reason="needs root (qemu image build)"),
              pytest.mark.deploy]
CHECKOUT = Path(__file__).resolve().parent.parent
PLAYBOOK = CHECKOUT / "deploy" / "ansible" / "site.yml"
AUTHD_PORT, COLLECTOR_PORT = 8443, 8444
AUTHD = f"https://127.0.0.1:{AUTHD_PORT}"


def variables_for(base: Path, c: VmCluster) -> dict[str, Any]:
    """What the admin's machine holds for this site: PKI, wheelhouse, variables."""
    wheels = base / "wheels"
    wheels.mkdir()
    for wheel in c.vm.share.glob("ztgpu-*.whl"):
        shutil.copy2(wheel, wheels)
    variables = site_variables(base, SitePki(base / "pki"), wheels, agent_config(), node=NODE,
                               url_host="127.0.0.1", dns_name="localhost",
                               authd_port=AUTHD_PORT, collector_port=COLLECTOR_PORT)
    variables["ztgpu_restart_slurmctld"] = True  # the VM is its own controller
    return variables


class VmController(Controller):
    def __init__(self, base: Path, c: VmCluster) -> None:
        key = base / "vm.key"
        shutil.copy2(c.vm.image.key, key)
        key.chmod(0o600)
        super().__init__(base, PLAYBOOK, key, {"vm": c.vm.port},
                         {"ztgpu_services": ["vm"], "ztgpu_nodes": ["vm"]},
                         variables_for(base, c))
        self.c = c

    def play_vm(self, *args: str, **overrides: Any
                ) -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
        res, recaps = self.play(*args, **overrides)
        return res, recaps.get("vm", {})


@pytest.fixture(scope="module")
def controller() -> Iterator[VmController]:
    base = Path(tempfile.mkdtemp(prefix="ztgpu-ansible-"))
    try:
        with vm_cluster("bookworm", CHECKOUT) as c:
            yield VmController(base, c)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_play_installs_node_and_services_and_a_second_run_changes_nothing(
        controller: VmController) -> None:
    c = controller.c
    first, recap = controller.play_vm()
    assert first.returncode == 0 and recap.get("failed") == 0, first.stdout[-6000:]
    assert recap["changed"] > 0
    # What the play left: running services, the hooks in slurm.conf, the
    # suite's PAM lines, the driver options, keys 0600 owned by their users.
    for unit in ("ztgpu-noded", "ztgpu-authd", "ztgpu-collectord"):
        assert c.sh(f"systemctl is-active {unit}", check=False).stdout.strip() == "active", \
            c.sh(f"journalctl -u {unit} -n 30 --no-pager", check=False).stdout
    assert "Prolog=" in c.sh("grep -E '^(Prolog|PrologFlags)=' /etc/slurm/slurm.conf").stdout
    assert "ztgpu" in c.sh("cat /etc/pam.d/sshd").stdout
    assert "NVreg_DeviceFileMode=0600" in c.sh("cat /etc/modprobe.d/ztgpu-nvidia.conf").stdout
    modes = c.sh("stat -c '%n %a %U' /etc/ztgpu/tls/node.key /etc/ztgpu/pki/authd.key "
                 "/etc/ztgpu/pki/collector.key /etc/ztgpu/authd/kek").stdout
    assert modes.split("\n")[:4] == [
        "/etc/ztgpu/tls/node.key 600 root", "/etc/ztgpu/pki/authd.key 600 slurm",
        "/etc/ztgpu/pki/collector.key 600 ztgpu-collector", "/etc/ztgpu/authd/kek 600 slurm"]
    installed = yaml.safe_load(c.sh("cat /etc/ztgpu/ztgpu.yaml").stdout)
    assert installed["tls"]["key"] == "/etc/ztgpu/tls/node.key"
    assert installed["auth"]["authd_url"] == AUTHD
    # The node was judged at the end of the play: the agent recorded it.
    assert c.events("node.assessed"), "no node.assessed event"
    # Judged live on this pure cgroup-v2 node: its cgroup mode, hooks, PAM
    # and munge are right; what it lacks (no GPU driver, so no wipe) is named.
    judged = json.loads(c.sh(f"{VENV}/bin/ztgpu assess --format json --fail-on critical "
                             "--no-event").stdout)
    rules = {f["rule"] for f in judged["findings"]}
    assert not rules & {"ZT101", "ZT102", "ZT103", "ZT301", "ZT401", "ZT501", "ZT601"}, judged
    assert "ZT606" in rules, judged
    assert c.agent_call("ping") == {"pong": True}

    second, recap = controller.play_vm()
    assert second.returncode == 0, second.stdout[-6000:]
    assert recap.get("changed") == 0 and recap.get("failed") == 0, second.stdout[-6000:]


def test_the_play_fails_on_a_critical_finding_and_names_it(controller: VmController) -> None:
    c = controller.c
    c.sh("chmod 0644 /etc/munge/munge.key")
    try:
        # Only the assessment (tag assess; a full run takes minutes under
        # emulation and the first test showed it changes nothing).
        res, recap = controller.play_vm("--tags", "assess")
    finally:
        c.sh("chmod 0400 /etc/munge/munge.key")
    assert res.returncode != 0 and recap.get("failed") == 1, res.stdout[-6000:]
    assert "ZT501 critical munge-key-exposed" in res.stdout, res.stdout[-6000:]
    assert recap.get("changed") == 0  # judged, not changed


def test_bad_variables_stop_the_play_before_anything_is_changed(
        controller: VmController) -> None:
    res, recap = controller.play_vm("--tags", "assess", ztgpu_pam_module="pam_nonsense")
    assert res.returncode != 0 and recap.get("changed") == 0, res.stdout[-6000:]
    assert "ztgpu_pam_module one of compiled/python/exec" in res.stdout, res.stdout[-6000:]
