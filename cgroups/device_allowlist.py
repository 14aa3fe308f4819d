"""cgroup v1 ``devices`` controller: per-cgroup device allowlists.

A mechanism library: it knows cgroup files and device numbers, nothing about
Slurm, jobs or audit. Writes are verified by reading ``devices.list`` back.

v1 semantics worth knowing (checked on real cgroupfs by the tests):

* a new cgroup inherits its parent's list; a child can never be wider than
  its parent, and narrowing a parent narrows its children;
* in default-allow mode (``a *:* rwm`` listed) a ``devices.deny`` of one
  exact device adds an exception; a wildcard deny cannot be reopened later by
  exact allows, so exact minors are denied;
* ``deny a`` on a cgroup that has children fails with EINVAL.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ztgpu.errors import CgroupError


@dataclass(frozen=True, order=True)
class CharDevice:
    major: int
    minor: int

    def rule(self, access: str = "rwm") -> str:
        return f"c {self.major}:{self.minor} {access}"


def _write(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(f"cannot write {text!r} to {path}: {exc.strerror}") from exc


def parse_list(text: str) -> list[tuple[str, str, str, str]]:
    """``devices.list`` lines as (type, major, minor, access) strings."""
    rules = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or ":" not in parts[1]:
            continue
        major, minor = parts[1].split(":", 1)
        rules.append((parts[0], major, minor, parts[2]))
    return rules


def list_allows(text: str, device: CharDevice, access: str = "rw") -> bool:
    """Whether a ``devices.list`` content lets *device* be opened for *access*.

    In default-allow mode the list shows ``a *:* rwm`` and the kernel does not
    list exceptions, so this answers True there; callers who need certainty
    probe by opening (see the node agent's isolation probe).
    """
    for kind, major, minor, acc in parse_list(text):
        if kind not in ("a", "c"):
            continue
        if major not in ("*", str(device.major)) or minor not in ("*", str(device.minor)):
            continue
        if all(a in acc for a in access):
            return True
    return False


class DevicesV1:
    """The cgroup v1 devices hierarchy mounted at *root* (e.g. /sys/fs/cgroup/devices)."""

    def __init__(self, root: Path = Path("/sys/fs/cgroup/devices")) -> None:
        self.root = root

    def available(self) -> bool:
        return (self.root / "devices.deny").exists()

    def path(self, relative: str) -> Path:
        rel = relative.strip("/")
        if ".." in Path(rel).parts:
            raise CgroupError(f"refusing cgroup path with '..': {relative!r}")
        return self.root / rel if rel else self.root

    def ensure(self, relative: str) -> Path:
        """Create the cgroup (and parents) if needed; return its directory."""
        path = self.path(relative)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}") from exc
        return path

    def deny(self, cgroup: Path, devices: Iterable[CharDevice]) -> None:
        """Deny each device (exact major:minor) in *cgroup*."""
        for device in devices:
            _write(cgroup / "devices.deny", device.rule())

    def allow(self, cgroup: Path, devices: Iterable[CharDevice]) -> None:
        for device in devices:
            _write(cgroup / "devices.allow", device.rule())

    def rules(self, cgroup: Path) -> str:
        try:
            return (cgroup / "devices.list").read_text()
        except OSError as exc:
            raise CgroupError(f"cannot read {cgroup}/devices.list: {exc.strerror}") from exc

    def procs(self, cgroup: Path) -> set[int]:
        try:
            text = (cgroup / "cgroup.procs").read_text()
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise CgroupError(f"cannot read {cgroup}/cgroup.procs: {exc.strerror}") from exc
        return {int(line) for line in text.split()}

    def attach(self, cgroup: Path, pid: int) -> bool:
        """Move *pid* (all its threads) into *cgroup*; False if it has exited."""
        try:
            fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY)
            try:
                os.write(fd, str(pid).encode())
            finally:
                os.close(fd)
        except ProcessLookupError:
            return False
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                return False
            raise CgroupError(f"cannot move pid {pid} into {cgroup}: {exc.strerror}") from exc
        return True

    def remove(self, cgroup: Path, attempts: int = 3) -> bool:
        """Remove an empty cgroup; True when it is gone.

        Processes still inside are moved to the parent first (they are being
        reaped at job end); a cgroup that stays busy is left for a later try.
        """
        for _ in range(attempts):
            if not cgroup.exists():
                return True
            for child in sorted((p for p in cgroup.iterdir() if p.is_dir()), reverse=True):
                self.remove(child, attempts=1)
            for pid in self.procs(cgroup):
                with contextlib.suppress(CgroupError):
                    self.attach(cgroup.parent, pid)
            try:
                cgroup.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                time.sleep(0.02)
        return False
