"""Tests that kill the mutants an independent mutation run left alive.

Each test pins one behaviour of the security-critical pure logic
(``ztgpu.slurm.env``, ``ztgpu.trust.grants``, ``ztgpu.audit.events``,
``ztgpu.policy``, ``ztgpu.trust.totp``) that a mutant used to change without
any test noticing: an exact exception and message, or an exact value. The
mutation run itself is ``make mutation`` (see ``tests/MUTATION.md``).

Survivors judged *equivalent* (no test can tell them from the original) are
listed in ``tests/MUTATION.md`` with the reason; the notable ones:

* ``slurm.env._is_digits``: ``0 < len(value)`` made ``0 <= len(value)`` is
  equivalent, since ``"".isdigit()`` is False anyway.
* ``slurm.env.printable``: the codec names ``"unicode_escape"`` and
  ``"ascii"`` upper-cased are the same codecs (codec lookup ignores case).
* ``events._check_fields``: ``len(_GOOD_NAMES) < 10_000`` moved by one only
  changes the size of a cache of already-checked names, never a result.
* ``grants._unb64url``: ``len(text) % 4 == 1`` removed is caught anyway by the
  round-trip check ``_b64url(data) == text`` (base64 of such a length never
  round-trips), so the early refusal only saves work.
"""

from __future__ import annotations

import hashlib
import json
import pwd
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest

from ztgpu.audit import events
from ztgpu.audit.events import EventError
from ztgpu.errors import InputRejected
from ztgpu.policy import AccessRequest, evaluate, parse_policy
from ztgpu.slurm import env as slurm_env
from ztgpu.trust import grants, totp
from ztgpu.trust.grants import GrantError, GrantKeyError
from ztgpu.trust.totp import TotpError

# ---------------------------------------------------------------- slurm env


@pytest.mark.parametrize("value", ["gpu", "A", "a" * 64, "Proj_1.x-y", "0"])
def test_parse_word_accepts_and_returns_plain_names(value: str) -> None:
    assert slurm_env.parse_word(value) == value


@pytest.mark.parametrize("value", [
    None, "", "a" * 65, "gpu,debug", "a b", "a/b", "ä", "gpu\n", 7, b"gpu", ["gpu"],
])
def test_parse_word_drops_odd_values(value: object) -> None:
    assert slurm_env.parse_word(value) is None


def _nobody_env(**extra: str) -> dict[str, str]:
    nobody = pwd.getpwnam("nobody")
    return {"SLURM_JOB_ID": "77", "SLURM_JOB_UID": str(nobody.pw_uid),
            "SLURM_JOB_USER": "nobody", "SLURM_JOB_GPUS": "0,3", **extra}


def test_parse_job_env_carries_partition_and_account() -> None:
    job = slurm_env.parse_job_env(_nobody_env(SLURM_JOB_PARTITION="gpu",
                                              SLURM_JOB_ACCOUNT="proj-1"))
    assert (job.job_id, job.user, job.gpus, job.partition, job.account) == (
        "77", "nobody", (0, 3), "gpu", "proj-1")


def test_parse_job_env_drops_odd_partition_and_account() -> None:
    job = slurm_env.parse_job_env(_nobody_env(SLURM_JOB_PARTITION="gpu debug",
                                              SLURM_JOB_ACCOUNT="a" * 65))
    assert (job.partition, job.account) == (None, None)
    assert slurm_env.parse_job_env(_nobody_env()).partition is None


@pytest.mark.parametrize("user", [
    "a!$",            # a bad character before the trailing '$'
    "ab$c$",          # '$' in the middle
    "a" * 33 + "$",   # 33 characters before the '$'
    "aB$",            # upper case in the body
    "$",              # nothing before the '$'
    "1a$",            # body starts with a digit
])
def test_machine_account_names_are_checked_in_full(user: str) -> None:
    with pytest.raises(InputRejected) as info:
        slurm_env.check_user(user, 0)
    assert str(info.value) == f"SLURM_JOB_USER '{user}' is not a user name"


@pytest.mark.parametrize("user", ["ab$", "a" * 32 + "$", "a" * 32, "_x.y-1$", "q", "q$"])
def test_machine_account_names_pass_the_name_check(user: str) -> None:
    # Well-formed names get as far as the user lookup.
    with pytest.raises(InputRejected) as info:
        slurm_env.check_user(user, 0)
    assert str(info.value) == f"SLURM_JOB_USER '{user}' does not exist on this node"


def test_parse_job_env_keeps_uid_and_gid() -> None:
    nobody = pwd.getpwnam("nobody")
    job = slurm_env.parse_job_env(_nobody_env())
    assert (job.uid, job.gid) == (nobody.pw_uid, nobody.pw_gid)


