"""Strict parsing of the job fields Slurm hands to node hooks.

The Prolog and Epilog import this on every job start and end, so it uses
only builtins and ``pwd`` (no ``re``, ``dataclasses`` or ``typing`` at run
time: each costs milliseconds of interpreter start-up). The agent re-checks
the same fields with the same functions, so a request that did not come from
a hook is held to the same rules.
"""

from __future__ import annotations

import pwd

from ztgpu.errors import InputRejected

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

#: Slurm job ids are 32-bit unsigned integers; 0 is never a real job.
MAX_JOB_ID = 2**32 - 1
MAX_GPUS_PER_NODE = 64
_REPORT_LIMIT = 64
_USER_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz_")
_USER_REST = _USER_FIRST | frozenset("0123456789.-")


def printable(value: str | None) -> str:
    """A short, printable rendering of untrusted *value* for messages."""
    if value is None:
        return "(unset)"
    text = value.encode("unicode_escape").decode("ascii").replace("'", "\\'")
    cut = len(text) > _REPORT_LIMIT
    return "'" + text[:_REPORT_LIMIT] + "'" + ("..." if cut else "")


def _is_digits(value: str, max_len: int = 10) -> bool:
    """1..max_len ASCII digits (``str.isdigit`` alone accepts other scripts' digits)."""
    return 0 < len(value) <= max_len and value.isascii() and value.isdigit()


class JobEnv:
    """What a node hook knows about a job, checked. Immutable by convention."""

    __slots__ = ("account", "gid", "gpus", "job_id", "partition", "uid", "user")

    def __init__(self, job_id: str, uid: int, user: str, gid: int,
                 gpus: tuple[int, ...], partition: str | None = None,
                 account: str | None = None) -> None:
        self.job_id = job_id
        self.uid = uid
        self.user = user
        self.gid = gid
        #: Slurm GPU (gres) indices on this node, ascending, no duplicates.
        self.gpus = gpus
        #: Partition and account, when Slurm gave plain names (for the policy).
        self.partition = partition
        self.account = account

    def _key(self) -> tuple[str, int, str, int, tuple[int, ...]]:
        return (self.job_id, self.uid, self.user, self.gid, self.gpus)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobEnv) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"JobEnv(job_id={self.job_id!r}, uid={self.uid}, user={self.user!r}, "
                f"gid={self.gid}, gpus={self.gpus})")


def parse_job_id(value: str | None) -> str:
    """A job id: 1-10 ASCII digits, 1..2**32-1, no sign, no padding."""
    if value is None or not _is_digits(value) or value.startswith("0"):
        raise InputRejected(f"SLURM_JOB_ID {printable(value)} is not a job id "
                            f"(expected 1 to {MAX_JOB_ID})")
    if int(value) > MAX_JOB_ID:
        raise InputRejected(f"SLURM_JOB_ID {printable(value)} is larger than {MAX_JOB_ID}")
    return value


def parse_uid(value: str | None) -> int:
    if (value is None or not _is_digits(value) or (value.startswith("0") and value != "0")
            or int(value) > MAX_JOB_ID - 1):
        raise InputRejected(f"SLURM_JOB_UID {printable(value)} is not a numeric uid")
    return int(value)


def parse_gpus(value: str | None) -> tuple[int, ...]:
    """SLURM_JOB_GPUS: comma-separated gres indices (e.g. ``0,2``); unset or empty = none."""
    if value is None or value == "":
        return ()
    parts = value.split(",")
    if len(parts) > MAX_GPUS_PER_NODE or not all(_is_digits(p, 2) for p in parts):
        raise InputRejected(f"SLURM_JOB_GPUS {printable(value)} is not a list of GPU indices "
                            f"such as '0,2'")
    gpus = [int(p) for p in parts]
    if len(set(gpus)) != len(gpus):
        raise InputRejected(f"SLURM_JOB_GPUS {printable(value)} names a GPU twice")
    if any(g >= MAX_GPUS_PER_NODE for g in gpus):
        raise InputRejected(f"SLURM_JOB_GPUS {printable(value)} is out of range")
    return tuple(sorted(gpus))


def valid_user_name(user: str) -> bool:
    body = user[:-1] if user.endswith("$") else user
    return (0 < len(body) <= 32 and body[0] in _USER_FIRST
            and all(ch in _USER_REST for ch in body))


def check_user(user: str | None, uid: int) -> int:
    """The user must exist and have exactly *uid*; returns the user's primary gid."""
    if user is None or not valid_user_name(user):
        raise InputRejected(f"SLURM_JOB_USER {printable(user)} is not a user name")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise InputRejected(f"SLURM_JOB_USER {printable(user)} does not exist on this node") \
            from None
    if entry.pw_uid != uid:
        raise InputRejected(f"SLURM_JOB_USER {printable(user)} has uid {entry.pw_uid}, "
                            f"not SLURM_JOB_UID {uid}")
    return entry.pw_gid


def parse_job_env(env: Mapping[str, str]) -> JobEnv:
    """Read and check SLURM_JOB_ID/UID/USER/GPUS.

    Raises:
        InputRejected: a field is missing or malformed, or the user does not
            match the uid. The message names the variable and its (escaped,
            truncated) value.
    """
    job_id = parse_job_id(env.get("SLURM_JOB_ID"))
    uid = parse_uid(env.get("SLURM_JOB_UID"))
    gid = check_user(env.get("SLURM_JOB_USER"), uid)
    gpus = parse_gpus(env.get("SLURM_JOB_GPUS"))
    return JobEnv(job_id=job_id, uid=uid, user=env["SLURM_JOB_USER"], gid=gid, gpus=gpus,
                  partition=parse_word(env.get("SLURM_JOB_PARTITION")),
                  account=parse_word(env.get("SLURM_JOB_ACCOUNT")))


_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def parse_word(value: object) -> str | None:
    """A partition or account name (1-64 of ``[A-Za-z0-9_.-]``), else None.

    These only inform the policy, so a missing or odd value is dropped
    rather than refusing the job (the policy then sees no partition).
    """
    if isinstance(value, str) and 0 < len(value) <= 64 and _WORD_CHARS.issuperset(value):
        return value
    return None
