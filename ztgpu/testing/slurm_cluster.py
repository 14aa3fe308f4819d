"""A private, real Slurm cluster on this machine: munged, slurmctld, slurmd.

Used by the integration tests, the demo and the benchmarks. Everything lives
under one directory the harness creates (config, state, logs, sockets and
the simulated GPU device nodes); daemons get ``-f`` and clients
``SLURM_CONF``, so nothing under /etc/slurm or /run/munge is touched.

Only the GPUs are simulated: character devices with the NVIDIA major (195)
and minors 0..N-1, plus ``nvidiactl`` (195:255), mode 0666 as the driver
leaves them. Opening one that access control allows gives ENXIO (no driver
behind it); one a cgroup denies gives EPERM; one file permissions deny gives
EACCES.

Teardown removes what the harness made: daemons (and any slurmstepd they
left), cgroup directories that did not exist before, device nodes, users.
It needs root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ztgpu.testing.prerequisites import PrerequisiteMissing, require

NVIDIA_MAJOR = 195
CGROUP_ROOT = Path("/sys/fs/cgroup")
_MARKER_ENV = "ZTGPU_TEST_CLUSTER"


class ClusterError(RuntimeError):
    """The test cluster could not be brought up or driven."""


@dataclass(frozen=True)
class ClusterSpec:
    gpus: int = 4
    cpus: int = 8
    constrain_devices: bool = True
    users: tuple[str, ...] = ("ztalice", "ztbob", "ztcarol")
    #: Extra slurm.conf lines (e.g. Prolog=...), appended verbatim.
    extra_conf: tuple[str, ...] = ()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.1) -> None:
    """Poll *predicate* until it is truthy. Raises ClusterError naming *what*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")


def _cgroup_dirs(prefixes: Sequence[str]) -> set[Path]:
    found: set[Path] = set()
    if not CGROUP_ROOT.is_dir():
        return found
    for ctrl in CGROUP_ROOT.iterdir():
        if not ctrl.is_dir():
            continue
        with contextlib.suppress(OSError):
            for child in ctrl.iterdir():
                if child.is_dir() and child.name.startswith(tuple(prefixes)):
                    found.add(child)
    return found


def _rmdir_tree(path: Path) -> None:
    """Remove a cgroup directory tree bottom-up (cgroupfs needs rmdir)."""
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