def test_job_env_equality_and_hash() -> None:
    a = slurm_env.JobEnv("1", 5, "u", 6, (0,), partition="p")
    same = slurm_env.JobEnv("1", 5, "u", 6, (0,), account="x")  # policy fields not in the key
    other = slurm_env.JobEnv("2", 5, "u", 6, (0,))
    assert a == same and hash(a) == hash(same) == hash(("1", 5, "u", 6, (0,)))
    assert a != other and hash(a) != hash(other)
    assert a != "1" and a != 5


def test_numeric_fields_are_exact() -> None:
    with pytest.raises(InputRejected) as info:
        slurm_env.parse_job_id("10000000000")  # 11 digits
    assert str(info.value) == ("SLURM_JOB_ID '10000000000' is not a job id "
                               "(expected 1 to 4294967295)")
    with pytest.raises(InputRejected) as info:
        slurm_env.parse_uid("007")
    assert str(info.value) == "SLURM_JOB_UID '007' is not a numeric uid"
    with pytest.raises(InputRejected) as info:
        slurm_env.parse_gpus("100")
    assert str(info.value) == ("SLURM_JOB_GPUS '100' is not a list of GPU indices "
                               "such as '0,2'")
    assert slurm_env.parse_gpus("05") == (5,)


def test_user_name_check_is_exact() -> None:
    assert slurm_env.valid_user_name("ab$") is True
    assert slurm_env.valid_user_name("a" * 32 + "$") is True
    assert slurm_env.valid_user_name("a" * 33) is False
    assert slurm_env.valid_user_name("a!$") is False
    assert slurm_env.valid_user_name("") is False


def test_job_id_and_uid_bounds() -> None:
    assert slurm_env.parse_job_id(str(2**32 - 1)) == "4294967295"
    with pytest.raises(InputRejected) as info:
        slurm_env.parse_job_id(str(2**32))
    assert str(info.value) == "SLURM_JOB_ID '4294967296' is larger than 4294967295"
    assert slurm_env.parse_uid("0") == 0
    assert slurm_env.parse_uid(str(2**32 - 2)) == 2**32 - 2
    with pytest.raises(InputRejected):
        slurm_env.parse_uid(str(2**32 - 1))


def test_gpu_index_bounds() -> None:
    assert slurm_env.parse_gpus("63,0") == (0, 63)
    with pytest.raises(InputRejected) as info:
        slurm_env.parse_gpus("64")
    assert str(info.value) == "SLURM_JOB_GPUS '64' is out of range"
    assert slurm_env.parse_gpus(",".join(str(i) for i in range(64))) == tuple(range(64))


def test_printable_truncates_at_exactly_64() -> None:
    assert slurm_env.printable("a" * 64) == "'" + "a" * 64 + "'"
    assert slurm_env.printable("a" * 65) == "'" + "a" * 64 + "'..."
    assert slurm_env.printable(None) == "(unset)"


# ------------------------------------------------------------------- events

TS = "2026-01-02T03:04:05.000006Z"
KNOWN_EVENT_BYTES = (
    b'{"code":"agent.stop","node":"gpu07",'
    b'"prev":"0000000000000000000000000000000000000000000000000000000000000000",'
    b'"reason":"caf\xc3\xa9","seq":1,"severity":"info",'
    b'"ts":"2026-01-02T03:04:05.000006Z","v":1}'
)
KNOWN_EVENT_HASH = "5068b2ecb16258b0b35c6118d9db885327b7fa594b95fbabe37e5320694f2d23"


def _event(seq: int = 1, prev: str = events.GENESIS_PREV, **fields: Any) -> dict[str, Any]:
    return events.build_event(events.REGISTRY["agent.stop"], "gpu07", seq, prev, TS,
                              fields or {"reason": "café"})


def test_chain_hash_known_answer() -> None:
    event = _event()
    # Sorted keys, no spaces, UTF-8 (not \u escapes), no "hash" key.
    assert events.canonical_bytes(event) == KNOWN_EVENT_BYTES
    assert hashlib.sha256(KNOWN_EVENT_BYTES).hexdigest() == KNOWN_EVENT_HASH
    assert event["hash"] == KNOWN_EVENT_HASH == events.event_hash(event)
    assert events.verify_chain([event]) == events.ChainResult(True, 1)


def test_checkpoint_message_known_answer() -> None:
    payload = {"node": "gpu07", "seq": 5, "hash": "a" * 64, "ts": TS, "sig": "x", "other": 1}
    expected = (b"ztgpu-checkpoint-v1\n"
                b'{"hash":"' + b"a" * 64 + b'","node":"gpu07","seq":5,'
                b'"ts":"2026-01-02T03:04:05.000006Z"}')
    message = events.checkpoint_message(payload)
    assert message == expected
    assert hashlib.sha256(message).hexdigest() == (
        "faf1832de5653acc969f653966c7f09748b637c3c51efbef59363e41b48d7442")
    # ASCII escapes, unlike the chain hash.
    assert events.checkpoint_message({**payload, "node": "né"}).endswith(
        b'"node":"n\\u00e9","seq":5,"ts":"2026-01-02T03:04:05.000006Z"}')


