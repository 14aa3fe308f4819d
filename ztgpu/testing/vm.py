"""A real pure-cgroup-v2 Debian node: an image built here, booted under qemu.

``build_image`` makes (once, cached) a Debian image with systemd, Slurm,
munge, sshd and a venv holding the suite's dependencies: debootstrap, a
small initrd (virtio, ext4, 9p only), ``mkfs.ext4 -d``. The cache lives under
:data:`CACHE_DIR` (tests own it) and a build is reused while its inputs (the
codename, the package list, the build steps, the suite's dependencies) are
unchanged; anything else gives a new image and the old one is removed.

``VirtualNode`` boots it with the unified cgroup v2 hierarchy only
(``systemd.unified_cgroup_hierarchy=1``), a throwaway qcow2 overlay over the
cached image (the cache stays pristine), a read-only 9p share of a host
directory at /mnt/share, and sshd forwarded to a free local port; commands
run over ssh as root with a key made for the image. The VM is disposable:
inside it, the suite is installed the way the README tells an admin to
(system paths, systemd units). Measured under software emulation on this
kind of host: cold build ~2 min, boot to ssh ~20 s, ~650 MB resident.

Nothing outside :data:`CACHE_DIR` and the VM's own run directory is written;
``stop`` powers the VM off (and kills qemu if it does not go).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ztgpu.testing.prerequisites import require
from ztgpu.testing.slurm_cluster import ClusterError

CACHE_DIR = Path(os.environ.get("ZTGPU_VM_CACHE", "/var/cache/ztgpu-tests/vm"))
MIRROR = os.environ.get("ZTGPU_VM_MIRROR", "http://deb.debian.org/debian")

#: Debian packages of the node (beyond minbase). bpftool is for people
#: looking at a node by hand; the suite does not need it.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "udev", "kmod", "linux-image-amd64",
            "initramfs-tools", "openssh-server", "iproute2", "procps", "passwd",
            "util-linux", "python3", "python3-venv", "slurm-wlm", "munge", "bpftool",
            "ca-certificates")

#: What the initrd needs to mount the root disk and the share.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ext4", "9p", "9pnet_virtio")


@dataclass(frozen=True)
class Release:
    codename: str
    python: str  # the release's python3, for the wheels of the suite's dependencies
    slurm: str   # the Slurm it ships (for messages and notes)


RELEASES = {
    "bookworm": Release("bookworm", "3.11", "22.05"),
    "trixie": Release("trixie", "3.13", "24.11"),
}


def _run(argv: Sequence[str], *, timeout: float, what: str,
         env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False, env=env)
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"{what}: no result after {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise ClusterError(f"{what} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def suite_requirements(pyproject: Path) -> list[str]:
    import tomllib

    with pyproject.open("rb") as f:
        data = tomllib.load(f)
    return [*data["project"]["dependencies"], "setuptools", "wheel"]


def image_digest(release: Release, requirements: Sequence[str]) -> str:
    steps = inspect.getsource(_configure_rootfs) + inspect.getsource(_install_wheels)
    text = json.dumps([release.codename, MIRROR, PACKAGES, INITRD_MODULES, sorted(requirements),
                       steps])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "root.img"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def key(self) -> Path:
        return self.directory / "id_ed25519"


def build_image(codename: str, pyproject: Path, *, cache_dir: Path = CACHE_DIR,
                log: Path | None = None) -> Image:
    """The cached image for *codename*, built first if its inputs changed."""
    release = RELEASES[codename]
    requirements = suite_requirements(pyproject)
    name = f"{codename}-{image_digest(release, requirements)}"
    image = Image(cache_dir / name)
    if (image.directory / "ready").exists():
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cache_dir, 0o700)
    for old in cache_dir.glob(f"{codename}-*"):
        shutil.rmtree(old, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=cache_dir))
    try:
        rootfs = work / "rootfs"
        _run([str(require("debootstrap")), "--variant=minbase",
              f"--include={','.join(PACKAGES)}", codename, str(rootfs), MIRROR],
             timeout=1500, what=f"debootstrap {codename}")
        key = work / "id_ed25519"
        _run([str(require("ssh-keygen")), "-q", "-t", "ed25519", "-N", "", "-C",
              f"ztgpu-vm-{codename}", "-f", str(key)], timeout=60, what="ssh-keygen")
        _configure_rootfs(rootfs, key.with_suffix(".pub").read_text())
        _install_wheels(rootfs, release, requirements, work / "wheels")
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise ClusterError(f"{codename}: no kernel in the image")
        version = kernels[-1].name.removeprefix("vmlinuz-")
        _chroot(rootfs, ["update-initramfs", "-c", "-k", version], timeout=600,
                what="update-initramfs")
        shutil.copy2(kernels[-1], work / "vmlinuz")
        shutil.copy2(rootfs / "boot" / f"initrd.img-{version}", work / "initrd.img")
        _run([str(require("mkfs.ext4")), "-q", "-F", "-L", "root", "-d", str(rootfs),
              str(work / "root.img"), "4G"], timeout=900, what="mkfs.ext4 -d")
        shutil.rmtree(rootfs)
        shutil.rmtree(work / "wheels", ignore_errors=True)
        (work / "ready").write_text(json.dumps({"codename": codename, "kernel": version,
                                                "requirements": requirements}))
        work.rename(image.directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return image


@contextlib.contextmanager
def _mounted_proc(rootfs: Path) -> Iterator[None]:
    mounts = [("proc", rootfs / "proc", ["-t", "proc", "proc"]),
              ("dev", rootfs / "dev", ["--bind", "/dev"]),
              ("sys", rootfs / "sys", ["-t", "sysfs", "sysfs"])]
    done = []
    try:
        for _, target, how in mounts:
            _run([str(require("mount")), *how, str(target)], timeout=30, what=f"mount {target}")
            done.append(target)
        yield
    finally:
        for target in reversed(done):
            subprocess.run([str(require("umount")), "-l", str(target)], check=False, timeout=30)


def _chroot(rootfs: Path, argv: Sequence[str], *, timeout: float, what: str) -> str:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
           "DEBIAN_FRONTEND": "noninteractive"}
    with _mounted_proc(rootfs):
        return _run(["chroot", str(rootfs), *argv], timeout=timeout, what=what, env=env)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _configure_rootfs(rootfs: Path, public_key: str) -> None:
    _write(rootfs / "etc/hostname", "ztgpu-vm\n")
    _write(rootfs / "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 ztgpu-vm\n")
    _write(rootfs / "etc/fstab",
           "/dev/vda / ext4 rw,noatime 0 1\n"
           "share /mnt/share 9p trans=virtio,version=9p2000.L,msize=262144,ro,nofail 0 0\n")
    (rootfs / "mnt/share").mkdir(parents=True, exist_ok=True)
    _write(rootfs / "etc/systemd/network/10-virtio.network",
           "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n")
    _write(rootfs / "root/.ssh/authorized_keys", public_key, 0o600)
    (rootfs / "root/.ssh").chmod(0o700)
    _write(rootfs / "etc/initramfs-tools/modules", "\n".join(INITRD_MODULES) + "\n")
    _write(rootfs / "etc/initramfs-tools/conf.d/ztgpu-vm", "MODULES=list\nCOMPRESS=gzip\n")
    # Fake GPUs: /dev is rebuilt at every boot. Four GPUs (the NVIDIA major,
    # no driver behind it: an open the cgroup allows gives ENXIO) and nvidiactl.
    rules = [f"c /dev/nvidia{m} 0666 root root - 195:{m}" for m in range(4)]
    rules += ["c /dev/nvidiactl 0666 root root - 195:255",
              "c /dev/nvidia-modeset 0666 root root - 195:254"]
    _write(rootfs / "etc/tmpfiles.d/ztgpu-fake-gpus.conf", "\n".join(rules) + "\n")
    _write(rootfs / "etc/ssh/sshd_config.d/ztgpu-vm.conf",
           "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n")
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ("systemd-networkd.service",):
        link = wants / unit
        if not link.exists():
            link.symlink_to(f"/lib/systemd/system/{unit}")
    # A short boot, and nothing started that the tests start themselves.
    for unit in ("systemd-networkd-wait-online.service", "apt-daily.timer",
                 "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
                 "slurmd.service", "slurmctld.service", "munge.service",
                 "getty@tty1.service", "systemd-timesyncd.service"):
        mask = rootfs / "etc/systemd/system" / unit
        if not mask.exists():
            mask.symlink_to("/dev/null")
    _write(rootfs / "etc/machine-id", "")


#: Wheel platforms a Debian 12 or 13 x86_64 (glibc 2.36 / 2.41) can run.
_WHEEL_PLATFORMS = ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
                    *(f"manylinux_2_{n}_x86_64" for n in (5, 12, 17, 24, 26, 27, 28, 31, 34)),
                    "linux_x86_64", "any")


def _install_wheels(rootfs: Path, release: Release, requirements: Sequence[str],
                    wheels: Path) -> None:
    """A venv at /opt/ztgpu/venv with the suite's dependencies (wheels fetched
    on the host for the release's Python: the VM has no route out)."""
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
           "--python-version", release.python, "--implementation", "cp",
           *(a for tag in _WHEEL_PLATFORMS for a in ("--platform", tag)),
           "-d", str(wheels), *requirements]
    _run(pip, timeout=900, what="pip download (the suite's dependencies)")
    inside = rootfs / "opt/wheels"
    shutil.copytree(wheels, inside)
    _chroot(rootfs, ["python3", "-m", "venv", "/opt/ztgpu/venv"], timeout=300, what="venv")
    _chroot(rootfs, ["/opt/ztgpu/venv/bin/pip", "install", "-q", "--no-index", "--find-links",
                     "/opt/wheels", *requirements], timeout=900, what="pip install in the image")
    shutil.rmtree(inside)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VirtualNode:
    """A booted VM; ``ssh`` runs a command in it as root."""

    image: Image
    share: Path
    run_dir: Path
    memory_mb: int = 1536
    cpus: int = 2
    port: int = field(default_factory=_free_port)

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    def _pid(self) -> int | None:
        try:
            return int((self.run_dir / "qemu.pid").read_text())
        except (OSError, ValueError):
            return None

    def boot(self, timeout: float = 240) -> None:
        overlay = self.run_dir / "overlay.qcow2"
        _run([str(require("qemu-img")), "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
              str(self.image.disk), str(overlay)], timeout=60, what="qemu-img create")
        _run([str(require("qemu-system-x86_64")), "-accel", "tcg,thread=multi,tb-size=256",
              "-cpu", "max", "-smp", str(self.cpus), "-m", str(self.memory_mb), "-display", "none",
              "-serial", f"file:{self.console}", "-kernel", str(self.image.kernel),
              "-initrd", str(self.image.initrd),
              "-append", "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 "
                         "net.ifnames=0 quiet",
              "-drive", f"file={overlay},if=virtio,cache=unsafe,format=qcow2",
              "-virtfs", f"local,path={self.share},mount_tag=share,security_model=none,"
                         "readonly=on",
              "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
              "-device", "virtio-net-pci,netdev=n0",
              "-daemonize", "-pidfile", str(self.run_dir / "qemu.pid")],
             timeout=60, what="qemu")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._pid() is None or not Path(f"/proc/{self._pid()}").exists():
                raise ClusterError(f"qemu exited while booting; console:\n{self.tail()}")
            probe = self.ssh("true", timeout=15, check=False)
            if probe.returncode == 0:
                return
            time.sleep(2)
        raise ClusterError(f"the VM did not answer ssh within {timeout:.0f} s; console:\n"
                           f"{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        return "(no console output)"

    def ssh(self, command: str, *, timeout: float = 120, check: bool = True,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(require("ssh")), "-q", "-i", str(self.image.key), "-p", str(self.port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
                # One connection, many commands: a handshake costs seconds under emulation.
                "-o", "ControlMaster=auto", "-o", f"ControlPath={self.run_dir}/ssh.sock",
                "-o", "ControlPersist=600",
                "root@127.0.0.1", command]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  input=input_text, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"in the VM, no result after {timeout:.0f} s: {command}") from exc
        if check and done.returncode != 0:
            raise ClusterError(f"in the VM, exit {done.returncode}: {command}\n"
                               f"{(done.stderr + done.stdout).strip()[-3000:]}")
        return done

    def stop(self) -> None:
        pid = self._pid()
        if pid is None:
            return
        with contextlib.suppress(ClusterError):
            self.ssh("systemctl poweroff", timeout=15, check=False)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run([str(require("ssh")), "-q", "-o", f"ControlPath={self.run_dir}/ssh.sock",
                        "-O", "exit", "root@127.0.0.1"], capture_output=True, timeout=10,
                       check=False)


@contextlib.contextmanager
def virtual_node(codename: str, share: Path, pyproject: Path) -> Iterator[VirtualNode]:
    image = build_image(codename, pyproject)
    run_dir = Path(tempfile.mkdtemp(prefix=f"ztgpu-vm-{codename}-"))
    node = VirtualNode(image=image, share=share, run_dir=run_dir)
    try:
        node.boot()
        yield node
    finally:
        node.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
