"""``ansible-playbook`` with deploy/ansible/site.yml, as an admin's controller runs it.

:class:`Controller` holds what the admin's machine does: an inventory of
hosts reached over ssh (each a port on 127.0.0.1: qemu's forward or a
container's own sshd), root's key for them, the site's variables. Each
:meth:`Controller.play` writes the variables to a file (``-e @file``: the
keys' paths, never their contents, are on the command line) and returns the
run with every host's recap (ok, changed, failed...).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ANSIBLE = Path(sys.executable).with_name("ansible-playbook")


class Controller:
    def __init__(self, base: Path, playbook: Path, key: Path, hosts: Mapping[str, int],
                 groups: Mapping[str, Sequence[str]], variables: Mapping[str, Any]) -> None:
        """*hosts*: inventory name -> ssh port on 127.0.0.1; *groups*: group ->
        its hosts; *key*: root's private key on every host."""
        self.base, self.playbook, self.key = base, playbook, key
        self.hosts = dict(hosts)
        self.variables: dict[str, Any] = dict(variables)
        ssh_args = ("-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                    f"-o ControlMaster=auto -o ControlPath={base}/cm-%p.sock "
                    "-o ControlPersist=600")
        lines = [f"{name} ansible_port={port}" for name, port in self.hosts.items()]
        for group, members in groups.items():
            lines += [f"[{group}]", *members]
        lines += [
            "[all:vars]", "ansible_host=127.0.0.1", "ansible_user=root",
            f"ansible_ssh_private_key_file={key}", f"ansible_ssh_common_args='{ssh_args}'",
            "ansible_python_interpreter=/usr/bin/python3",
            # Already root; the hosts have no sudo for the play's become.
            "ansible_become=false"]
        (base / "inventory.ini").write_text("\n".join(lines) + "\n")

    def play(self, *args: str, **overrides: Any
             ) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, int]]]:
        """Run the playbook (with *args*, the variables updated by
        *overrides*); returns the run and each host's recap."""
        extra = self.base / "vars.json"
        extra.write_text(json.dumps({**self.variables, **overrides}))
        env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0",
               "ANSIBLE_LOCAL_TEMP": str(self.base / "ansible-tmp"),
               "ANSIBLE_HOME": str(self.base / "ansible-home"),
               "ANSIBLE_PIPELINING": "True"}
        res = subprocess.run([str(ANSIBLE), "-i", str(self.base / "inventory.ini"),
                              "-e", f"@{extra}", *args, str(self.playbook)],
                             capture_output=True, text=True, timeout=1500, env=env,
                             check=False)
        recaps: dict[str, dict[str, int]] = {}
        for name in self.hosts:
            found = re.search(rf"^{re.escape(name)}\s+:\s+(.*)$", res.stdout, re.MULTILINE)
            if found:
                recaps[name] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", found.group(1))}
        return res, recaps


def total(recaps: Mapping[str, Mapping[str, int]], what: str) -> int:
    """*what* (changed, failed...) summed over the hosts' recaps."""
    return sum(recap.get(what, 0) for recap in recaps.values())


def site_variables(base: Path, pki: Any, wheels: Path, node_config: Mapping[str, Any], *,
                   node: str, url_host: str, dns_name: str, authd_port: int,
                   collector_port: int, authd_extra: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The variables an admin writes for a site: authd and the collector on
    ports *authd_port*/*collector_port* of a host reached as *url_host*
    (certificates for *dns_name* and 127.0.0.1, from *pki*, a
    :class:`~ztgpu.testing.collector_process.SitePki`), the test policy, and
    GPU node *node* running *node_config* pointed at them. The node's PAM
    module is the exec form and, with no NVIDIA driver (so no wipe, high),
    the play fails at critical. *authd_extra* adds to authd's ``authd:``."""
    from ztgpu.testing.authd_process import DEFAULT_POLICY

    authd_url = f"https://{url_host}:{authd_port}"
    collector_url = f"https://{url_host}:{collector_port}"
    authd = pki.issue("service", "authd", dns_names=[dns_name], ip_addresses=["127.0.0.1"])
    collector = pki.issue("service", "collector", dns_names=[dns_name],
                          ip_addresses=["127.0.0.1"])
    node_cert, node_key = pki.issue("node", node)
    policy = base / "policy.yaml"
    policy.write_text(DEFAULT_POLICY)
    return {
        "ztgpu_wheelhouse": str(wheels),
        "ztgpu_tls_ca": str(pki.ca_cert),
        # the node
        "ztgpu_config": {**node_config, "auth": {"authd_url": authd_url},
                         "audit": {"collector_url": collector_url}},
        "ztgpu_tls_cert": str(node_cert), "ztgpu_tls_key": str(node_key),
        "ztgpu_pam_module": "exec", "ztgpu_assess_fail_on": "critical",
        # the services
        "ztgpu_authd_policy": str(policy),
        "ztgpu_authd_cert": str(authd[0]), "ztgpu_authd_key": str(authd[1]),
        "ztgpu_collector_cert": str(collector[0]), "ztgpu_collector_key": str(collector[1]),
        "ztgpu_authd_config": {
            "auth": {"authd_url": authd_url}, "audit": {"collector_url": collector_url},
            "paths": {"spool_dir": "/var/lib/ztgpu-authd/spool"},
            "slurm": {"bin_dir": "/usr/bin", "conf": "/etc/slurm/slurm.conf"},
            "authd": {"listen_host": "127.0.0.1", "listen_port": authd_port, "name": "authd",
                      **(authd_extra or {})}},
        "ztgpu_collector_config": {
            "collector": {"listen_host": "127.0.0.1", "listen_port": collector_port}},
    }