def test_checkpoint_message_refusals() -> None:
    with pytest.raises(ValueError, match=r"^checkpoint payload lacks seq, ts$"):
        events.checkpoint_message({"node": "n", "hash": "a"})
    with pytest.raises(ValueError, match=r"^checkpoint payload is not JSON data"):
        events.checkpoint_message({"node": "n", "seq": {1}, "hash": "a", "ts": "t"})
    with pytest.raises(ValueError):
        events.checkpoint_message({"node": "n", "seq": float("nan"), "hash": "a", "ts": "t"})


def test_max_seq_is_two_to_the_62() -> None:
    assert events.MAX_SEQ == 2**62
    assert events.check_envelope(_event(seq=2**62 - 1)) is None
    assert events.check_envelope(_event(seq=2**62)) == (
        "agent.stop: seq must be an int from 1 to 4611686018427387903")
    assert events.check_envelope(_event(seq=1)) is None
    assert events.check_envelope(_event(seq=0)) == (
        "agent.stop: seq must be an int from 1 to 4611686018427387903")


def test_chain_refuses_an_event_whose_hash_cannot_be_recomputed() -> None:
    event = _event()
    event["extra"] = float("nan")  # not JSON data: the hash cannot be recomputed
    result = events.verify_chain([event])
    assert (result.ok, result.checked, result.first_bad_seq) == (False, 0, 1)
    assert result.problem is not None
    assert result.problem.startswith("event is not JSON data: ")
    event = _event()
    event["extra"] = {1, 2}
    result = events.verify_chain([event])
    assert result.ok is False
    assert result.problem is not None
    assert result.problem.startswith("event is not JSON data: ")


def test_chain_of_two_and_breaks() -> None:
    first = _event()
    second = _event(seq=2, prev=first["hash"])
    assert events.verify_chain([first, second]) == events.ChainResult(True, 2)
    bad = dict(second, reason="changed")
    assert events.verify_chain([first, bad]) == events.ChainResult(
        False, 1, 2, "hash mismatch: the event was altered")
    genesis = _event(prev="1" * 64)
    assert events.verify_chain([genesis]) == events.ChainResult(
        False, 0, 1, "first event's prev is not the genesis value")


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"a": [NaN]}'])
def test_parse_json_refuses_constants(text: str) -> None:
    name = text.strip('{"a: []}')
    with pytest.raises(ValueError) as info:
        events.parse_json(text)
    assert str(info.value) == f"{name} is not JSON data"


@pytest.mark.parametrize(("text", "shown"), [
    ("1e400", "1e400"), ("-1e400", "-1e400"),
    ("1.0e99999999999999999999999", "1.0e" + "9" * 16),  # first 20 characters
])
def test_parse_json_refuses_overflow(text: str, shown: str) -> None:
    with pytest.raises(ValueError) as info:
        events.parse_json(text)
    assert str(info.value) == f"{shown} is out of range"


def test_parse_json_returns_the_data() -> None:
    assert events.parse_json(b'{"a": 1.5, "b": [1, "x", null, true]}') == {
        "a": 1.5, "b": [1, "x", None, True]}
    assert events.parse_json("1e308") == 1e308


def test_format_timestamp() -> None:
    moment = datetime(2026, 1, 2, 4, 4, 5, 6, tzinfo=UTC) .astimezone()
    assert events.format_timestamp(moment) == "2026-01-02T04:04:05.000006Z"
    with pytest.raises(EventError, match=r"^event timestamps need a timezone-aware datetime$"):
        events.format_timestamp(datetime(2026, 1, 2))


# ------------------------------------------------------------------- policy

def _hours_policy(window: str) -> Any:
    return parse_policy(
        f"version: 1\nrules: [{{name: w, allow: true, allowed_hours: {window}}}]\n",
        "/etc/ztgpu/policy.yaml")


def _request(now: datetime) -> AccessRequest:
    return AccessRequest(user="bob", groups=frozenset({"ml"}), account="proj1",
                         partition="gpu", gpus=1, now=now, mfa_age_s=60.0)


# Monday 2024-06-03.
@pytest.mark.parametrize(("hhmm", "inside"), [
    ("08:29", False), ("08:30", True), ("08:31", True),
    ("17:44", True), ("17:45", False), ("17:46", False), ("07:31", False),
])
def test_day_window_with_minutes(hhmm: str, inside: bool) -> None:
    pol = _hours_policy('{from: "08:30", to: "17:45", tz: UTC}')
    window = pol.rules[0].allowed_hours
    assert (window.start, window.end) == (8 * 60 + 30, 17 * 60 + 45)
    hour, minute = map(int, hhmm.split(":"))
    now = datetime(2024, 6, 3, hour, minute, 30, tzinfo=UTC)
    decision = evaluate(pol, _request(now))
    assert decision.code == ("allowed" if inside else "outside_hours")
    if not inside:
        assert decision.reason == (
            f"rule w allows GPU jobs only every day 08:30-17:45 UTC; it is now mon {hhmm} "
            "there")


