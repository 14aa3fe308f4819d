"""Processes that still hold a GPU, found in /proc and ended before the GPU is free.

Putting a device file back to root and denying it in a cgroup stops new
opens only: a descriptor opened earlier, or a mapping of the device made
through one, keeps working. So whenever the agent takes a GPU back (Epilog,
revocation, drift repair) it looks for every process that holds one of the
GPU's device numbers, as an open descriptor (``/proc/PID/fd``), as a
mapping (``/proc/PID/maps``, confirmed through ``/proc/PID/map_files``) or
as a context the driver reports (NVML), and ends it. Processes are signalled
through a pidfd opened once their start time is checked, so a pid that was
reused meanwhile is never signalled.

Processes whose every uid (real, effective, saved, filesystem) is exempt
(root and the configured service accounts, such as nvidia-persistenced,
which holds every GPU by design) are left alone. A user cannot hide by
making a process non-dumpable: the uids come from ``status``, not from
the owner of ``/proc/PID``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: After the kills, look again this many times (a holder may have passed its
#: descriptor on, or forked, before it died).
ROUNDS = 3


@dataclass(frozen=True)
class Holder:
    """One process holding one or more of the GPUs being taken back."""

    pid: int
    uid: int
    #: Start time in clock ticks since boot (``/proc/PID/stat`` field 22): with
    #: the pid, it names one process for the whole life of the node.
    start: int
    command: str
    #: Minor numbers (of the NVIDIA major) the process holds.
    minors: frozenset[int]
    #: How it holds them: ``fd``, ``mmap`` or both.
    how: tuple[str, ...]

    def describe(self) -> str:
        return f"pid {self.pid} (uid {self.uid}, {self.command!r})"


@dataclass
class TakeBack:
    """What ending the holders of some GPUs came to."""

    #: Processes ended (or found gone when signalled).
    ended: list[Holder] = field(default_factory=list)
    #: Processes still holding a GPU when the deadline passed.
    survivors: list[Holder] = field(default_factory=list)


def _uids(status: str) -> tuple[int, ...]:
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return tuple(int(x) for x in line.split()[1:5])
    return ()


def start_time(pid: int, proc_root: Path = Path("/proc")) -> int | None:
    """The process's start time in clock ticks, or None once it has exited."""
    try:
        text = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command may hold spaces and ')': the fields follow the last ')'.
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[19]) if len(fields) > 19 else None


def command_of(pid: int, proc_root: Path = Path("/proc")) -> str:
    """The process's command line (at most 200 characters), ``[comm]`` for a
    kernel thread, ``?`` once it has exited."""
    return _command(proc_root / str(pid))


def _command(pid_dir: Path) -> str:
    with contextlib.suppress(OSError):
        raw = (pid_dir / "cmdline").read_bytes()
        if raw:
            return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()[:200]
    with contextlib.suppress(OSError):
        return "[" + (pid_dir / "comm").read_text().strip() + "]"
    return "?"


def _held_minor(link: str, major: int, minors: Collection[int]) -> int | None:
    """The GPU minor the file behind a /proc link is, if it is one of *minors*."""
    try:
        st = os.stat(link)
    except OSError:
        return None
    if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == major:
        minor = os.minor(st.st_rdev)
        if minor in minors:
            return minor
    return None


def _fd_minors(pid_dir: str, major: int, minors: Collection[int]) -> set[int]:
    # Plain strings, not Path: this runs for every descriptor of every user
    # process at every Epilog.
    found: set[int] = set()
    fd_dir = pid_dir + "/fd/"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for name in names:
        minor = _held_minor(fd_dir + name, major, minors)  # the open file itself
        if minor is not None:
            found.add(minor)
    return found


def _map_minors(pid_dir: str, major: int, minors: Collection[int],
                nodes: Collection[tuple[int, int]]) -> set[int]:
    """Minors mapped into the process, through a device node in *nodes* (st_dev, st_ino)."""
    found: set[int] = set()
    if not nodes:
        return found
    try:
        with open(pid_dir + "/maps", "rb") as maps:
            raw = maps.read()
    except OSError:
        return found
    # Most processes map no device node at all: look for the inodes first.
    if not any(f" {ino} ".encode() in raw for _, ino in nodes):
        return found
    for line in raw.decode("utf-8", "replace").splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[4] == "0":
            continue
        fs_major, _, fs_minor = parts[3].partition(":")
        try:
            key = (os.makedev(int(fs_major, 16), int(fs_minor, 16)), int(parts[4]))
        except ValueError:
            continue
        if key not in nodes:
            continue
        minor = _held_minor(f"{pid_dir}/map_files/{parts[0]}", major, minors)
        if minor is not None:
            found.add(minor)
    return found


