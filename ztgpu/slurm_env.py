"""Strict parsing of the job fields Slurm hands to node hooks.

Standard library only: the Prolog and Epilog import this on every job start
and end. The agent re-checks the same fields with the same functions, so a
request that did not come from a hook is held to the same rules.
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ztgpu.errors import InputRejected

#: Slurm job ids are 32-bit unsigned integers; 0 is never a real job.
MAX_JOB_ID = 2**32 - 1
MAX_GPUS_PER_NODE = 64
_DIGITS = re.compile(r"[0-9]{1,10}")
_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?")
_REPORT_LIMIT = 64


def printable(value: str | None) -> str:
    """A short, printable rendering of untrusted *value* for messages."""
    if value is None:
        return "(unset)"
    text = value[:_REPORT_LIMIT].encode("unicode_escape").decode("ascii")
    return repr(text) + ("..." if len(value) > _REPORT_LIMIT else "")


@dataclass(frozen=True)
class JobEnv:
    """What a node hook knows about a job, checked."""

    job_id: str
    uid: int
    user: str
    gid: int
    #: Slurm GPU (gres) indices on this node, ascending, no duplicates.
    gpus: tuple[int, ...]


def parse_job_id(value: str | None) -> str:
    """A job id: 1-10 ASCII digits, 1..2**32-1, no sign, no padding."""
    if value is None or not _DIGITS.fullmatch(value) or value.startswith("0"):
        raise InputRejected(f"SLURM_JOB_ID {printable(value)} is not a job id "
                            f"(expected 1 to {MAX_JOB_ID})")
    if int(value) > MAX_JOB_ID:
        raise InputRejected(f"SLURM_JOB_ID {printable(value)} is larger than {MAX_JOB_ID}")
    return value


def parse_uid(value: str | None) -> int:
    if value is None or not _DIGITS.fullmatch(value) or int(value) > MAX_JOB_ID - 1:
        raise InputRejected(f"SLURM_JOB_UID {printable(value)} is not a numeric uid")
    return int(value)


def parse_gpus(value: str | None) -> tuple[int, ...]:
    """SLURM_JOB_GPUS: comma-separated gres indices (e.g. ``0,2``); unset or empty = none."""
    if value is None or value == "":
        return ()
    parts = value.split(",")
    if len(parts) > MAX_GPUS_PER_NODE or not all(_DIGITS.fullmatch(p) and len(p) <= 2
                                                  for p in parts):
        raise InputRejected(f"SLURM_JOB_GPUS {printable(value)} is not a list of GPU indices "
                            f"such as '0,2'")
    gpus = [int(p) for p in parts]
    if len(set(gpus)) != len(gpus):
        raise InputRejected(f"SLURM_JOB_GPUS {printable(value)} names a GPU twice")
    if any(g >= MAX_GPUS_PER_NODE for g in gpus):
        raise InputRejected(f"SLURM_JOB_GPUS {printable(value)} is out of range")
    return tuple(sorted(gpus))


def check_user(user: str | None, uid: int) -> int:
    """The user must exist and have exactly *uid*; returns the user's primary gid."""
    if user is None or not _USER.fullmatch(user):
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
    return JobEnv(job_id=job_id, uid=uid, user=env["SLURM_JOB_USER"], gid=gid, gpus=gpus)