@pytest.mark.parametrize(("when", "inside"), [
    ("2024-06-07T22:14", False),   # Friday, a minute before the window opens
    ("2024-06-07T22:15", True),
    ("2024-06-08T06:44", True),    # Saturday morning belongs to Friday's window
    ("2024-06-08T06:45", False),   # end is exclusive
    ("2024-06-03T06:44", False),   # Monday morning belongs to Sunday: not a window day
    ("2024-06-03T22:15", True),
])
def test_overnight_window_with_minutes(when: str, inside: bool) -> None:
    pol = _hours_policy('{days: [mon, fri], from: "22:15", to: "06:45", tz: UTC}')
    window = pol.rules[0].allowed_hours
    assert (window.start, window.end, window.overnight) == (1335, 405, True)
    now = datetime.fromisoformat(when).replace(tzinfo=UTC)
    assert window.contains(now) is inside
    assert evaluate(pol, _request(now)).code == ("allowed" if inside else "outside_hours")


def test_window_describe_with_minutes() -> None:
    pol = _hours_policy('{days: [mon, fri], from: "22:15", to: "06:45", tz: UTC}')
    assert pol.rules[0].allowed_hours.describe() == "mon,fri 22:15-06:45 (next day) UTC"


def test_naive_now_is_refused() -> None:
    with pytest.raises(InputRejected) as info:
        _request(datetime(2024, 6, 3, 10, 0))
    assert str(info.value) == "access request: 'now' must carry a time zone"


# ------------------------------------------------------------------- grants

T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
GPU0 = [{"index": 0, "uuid": "GPU-0000"}]


@pytest.fixture(scope="module")
def key() -> grants.SigningKey:
    return grants.new_signing_key(now=T0)


@pytest.fixture(scope="module")
def keyset(key: grants.SigningKey) -> dict[str, Any]:
    return grants.jwks([(key.kid, key.public_key())])


def _issue(key: grants.SigningKey, **over: Any) -> str:
    args: dict[str, Any] = {"job_id": "4242", "uid": 1001, "user": "alice", "node": "gpu07",
                            "gpus": GPU0, "expires_at": T0 + timedelta(hours=2), "now": T0}
    args.update(over)
    return grants.issue_grant(key, **args)


def _verify(token: str, keyset: dict[str, Any], **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"job_id": "4242", "uid": 1001, "node": "gpu07", "gpus": GPU0,
                            "now": T0 + timedelta(minutes=1)}
    args.update(over)
    return grants.verify_grant(token, keyset, **args)


def _jwks_entry(keyset: dict[str, Any], **over: Any) -> dict[str, Any]:
    entry = {**keyset["keys"][0], **over}
    return {"keys": [{k: v for k, v in entry.items() if v is not None}]}


@pytest.mark.parametrize(("over", "message"), [
    ({"kty": "EC"}, "is not an OKP Ed25519 key"),
    ({"kty": None}, "is not an OKP Ed25519 key"),
    ({"crv": "X25519"}, "is not an OKP Ed25519 key"),
    ({"crv": "Ed448"}, "is not an OKP Ed25519 key"),
    ({"crv": None}, "is not an OKP Ed25519 key"),
    ({"alg": "ES256"}, "is not an EdDSA signature key"),
    ({"use": "enc"}, "is not an EdDSA signature key"),
])
def test_jwks_refuses_other_key_types(keyset: dict[str, Any], key: grants.SigningKey,
                                      over: dict[str, Any], message: str) -> None:
    with pytest.raises(GrantKeyError) as info:
        grants.parse_jwks(_jwks_entry(keyset, **over))
    assert str(info.value) == f"JWKS key {key.kid} {message}"


@pytest.mark.parametrize("kid", [None, "", 7, "a b", "k" * 65, "k.1"])
def test_jwks_refuses_bad_kids(keyset: dict[str, Any], kid: object) -> None:
    entry = {**keyset["keys"][0], "kid": kid}
    if kid is None:
        del entry["kid"]
    with pytest.raises(GrantKeyError) as info:
        grants.parse_jwks({"keys": [entry]})
    assert str(info.value) == "JWKS key #0 has no valid kid"


def test_jwks_refuses_a_repeated_kid(keyset: dict[str, Any], key: grants.SigningKey) -> None:
    entry = keyset["keys"][0]
    with pytest.raises(GrantKeyError) as info:
        grants.parse_jwks({"keys": [entry, dict(entry)]})
    assert str(info.value) == f"key id {key.kid} appears twice in the JWKS"


def test_jwks_accepts_a_64_char_kid_and_no_alg_use(key: grants.SigningKey) -> None:
    doc = grants.jwks([("k" * 64, key.public_key())])
    entry = dict(doc["keys"][0])
    del entry["alg"], entry["use"]
    parsed = grants.parse_jwks({"keys": [entry]})
    assert list(parsed) == ["k" * 64]


