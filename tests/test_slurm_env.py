"""Strict parsing of the SLURM_JOB_* fields the node hooks and the agent trust."""

from __future__ import annotations

import pwd
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztgpu.errors import Denied, InputRejected
from ztgpu.slurm.env import (
    MAX_GPUS_PER_NODE,
    MAX_JOB_ID,
    JobEnv,
    check_user,
    parse_gpus,
    parse_job_env,
    parse_job_id,
    parse_uid,
    printable,
)

NOBODY = pwd.getpwnam("nobody")
ROOT = pwd.getpwuid(0)


def rejected(func: object, value: object) -> str:
    with pytest.raises(InputRejected) as info:
        func(value)  # type: ignore[operator]
    return str(info.value)


# ---- job id ------------------------------------------------------------------

@pytest.mark.parametrize("value", ["1", "9", "10", "17", "4294967295", "1000000000"])
def test_job_id_accepted(value: str) -> None:
    assert parse_job_id(value) == value


@pytest.mark.parametrize("value", [
    "0", "00", "007", "01", "4294967296", "9999999999", "12345678901234567890", "", " 1",
    "1 ", "1\n", "\n1", "+1", "-1", "1;id", "1 && reboot", "../../x", "1/../2", "1.0", "1e3",
    "0x10", "\u0661\u0662", "\uff11\uff12", "12\x00", "abc", None,
])
def test_job_id_rejected(value: str | None) -> None:
    message = rejected(parse_job_id, value)
    assert message.startswith("SLURM_JOB_ID ")


def test_job_id_rejection_is_a_denial_not_a_fault() -> None:
    with pytest.raises(Denied):
        parse_job_id("0")


def test_job_id_messages_say_what_is_expected() -> None:
    assert "expected 1 to 4294967295" in rejected(parse_job_id, "x")
    assert "larger than 4294967295" in rejected(parse_job_id, "4294967296")
    assert "(unset)" in rejected(parse_job_id, None)


_JOB_ID_ORACLE = re.compile(r"[1-9][0-9]{0,9}")


@settings(max_examples=500)
@given(st.one_of(
    st.text(max_size=14),
    st.text(alphabet="0123456789", min_size=1, max_size=12),
    st.integers(min_value=0, max_value=2**34).map(str),
    st.integers(min_value=MAX_JOB_ID - 3, max_value=MAX_JOB_ID + 3).map(str),
    st.from_regex(r"\A[ +\-0]?[0-9]{1,11}[ \n;]?\Z"),
))
def test_job_id_accepts_exactly_plain_32_bit_numbers(value: str) -> None:
    expected = bool(_JOB_ID_ORACLE.fullmatch(value)) and int(value) <= 2**32 - 1
    try:
        got = parse_job_id(value)
    except InputRejected:
        assert not expected, value
    else:
        assert expected, value
        assert got == value


# ---- GPU indices -------------------------------------------------------------

@pytest.mark.parametrize(("value", "gpus"), [
    (None, ()),
    ("", ()),
    ("0", (0,)),
    ("0,2", (0, 2)),
    ("2,0", (0, 2)),
    ("3,1,2,0", (0, 1, 2, 3)),
    ("63", (63,)),
    (",".join(str(i) for i in reversed(range(64))), tuple(range(64))),
])
def test_gpus_accepted_and_sorted(value: str | None, gpus: tuple[int, ...]) -> None:
    assert parse_gpus(value) == gpus


@pytest.mark.parametrize("value", [
    "0,0", "1,2,1", "0,,1", ",0", "0,", ",", "a", "0x1", "-1", "0,-1", " 0", "0 ", "0, 1",
    "1;2", "0-3", "0\n", "64", "99", "100", "\u0661", ",".join(["0"] * 65),
    ",".join(str(i) for i in range(65)),
])
def test_gpus_rejected(value: str) -> None:
    message = rejected(parse_gpus, value)
    assert message.startswith("SLURM_JOB_GPUS ")


def test_gpus_messages_say_why() -> None:
    assert "names a GPU twice" in rejected(parse_gpus, "1,1")
    assert "out of range" in rejected(parse_gpus, "64")
    assert "such as '0,2'" in rejected(parse_gpus, "0-3")


@given(st.lists(st.integers(min_value=0, max_value=MAX_GPUS_PER_NODE - 1), unique=True,
                max_size=MAX_GPUS_PER_NODE))
def test_gpus_any_distinct_in_range_indices_in_any_order(indices: list[int]) -> None:
    assert parse_gpus(",".join(map(str, indices))) == tuple(sorted(indices))


# ---- uid ---------------------------------------------------------------------

@pytest.mark.parametrize(("value", "uid"), [
    ("0", 0), ("1000", 1000), (str(NOBODY.pw_uid), NOBODY.pw_uid), ("4294967294", 2**32 - 2),
])
def test_uid_accepted(value: str, uid: int) -> None:
    assert parse_uid(value) == uid


@pytest.mark.parametrize("value", [
    # 4294967295 is (uid_t)-1, "no uid" to the kernel's set*id calls.
    "4294967295", "4294967296", "-1", "+0", "", " 0", "0 ", "1e3", "0x0", "\u0661", "root",
    "12345678901", None,
])
def test_uid_rejected(value: str | None) -> None:
    assert rejected(parse_uid, value).startswith("SLURM_JOB_UID ")


# ---- user --------------------------------------------------------------------

def test_check_user_root() -> None:
    assert check_user("root", 0) == ROOT.pw_gid


