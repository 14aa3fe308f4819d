"""cgroup v2 device control: BPF_PROG_TYPE_CGROUP_DEVICE programs over bpf(2).

A mechanism library, like :mod:`device_allowlist` for v1: it knows the bpf
syscall, cgroup directories and device numbers, nothing about Slurm or jobs.
Pure Python (ctypes); the programs are assembled here from a
:class:`DevicePolicy`, a few dozen instructions, so no compiler is needed at
run time.

The program a policy becomes is deny-by-default *for the devices it guards*
and neutral for everything else: an access to a guarded device (e.g. every
NVIDIA major) is allowed only when an ``allowed`` rule matches its type,
number and every access bit asked for (read, write, mknod); any other device
is left to the other programs on the path (systemd's, Slurm's). That is what
makes it safe to stack.

Kernel semantics this module relies on (checked by the tests on a real
cgroup2 hierarchy):

* A cgroup's effective programs are its own plus those of every ancestor
  attached with ``BPF_F_ALLOW_MULTI``; an ancestor's ``ALLOW_OVERRIDE`` or
  flag-0 program is dropped below any cgroup that has a program of its own.
  Every effective program must return 1 for the access to go through.
* ``MULTI`` programs can be attached below an ``OVERRIDE`` or ``MULTI``
  program, not below a flag-0 one; a cgroup's programs all share one flag,
  so a ``MULTI`` attach where an ``OVERRIDE`` program sits fails with EPERM.
* A program stays attached after the loader closes its descriptor, and is
  freed when it is detached or its cgroup is removed.

So a ``MULTI`` program attached to a cgroup in which no one else attaches
runs for every process below it, whatever is attached further down.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ztgpu.errors import CgroupError

#: Names of the programs this module loads start with this (bpftool shows it).
NAME_PREFIX = "ztgpu_"
#: The kernel's limit on a program name, NUL included.
_OBJ_NAME_LEN = 16

_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}

# bpf(2) commands, program and attach types, flags (include/uapi/linux/bpf.h).
_PROG_LOAD = 5
_PROG_ATTACH = 8
_PROG_DETACH = 9
_PROG_GET_NEXT_ID = 11
_PROG_GET_FD_BY_ID = 13
_OBJ_GET_INFO_BY_FD = 15
_PROG_QUERY = 16
_PROG_TYPE_CGROUP_DEVICE = 15
_CGROUP_DEVICE = 6
F_ALLOW_OVERRIDE = 1
F_ALLOW_MULTI = 2
_F_REPLACE = 4

# The program's context: struct bpf_cgroup_dev_ctx {u32 access_type; u32 major; u32 minor}.
# access_type = (access bits << 16) | device type.
_DEV_BLOCK = 1
_DEV_CHAR = 2
_ACCESS_BITS = {"m": 1, "r": 2, "w": 4}


@dataclass(frozen=True)
class DeviceRule:
    """A character device, or every minor of a major (``minor=None``), and the
    access bits the rule grants (any of ``r``, ``w``, ``m``)."""

    major: int
    minor: int | None = None
    access: str = "rwm"

    def __post_init__(self) -> None:
        if not 0 <= self.major < 2**32 or (self.minor is not None and not 0 <= self.minor < 2**32):
            raise CgroupError(f"device number out of range: {self.major}:{self.minor}")
        if not self.access or set(self.access) - set(_ACCESS_BITS):
            raise CgroupError(f"device access must be letters of 'rwm', not {self.access!r}")

    @property
    def mask(self) -> int:
        return sum(_ACCESS_BITS[a] for a in set(self.access))

    def covers(self, major: int, minor: int) -> bool:
        return self.major == major and self.minor in (None, minor)

    def __str__(self) -> str:
        return f"c {self.major}:{'*' if self.minor is None else self.minor} {self.access}"


@dataclass(frozen=True)
class DevicePolicy:
    """Which character devices are guarded, and which of those are allowed."""

    guarded: tuple[DeviceRule, ...]
    allowed: tuple[DeviceRule, ...] = ()

    def decide(self, major: int, minor: int, access: str) -> bool:
        """What the assembled program answers for a character device access
        (the reference the program is tested against)."""
        if not any(g.covers(major, minor) for g in self.guarded):
            return True
        want = DeviceRule(major, minor, access).mask
        return any(a.covers(major, minor) and want & ~a.mask == 0 for a in self.allowed)


# --- assembling -----------------------------------------------------------

# Opcodes (class | op | source) used below.
_LDX_W = 0x61        # dst = *(u32 *)(src + off)
_MOV64_X = 0xBF
_MOV64_K = 0xB7
_AND64_K = 0x57
_RSH64_K = 0x77
_JEQ_K = 0x15
_JNE_K = 0x55
_JA = 0x05
_EXIT = 0x95


class _Assembler:
    def __init__(self) -> None:
        self.code: list[tuple[int, int, int, object, int]] = []  # op, dst, src, off|label, imm
        self.labels: dict[str, int] = {}

    def emit(self, op: int, dst: int = 0, src: int = 0, off: object = 0, imm: int = 0) -> None:
        self.code.append((op, dst, src, off, imm))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (op, dst, src, off, imm) in enumerate(self.code):
            if isinstance(off, str):
                off = self.labels[off] - (pc + 1)
            assert isinstance(off, int)
            out += struct.pack("<BBhi", op, dst | (src << 4), off, imm)
        return bytes(out)


def assemble(policy: DevicePolicy) -> bytes:
    """The program's instructions (struct bpf_insn, little-endian) for *policy*."""
    a = _Assembler()
    a.emit(_LDX_W, 2, 1, 0)          # r2 = access_type
    a.emit(_MOV64_X, 3, 2)           # r3 = r2 & 0xffff: device type
    a.emit(_AND64_K, 3, imm=0xFFFF)
    a.emit(_RSH64_K, 2, imm=16)      # r2 = access bits asked for
    a.emit(_LDX_W, 4, 1, 4)          # r4 = major
    a.emit(_LDX_W, 5, 1, 8)          # r5 = minor
    a.emit(_JNE_K, 3, off="allow", imm=_DEV_CHAR)
    for i, rule in enumerate(policy.guarded):
        if rule.minor is None:
            a.emit(_JEQ_K, 4, off="check", imm=rule.major)
        else:
            a.emit(_JNE_K, 4, off=f"g{i}", imm=rule.major)
            a.emit(_JEQ_K, 5, off="check", imm=rule.minor)
            a.label(f"g{i}")
    a.emit(_JA, off="allow")         # not guarded: not ours to decide
    a.label("check")
    for i, rule in enumerate(policy.allowed):
        a.emit(_JNE_K, 4, off=f"a{i}", imm=rule.major)
        if rule.minor is not None:
            a.emit(_JNE_K, 5, off=f"a{i}", imm=rule.minor)
        if rule.mask != 7:
            a.emit(_MOV64_X, 6, 2)   # r6 = asked & ~granted
            a.emit(_AND64_K, 6, imm=~rule.mask & 7)
            a.emit(_JNE_K, 6, off=f"a{i}", imm=0)
        a.emit(_JA, off="allow")
        a.label(f"a{i}")
    a.emit(_MOV64_K, 0, imm=0)       # guarded and not allowed: deny
    a.emit(_EXIT)
    a.label("allow")
    a.emit(_MOV64_K, 0, imm=1)
    a.emit(_EXIT)
    return a.assemble()


