"""The Ansible roles (deploy/ansible) install the suite on a real host over ssh.

Real parts: ansible-playbook (ansible-core), a Debian 12 VM with Slurm from
its packages (ztgpu.testing.vm_cluster: systemd, munge, slurmctld, slurmd,
cgroup v2, four fake GPUs) reached over ssh, the site PKI made here. The VM
is both the service host (authd, the collector) and the GPU node. The play
is run twice (the second changes nothing), then against a node with a
critical weakness, which fails it with the finding, and with a bad variable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import HAVE_ROOT

from ztgpu.testing.authd_process import DEFAULT_POLICY
from ztgpu.testing.collector_process import SitePki
from ztgpu.testing.vm_cluster import NODE, VENV, VmCluster, agent_config, vm_cluster

# Two full runs of the play take about 20 minutes under software emulation:
# outside `make test`, run by `make test-deploy`.
pytestmark = [pytest.mark.skipif(not HAVE_ROOT, reason="needs root (qemu image build)"),
              pytest.mark.deploy]
CHECKOUT = Path(__file__).resolve().parent.parent
PLAYBOOK = CHECKOUT / "deploy" / "ansible" / "site.yml"
ANSIBLE = Path(sys.executable).with_name("ansible-playbook")
AUTHD, COLLECTOR = "https://127.0.0.1:8443", "https://127.0.0.1:8444"


class Controller:
    """What the admin's machine holds: inventory, PKI, wheelhouse, variables."""

    def __init__(self, base: Path, c: VmCluster) -> None:
        self.base, self.c = base, c
        pki = SitePki(base / "pki")
        wheels = base / "wheels"
        wheels.mkdir()
        for wheel in c.vm.share.glob("ztgpu-*.whl"):
            shutil.copy2(wheel, wheels)
        authd = pki.issue("service", "authd", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        collector = pki.issue("service", "collector", dns_names=["localhost"],
                              ip_addresses=["127.0.0.1"])
        node = pki.issue("node", NODE)
        policy = base / "policy.yaml"
        policy.write_text(DEFAULT_POLICY)
        node_config = agent_config()
        node_config["auth"] = {"authd_url": AUTHD}
        node_config["audit"] = {"collector_url": COLLECTOR}
        self.variables: dict[str, Any] = {
            "ztgpu_wheelhouse": str(wheels),
            "ztgpu_tls_ca": str(pki.ca_cert),
            # the node
            "ztgpu_config": node_config, "ztgpu_tls_cert": str(node[0]),
            "ztgpu_tls_key": str(node[1]), "ztgpu_pam_module": "exec",
            "ztgpu_restart_slurmctld": True,  # the VM is its own controller
            # No NVIDIA driver in the VM and so no wipe (high): judged at critical.
            "ztgpu_assess_fail_on": "critical",
            # the services
            "ztgpu_authd_policy": str(policy),
            "ztgpu_authd_cert": str(authd[0]), "ztgpu_authd_key": str(authd[1]),
            "ztgpu_collector_cert": str(collector[0]), "ztgpu_collector_key": str(collector[1]),
            "ztgpu_authd_config": {
                "auth": {"authd_url": AUTHD}, "audit": {"collector_url": COLLECTOR},
                "paths": {"spool_dir": "/var/lib/ztgpu-authd/spool"},
                "slurm": {"bin_dir": "/usr/bin", "conf": "/etc/slurm/slurm.conf"},
                "authd": {"listen_host": "127.0.0.1", "listen_port": 8443, "name": "authd"}},
            "ztgpu_collector_config": {
                "collector": {"listen_host": "127.0.0.1", "listen_port": 8444}},
        }
        key = base / "vm.key"
        shutil.copy2(c.vm.image.key, key)
        key.chmod(0o600)
        ssh_args = ("-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                    f"-o ControlMaster=auto -o ControlPath={base}/cm.sock -o ControlPersist=600")
        (base / "inventory.ini").write_text(
            "[ztgpu_services]\nvm\n[ztgpu_nodes]\nvm\n[all:vars]\n"
            f"ansible_host=127.0.0.1\nansible_port={c.vm.port}\nansible_user=root\n"
            f"ansible_ssh_private_key_file={key}\nansible_ssh_common_args='{ssh_args}'\n"
            "ansible_python_interpreter=/usr/bin/python3\n"
            # Already root; the VM has no sudo for the play's become.
            "ansible_become=false\n")

    def play(self, *args: str, **overrides: Any
             ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        """Run site.yml (with *args*); returns the run and the VM's recap (ok,
        changed, failed...)."""
        extra = self.base / "vars.json"
        extra.write_text(json.dumps({**self.variables, **overrides}))
        env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0",
               "ANSIBLE_LOCAL_TEMP": str(self.base / "ansible-tmp"),
               "ANSIBLE_HOME": str(self.base / "ansible-home"),
               "ANSIBLE_PIPELINING": "True"}
        res = subprocess.run([str(ANSIBLE), "-i", str(self.base / "inventory.ini"),
                              "-e", f"@{extra}", *args, str(PLAYBOOK)], capture_output=True,
                             text=True, timeout=1200, env=env, check=False)
        recap = re.search(r"^vm\s+:\s+(.*)$", res.stdout, re.MULTILINE)
        counts = dict(re.findall(r"(\w+)=(\d+)", recap.group(1))) if recap else {}
        return res, {k: int(v) for k, v in counts.items()}


@pytest.fixture(scope="module")
def controller() -> Iterator[Controller]:
    base = Path(tempfile.mkdtemp(prefix="ztgpu-ansible-"))
    try:
        with vm_cluster("bookworm", CHECKOUT) as c:
            yield Controller(base, c)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_play_installs_node_and_services_and_a_second_run_changes_nothing(
        controller: Controller) -> None:
    c = controller.c
    first, recap = controller.play()
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

    second, recap = controller.play()
    assert second.returncode == 0, second.stdout[-6000:]
    assert recap.get("changed") == 0 and recap.get("failed") == 0, second.stdout[-6000:]


def test_the_play_fails_on_a_critical_finding_and_names_it(controller: Controller) -> None:
    c = controller.c
    c.sh("chmod 0644 /etc/munge/munge.key")
    try:
        # Only the assessment (tag assess; a full run takes minutes under
        # emulation and the first test showed it changes nothing).
        res, recap = controller.play("--tags", "assess")
    finally:
        c.sh("chmod 0400 /etc/munge/munge.key")
    assert res.returncode != 0 and recap.get("failed") == 1, res.stdout[-6000:]
    assert "ZT501 critical munge-key-exposed" in res.stdout, res.stdout[-6000:]
    assert recap.get("changed") == 0  # judged, not changed


def test_bad_variables_stop_the_play_before_anything_is_changed(
        controller: Controller) -> None:
    res, recap = controller.play("--tags", "assess", ztgpu_pam_module="pam_nonsense")
    assert res.returncode != 0 and recap.get("changed") == 0, res.stdout[-6000:]
    assert "ztgpu_pam_module one of compiled/python/exec" in res.stdout, res.stdout[-6000:]
