"""Hosts for the Ansible roles' tests: Debian 12 containers that boot systemd.

Each container runs systemd as its PID 1 (with CAP_SYS_ADMIN, a cgroup
namespace of its own and the host's cgroups read-only), sshd on a port of its
own, munge and Debian's Slurm 22.05 packages, and nothing of the suite: what
an admin's freshly imaged host holds before the role runs. They share the
host's network (the private :class:`~ztgpu.testing.containers.DockerDaemon`
has no bridge), so each one's name is 127.0.0.1 to all of them and every
daemon in them needs a port of its own. They are built from the base image
``containers/build`` makes and are removed with their daemon afterwards; the
image's layers stay in the tests' docker cache.

Unlike the qemu VMs (ztgpu.testing.vm) they run at native speed, which puts
two full plays of the roles within a minute or two; what they cannot show
(cgroup enforcement: their cgroup view is read-only) the VM run of the same
roles does (tests/test_ansible.py, ``make test-deploy``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ztgpu.testing.collector_process import free_port
from ztgpu.testing.containers import DockerDaemon, listening
from ztgpu.testing.slurm_cluster import ClusterError, wait_for

IMAGE = "ztgpu-testhost:bookworm"
#: What the hosts have before the role runs. No recommends: nothing that would
#: act on the host from a shared network (no timesyncd, no networkd, no udev).
DOCKERFILE = """\
ARG BASE=ztgpu-base:bookworm
FROM ${BASE}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
      systemd systemd-sysv dbus openssh-server python3 python3-venv munge \\
      slurmctld slurmd slurm-client ca-certificates \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \\
 && systemctl mask getty@.service console-getty.service systemd-logind.service \\
 && systemctl disable munge slurmctld slurmd
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
"""


@dataclass
class SystemdHost:
    """One running container: *name* is its hostname, *port* its sshd's."""

    name: str
    port: int
    container: str
    daemon: DockerDaemon

    def sh(self, command: str, *, timeout: float = 120, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
        """Run *command* as root in the host (``docker exec``, not the play's ssh)."""
        res = self.daemon.run("exec", self.container, "sh", "-c", command, check=False,
                              timeout=timeout)
        if check and res.returncode != 0:
            raise ClusterError(f"{self.name}: {command}: rc={res.returncode}\n"
                               f"{(res.stdout + res.stderr)[-3000:]}")
        return res

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        res = self.daemon.run("exec", "-i", self.container, "sh", "-c",
                              f"umask 077 && cat > {path} && chmod {mode} {path}",
                              check=False, stdin=text)
        if res.returncode != 0:
            raise ClusterError(f"{self.name}: writing {path}: {res.stderr[-2000:]}")


def _start(daemon: DockerDaemon, base: Path, name: str, names: Sequence[str],
           public_key: Path, shared: Sequence[tuple[Path, str]]) -> SystemdHost:
    port = free_port()
    sshd = base / f"{name}-sshd.conf"
    sshd.write_text(f"Port {port}\nListenAddress 127.0.0.1\n"
                    "PermitRootLogin prohibit-password\nPasswordAuthentication no\n")
    sshd.chmod(0o644)
    hosts = [arg for other in names for arg in ("--add-host", f"{other}:127.0.0.1")]
    mounts = [arg for path, at in shared for arg in ("-v", f"{path}:{at}")]
    container = f"ztgpu-testhost-{name}-{port}"
    daemon.run("run", "--detach", "--name", container, "--hostname", name,
               "--cap-add", "SYS_ADMIN", "--cgroupns", "private", "--network", "host",
               "--tmpfs", "/run", "--tmpfs", "/run/lock", *hosts, *mounts,
               "-v", f"{sshd}:/etc/ssh/sshd_config.d/10-tests.conf:ro",
               "-v", f"{public_key}:/root/.ssh/authorized_keys:ro", IMAGE, timeout=120)
    host = SystemdHost(name=name, port=port, container=container, daemon=daemon)
    try:
        wait_for(lambda: listening(port), 60, f"{name}'s sshd", interval=0.5)
        host.sh("systemctl is-system-running --wait >/dev/null || true", timeout=120)
    except ClusterError as exc:
        logs = daemon.run("logs", "--tail", "40", container, check=False)
        raise ClusterError(f"{exc}\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}") from None
    return host


@contextlib.contextmanager
def systemd_hosts(containers: Path, names: Sequence[str], public_key: Path,
                  wheelhouse: Path, shared: Sequence[tuple[Path, str]] = ()
                  ) -> Iterator[dict[str, SystemdHost]]:
    """Build the suite's images (keeping their wheels in *wheelhouse*: what
    the role installs from) and the hosts' image, start one host per name
    (root's ssh key: *public_key*; each (directory, path) of *shared* mounted
    in all of them, as NFS would); remove them all afterwards."""
    base = Path(tempfile.mkdtemp(prefix="ztgpu-hosts-"))
    base.chmod(0o755)
    daemon = DockerDaemon(base / "docker")
    started: list[SystemdHost] = []
    try:
        daemon.start()
        daemon.build_images(containers, wheelhouse=wheelhouse)
        context = base / "image"
        context.mkdir()
        (context / "Dockerfile").write_text(DOCKERFILE)
        daemon.run("build", "-q", "--network", "host", "-t", IMAGE, str(context),
                   timeout=900)
        for name in names:
            started.append(_start(daemon, base, name, names, public_key, shared))
        yield {host.name: host for host in started}
    finally:
        for host in started:
            daemon.run("rm", "--force", "--volumes", host.container, check=False, timeout=60)
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