# --- the syscall ----------------------------------------------------------

class _LoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * _OBJ_NAME_LEN),
                ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32)]


class _AttachAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32)]


class _QueryAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _ProgInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("tag", ctypes.c_uint8 * 8), ("jited_prog_len", ctypes.c_uint32),
                ("xlated_prog_len", ctypes.c_uint32), ("jited_prog_insns", ctypes.c_uint64),
                ("xlated_prog_insns", ctypes.c_uint64), ("load_time", ctypes.c_uint64),
                ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
                ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * _OBJ_NAME_LEN)]


_libc: ctypes.CDLL | None = None


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    global _libc
    number = _SYSCALL_BPF.get(platform.machine())
    if number is None:
        raise CgroupError(f"bpf(2) is not wired up for {platform.machine()}")
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result = int(_libc.syscall(ctypes.c_long(number), ctypes.c_int(cmd), ctypes.byref(attr),
                               ctypes.c_uint(ctypes.sizeof(attr))))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


@dataclass(frozen=True)
class Program:
    """A loaded program, as the kernel reports it."""

    id: int
    name: str
    tag: str


def _info(fd: int) -> Program:
    info = _ProgInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(_OBJ_GET_INFO_BY_FD, attr)
    return Program(id=info.id, name=info.name.decode(errors="replace"), tag=bytes(info.tag).hex())


