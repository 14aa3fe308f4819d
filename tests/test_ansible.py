"""The Ansible roles (deploy/ansible) install the suite on real hosts over ssh.

Real parts: ansible-playbook (ansible-core) against two Debian 12 hosts
(ztgpu.testing.systemd_hosts: containers booting systemd, reached over
their own sshd) with Debian's munge and Slurm 22.05 running from their
packaged units and one slurm.conf shared between them (/etc/slurm mounted
in both, as NFS would): ``ztsvc``, the Slurm controller and the service
host (ztgpu_services: authd and the collector; ztgpu_controller: the
suite's lines in slurm.conf and the job gate), and ``ztgpu01``, a GPU node
(ztgpu_node, with its hooks alone; four fake GPU device files). The site
PKI and the wheelhouse (containers/build's) are made here, on the
"controller". The play is run twice (the second changes nothing); the
node's events reach the collector on the other host over mTLS and a GPU job
without MFA is held by the gate with its reason; a changed variable reaches
the node and restarts only its agent, a config the agent rejects is not
installed, a node with a critical weakness fails the play with the finding,
and a bad variable stops it before anything changes.

tests/test_ansible_vm.py (``make test-deploy``) runs the same play against
the pure cgroup-v2 VM, which these hosts (read-only cgroups) cannot stand
in for.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import needs_root

from ztgpu.testing.ansible_play import Controller, site_variables, total
from ztgpu.testing.collector_process import CollectorClient, SitePki, free_port
from ztgpu.testing.slurm_cluster import wait_for
from ztgpu.testing.systemd_hosts import SystemdHost, systemd_hosts
from ztgpu.testing.vm_cluster import agent_config

pytestmark = needs_root
CHECKOUT = Path(__file__).resolve().parent.parent
PLAYBOOK = CHECKOUT / "deploy" / "ansible" / "site.yml"
SVC, NODE = "ztsvc", "ztgpu01"
VENV = "/opt/ztgpu/venv"
GATE_SOCKET = "/run/ztgpu-authd/gate.sock"
USER, USER_UID = "ztalice", 2101


def slurm_conf(ctld_port: int, slurmd_port: int) -> str:
    return "\n".join([
        "ClusterName=ansible", f"SlurmctldHost={SVC}", f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}", "AuthType=auth/munge", "SlurmUser=slurm",
        "StateSaveLocation=/var/lib/slurm/slurmctld", "SlurmdSpoolDir=/var/lib/slurm/slurmd",
        "SlurmctldPidFile=/run/slurmctld.pid", "SlurmdPidFile=/run/slurmd.pid",
        # The hosts' cgroups are read-only: Slurm tracks processes without them.
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "GresTypes=gpu", "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none",
        "SlurmctldLogFile=/var/log/slurm/slurmctld.log",
        "SlurmdLogFile=/var/log/slurm/slurmd.log",
        f"NodeName={NODE} CPUs=2 RealMemory=500 Gres=gpu:4 State=UNKNOWN",
        f"PartitionName=gpu Nodes={NODE} Default=YES MaxTime=INFINITE State=UP"]) + "\n"


def provision(svc: SystemdHost, node: SystemdHost) -> None:
    """Slurm alone, from its packaged units: the controller on svc, slurmd on
    the node, one slurm.conf (the hosts share munge's key: one image); a
    user on both."""
    for host in (svc, node):
        host.sh("mkdir -p /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm "
                "&& chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm && "
                f"useradd -m -u {USER_UID} -s /bin/sh {USER}")
    svc.write("/etc/slurm/slurm.conf", slurm_conf(free_port(), free_port()))
    svc.write("/etc/slurm/gres.conf", "Name=gpu File=/dev/nvidia[0-3]\n")
    node.sh("for m in 0 1 2 3; do mknod -m 0666 /dev/nvidia$m c 195 $m; done; "
            "mknod -m 0666 /dev/nvidiactl c 195 255")
    svc.sh("systemctl start munge slurmctld", timeout=120)
    node.sh("systemctl start munge slurmd", timeout=120)
    wait_for(lambda: svc.sh("sinfo -h -N -o %T", check=False).stdout.strip()
             in ("idle", "mixed"), 60, f"{NODE} idle in Slurm", interval=1)


@dataclass
class Site:
    controller: Controller
    svc: SystemdHost
    node: SystemdHost
    pki: SitePki
    collector_url: str


def variables_for(base: Path, pki: SitePki, wheels: Path) -> tuple[dict[str, Any], str]:
    """This site's variables; returns them and the collector's URL from here."""
    authd_port, collector_port = free_port(), free_port()
    node_config = {**agent_config(), "node": {"name": NODE}, "isolation": {}}
    variables = site_variables(base, pki, wheels, node_config, node=NODE, url_host=SVC,
                               dns_name=SVC, authd_port=authd_port,
                               collector_port=collector_port,
                               authd_extra={"gate_socket": GATE_SOCKET})
    # slurm.conf is shared: the node gets its hooks alone, the controller
    # the lines and the gate (over authd's socket on that host).
    variables.update({
        "ztgpu_slurm_conf": "", "ztgpu_gate": True,
        "ztgpu_controller_config": {"authd": {"gate_socket": GATE_SOCKET},
                                    "slurm": {"bin_dir": "/usr/bin"}}})
    return variables, f"https://127.0.0.1:{collector_port}"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    base = Path(tempfile.mkdtemp(prefix="ztgpu-ansible-"))
    try:
        key, public = base / "id_root", base / "id_root.pub"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True, timeout=30)
        public.chmod(0o644)
        wheels, etc_slurm = base / "wheels", base / "etc-slurm"
        etc_slurm.mkdir(mode=0o755)
        with systemd_hosts(CHECKOUT / "containers", [SVC, NODE], public, wheels,
                           shared=[(etc_slurm, "/etc/slurm")]) as hosts:
            provision(hosts[SVC], hosts[NODE])
            pki = SitePki(base / "pki")
            variables, collector_url = variables_for(base, pki, wheels)
            controller = Controller(
                base, PLAYBOOK, key, {name: h.port for name, h in hosts.items()},
                {"ztgpu_services": [SVC], "ztgpu_controllers": [SVC], "ztgpu_nodes": [NODE]},
                variables)
            yield Site(controller, hosts[SVC], hosts[NODE], pki, collector_url)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def active(host: SystemdHost, unit: str) -> str:
    return host.sh(f"systemctl is-active {unit}", check=False).stdout.strip()


def main_pid(host: SystemdHost, unit: str) -> str:
    return host.sh(f"systemctl show -p MainPID --value {unit}").stdout.strip()


def assessed_events(site: Site) -> list[dict[str, Any]]:
    auditor = CollectorClient(site.collector_url, site.pki.context("auditor", "carol"))
    try:
        status, body = auditor.get("/v1/events", node=NODE, code="node.assessed", limit=100)
    finally:
        auditor.close()
    assert status == 200, body
    events: list[dict[str, Any]] = body["events"]
    return events


def test_the_play_installs_services_and_node_on_their_hosts_and_a_second_run_changes_nothing(
        site: Site) -> None:
    svc, node = site.svc, site.node
    first, recaps = site.controller.play()
    assert first.returncode == 0 and total(recaps, "failed") == 0, first.stdout[-6000:]
    assert recaps[SVC]["changed"] > 0 and recaps[NODE]["changed"] > 0, recaps
    # Each host got its part and only that.
    for unit in ("ztgpu-authd", "ztgpu-collectord"):
        assert active(svc, unit) == "active", svc.sh(
            f"journalctl -u {unit} -n 30 --no-pager", check=False).stdout
        assert active(node, unit) != "active"
    assert active(node, "ztgpu-noded") == "active", node.sh(
        "journalctl -u ztgpu-noded -n 30 --no-pager", check=False).stdout
    assert active(svc, "ztgpu-noded") != "active"
    # The shared slurm.conf has the suite's lines and the gate (written on
    # the controller); the node has its hooks, the suite's PAM line, the
    # driver options, its key 0600 root's; the services' keys are 0600, each
    # its service user's.
    conf = node.sh("cat /etc/slurm/slurm.conf").stdout
    assert "PrologFlags=Alloc,Contain" in conf and "Prolog=/usr/libexec/ztgpu/prolog" in conf
    assert "PrologSlurmctld=/usr/libexec/ztgpu/prolog_slurmctld" in conf, conf
    assert svc.sh("stat -c '%U %a' /usr/libexec/ztgpu/prolog_slurmctld").stdout.split() == [
        "root", "755"]
    for hook in ("prolog", "epilog", "task_prolog"):
        assert node.sh(f"stat -c '%U %a' /usr/libexec/ztgpu/{hook}").stdout.split() == [
            "root", "755"]
    assert "ztgpu" in node.sh("cat /etc/pam.d/sshd").stdout
    assert "NVreg_DeviceFileMode=0600" in node.sh("cat /etc/modprobe.d/ztgpu-nvidia.conf").stdout
    assert node.sh("stat -c '%a %U' /etc/ztgpu/tls/node.key").stdout.split() == ["600", "root"]
    modes = svc.sh("stat -c '%n %a %U' /etc/ztgpu/pki/authd.key /etc/ztgpu/pki/collector.key "
                   "/etc/ztgpu/authd/kek").stdout.splitlines()
    assert modes == ["/etc/ztgpu/pki/authd.key 600 slurm",
                     "/etc/ztgpu/pki/collector.key 600 ztgpu-collector",
                     "/etc/ztgpu/authd/kek 600 slurm"]
    installed = yaml.safe_load(node.sh("cat /etc/ztgpu/ztgpu.yaml").stdout)
    assert installed["tls"] == {"ca_cert": "/etc/ztgpu/tls/ca.crt",
                                "cert": "/etc/ztgpu/tls/node.crt",
                                "key": "/etc/ztgpu/tls/node.key"}
    # Slurm took them: the node is up, and a GPU job without MFA is held by
    # the gate with its reason (authd, over its socket on the controller).
    wait_for(lambda: svc.sh("sinfo -h -N -o %T").stdout.strip() in ("idle", "mixed"), 60,
             f"{NODE} idle after the restarts", interval=1)
    job = svc.sh(f"runuser -u {USER} -- sbatch --parsable --gres=gpu:1 -o /dev/null "
                 "--wrap true").stdout.strip()
    wait_for(lambda: "MFA session required" in svc.sh(f"scontrol show job {job}").stdout, 60,
             f"job {job} held for MFA", interval=1)
    svc.sh(f"scancel {job}")
    # The node judged itself at the end of the play, and its agent forwarded
    # that to the collector on the other host over mTLS.
    wait_for(lambda: bool(assessed_events(site)), 60, "node.assessed at the collector",
             interval=1)
    judged = json.loads(node.sh(f"{VENV}/bin/ztgpu assess --format json --fail-on critical "
                                "--no-event").stdout)
    rules = {f["rule"] for f in judged["findings"]}
    assert not rules & {"ZT101", "ZT102", "ZT401", "ZT404", "ZT501", "ZT601", "ZT605",
                        "ZT701", "ZT702"}, judged
    # What these hosts lack is named: Slurm without cgroups, no wipe.
    assert {"ZT105", "ZT606"} <= rules, judged

    second, recaps = site.controller.play()
    assert second.returncode == 0, second.stdout[-6000:]
    assert total(recaps, "changed") == 0 and total(recaps, "failed") == 0, (
        recaps, second.stdout[-6000:])


def test_a_changed_variable_reaches_the_node_and_restarts_only_its_agent(site: Site) -> None:
    node, svc = site.node, site.svc
    before = {(h.name, u): main_pid(h, u) for h, u in (
        (node, "ztgpu-noded"), (node, "slurmd"), (svc, "ztgpu-authd"))}
    config = json.loads(json.dumps(site.controller.variables["ztgpu_config"]))
    config["isolation"] = {"sweep_interval_s": 3.0}
    res, recaps = site.controller.play(ztgpu_config=config)
    assert res.returncode == 0, res.stdout[-6000:]
    # The config file, then its handler: the agent restarted, Slurm left alone.
    assert recaps[NODE]["changed"] == 2 and recaps[SVC]["changed"] == 0, (
        recaps, res.stdout[-6000:])
    assert "RUNNING HANDLER [ztgpu_node : Restart ztgpu-noded]" in res.stdout
    assert "Restart slurmd" not in res.stdout
    installed = yaml.safe_load(node.sh("cat /etc/ztgpu/ztgpu.yaml").stdout)
    assert installed["isolation"] == {"sweep_interval_s": 3.0}
    after = {(h.name, u): main_pid(h, u) for h, u in (
        (node, "ztgpu-noded"), (node, "slurmd"), (svc, "ztgpu-authd"))}
    assert after[(NODE, "ztgpu-noded")] != before[(NODE, "ztgpu-noded")]
    assert after[(NODE, "slurmd")] == before[(NODE, "slurmd")]
    assert after[(SVC, "ztgpu-authd")] == before[(SVC, "ztgpu-authd")]
    site.controller.variables["ztgpu_config"] = config


def test_a_config_the_agent_rejects_is_not_installed(site: Site) -> None:
    node = site.node
    before = node.sh("cat /etc/ztgpu/ztgpu.yaml").stdout
    pid = main_pid(node, "ztgpu-noded")
    config = json.loads(json.dumps(site.controller.variables["ztgpu_config"]))
    config["isolation"] = {"sweep_interval_s": "often"}
    res, recaps = site.controller.play("--limit", NODE, ztgpu_config=config)
    assert res.returncode != 0 and recaps[NODE]["failed"] == 1, res.stdout[-6000:]
    assert "sweep_interval_s" in res.stdout, res.stdout[-6000:]
    # The file and the running agent are the ones before.
    assert node.sh("cat /etc/ztgpu/ztgpu.yaml").stdout == before
    time.sleep(1)
    assert main_pid(node, "ztgpu-noded") == pid and active(node, "ztgpu-noded") == "active"


def test_the_play_fails_on_a_critical_finding_and_names_it(site: Site) -> None:
    node = site.node
    node.sh("chmod 0644 /etc/munge/munge.key")
    try:
        res, recaps = site.controller.play("--tags", "assess")
    finally:
        node.sh("chmod 0400 /etc/munge/munge.key")
    assert res.returncode != 0 and recaps[NODE]["failed"] == 1, res.stdout[-6000:]
    assert "ZT501 critical munge-key-exposed" in res.stdout, res.stdout[-6000:]
    assert total(recaps, "changed") == 0  # judged, not changed


def test_bad_variables_stop_the_play_before_anything_is_changed(site: Site) -> None:
    res, recaps = site.controller.play("--limit", NODE, ztgpu_pam_module="pam_nonsense")
    assert res.returncode != 0 and total(recaps, "changed") == 0, res.stdout[-6000:]
    assert "ztgpu_pam_module one of compiled/python/exec" in res.stdout, res.stdout[-6000:]