def test_token_signed_with_unlisted_kid_is_unknown_key(key: grants.SigningKey) -> None:
    other = grants.jwks([("other", key.public_key())])
    token = _issue(key)
    with pytest.raises(GrantError) as info:
        _verify(token, other)
    assert info.value.code == "unknown_key"
    assert str(info.value) == (f"grant is signed with key {key.kid!r}, which is not among "
                               "the authorisation daemon's published keys")


def _token_of_length(key: grants.SigningKey, length: int) -> str:
    """A valid grant of exactly ``length`` characters (padded with an extra claim)."""
    base = len(_issue(key, extra={"pad": ""}, jti="j"))
    first = max(0, (length - base) * 3 // 4 - 8)
    for pad in range(first, first + 24):
        for jti in ("j", "jj", "jjj"):
            token = _issue(key, extra={"pad": "x" * pad}, jti=jti)
            if len(token) == length:
                return token
    raise AssertionError(f"no token of {length} characters")


def test_token_size_cap_is_exactly_16_kib(key: grants.SigningKey,
                                           keyset: dict[str, Any]) -> None:
    assert grants.MAX_TOKEN_CHARS == 16384
    at_cap = _token_of_length(key, 16384)
    assert _verify(at_cap, keyset)["jti"] in ("j", "jj", "jjj")
    over = _token_of_length(key, 16385)
    with pytest.raises(GrantError) as info:
        _verify(over, keyset)
    assert info.value.code == "malformed"
    assert str(info.value) == "not a signed grant (expected a compact JWS)"


def test_gpu_index_zero_is_granted_and_verified(key: grants.SigningKey,
                                                keyset: dict[str, Any]) -> None:
    token = _issue(key)
    claims = _verify(token, keyset)
    assert claims["gpus"] == [{"index": 0, "uuid": "GPU-0000"}]
    with pytest.raises(GrantError) as info:
        _verify(token, keyset, gpus=[{"index": 1, "uuid": "GPU-0000"}])
    assert info.value.code == "wrong_gpus"
    assert str(info.value) == ("grant for job '4242' names GPUs [0], the job has [1] "
                               "(or their uuids differ)")


def test_negative_gpu_index_is_refused(key: grants.SigningKey) -> None:
    with pytest.raises(InputRejected):
        _issue(key, gpus=[{"index": -1, "uuid": "GPU-x"}])


def test_verify_with_now_none_uses_the_clock(key: grants.SigningKey,
                                             keyset: dict[str, Any]) -> None:
    real_now = datetime.now(UTC)
    token = _issue(key, now=None, expires_at=real_now + timedelta(hours=1))
    claims = grants.verify_grant(token, keyset, job_id="4242", uid=1001, node="gpu07",
                                 gpus=GPU0)
    assert abs(claims["iat"] - real_now.timestamp()) < 120
    assert claims["nbf"] == claims["iat"]
    # A grant of 2025 has long expired by the real clock.
    old = _issue(key)
    with pytest.raises(GrantError) as info:
        grants.verify_grant(old, keyset, job_id="4242", uid=1001, node="gpu07", gpus=GPU0)
    assert info.value.code == "expired"
    # And one issued (by the real clock) a day from now is not valid yet.
    future = _issue(key, now=real_now + timedelta(days=1),
                    expires_at=real_now + timedelta(days=2))
    with pytest.raises(GrantError) as info:
        grants.verify_grant(future, keyset, job_id="4242", uid=1001, node="gpu07", gpus=GPU0)
    assert info.value.code == "not_yet_valid"


def test_naive_now_refused_by_verify(key: grants.SigningKey, keyset: dict[str, Any]) -> None:
    with pytest.raises(InputRejected) as info:
        _verify(_issue(key), keyset, now=datetime(2025, 6, 1, 12, 1))
    assert str(info.value) == "grant time now must be a timezone-aware datetime"


def test_expiry_and_leeway_boundaries(key: grants.SigningKey, keyset: dict[str, Any]) -> None:
    token = _issue(key)  # iat = nbf = T0, exp = T0 + 2h
    exp = T0 + timedelta(hours=2)
    assert _verify(token, keyset, now=exp + timedelta(seconds=29))["job"] == "4242"
    with pytest.raises(GrantError) as info:
        _verify(token, keyset, now=exp + timedelta(seconds=30))
    assert info.value.code == "expired"
    assert _verify(token, keyset, now=T0 - timedelta(seconds=30))["job"] == "4242"
    with pytest.raises(GrantError) as info:
        _verify(token, keyset, now=T0 - timedelta(seconds=31))
    assert info.value.code == "not_yet_valid"
    assert _verify(token, keyset, now=exp, leeway_s=1)["job"] == "4242"
    with pytest.raises(GrantError):
        _verify(token, keyset, now=exp, leeway_s=0)


def test_header_alg_confusion_is_bad_alg(key: grants.SigningKey,
                                         keyset: dict[str, Any]) -> None:
    token = jwt.encode({"a": 1}, "secret-secret-secret-secret-secret", algorithm="HS256",
                       headers={"kid": key.kid})
    with pytest.raises(GrantError) as info:
        _verify(token, keyset)
    assert info.value.code == "bad_alg"
    assert str(info.value) == "grant uses algorithm 'HS256'; only EdDSA is accepted"


# --------------------------------------------------------------------- totp

SECRET = b"12345678901234567890"
NOW = datetime(2025, 3, 1, 12, 0, 15, tzinfo=UTC)


@pytest.mark.parametrize("length", [0, 1, 15])
def test_short_secret_refused(length: int) -> None:
    for call in (lambda s: totp.code_at(s, NOW),
                 lambda s: totp.verify(s, "123456", NOW, None),
                 lambda s: totp.otpauth_uri(s, "alice")):
        with pytest.raises(TotpError) as info:
            call(b"k" * length)
        assert str(info.value) == f"a TOTP secret must be at least 16 bytes, not {length}"


def test_sixteen_byte_secret_accepted() -> None:
    secret = b"k" * 16
    code = totp.code_at(secret, NOW)
    assert totp.verify(secret, code, NOW, None) == totp.step_at(NOW)


def test_window_zero_accepts_only_the_current_step() -> None:
    step = totp.step_at(NOW)
    current = totp.code_at(SECRET, NOW)
    before = totp.code_at(SECRET, NOW - timedelta(seconds=30))
    after = totp.code_at(SECRET, NOW + timedelta(seconds=30))
    assert len({current, before, after}) == 3
    assert totp.verify(SECRET, current, NOW, None, window=0) == step
    assert totp.verify(SECRET, before, NOW, None, window=0) is None
    assert totp.verify(SECRET, after, NOW, None, window=0) is None
    # Step boundaries: the first and last second of the step, with window 0.
    start = datetime.fromtimestamp(step * 30, UTC)
    assert totp.verify(SECRET, current, start, None, window=0) == step
    assert totp.verify(SECRET, current, start + timedelta(seconds=29), None, window=0) == step
    assert totp.verify(SECRET, current, start + timedelta(seconds=30), None, window=0) is None
    assert totp.verify(SECRET, current, start - timedelta(seconds=1), None, window=0) is None
    # Replay boundary: a step at or before last_step is refused.
    assert totp.verify(SECRET, current, NOW, step - 1, window=0) == step
    assert totp.verify(SECRET, current, NOW, step, window=0) is None


def test_window_one_reaches_one_step_each_side() -> None:
    step = totp.step_at(NOW)
    before = totp.code_at(SECRET, NOW - timedelta(seconds=30))
    after = totp.code_at(SECRET, NOW + timedelta(seconds=30))
    two_before = totp.code_at(SECRET, NOW - timedelta(seconds=60))
    assert totp.verify(SECRET, before, NOW, None) == step - 1
    assert totp.verify(SECRET, after, NOW, None) == step + 1
    assert totp.verify(SECRET, two_before, NOW, None) is None
    assert totp.verify(SECRET, two_before, NOW, None, window=2) == step - 2


def test_negative_window_refused() -> None:
    with pytest.raises(TotpError) as info:
        totp.verify(SECRET, "123456", NOW, None, window=-1)
    assert str(info.value) == "the TOTP window must not be negative, not -1"


def test_step_zero_is_usable() -> None:
    epoch = datetime.fromtimestamp(0, UTC)
    code = totp.code_at(SECRET, epoch)
    assert totp.verify(SECRET, code, epoch, None, window=1) == 0
    assert totp.verify(SECRET, code, epoch, None, window=0) == 0


def test_naive_time_refused() -> None:
    with pytest.raises(TotpError) as info:
        totp.step_at(datetime(2025, 3, 1, 12, 0))
    assert str(info.value) == "times given to TOTP must be timezone-aware"
    assert totp.step_at(NOW) == 1740830415 // 30


@pytest.mark.parametrize("code", ["12345", "1234567", "12345a", "١٢٣٤٥٦", 123456, None])
def test_malformed_codes_are_none(code: object) -> None:
    assert totp.verify(SECRET, code, NOW, None) is None  # type: ignore[arg-type]


# ------------------------------------------------ second round (mutmut 3 survivors)

@pytest.mark.parametrize(("field", "value", "problem"), [
    ("job_id", "12a", "must be a string of digits"),
    ("uid", -1, "must be an int >= 0"),
    ("user", "", "must be a non-empty str"),
    ("outcome", 5, "must be a str"),
    ("gpus", "0", "must be a list of GPUs"),
    ("gpus", [{"index": 0, "uuid": "", "minor": 0}],
     'entries must be {"index": int, "uuid": str, "minor": int}'),
])
def test_common_field_messages(field: str, value: Any, problem: str) -> None:
    fields: dict[str, Any] = {"job_id": "1", "uid": 0, "user": "u", "gpus": [],
                              "outcome": "ok", field: value}
    with pytest.raises(EventError) as info:
        events.validate_fields("job.grant", fields)
    assert str(info.value) == f"job.grant: field {field!r} {problem}"


def test_json_data_messages_name_the_path() -> None:
    with pytest.raises(EventError) as info:
        events.validate_fields("agent.stop", {"reason": "r", "extra": [1, {"k": float("nan")}]})
    assert str(info.value) == "agent.stop: field 'extra[1].k' is not a finite number"
    with pytest.raises(EventError) as info:
        events.validate_fields("agent.stop", {"reason": "r", "extra": {"a": [{1}]}})
    assert str(info.value) == "agent.stop: field 'extra.a[0]' is not JSON data (set)"
    with pytest.raises(EventError) as info:
        events.validate_fields("agent.stop", {"reason": "r", "extra": float("inf")})
    assert str(info.value) == "agent.stop: field 'extra' is not a finite number"
    with pytest.raises(EventError) as info:
        events.validate_fields("agent.stop", {"reason": "r", "Bad": 1})
    assert str(info.value) == "agent.stop: bad field name 'Bad'"
    assert events.validate_fields("agent.stop", {"reason": "r", "zz_fresh_name_7": 1}).code \
        == "agent.stop"


def test_event_type_table_entry() -> None:
    assert events.REGISTRY["agent.start"] == events.EventType(
        code="agent.start", severity=events.Severity.INFO, category="agent",
        required=frozenset({"version", "gpu_backend", "gpus"}),
        description="The node agent started.")
    assert events.REGISTRY["audit.chain_broken"].category == "audit"


def test_envelope_messages() -> None:
    assert events.check_envelope(dict(_event(), v=2)) == "unsupported schema version 2"
    event = _event()
    event["extra"] = float("nan")
    assert events.check_envelope(event) == "agent.stop: field 'extra' is not a finite number"


def test_chain_link_messages() -> None:
    first = _event()
    assert events.verify_chain([dict(first, v=2)]) == events.ChainResult(
        False, 0, 1, "unsupported schema version 2")
    moved = events.build_event(events.REGISTRY["agent.stop"], "gpu08", 2, first["hash"], TS,
                               {"reason": "café"})
    assert events.verify_chain([first, moved]) == events.ChainResult(
        False, 1, 2, "node changed from 'gpu07' to 'gpu08'")
    assert events.verify_chain([{"seq": True}]) == events.ChainResult(
        False, 0, None, "event after 0 good ones has no seq")
    assert events.verify_chain([first, {"seq": "2"}]) == events.ChainResult(
        False, 1, None, "event after 1 good ones has no seq")


def test_timestamp_needs_a_real_offset() -> None:
    from datetime import tzinfo

    class NoOffset(tzinfo):
        def utcoffset(self, dt: datetime | None) -> None:
            return None

        def dst(self, dt: datetime | None) -> None:
            return None

        def tzname(self, dt: datetime | None) -> None:
            return None

    with pytest.raises(EventError):
        events.format_timestamp(datetime(2026, 1, 2, tzinfo=NoOffset()))


def _signed(key: grants.SigningKey, payload: bytes) -> str:
    return jwt.PyJWS().encode(payload, key.private, algorithm="EdDSA",
                              headers={"kid": key.kid})


def _claims(**over: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"iss": "ztgpu-authd", "sub": "alice", "uid": 1001, "job": "4242",
                              "node": "gpu07", "gpus": GPU0, "iat": 1748779200,
                              "nbf": 1748779200, "exp": 1748786400, "jti": "j"}
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.mark.parametrize(("payload", "message"), [
    (b"not json", "grant claims are not JSON"),
    (b"[1, 2]", "grant claims are not a JSON object"),
    (json.dumps(_claims(sub=None)).encode(), "grant claim 'sub' is missing or not a string"),
    (json.dumps(_claims(uid="1001")).encode(), "grant claim 'uid' is missing or not an integer"),
    (json.dumps(_claims(exp=None)).encode(), "grant claim 'exp' is missing or not an integer"),
    (json.dumps(_claims(gpus=[{"index": 0}])).encode(),
     "grant claim 'gpus' is not a list of distinct GPUs"),
])
def test_malformed_claim_messages(key: grants.SigningKey, keyset: dict[str, Any],
                                  payload: bytes, message: str) -> None:
    with pytest.raises(GrantError) as info:
        _verify(_signed(key, payload), keyset)
    assert (info.value.code, str(info.value)) == ("malformed", message)


def test_malformed_header_message(keyset: dict[str, Any]) -> None:
    with pytest.raises(GrantError) as info:
        _verify("a.b.c", keyset)
    assert (info.value.code, str(info.value)) == ("malformed", "grant header is not valid")


@pytest.mark.parametrize(("over", "message"), [
    ({"job_id": ""}, "a grant needs a non-empty job id"),
    ({"user": ""}, "a grant needs a non-empty user"),
    ({"node": ""}, "a grant needs a non-empty node"),
    ({"issuer": ""}, "a grant needs a non-empty issuer"),
    ({"uid": -1}, "a grant's uid must be a non-negative integer, not -1"),
    ({"gpus": [{"index": 0, "uuid": ""}]},
     "a grant's GPUs must be distinct {'index': int >= 0, 'uuid': non-empty str} objects"),
    ({"expires_at": T0}, "grant for job 4242 would expire before it is issued"),
    ({"extra": {"exp": 1, "sub": 2}}, "extra grant claims may not replace ['exp', 'sub']"),
    ({"expires_at": datetime(2025, 6, 1, 14)},
     "grant time expires_at must be a timezone-aware datetime"),
    ({"now": datetime(2025, 6, 1, 12)},
     "grant time now must be a timezone-aware datetime"),
])
def test_issue_refusal_messages(key: grants.SigningKey, over: dict[str, Any],
                                message: str) -> None:
    with pytest.raises(InputRejected) as info:
        _issue(key, **over)
    assert str(info.value) == message


def test_uid_zero_is_granted(key: grants.SigningKey, keyset: dict[str, Any]) -> None:
    assert _verify(_issue(key, uid=0), keyset, uid=0)["uid"] == 0


def test_grant_helpers() -> None:
    assert grants._show(5) == "5"
    assert grants._show("gpu07") == "'gpu07'"
    assert grants._show(None) == "(missing or unprintable)"
    assert grants._show("a b") == "(missing or unprintable)"
    assert grants._b64url(b"\x00\x00\x17") == "AAAX"
    assert grants._unb64url("AAAX") == b"\x00\x00\x17"
    assert grants._unb64url("AA") == b"\x00"
    assert grants._unb64url("AB") is None       # not the canonical encoding of b"\0"
    assert grants._unb64url("AAAAA") is None    # a length no base64 has
    assert grants._unb64url("A") is None
    assert grants._unb64url("AA=") is None
    assert grants.new_signing_key().created.tzinfo is UTC
    with pytest.raises(GrantKeyError) as info:
        grants.jwks([("bad kid", grants.new_signing_key(now=T0).public_key())])
    assert str(info.value) == "a key id must be 1-64 letters, digits, '-' or '_'"


def test_otpauth_labels_escape_slashes_and_messages() -> None:
    uri = totp.otpauth_uri(SECRET, "a/b", issuer="x/y")
    assert uri.startswith("otpauth://totp/x%2Fy:a%2Fb?")
    for kwargs, what in (({"user": ""}, "user"), ({"user": "a", "issuer": "x:y"}, "issuer")):
        with pytest.raises(TotpError) as info:
            totp.otpauth_uri(SECRET, **kwargs)
        assert str(info.value) == f"the TOTP {what} name must be non-empty and contain no colon"
    ends_in_x = b"\x00" * 19 + bytes([23])
    assert "secret=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAX&" in totp.otpauth_uri(ends_in_x, "a")


@pytest.mark.parametrize(("text", "problem"), [
    ("users: [Bob]", "must be '*' or a user name ([a-z_][a-z0-9_.-]*, optionally ending in '$')"),
    ("groups: [Ml]",
     "must be '*' or a unix group name ([a-z_][a-z0-9_.-]*, optionally ending in '$')"),
    ("accounts: ['a b']", "must be '*' or a Slurm name (letters, digits, '_', '.', '-')"),
    ("allowed_hours: {from: '08:00', to: '09:00', tz: 'no zone'}",
     "must be an IANA time zone name such as 'Europe/Berlin' or 'UTC'"),
    ("allowed_hours: {from: '08:00', to: '09:00', tz: 'Mars/Base'}",
     "unknown time zone 'Mars/Base'; use an IANA name such as 'Europe/Berlin' or 'UTC'"),
])
def test_policy_value_messages(text: str, problem: str) -> None:
    from ztgpu.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        parse_policy(f"version: 1\nrules: [{{name: r, allow: true, {text}}}]\n", "p.yaml")
    assert problem in str(info.value)


@pytest.mark.parametrize(("seconds", "shown"), [
    (59, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h"), (3660, "1h01m"),
    (47 * 3600, "47h"), (48 * 3600, "2d"), (49 * 3600, "2d1h"),
])
def test_format_duration_boundaries(seconds: int, shown: str) -> None:
    from ztgpu.policy import format_duration
    assert format_duration(seconds) == shown


def test_plural_in_reasons() -> None:
    from ztgpu.policy import _plural
    assert (_plural(1, "GPU"), _plural(2, "GPU"), _plural(0, "GPU")) == (
        "1 GPU", "2 GPUs", "0 GPUs")


def test_printable_escapes_quotes() -> None:
    assert slurm_env.printable("a'b") == "'a\\'b'"
    assert slurm_env.printable("é\n") == "'\\xe9\\n'"