@dataclass
class SlurmTestCluster:
    """A running private cluster; use :func:`slurm_cluster` to get one."""

    root: Path
    spec: ClusterSpec
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    created_users: list[str] = field(default_factory=list)
    cgroups_before: set[Path] = field(default_factory=set)

    # ---- layout -------------------------------------------------------
    @property
    def conf_dir(self) -> Path:
        return self.root / "etc"

    @property
    def slurm_conf(self) -> Path:
        return self.conf_dir / "slurm.conf"

    @property
    def dev_dir(self) -> Path:
        return self.root / "dev"

    @property
    def work_dir(self) -> Path:
        """World-writable (sticky) directory for job scripts and output."""
        return self.root / "work"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def gpu_path(self, minor: int) -> Path:
        return self.dev_dir / f"nvidia{minor}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.slurm_conf)
        return env

    # ---- bring up -----------------------------------------------------
    def prepare(self) -> None:
        """Create users, devices, munge key and config files (no daemons yet)."""
        self.cgroups_before = _cgroup_dirs(["slurm"])
        for sub in ("etc", "dev", "munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.dev_dir.chmod(0o755)
        self.work_dir.mkdir(exist_ok=True)
        self.work_dir.chmod(0o1777)
        for user in self.spec.users:
            self._ensure_user(user)
        for minor in range(self.spec.gpus):
            self._mknod(self.gpu_path(minor), minor)
        self._mknod(self.dev_dir / "nvidiactl", 255)
        key = self.root / "munge" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(1024))
        self._write_conf()

    def _ensure_user(self, user: str) -> None:
        try:
            pwd.getpwnam(user)
            return
        except KeyError:
            pass
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/bin/sh", "--user-group", user], check=True,
                       capture_output=True, timeout=30)
        self.created_users.append(user)

    def _mknod(self, path: Path, minor: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.mknod(path, 0o666 | 0o020000, os.makedev(NVIDIA_MAJOR, minor))
        path.chmod(0o666)

    def _write_conf(self) -> None:
        spec = self.spec
        ctld_port, slurmd_port = _free_port(), _free_port()
        gpu_files = ",".join(str(self.gpu_path(m)) for m in range(spec.gpus))
        lines = [
            "# Private test cluster written by ztgpu.testing.slurm_cluster",
            "ClusterName=ztgputest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/cgroup",
            "TaskPlugin=task/cgroup",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "GresTypes=gpu",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "KillWait=2",
            "MinJobAge=600",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            *spec.extra_conf,
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={spec.cpus} "
            f"Gres=gpu:{spec.gpus} State=UNKNOWN",
            f"PartitionName=gpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.slurm_conf.write_text("\n".join(lines) + "\n")
        (self.conf_dir / "gres.conf").write_text(
            "AutoDetect=off\n"
            f"NodeName={self.node} Name=gpu File={gpu_files}\n")
        (self.conf_dir / "cgroup.conf").write_text(
            "CgroupPlugin=cgroup/v1\n"
            f"CgroupMountpoint={CGROUP_ROOT}\n"
            f"ConstrainDevices={'yes' if spec.constrain_devices else 'no'}\n"
            "ConstrainCores=no\nConstrainRAMSpace=no\n")

    def start(self) -> None:
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        munge_dir = self.root / "munge"
        self._spawn("munged", [
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={munge_dir / 'munge.key'}", f"--pid-file={munge_dir / 'munged.pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}", "--num-threads=4"])
        wait_for(self.munge_socket.exists, 15, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.slurm_conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.slurm_conf)])
        wait_for(self._node_idle, 60, "the node to become idle in sinfo", interval=0.3)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115
        env = self.env()
        env[_MARKER_ENV] = str(self.root)
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
        log.close()
        time.sleep(0.05)
        if self.procs[name].poll() is not None:
            raise ClusterError(f"{name} exited at once; see {self.root / 'log'}")

    def _node_idle(self) -> bool:
        out = self.slurm(["sinfo", "-h", "-N", "-o", "%t"], check=False)
        return out.strip() in {"idle", "mix", "alloc"}

    # ---- driving ------------------------------------------------------
    def slurm(self, argv: list[str], *, user: str | None = None, check: bool = True,
              timeout: float = 30, input_text: str | None = None) -> str:
        """Run a Slurm client command (optionally as *user*); return stdout."""
        cmd = argv
        if user is not None:
            cmd = ["runuser", "-u", user, "--", "env", f"SLURM_CONF={self.slurm_conf}", *argv]
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env(),
                             timeout=timeout, input=input_text, cwd=self.work_dir)
        if check and res.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} failed ({res.returncode}): "
                               f"{res.stderr.strip()}")
        return res.stdout

    def sbatch(self, user: str, script: str, *, gpus: int = 1, extra: Sequence[str] = ()) -> str:
        """Submit *script* as *user* with *gpus* GPUs; return the job id."""
        path = Path(tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.work_dir)[1])
        path.write_text(script if script.startswith("#!") else "#!/bin/sh\n" + script)
        path.chmod(0o755)
        args = ["sbatch", "--parsable", "-N1", "-n1", f"--chdir={self.work_dir}",
                f"--output={self.work_dir}/slurm-%j.out"]
        if gpus:
            args.append(f"--gres=gpu:{gpus}")
        out = self.slurm([*args, *extra, str(path)], user=user)
        return out.strip().split(";")[0]

    def job_state(self, job_id: str) -> dict[str, str]:
        out = self.slurm(["scontrol", "-o", "show", "job", job_id], check=False)
        fields: dict[str, str] = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_job(self, job_id: str, states: Sequence[str], timeout: float = 60) -> dict[str, str]:
        """Wait until the job reaches one of *states*; return its fields."""
        last: dict[str, str] = {}

        def reached() -> bool:
            nonlocal last
            last = self.job_state(job_id)
            return last.get("JobState", "") in states

        try:
            wait_for(reached, timeout, f"job {job_id} to reach {'/'.join(states)}", 0.2)
        except ClusterError as exc:
            raise ClusterError(f"{exc}; last state {last.get('JobState')} "
                               f"reason {last.get('Reason')}") from None
        return last

    def output(self, job_id: str) -> str:
        path = self.work_dir / f"slurm-{job_id}.out"
        return path.read_text() if path.exists() else ""

    def node_state(self) -> str:
        return self.slurm(["sinfo", "-h", "-N", "-o", "%T"], check=False).strip()

    def node_reason(self) -> str:
        return self.slurm(["sinfo", "-h", "-N", "-o", "%E"], check=False).strip()

    def resume_node(self) -> None:
        self.slurm(["scontrol", "update", f"NodeName={self.node}", "State=RESUME"], check=False)

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every test user's jobs and wait for an empty queue."""
        for user in self.spec.users:
            self.slurm(["scancel", "-u", user], check=False)
        wait_for(lambda: not self.slurm(["squeue", "-h"], check=False).strip(), timeout,
                 "empty queue")

    def clean_slate(self) -> None:
        """Between tests: no job left, the node resumed if drained, and idle."""
        self.cancel_all()
        if "drain" in self.node_state():
            self.resume_node()
        wait_for(lambda: self.node_state() == "idle", 60, "idle node")

    # ---- teardown -----------------------------------------------------
    def _stop_proc(self, name: str, timeout: float = 15) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def _our_stepds(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if f"{_MARKER_ENV}={self.root}".encode() in environ.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Stop everything and remove what :meth:`prepare` created."""
        if "slurmctld" in self.procs:
            self.slurm(["scancel", "--full", "-u", "root"], check=False)
            for user in self.spec.users:
                self.slurm(["scancel", "--full", "-u", user], check=False)
            with contextlib.suppress(ClusterError):
                wait_for(lambda: not self.slurm(["squeue", "-h", "-t", "R,CG"], check=False)
                          .strip(), 20, "running jobs to end")
        for name in ("slurmd", "slurmctld", "munged"):
            self._stop_proc(name)
        for _ in range(50):
            pids = self._our_stepds()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for path in _cgroup_dirs(["slurm"]) - self.cgroups_before:
            _rmdir_tree(path)
        for user in self.created_users:
            subprocess.run(["userdel", user], capture_output=True, timeout=30, check=False)
            subprocess.run(["groupdel", user], capture_output=True, timeout=30, check=False)
        self.created_users.clear()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def slurm_cluster(spec: ClusterSpec | None = None, *, root: Path | None = None,
                  before_start: object = None) -> Iterator[SlurmTestCluster]:
    """Bring up a private cluster; tear it down on exit, whatever happened.

    *before_start*, if given, is called with the prepared (not yet started)
    cluster, e.g. to install the suite into its slurm.conf.
    """
    if os.geteuid() != 0:
        raise ClusterError("the Slurm test cluster needs root")
    try:
        for tool in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol",
                     "scancel", "useradd", "runuser"):
            require(tool)
    except PrerequisiteMissing as exc:
        raise ClusterError(str(exc)) from None
    base = Path(tempfile.mkdtemp(prefix="ztgpu-cluster-", dir=root))
    cluster = SlurmTestCluster(root=base, spec=spec or ClusterSpec())
    try:
        cluster.prepare()
        if before_start is not None:
            assert callable(before_start)
            before_start(cluster)
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
