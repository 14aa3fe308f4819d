"""A one-node Slurm cluster with the suite inside a pure-v2 VM (``vm.VirtualNode``).

Set up as the README tells an admin: the Debian packages' systemd units for
munge, slurmctld and slurmd, /etc/slurm, the suite from a wheel into
/opt/ztgpu/venv, /etc/ztgpu/ztgpu.yaml, the shipped ztgpu-noded unit, then
``ztgpu install --slurm-conf /etc/slurm/slurm.conf``. Four fake GPUs
(/dev/nvidia0-3, 195:N, and nvidiactl) come from a tmpfiles.d rule in the
image. The tests drive it from the host over ssh, with the methods below
mirroring :class:`ztgpu.testing.slurm_cluster.SlurmTestCluster`.

It starts as Slurm alone (for the side-by-side comparison);
``install_suite`` then adds the suite to the running node.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ztgpu.testing import gpu_probe
from ztgpu.testing.authd_process import CodeSource, secret_from_uri
from ztgpu.testing.slurm_cluster import ClusterError
from ztgpu.testing.vm import VirtualNode, virtual_node

NODE = "ztgpu-vm"
USERS = ("ztalice", "ztbob", "ztcarol")
VENV = "/opt/ztgpu/venv"
WORK = "/srv/ztgpu-work"  # world-readable: the probe script and the go/end flags
AUTHD_PORT = 8443
GATE_SOCKET = "/run/ztgpu-authd/gate.sock"


def slurm_conf() -> str:
    lines = [
        "ClusterName=vm", f"SlurmctldHost={NODE}", "AuthType=auth/munge",
        "SlurmUser=slurm", "SlurmdUser=root",
        "StateSaveLocation=/var/lib/slurm/slurmctld", "SlurmdSpoolDir=/var/lib/slurm/slurmd",
        "SlurmctldPidFile=/run/slurmctld.pid", "SlurmdPidFile=/run/slurmd.pid",
        "ProctrackType=proctrack/cgroup", "TaskPlugin=task/cgroup,task/affinity",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "GresTypes=gpu", "DefMemPerCPU=100", "MaxJobCount=10000", "ReturnToService=2",
        "SlurmctldTimeout=30", "SlurmdTimeout=60", "InactiveLimit=0", "KillWait=5",
        "MinJobAge=30", "SchedulerType=sched/backfill", "JobAcctGatherType=jobacct_gather/none",
        "SlurmctldLogFile=/var/log/slurm/slurmctld.log",
        "SlurmdLogFile=/var/log/slurm/slurmd.log", "SlurmdDebug=info",
        f"NodeName={NODE} CPUs=2 RealMemory=900 Gres=gpu:4 State=UNKNOWN",
        f"PartitionName=gpu Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def agent_config() -> dict[str, Any]:
    return {
        "node": {"name": NODE},
        "gpu": {"backend": "simulated",
                "simulated": [{"index": m, "minor": m, "name": "Simulated H100",
                               "uuid": f"GPU-7{m:07d}-0000-4000-8000-0000000000{m:02d}",
                               "pci_bus_id": f"00000000:{0x17 + m * 0x10:02X}:00.0"}
                              for m in range(4)]},
        "slurm": {"gres_conf": "/etc/slurm/gres.conf", "bin_dir": "/usr/bin"},
        # A probe forks a helper into the job's cgroup; under software
        # emulation that alone can take seconds, beyond the 5 s default.
        "isolation": {"sweep_interval_s": 0.2, "probe_timeout_s": 20},
        "wipe": {"mode": "off"},  # no libcuda in the VM
        # Under software emulation the sampling thread's rounds compete with
        # the isolation probes' 5 s budget; the VM tests are about cgroup v2.
        "telemetry": {"metrics_listen": None, "enabled": False},
    }


@dataclass
class VmCluster:
    vm: VirtualNode
    constrain_devices: bool
    with_suite: bool
    codename: str
    codes: CodeSource = field(default_factory=CodeSource)

    # ---- running commands ---------------------------------------------
    def sh(self, command: str, *, timeout: float = 120, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
        return self.vm.ssh(command, timeout=timeout, check=check)

    def slurm(self, argv: Sequence[str], *, user: str | None = None, check: bool = True,
              timeout: float = 60) -> str:
        command = shlex.join(argv)
        if user is not None:
            command = f"runuser -u {user} -- {command}"
        return self.sh(command, timeout=timeout, check=check).stdout

    def agent_call(self, op: str, **payload: Any) -> Any:
        code = ("import json, sys; from ztgpu.node_client import call; "
                "print(json.dumps(call('/run/ztgpu/noded.sock', sys.argv[1], timeout=60, "
                "**json.loads(sys.argv[2]))))")
        out = self.sh(f"{VENV}/bin/python -c {shlex.quote(code)} {shlex.quote(op)} "
                      f"{shlex.quote(json.dumps(payload))}", timeout=120).stdout
        return json.loads(out)

    def ztgpu(self, *args: str, check: bool = True, timeout: float = 180
              ) -> subprocess.CompletedProcess[str]:
        return self.sh(f"{VENV}/bin/ztgpu {shlex.join(args)}", timeout=timeout, check=check)

    def events(self, code: str, job_id: str | None = None) -> list[dict[str, Any]]:
        out = self.ztgpu("audit", "tail", "--local", "--json", "-n", "100000").stdout
        found = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [e for e in found if e.get("code") == code and job_id in (None, e.get("job_id"))]

    # ---- jobs ------------------------------------------------------------
    def sbatch(self, user: str, script: str, *, gpus: int = 1, extra: Sequence[str] = ()
               ) -> str:
        name = f"{WORK}/job-{time.monotonic_ns()}.sh"
        self.vm.ssh(f"cat > {name} && chmod 0755 {name}", input_text=script)
        argv = ["sbatch", "--parsable", f"--gres=gpu:{gpus}" if gpus else "--gres=none",
                "-o", f"{WORK}/out-%j.txt", "-D", WORK, *extra, name]
        return self.slurm(argv, user=user).strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        out = self.slurm(["scontrol", "-o", "show", "job", job_id], check=False)
        for token in out.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        return "GONE"

    def wait_job(self, job_id: str, states: Sequence[str], timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(1)
        raise ClusterError(f"job {job_id} is {state}, not {'/'.join(states)}, after "
                           f"{timeout:.0f} s; slurmd log:\n{self.log('slurmd')}")

    def output(self, job_id: str) -> str:
        return self.sh(f"cat {WORK}/out-{job_id}.txt", check=False).stdout

    def flag(self, name: str) -> None:
        self.sh(f"touch {WORK}/{name}")

    def node_state(self) -> str:
        return self.slurm(["sinfo", "-h", "-N", "-o", "%T"]).strip()

    def log(self, which: str, lines: int = 40) -> str:
        return self.sh(f"tail -n {lines} /var/log/slurm/{which}.log; "
                       f"journalctl -q -n {lines} -u ztgpu-noded --no-pager", check=False).stdout

    # ---- setup -------------------------------------------------------------
    def provision(self) -> None:
        """Slurm alone, from its packaged systemd units."""
        steps = [
            *(f"id {u} >/dev/null 2>&1 || useradd -m -s /bin/sh {u}" for u in USERS),
            "mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "
            f"/var/log/slurm /etc/ztgpu {WORK}",
            "chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm",
            f"chmod 1777 {WORK}",
            f"cp /mnt/share/probe.py {WORK}/probe.py && chmod 0644 {WORK}/probe.py",
            "cp /mnt/share/slurm.conf /etc/slurm/slurm.conf",
            "echo 'Name=gpu File=/dev/nvidia[0-3]' > /etc/slurm/gres.conf",
            "systemctl unmask munge slurmctld slurmd && systemctl start munge",
        ]
        for step in steps:
            self.sh(step, timeout=300)
        self.set_constrain_devices(self.constrain_devices, restart_controller=True)

    def set_constrain_devices(self, on: bool, *, restart_controller: bool = False) -> None:
        """cgroup.conf's ConstrainDevices, then slurmd (and slurmctld) restarted."""
        current = self.sh("cat /etc/slurm/cgroup.conf", check=False).stdout
        conf = f"CgroupPlugin=cgroup/v2\nConstrainDevices={'yes' if on else 'no'}\n"
        if current == conf and not restart_controller:
            return
        self.sh(f"printf %s {shlex.quote(conf)} > /etc/slurm/cgroup.conf")
        self.constrain_devices = on
        if restart_controller:
            self.sh("systemctl restart slurmctld", timeout=180)
        self.sh("systemctl restart slurmd", timeout=180)
        self.wait_idle()

    def wait_idle(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.node_state() not in ("idle", "mixed"):
            if time.monotonic() > deadline:
                raise ClusterError(f"node is {self.node_state()}:\n{self.log('slurmd')}")
            self.slurm(["scontrol", "update", f"NodeName={NODE}", "State=RESUME"], check=False)
            time.sleep(2)

    def install_suite(self) -> None:
        """The suite as the README installs it; then slurmctld and slurmd restarted."""
        wheel = self.sh("ls /mnt/share/").stdout.split()
        name = next(w for w in wheel if w.startswith("ztgpu-") and w.endswith(".whl"))
        for step in (
            f"{VENV}/bin/pip install -q --no-deps --no-index --force-reinstall /mnt/share/{name}",
            "cp /mnt/share/ztgpu.yaml /etc/ztgpu/ztgpu.yaml",
            f"{VENV}/bin/ztgpu config check",
            "cp /mnt/share/ztgpu-noded.service /etc/systemd/system/",
            "systemctl daemon-reload && systemctl enable --now ztgpu-noded",
            f"{VENV}/bin/ztgpu install --slurm-conf /etc/slurm/slurm.conf",
        ):
            self.sh(step, timeout=300)
        self.with_suite = True
        self.set_constrain_devices(self.constrain_devices, restart_controller=True)

    # ---- MFA: authd on this "controller", the job gate ---------------------
    def install_authd(self, policy: str) -> None:
        """authd from its shipped unit (as SlurmUser, SQLite, the site PKI made
        on the host), the node agent asking it for grants, and the job gate
        (``ztgpu install --gate``, over authd's gate socket as the README says
        for authd on the controller host); root enrolled as the first admin."""
        from ztgpu.testing.collector_process import SitePki

        pki_dir = self.vm.share / "pki"
        pki = SitePki(pki_dir)
        authd_cert, authd_key = pki.issue("service", "authd", dns_names=["localhost"],
                                          ip_addresses=["127.0.0.1"])
        node_cert, node_key = pki.issue("node", NODE)
        share = "/mnt/share/pki"
        rel = {path: f"{share}/{path.relative_to(pki_dir)}"
               for path in (pki.ca_cert, authd_cert, authd_key, node_cert, node_key)}
        for path in pki_dir.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (self.vm.share / "policy.yaml").write_text(policy)
        (self.vm.share / "policy.yaml").chmod(0o644)
        url = f"https://127.0.0.1:{AUTHD_PORT}"
        authd_config = {
            "tls": {"ca_cert": "/etc/ztgpu/pki/ca.crt", "cert": "/etc/ztgpu/pki/authd.crt",
                    "key": "/etc/ztgpu/pki/authd.key"},
            "auth": {"authd_url": url},
            "paths": {"spool_dir": "/var/lib/ztgpu-authd/spool"},
            "slurm": {"bin_dir": "/usr/bin", "conf": "/etc/slurm/slurm.conf"},
            "authd": {"listen_host": "127.0.0.1", "listen_port": AUTHD_PORT,
                      "store": "sqlite", "sqlite_path": "/var/lib/ztgpu-authd/authd.db",
                      "kek_file": "/etc/ztgpu/authd/kek",
                      "policy_file": "/etc/ztgpu/policy.yaml",
                      "gate_socket": GATE_SOCKET},
        }
        node_config = agent_config()
        node_config["auth"] = {"authd_url": url, "revocation_poll_s": 0.5}
        node_config["tls"] = {"ca_cert": "/etc/ztgpu/pki/ca.crt",
                              "cert": "/etc/ztgpu/pki/node.crt",
                              "key": "/etc/ztgpu/pki/node.key"}
        node_config["authd"] = {"gate_socket": GATE_SOCKET}
        login_config = {"auth": {"authd_url": url}, "tls": {"ca_cert": "/etc/ztgpu/pki/ca.crt"}}
        for name, values in (("authd.yaml", authd_config), ("ztgpu.yaml", node_config),
                             ("login.yaml", login_config)):
            (self.vm.share / name).write_text(yaml.safe_dump(values, sort_keys=False))
            (self.vm.share / name).chmod(0o644)
        ztgpu = f"{VENV}/bin/ztgpu"
        as_authd = "runuser -u slurm -- env ZTGPU_CONFIG=/etc/ztgpu/authd.yaml"
        for step in (
            "install -d -m 0755 /etc/ztgpu/pki",
            f"install -m 0644 {rel[pki.ca_cert]} /etc/ztgpu/pki/ca.crt",
            f"install -m 0644 {rel[authd_cert]} /etc/ztgpu/pki/authd.crt",
            f"install -m 0600 -o slurm {rel[authd_key]} /etc/ztgpu/pki/authd.key",
            f"install -m 0644 {rel[node_cert]} /etc/ztgpu/pki/node.crt",
            f"install -m 0600 {rel[node_key]} /etc/ztgpu/pki/node.key",
            "install -m 0644 /mnt/share/policy.yaml /etc/ztgpu/policy.yaml",
            "install -m 0644 /mnt/share/authd.yaml /mnt/share/login.yaml /etc/ztgpu/",
            "install -d -m 0700 -o slurm /etc/ztgpu/authd /var/lib/ztgpu-authd",
            f"ZTGPU_CONFIG=/etc/ztgpu/authd.yaml {ztgpu} admin kek init --owner slurm",
            "cp /mnt/share/ztgpu-authd.service /etc/systemd/system/",
            "mkdir -p /etc/systemd/system/ztgpu-authd.service.d && printf "
            "'[Service]\\nEnvironment=ZTGPU_CONFIG=/etc/ztgpu/authd.yaml\\n' "
            "> /etc/systemd/system/ztgpu-authd.service.d/config.conf",
        ):
            self.sh(step, timeout=120)
        enrolled = self.sh(f"{as_authd} {ztgpu} admin enroll root --local", timeout=120).stdout
        uri = re.search(r"otpauth://\S+", enrolled)
        if uri is None:
            raise ClusterError(f"bootstrap enrolment printed no otpauth URI:\n{enrolled}")
        self.codes.secrets["root"] = secret_from_uri(uri.group(0))
        for step in (
            "systemctl daemon-reload && systemctl enable --now ztgpu-authd",
            "cp /mnt/share/ztgpu.yaml /etc/ztgpu/ztgpu.yaml",
            f"{ztgpu} config check",
            "systemctl restart ztgpu-noded",
            f"{ztgpu} install --gate --slurm-conf /etc/slurm/slurm.conf",
        ):
            self.sh(step, timeout=180)
        self.set_constrain_devices(self.constrain_devices, restart_controller=True)

    def ztgpu_as(self, user: str, *args: str, stdin: str = "", check: bool = False
                 ) -> subprocess.CompletedProcess[str]:
        """``ztgpu`` run by ``user`` with the login config (as on a login node)."""
        command = (f"runuser -u {user} -- {VENV}/bin/ztgpu --config /etc/ztgpu/login.yaml "
                   f"{shlex.join(args)}")
        return self.vm.ssh(command, timeout=120, check=check, input_text=stdin)

    def login(self, user: str) -> subprocess.CompletedProcess[str]:
        return self.ztgpu_as(user, "login", "--code-stdin", stdin=self.codes.code(user) + "\n")

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ztgpu admin ...`` as root after a fresh root login."""
        done = self.login("root")
        if done.returncode != 0:
            return done
        return self.ztgpu_as("root", "admin", *args)

    def enroll(self, user: str) -> None:
        done = self.admin("enroll", user)
        uri = re.search(r"otpauth://\S+", done.stdout)
        if done.returncode != 0 or uri is None:
            raise ClusterError(f"enrolling {user} failed: {done.stderr}{done.stdout}")
        self.codes.secrets[user] = secret_from_uri(uri.group(0))


def prepare_share(checkout: Path, share: Path) -> None:
    """What the VM reads from the host: the suite's wheel, its config and unit,
    slurm.conf, the job-side probe."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(share), str(checkout)],
                   check=True, timeout=600, capture_output=True)
    (share / "slurm.conf").write_text(slurm_conf())
    (share / "ztgpu.yaml").write_text(yaml.safe_dump(agent_config(), sort_keys=False))
    for unit in ("ztgpu-noded.service", "ztgpu-authd.service"):
        shutil.copy2(checkout / "configs" / unit, share)
    gpu_probe.install_probe(share)
    for path in share.iterdir():
        path.chmod(0o644)
    share.chmod(0o755)


@contextmanager
def vm_cluster(codename: str, checkout: Path, *, constrain_devices: bool = True
               ) -> Iterator[VmCluster]:
    """A booted VM running Slurm alone; ``install_suite`` adds the suite."""
    share = Path(tempfile.mkdtemp(prefix="ztgpu-vm-share-"))
    try:
        prepare_share(checkout, share)
        with virtual_node(codename, share, checkout / "pyproject.toml") as node:
            cluster = VmCluster(vm=node, constrain_devices=constrain_devices,
                                with_suite=False, codename=codename)
            cluster.provision()
            yield cluster
    finally:
        shutil.rmtree(share, ignore_errors=True)
