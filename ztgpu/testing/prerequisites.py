"""Every external program and file the test harnesses, the demo and the
benchmarks start, with the Debian package ``make setup`` installs for it.

The harnesses look each one up here (:func:`require`) instead of calling
``shutil.which`` on their own, so that a missing one fails with the package
to install, never with a skipped test or an obscure error from the program
that needed it (e.g. ``rsyslogd: could not load module 'lmnsd_ossl'``).
``tests/test_prerequisites.py`` checks that every package named here is in
the Makefile's ``DEB_PACKAGES``, that each prerequisite is present and owned
by that package (or one it depends on), and that the harness code starts no
program this table does not list.
"""

from __future__ import annotations

import glob
import re
import shutil
from dataclasses import dataclass
from pathlib import Path


class PrerequisiteMissing(RuntimeError):
    """A program or file the harness needs is not installed (the message names the package)."""


@dataclass(frozen=True)
class Prerequisite:
    """One program on PATH (``program``) or one file pattern (``pattern``)."""

    name: str
    #: The Debian package in ``make setup``'s list that brings it (itself or
    #: through its dependencies, e.g. slurm-wlm -> slurmctld).
    package: str
    #: Who starts it, for the error message.
    used_by: str
    pattern: str | None = None

    def find(self) -> Path | None:
        """Where it is installed, or None."""
        if self.pattern is not None:
            found = sorted(glob.glob(self.pattern))
            return Path(found[-1]) if found else None
        where = shutil.which(self.name)
        return Path(where) if where is not None else None


def _programs(package: str, used_by: str, *names: str) -> list[Prerequisite]:
    return [Prerequisite(name, package, used_by) for name in names]


_LIB = "/usr/lib/*/rsyslog"

PREREQUISITES: dict[str, Prerequisite] = {p.name: p for p in [
    *_programs("slurm-wlm", "the private Slurm cluster (ztgpu.testing.slurm_cluster)",
               "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel",
               "sinfo"),
    *_programs("munge", "the private munged (ztgpu.testing.munge)",
               "munged", "munge", "unmunge", "mungekey"),
    *_programs("rsyslog", "the SIEM receiver (ztgpu.testing.rsyslog)", "rsyslogd"),
    Prerequisite("lmnsd_gtls", "rsyslog-gnutls", "the SIEM receiver's gtls TLS driver",
                 pattern=f"{_LIB}/lmnsd_gtls.so"),
    Prerequisite("lmnsd_ossl", "rsyslog-openssl", "the SIEM receiver's ossl TLS driver",
                 pattern=f"{_LIB}/lmnsd_ossl.so"),
    Prerequisite("initdb", "postgresql", "the private PostgreSQL server "
                 "(ztgpu.testing.postgres)", pattern="/usr/lib/postgresql/*/bin/initdb"),
    Prerequisite("postgres", "postgresql", "the private PostgreSQL server "
                 "(ztgpu.testing.postgres)", pattern="/usr/lib/postgresql/*/bin/postgres"),
    Prerequisite("python3", "python3", "the demo's and the tests' job scripts "
                 "(run by Slurm with the system PATH)", pattern="/usr/bin/python3"),
    *_programs("util-linux", "running commands as test users", "runuser", "setpriv"),
    *_programs("passwd", "the test users of the private cluster",
               "useradd", "userdel", "usermod", "groupadd", "groupdel"),
    *_programs("systemd", "checking the shipped unit files", "systemd-analyze"),
    *_programs("openssl", "inspecting the site PKI's certificates", "openssl"),
    *_programs("debootstrap", "the pure-v2 VM images (ztgpu.testing.vm)", "debootstrap"),
    *_programs("e2fsprogs", "the pure-v2 VM images (ztgpu.testing.vm)", "mkfs.ext4"),
    *_programs("mount", "the pure-v2 VM images (ztgpu.testing.vm)", "mount", "umount"),
    *_programs("qemu-utils", "the pure-v2 VMs' disks (ztgpu.testing.vm)", "qemu-img"),
    *_programs("qemu-system-x86", "the pure-v2 VMs (ztgpu.testing.vm)", "qemu-system-x86_64"),
    *_programs("openssh-client", "commands in the pure-v2 VMs (ztgpu.testing.vm) and the "
               "PAM tests' ssh logins (ztgpu.testing.sshd)", "ssh", "ssh-keygen"),
    Prerequisite("sshd", "openssh-server", "the PAM tests' private sshd (ztgpu.testing.sshd)",
                 pattern="/usr/sbin/sshd"),
    Prerequisite("pam_python.so", "libpam-python", "the ztgpu PAM module under a private sshd",
                 pattern="/lib/security/pam_python.so"),
    Prerequisite("pam_slurm_adopt.so", "libpam-slurm-adopt", "the side-by-side PAM tests and "
                 "bench/pam_latency.py", pattern="/lib/security/pam_slurm_adopt.so"),
    *_programs("pamtester", "bench/pam_latency.py and the PAM module tests", "pamtester"),
    *_programs("gcc", "building the compiled PAM module (`ztgpu install --pam`) and the "
               "tests' sanitizer builds", "gcc"),
    Prerequisite("pam_modules.h", "libpam0g-dev", "building the compiled PAM module",
                 pattern="/usr/include/security/pam_modules.h"),
    Prerequisite("dockerd", "docker.io", "the private docker daemon that builds and runs the "
                 "central services' containers (ztgpu.testing.containers)",
                 pattern="/usr/sbin/dockerd"),
    Prerequisite("docker", "docker.io", "the docker client matching that daemon",
                 pattern="/usr/bin/docker"),
    *_programs("docker-compose", "starting containers/compose.yaml "
               "(ztgpu.testing.containers)", "docker-compose"),
    *_programs("prometheus", "the private Prometheus server that scrapes the suite's "
               "/metrics (ztgpu.testing.prometheus) and checks the shipped alerting rules",
               "prometheus", "promtool"),
]}


#: Programs some tests use when present and skip without, with why: not
#: Debian packages `make setup` installs (the CUDA toolkit comes from NVIDIA).
OPTIONAL = {
    "nvcc": "tests/test_cuda_wipe.py: the shipped PTX is what verify.cu compiles to",
    "ptxas": "tests/test_cuda_wipe.py: the shipped PTX assembles for sm_90",
}


def require(name: str) -> Path:
    """The installed path of prerequisite ``name``.

    Raises:
        PrerequisiteMissing: it is not installed; the message names the
            Debian package and ``make setup``.
        KeyError: ``name`` is not in :data:`PREREQUISITES` (add it there,
            with its package, before the harness uses it).
    """
    item = PREREQUISITES[name]
    where = item.find()
    if where is None:
        what = item.pattern or f"{name} (on PATH)"
        raise PrerequisiteMissing(
            f"{what} is missing: {item.used_by} needs the Debian package {item.package}; "
            f"run `make setup` (it installs {item.package})")
    return where


def missing() -> list[Prerequisite]:
    """Every prerequisite that is not installed here."""
    return [item for item in PREREQUISITES.values() if item.find() is None]


def makefile_packages(makefile: Path) -> set[str]:
    """The Debian packages in ``DEB_PACKAGES := ...`` (with continuation lines)."""
    text = makefile.read_text()
    match = re.search(r"^DEB_PACKAGES\s*:?=((?:[^\n]*\\\n)*[^\n]*)", text, re.M)
    if match is None:
        raise ValueError(f"{makefile}: no DEB_PACKAGES line")
    return set(match.group(1).replace("\\\n", " ").split())