def _fd_by_id(prog_id: int) -> int | None:
    try:
        return _bpf(_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None  # freed meanwhile
        raise


def load(policy: DevicePolicy, name: str) -> int:
    """Load *policy* as a device program named ``ztgpu_<name>``; returns its fd
    (the caller closes it; an attached program outlives the fd)."""
    full = f"{NAME_PREFIX}{name}"
    if len(full) >= _OBJ_NAME_LEN or not full.replace("_", "").replace(".", "").isalnum():
        raise CgroupError(f"bad device program name {full!r} (letters, digits, '_', '.'; "
                          f"at most {_OBJ_NAME_LEN - 1})")
    code = assemble(policy)
    insns = ctypes.create_string_buffer(code, len(code))
    license_text = ctypes.create_string_buffer(b"Apache-2.0")
    log = ctypes.create_string_buffer(16384)
    attr = _LoadAttr(prog_type=_PROG_TYPE_CGROUP_DEVICE, insn_cnt=len(code) // 8,
                     insns=ctypes.addressof(insns), license=ctypes.addressof(license_text),
                     log_level=1, log_size=len(log), log_buf=ctypes.addressof(log),
                     prog_name=full.encode())
    try:
        return _bpf(_PROG_LOAD, attr)
    except OSError as exc:
        detail = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise CgroupError(f"cannot load device program {full}: {exc.strerror}"
                          + (f" (verifier: {' / '.join(detail)})" if detail else "")) from exc


@contextlib.contextmanager
def _cgroup_fd(cgroup: Path) -> Iterator[int]:
    try:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise CgroupError(f"cannot open cgroup {cgroup}: {exc.strerror}") from exc
    try:
        yield fd
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Attached:
    """The device programs attached to one cgroup, and the flag they share."""

    flags: int
    programs: tuple[Program, ...]

    def ours(self) -> tuple[Program, ...]:
        return tuple(p for p in self.programs if p.name.startswith(NAME_PREFIX))


def attached(cgroup: Path) -> Attached:
    """The device programs attached directly to *cgroup* (not its ancestors')."""
    with _cgroup_fd(cgroup) as cg:
        ids = (ctypes.c_uint32 * 64)()
        attr = _QueryAttr(target_fd=cg, attach_type=_CGROUP_DEVICE,
                          prog_ids=ctypes.addressof(ids), prog_cnt=64)
        try:
            _bpf(_PROG_QUERY, attr)
        except OSError as exc:
            raise CgroupError(f"cannot list device programs of {cgroup}: {exc.strerror}") from exc
    programs = []
    for prog_id in ids[:attr.prog_cnt]:
        fd = _fd_by_id(prog_id)
        if fd is None:
            continue
        try:
            programs.append(_info(fd))
        finally:
            os.close(fd)
    return Attached(flags=attr.attach_flags, programs=tuple(programs))


def attach(cgroup: Path, prog_fd: int, *, replace_fd: int | None = None,
           flags: int = F_ALLOW_MULTI) -> None:
    """Attach a program to *cgroup*, by default with ``BPF_F_ALLOW_MULTI``;
    with *replace_fd*, atomically in place of that (attached) program.
    (Other *flags* are for tests that stand in for Slurm's own programs.)"""
    flags |= _F_REPLACE if replace_fd is not None else 0
    with _cgroup_fd(cgroup) as cg:
        attr = _AttachAttr(target_fd=cg, attach_bpf_fd=prog_fd, attach_type=_CGROUP_DEVICE,
                           attach_flags=flags, replace_bpf_fd=replace_fd or 0)
        try:
            _bpf(_PROG_ATTACH, attr)
        except OSError as exc:
            hint = (" (a program attached there without BPF_F_ALLOW_MULTI excludes ours)"
                    if exc.errno == errno.EPERM else "")
            raise CgroupError(f"cannot attach device program to {cgroup}: "
                              f"{exc.strerror}{hint}") from exc


def detach(cgroup: Path, prog_id: int) -> bool:
    """Detach program *prog_id* from *cgroup*; False if it was not attached there."""
    fd = _fd_by_id(prog_id)
    if fd is None:
        return False
    try:
        with _cgroup_fd(cgroup) as cg:
            try:
                _bpf(_PROG_DETACH, _AttachAttr(target_fd=cg, attach_bpf_fd=fd,
                                               attach_type=_CGROUP_DEVICE))
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return False
                raise CgroupError(f"cannot detach device program {prog_id} from {cgroup}: "
                                  f"{exc.strerror}") from exc
    finally:
        os.close(fd)
    return True


def program_ids() -> Iterator[int]:
    """Ids of every BPF program loaded on this host."""
    attr = _IdAttr(id=0)
    while True:
        try:
            _bpf(_PROG_GET_NEXT_ID, attr)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise CgroupError(f"cannot list BPF programs: {exc.strerror}") from exc
        yield attr.next_id
        attr.id = attr.next_id


class DevicesV2:
    """Device programs on the cgroup v2 hierarchy mounted at *root*."""

    def __init__(self, root: Path = Path("/sys/fs/cgroup")) -> None:
        self.root = root

    def path(self, relative: str) -> Path:
        rel = relative.strip("/")
        if ".." in Path(rel).parts:
            raise CgroupError(f"refusing cgroup path with '..': {relative!r}")
        return self.root / rel if rel else self.root

    def restrict(self, cgroup: Path, policy: DevicePolicy, name: str) -> Program:
        """Make *policy* the one program of ours on *cgroup*.

        The new program replaces ours atomically where one is attached (so
        there is never a moment with neither), else is added beside whatever
        else is attached. Any further programs of ours there are detached.
        """
        before = attached(cgroup).ours()
        fd = load(policy, name)
        try:
            program = _info(fd)
            old_fd = _fd_by_id(before[0].id) if before else None
            try:
                attach(cgroup, fd, replace_fd=old_fd)
            finally:
                if old_fd is not None:
                    os.close(old_fd)
        finally:
            os.close(fd)
        for extra in before[1:]:
            detach(cgroup, extra.id)
        return program

    def release(self, cgroup: Path) -> int:
        """Detach every program of ours from *cgroup*; how many were detached
        (0 when the cgroup is gone: the kernel freed them with it)."""
        if not cgroup.exists():
            return 0
        try:
            ours = attached(cgroup).ours()
        except CgroupError:
            if not cgroup.exists():
                return 0
            raise
        return sum(detach(cgroup, p.id) for p in ours)

    def programs(self, names: Iterable[str] | None = None) -> list[Program]:
        """Our programs loaded on the host (those named ``ztgpu_<name>`` for
        *names*, if given)."""
        wanted = None if names is None else {f"{NAME_PREFIX}{n}" for n in names}
        found = []
        for prog_id in program_ids():
            fd = _fd_by_id(prog_id)
            if fd is None:
                continue
            try:
                program = _info(fd)
            finally:
                os.close(fd)
            if program.name.startswith(NAME_PREFIX) and (wanted is None or program.name in wanted):
                found.append(program)
        return found