def test_check_user_nobody() -> None:
    assert check_user("nobody", NOBODY.pw_uid) == NOBODY.pw_gid


def test_check_user_with_another_users_uid_is_rejected() -> None:
    with pytest.raises(InputRejected) as info:
        check_user("nobody", 0)
    message = str(info.value)
    assert message.startswith("SLURM_JOB_USER 'nobody' has uid")
    assert f"uid {NOBODY.pw_uid}, not SLURM_JOB_UID 0" in message


def test_check_user_root_name_with_other_uid_is_rejected() -> None:
    # A job claiming to be root's but running as someone else.
    with pytest.raises(InputRejected, match="not SLURM_JOB_UID 1000"):
        check_user("root", 1000)


def test_check_user_unknown_user() -> None:
    with pytest.raises(InputRejected, match="does not exist on this node"):
        check_user("no_such_user_ztgpu", 4242)


@pytest.mark.parametrize("user", [
    None, "", "Root", "root ", " root", "ro ot", "root\n", "root;id", "../root", "-root",
    "1root", "a" * 33, "nöbody", "root\x00",
])
def test_check_user_malformed_name(user: str | None) -> None:
    with pytest.raises(InputRejected) as info:
        check_user(user, 0)
    assert str(info.value).startswith("SLURM_JOB_USER ")
    assert "is not a user name" in str(info.value)


# ---- the whole environment ---------------------------------------------------

def test_parse_job_env_good() -> None:
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_UID": str(NOBODY.pw_uid),
           "SLURM_JOB_USER": "nobody", "SLURM_JOB_GPUS": "3,1", "PATH": "/usr/bin"}
    assert parse_job_env(env) == JobEnv(job_id="4242", uid=NOBODY.pw_uid, user="nobody",
                                        gid=NOBODY.pw_gid, gpus=(1, 3))


def test_parse_job_env_without_gpus() -> None:
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_UID": "0", "SLURM_JOB_USER": "root"}
    assert parse_job_env(env).gpus == ()


@pytest.mark.parametrize(("drop", "variable"), [
    ("SLURM_JOB_ID", "SLURM_JOB_ID"),
    ("SLURM_JOB_UID", "SLURM_JOB_UID"),
    ("SLURM_JOB_USER", "SLURM_JOB_USER"),
])
def test_parse_job_env_missing_field_names_it(drop: str, variable: str) -> None:
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_UID": "0", "SLURM_JOB_USER": "root",
           "SLURM_JOB_GPUS": "0"}
    del env[drop]
    with pytest.raises(InputRejected) as info:
        parse_job_env(env)
    assert str(info.value).startswith(f"{variable} (unset)")


def test_parse_job_env_user_uid_mismatch() -> None:
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_UID": "0", "SLURM_JOB_USER": "nobody"}
    with pytest.raises(InputRejected, match="not SLURM_JOB_UID 0"):
        parse_job_env(env)


def test_parse_job_env_bad_gpus_after_good_identity() -> None:
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_UID": "0", "SLURM_JOB_USER": "root",
           "SLURM_JOB_GPUS": "0,0"}
    with pytest.raises(InputRejected, match="SLURM_JOB_GPUS '0,0' names a GPU twice"):
        parse_job_env(env)


# ---- hostile values in messages ----------------------------------------------

_PARSERS = [
    (parse_job_id, "SLURM_JOB_ID"),
    (parse_uid, "SLURM_JOB_UID"),
    (parse_gpus, "SLURM_JOB_GPUS"),
    (lambda value: check_user(value, 0), "SLURM_JOB_USER"),
]


@pytest.mark.parametrize(("parse", "variable"), _PARSERS, ids=[v for _, v in _PARSERS])
@pytest.mark.parametrize(("hostile", "marker"), [
    ("A" * 5000, "A"),
    ("Q\n" * 1000, "Q"),
    ("Q\r\x1b[2K" * 500, "Q"),
    ("\x1b[31mQ" * 300, "Q"),
    ("Q\x00" * 1000, "Q"),
    # os.environ turns bytes that are not UTF-8 into lone surrogates.
    ("Q\udcff" * 1000, "Q"),
])
def test_hostile_values_are_cut_short_and_escaped(parse: object, variable: str, hostile: str,
                                                  marker: str) -> None:
    message = rejected(parse, hostile)
    assert message.startswith(f"{variable} '")
    # Escaped: one line, no terminal control sequences.
    assert message.isprintable()
    assert "\x1b" not in message and "\n" not in message and "\x00" not in message
    # Cut short: at most the first 64 characters of the value are echoed
    # (and some are, so the admin can see what was sent).
    assert 1 <= message.count(marker) <= 64
    assert "..." in message
    assert len(message) < 500


def test_escape_sequence_is_shown_escaped() -> None:
    message = rejected(parse_job_id, "\x1b[31m")
    assert "\x1b" not in message
    assert "x1b[31m" in message


def test_printable_unset_and_plain() -> None:
    assert printable(None) == "(unset)"
    assert printable("abc") == "'abc'"
    assert printable("a" * 64) == repr("a" * 64)
    assert printable("a" * 65) == repr("a" * 64) + "..."


@given(st.text(max_size=300))
def test_printable_is_always_one_printable_line(value: str) -> None:
    shown = printable(value)
    assert shown.isprintable()
    assert shown.startswith("'") or shown.startswith('"')
    assert shown.endswith(("'", '"', "..."))