def device_nodes(paths: Iterable[Path]) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of each existing device file, to recognise its mappings."""
    nodes = set()
    for path in paths:
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            nodes.add((st.st_dev, st.st_ino))
    return nodes


def find_holders(major: int, minors: Collection[int], *, nodes: Collection[tuple[int, int]],
                 exempt_uids: Collection[int],
                 reported: Mapping[int, Collection[int]] | None = None,
                 proc_root: Path = Path("/proc")) -> list[Holder]:
    """Every process holding one of *minors* (of *major*) but those of exempt uids.

    An exempt process's descriptors are not even read: on a node most
    processes are root's, so a scan costs about what the users' ones do.

    *reported* adds what the driver says runs where (pid -> minors, from
    NVML): such a process counts as a holder even if it shows no descriptor.
    Never raises for a process that exits while it is being read.
    """
    reported = reported or {}
    targets = frozenset(minors)
    holders: list[Holder] = []
    if not targets:
        return holders
    me = os.getpid()
    root = str(proc_root)
    try:
        entries = [e.name for e in os.scandir(root) if e.name.isdigit()]
    except OSError:
        return holders
    for name in entries:
        pid = int(name)
        if pid == me:
            continue
        pid_dir = f"{root}/{name}"
        try:
            with open(pid_dir + "/status", "rb") as status:
                uids = _uids(status.read().decode("ascii", "replace"))
        except OSError:
            continue
        if not uids or all(u in exempt_uids for u in uids):
            continue
        by_fd = _fd_minors(pid_dir, major, targets)
        by_map = _map_minors(pid_dir, major, targets, nodes)
        by_driver = targets.intersection(reported.get(pid, ()))
        if not by_fd and not by_map and not by_driver:
            continue
        started = start_time(pid, proc_root)
        if started is None:
            continue
        how = tuple(kind for kind, got in (("fd", by_fd), ("mmap", by_map),
                                           ("driver", by_driver)) if got)
        holders.append(Holder(pid=pid, uid=uids[0], start=started,
                              command=_command(Path(pid_dir)),
                              minors=frozenset(by_fd | by_map | by_driver), how=how))
    return holders


def exited(pidfd: int) -> bool:
    """Whether the process a pidfd names has exited (its pid may be reused)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _kill(holder: Holder, proc_root: Path) -> int | None:
    """SIGKILL *holder* through a pidfd; returns the pidfd to wait on, None if it is gone."""
    try:
        pidfd = os.pidfd_open(holder.pid)
    except ProcessLookupError:
        return None
    # The pidfd now names whatever process has this pid; make sure it is ours.
    if start_time(holder.pid, proc_root) != holder.start:
        os.close(pidfd)
        return None
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        os.close(pidfd)
        return None
    return pidfd


def _wait(pidfds: dict[int, Holder], deadline: float) -> None:
    """Wait until every pidfd reports an exit or *deadline*; exited ones are removed."""
    poller = select.poll()
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    while pidfds:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for pidfd, _ in poller.poll(left * 1000):
            poller.unregister(pidfd)
            os.close(pidfd)
            pidfds.pop(pidfd, None)


def take_back(major: int, minors: Collection[int], *, nodes: Collection[tuple[int, int]],
              exempt_uids: Collection[int], timeout_s: float,
              spare_uid: int | None = None,
              reported: Mapping[int, Collection[int]] | None = None,
              proc_root: Path = Path("/proc")) -> TakeBack:
    """End every non-exempt process holding one of *minors*, within *timeout_s*.

    Processes of *spare_uid* are left alone (the user of the job that now
    holds the GPU). Looks again after the kills, up to :data:`ROUNDS`
    times, so a descriptor passed on before its holder died is found too.
    """
    result = TakeBack()
    deadline = time.monotonic() + timeout_s
    seen: set[tuple[int, int]] = set()
    for _ in range(ROUNDS):
        found = find_holders(major, minors, nodes=nodes, exempt_uids=exempt_uids,
                             reported=reported, proc_root=proc_root)
        found = [h for h in found if spare_uid is None or h.uid != spare_uid]
        fresh = [h for h in found if (h.pid, h.start) not in seen]
        if not found:
            result.survivors = []
            return result
        if not fresh:  # all already signalled and still there: they will not die
            break
        pidfds: dict[int, Holder] = {}
        for holder in fresh:
            seen.add((holder.pid, holder.start))
            pidfd = _kill(holder, proc_root)
            result.ended.append(holder)
            if pidfd is not None:
                pidfds[pidfd] = holder
        _wait(pidfds, deadline)
        for pidfd in pidfds:
            os.close(pidfd)
        if pidfds and time.monotonic() >= deadline:
            break
    found = find_holders(major, minors, nodes=nodes, exempt_uids=exempt_uids,
                         reported=reported, proc_root=proc_root)
    result.survivors = [h for h in found if spare_uid is None or h.uid != spare_uid]
    survivors = {(h.pid, h.start) for h in result.survivors}
    result.ended = [h for h in result.ended if (h.pid, h.start) not in survivors]
    return result


def end_process(pid: int, start: int, timeout_s: float,
                proc_root: Path = Path("/proc")) -> str:
    """SIGKILL the process *pid* started at *start* (never another that
    reused the pid) and wait up to *timeout_s*: ``ended``, ``gone`` (it had
    exited) or ``survived``."""
    holder = Holder(pid=pid, uid=-1, start=start, command="", minors=frozenset(), how=())
    pidfd = _kill(holder, proc_root)
    if pidfd is None:
        return "gone"
    pidfds = {pidfd: holder}
    _wait(pidfds, time.monotonic() + timeout_s)
    for fd in pidfds:
        os.close(fd)
    return "survived" if pidfds else "ended"
