"""Grants: Ed25519 JWT round trips, every refusal code, algorithm confusion, rotation, fuzzing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ztgpu.errors import Denied, InputRejected
from ztgpu.trust import grants
from ztgpu.trust.grants import GrantError, GrantKeyError, SigningKey

T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
GPUS = [{"index": 3, "uuid": "GPU-cccc"}, {"index": 1, "uuid": "GPU-aaaa"}]
JOB = {"job_id": "4242", "uid": 1001, "node": "gpu07"}


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return grants.new_signing_key(now=T0)


@pytest.fixture(scope="module")
def keyset(key: SigningKey) -> dict[str, Any]:
    return grants.jwks([(key.kid, key.public_key())])


def issue(key: SigningKey, **over: Any) -> str:
    args: dict[str, Any] = {"job_id": "4242", "uid": 1001, "user": "alice", "node": "gpu07",
                            "gpus": GPUS, "expires_at": T0 + timedelta(hours=2), "now": T0}
    args.update(over)
    return grants.issue_grant(key, **args)


def verify(token: str, keyset: dict[str, Any], **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {**JOB, "gpus": GPUS, "now": T0 + timedelta(minutes=1)}
    args.update(over)
    return grants.verify_grant(token, keyset, **args)


def refused(code: str, token: str, keyset: dict[str, Any], **over: Any) -> GrantError:
    with pytest.raises(GrantError) as info:
        verify(token, keyset, **over)
    assert info.value.code == code, str(info.value)
    return info.value


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    h, p, s = token.split(".")
    return (json.loads(base64.urlsafe_b64decode(h + "==")),
            json.loads(base64.urlsafe_b64decode(p + "==")), s)


def compact(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join((b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode()),
                     b64url(signature)))


# ---------------------------------------------------------------- round trip


def test_round_trip(key: SigningKey, keyset: dict[str, Any]) -> None:
    token = issue(key, extra={"partition": "gpu"})
    header, payload, _ = segments(token)
    assert header["alg"] == "EdDSA" and header["kid"] == key.kid
    claims = verify(token, keyset)
    assert claims == payload
    assert claims["iss"] == "ztgpu-authd" and claims["sub"] == "alice"
    assert (claims["job"], claims["uid"], claims["node"]) == ("4242", 1001, "gpu07")
    assert claims["gpus"] == [{"index": 1, "uuid": "GPU-aaaa"}, {"index": 3, "uuid": "GPU-cccc"}]
    assert claims["iat"] == claims["nbf"] == int(T0.timestamp())
    assert claims["exp"] == int((T0 + timedelta(hours=2)).timestamp())
    assert claims["partition"] == "gpu"
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    assert segments(issue(key))[1]["jti"] != claims["jti"]


def test_gpu_order_does_not_matter(key: SigningKey, keyset: dict[str, Any]) -> None:
    token = issue(key)
    assert verify(token, keyset, gpus=list(reversed(GPUS)))["job"] == "4242"


def test_gpus_none_skips_gpu_check(key: SigningKey, keyset: dict[str, Any]) -> None:
    token = issue(key)
    assert verify(token, keyset, gpus=None)["gpus"][0]["uuid"] == "GPU-aaaa"
    refused("wrong_gpus", token, keyset, gpus=[{"index": 1, "uuid": "GPU-aaaa"}])


def test_empty_gpu_grant(key: SigningKey, keyset: dict[str, Any]) -> None:
    token = issue(key, gpus=[])
    assert verify(token, keyset, gpus=[])["gpus"] == []
    refused("wrong_gpus", token, keyset)


def test_grant_error_is_denied() -> None:
    assert issubclass(GrantError, Denied)
    expected = {"malformed", "bad_alg", "unknown_key", "bad_signature", "expired",
                "not_yet_valid", "wrong_issuer", "wrong_job", "wrong_uid", "wrong_node",
                "wrong_gpus"}
    assert expected == grants.GRANT_ERROR_CODES
    with pytest.raises(ValueError, match="unknown grant error code"):
        GrantError("nope", "x")


# ------------------------------------------------------- signature and algorithm


def test_forged_with_another_key(key: SigningKey, keyset: dict[str, Any]) -> None:
    impostor = SigningKey(kid=key.kid, private=Ed25519PrivateKey.generate(), created=T0)
    err = refused("bad_signature", issue(impostor), keyset)
    assert key.kid in str(err)


def test_tampered_claims(key: SigningKey, keyset: dict[str, Any]) -> None:
    h, _, s = issue(key).split(".")
    _, claims, _ = segments(issue(key))
    claims["uid"] = 0
    forged = ".".join((h, b64url(json.dumps(claims).encode()), s))
    refused("bad_signature", forged, keyset, uid=0)


def test_truncated_signature(key: SigningKey, keyset: dict[str, Any]) -> None:
    h, p, s = issue(key).split(".")
    signature = base64.urlsafe_b64decode(s + "==")
    refused("bad_signature", f"{h}.{p}.{b64url(signature[:-3])}", keyset)
    refused("bad_signature", f"{h}.{p}.{b64url(signature + b'x')}", keyset)
    # Non-canonical base64 (a last character with spare bits set) is not a signature at
    # all. 82 characters leave 4 spare bits in the last one; "B" sets one of them.
    refused("malformed", f"{h}.{p}.{s[:81]}B", keyset)
    refused("bad_signature", f"{h}.{p}.", keyset)


def test_hs256_with_raw_public_key_refused(key: SigningKey, keyset: dict[str, Any]) -> None:
    _, claims, _ = segments(issue(key))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    assert base64.urlsafe_b64decode(keyset["keys"][0]["x"] + "=") == raw
    forged = jwt.encode(claims, raw, algorithm="HS256", headers={"kid": key.kid})
    err = refused("bad_alg", forged, keyset)
    assert "HS256" in str(err)


def test_hs256_with_pem_public_key_refused(key: SigningKey, keyset: dict[str, Any]) -> None:
    # PyJWT will not sign with a PEM as HMAC secret; forge it by hand.
    _, claims, _ = segments(issue(key))
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    unsigned = compact({"alg": "HS256", "kid": key.kid, "typ": "JWT"}, claims).rsplit(".", 1)[0]
    mac = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    refused("bad_alg", f"{unsigned}.{b64url(mac)}", keyset)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "", None, "eddsa", "Ed25519", "ES256",
                                 ["EdDSA"]])
def test_other_algorithms_refused(key: SigningKey, keyset: dict[str, Any], alg: Any) -> None:
    _, claims, _ = segments(issue(key))
    header: dict[str, Any] = {"kid": key.kid, "typ": "JWT"}
    if alg is not None:
        header["alg"] = alg
    refused("bad_alg", compact(header, claims), keyset)
    # Even with the genuine signature attached.
    signature = base64.urlsafe_b64decode(issue(key).split(".")[2] + "==")
    refused("bad_alg", compact(header, claims, signature), keyset)


def test_rs256_refused(key: SigningKey, keyset: dict[str, Any]) -> None:
    _, claims, _ = segments(issue(key))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": key.kid})
    refused("bad_alg", forged, keyset)


def test_unknown_kid(key: SigningKey, keyset: dict[str, Any]) -> None:
    other = grants.new_signing_key()
    err = refused("unknown_key", issue(other), keyset)
    assert other.kid in str(err)
    _, claims, _ = segments(issue(key))
    refused("unknown_key", compact({"alg": "EdDSA"}, claims, b"x" * 64), keyset)


def test_unprintable_kid_not_echoed(key: SigningKey, keyset: dict[str, Any]) -> None:
    _, claims, _ = segments(issue(key))
    err = refused("unknown_key", compact({"alg": "EdDSA", "kid": "<script>"}, claims), keyset)
    assert "<script>" not in str(err)


# --------------------------------------------------------------- time and issuer


def test_expired_with_leeway(key: SigningKey, keyset: dict[str, Any]) -> None:
    exp = T0 + timedelta(minutes=10)
    token = issue(key, expires_at=exp)
    assert verify(token, keyset, now=exp + timedelta(seconds=29))["job"] == "4242"
    refused("expired", token, keyset, now=exp + timedelta(seconds=30))
    refused("expired", token, keyset, now=exp + timedelta(days=1))
    refused("expired", token, keyset, now=exp, leeway_s=0)


def test_not_yet_valid_with_leeway(key: SigningKey, keyset: dict[str, Any]) -> None:
    token = issue(key)
    assert verify(token, keyset, now=T0 - timedelta(seconds=30))["job"] == "4242"
    err = refused("not_yet_valid", token, keyset, now=T0 - timedelta(seconds=31))
    assert "clocks" in str(err)
    refused("not_yet_valid", token, keyset, now=T0 - timedelta(seconds=1), leeway_s=0)


def test_wrong_issuer(key: SigningKey, keyset: dict[str, Any]) -> None:
    refused("wrong_issuer", issue(key, issuer="someone-else"), keyset)
    assert verify(issue(key, issuer="site-b"), keyset, issuer="site-b")["iss"] == "site-b"


# ------------------------------------------------------------- job, uid, node


def test_wrong_job_uid_node(key: SigningKey, keyset: dict[str, Any]) -> None:
    token = issue(key)
    err = refused("wrong_job", token, keyset, job_id="4243")
    assert "'4242'" in str(err) and "'4243'" in str(err)
    err = refused("wrong_uid", token, keyset, uid=0)
    assert "1001" in str(err)
    err = refused("wrong_node", token, keyset, node="gpu08")
    assert "'gpu07'" in str(err) and "'gpu08'" in str(err)


@pytest.mark.parametrize("expected", [
    [{"index": 1, "uuid": "GPU-aaaa"}, {"index": 3, "uuid": "GPU-dddd"}],   # other uuid
    [{"index": 1, "uuid": "GPU-aaaa"}],                                       # missing index
    [*GPUS, {"index": 5, "uuid": "GPU-eeee"}],                                # extra index
    [{"index": 1, "uuid": "GPU-cccc"}, {"index": 3, "uuid": "GPU-aaaa"}],   # uuids swapped
    [{"index": 2, "uuid": "GPU-aaaa"}, {"index": 3, "uuid": "GPU-cccc"}],   # other index
])
def test_wrong_gpus(key: SigningKey, keyset: dict[str, Any],
                    expected: list[dict[str, Any]]) -> None:
    err = refused("wrong_gpus", issue(key), keyset, gpus=expected)
    assert "[1, 3]" in str(err)


def test_messages_carry_no_token_contents(key: SigningKey, keyset: dict[str, Any]) -> None:
    token = issue(key, user="alice-secret-name", extra={"note": "confidential"})
    _, claims, signature = segments(token)
    for over in ({"job_id": "1"}, {"uid": 7}, {"node": "n"}, {"gpus": []},
                 {"now": T0 + timedelta(days=1)}, {"issuer": "x"}):
        with pytest.raises(GrantError) as info:
            verify(token, keyset, **over)
        text = str(info.value)
        for secret in ("alice-secret-name", "confidential", claims["jti"], signature):
            assert secret not in text


# ---------------------------------------------------------- malformed claims


@pytest.mark.parametrize("change", [
    {"uid": "1001"}, {"uid": True}, {"uid": None}, {"job": 4242}, {"node": None},
    {"exp": "soon"}, {"exp": 1.5e9}, {"nbf": None}, {"iss": None}, {"jti": 5},
    {"gpus": None}, {"gpus": "GPU-aaaa"}, {"gpus": [{"index": 1}]},
    {"gpus": [{"index": -1, "uuid": "GPU-a"}]},
    {"gpus": [{"index": 1, "uuid": "GPU-a"}, {"index": 1, "uuid": "GPU-b"}]},
    {"gpus": [{"index": 1, "uuid": "GPU-a", "mig": 2}]},
])
def test_signed_but_malformed_claims(key: SigningKey, keyset: dict[str, Any],
                                     change: dict[str, Any]) -> None:
    _, claims, _ = segments(issue(key))
    claims.update(change)
    # PyJWS, not jwt.encode: the latter refuses some of these claims itself.
    token = jwt.PyJWS().encode(json.dumps(claims).encode(), key.private, algorithm="EdDSA",
                               headers={"kid": key.kid})
    refused("malformed", token, keyset)


def test_signed_non_object_claims(key: SigningKey, keyset: dict[str, Any]) -> None:
    token = jwt.PyJWS().encode(b"[1, 2]", key.private, algorithm="EdDSA",
                               headers={"kid": key.kid})
    refused("malformed", token, keyset)
    token = jwt.PyJWS().encode(b"not json", key.private, algorithm="EdDSA",
                               headers={"kid": key.kid})
    refused("malformed", token, keyset)


@pytest.mark.parametrize("token", [
    "", "abc", "a.b", "a.b.c.d", "....", "eyJhbGciOiJFZERTQSJ9.e30",
    "!!!.e30.AAAA", "e30.e30.e30", "W10.e30.", "eyJhbGciOiJFZERTQSJ9.\u00e9.x",
    "x" * (grants.MAX_TOKEN_CHARS + 1),
    b64url(b"[" * 5000) + ".e30.",
])
def test_malformed_tokens(keyset: dict[str, Any], token: str) -> None:
    with pytest.raises(GrantError) as info:
        verify(token, keyset)
    assert info.value.code in {"malformed", "bad_alg", "unknown_key"}


def test_non_string_token(keyset: dict[str, Any]) -> None:
    refused("malformed", b"a.b.c", keyset)  # type: ignore[arg-type]


def test_crit_header_refused(key: SigningKey, keyset: dict[str, Any]) -> None:
    _, claims, _ = segments(issue(key))
    token = jwt.encode(claims, key.private, algorithm="EdDSA",
                       headers={"kid": key.kid, "crit": ["exp-ext"], "exp-ext": 1})
    refused("malformed", token, keyset)


# ----------------------------------------------------------------- rotation


def test_rotation_old_and_new_keys_verify(key: SigningKey) -> None:
    new = grants.new_signing_key()
    both = grants.jwks([(new.kid, new.public_key()), (key.kid, key.public_key())])
    assert verify(issue(key), both)["job"] == "4242"
    assert verify(issue(new), both)["job"] == "4242"
    # After the old key is dropped from the JWKS its tokens are refused.
    only_new = grants.jwks([(new.kid, new.public_key())])
    refused("unknown_key", issue(key), only_new)
    # A token naming the new kid but signed by the old key does not verify.
    relabelled = SigningKey(kid=new.kid, private=key.private, created=T0)
    refused("bad_signature", issue(relabelled), both)


# ------------------------------------------------------------- keys and JWKS


def test_jwks_format(key: SigningKey, keyset: dict[str, Any]) -> None:
    (entry,) = keyset["keys"]
    assert entry == {"kty": "OKP", "crv": "Ed25519", "x": entry["x"], "kid": key.kid,
                     "alg": "EdDSA", "use": "sig"}
    assert "=" not in entry["x"] and len(entry["x"]) == 43
    assert len(key.kid) == 16 and int(key.kid, 16) >= 0
    # Another JOSE implementation (PyJWT's own JWK parser) reads it as the same key.
    parsed = jwt.PyJWK(entry)
    assert parsed.key_id == key.kid and parsed.algorithm_name == "EdDSA"
    token = issue(key)
    assert jwt.decode(token, parsed.key, algorithms=["EdDSA"],
                      options={"verify_exp": False, "verify_iat": False,
                               "verify_nbf": False})["job"] == "4242"
    json.dumps(keyset)  # serialisable as published


def test_jwks_refuses_duplicate_kid(key: SigningKey) -> None:
    with pytest.raises(GrantKeyError, match="twice"):
        grants.jwks([(key.kid, key.public_key()), (key.kid, key.public_key())])


@pytest.mark.parametrize("doc", [
    {}, {"keys": "x"}, {"keys": [1]}, {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA"}]},
    {"keys": [{"kid": "k", "kty": "RSA", "n": "x", "e": "AQAB"}]},
    {"keys": [{"kid": "k", "kty": "OKP", "crv": "Ed448", "x": "A" * 57}]},
    {"keys": [{"kid": "k", "kty": "OKP", "crv": "Ed25519", "x": "A" * 42}]},
    {"keys": [{"kid": "k", "kty": "OKP", "crv": "Ed25519", "x": "A" * 43, "alg": "HS256"}]},
    {"keys": [{"kid": "k", "kty": "OKP", "crv": "Ed25519", "x": "A" * 43, "use": "enc"}]},
    {"keys": [{"kid": "k", "kty": "OKP", "crv": "Ed25519", "x": "A" * 43},
              {"kid": "k", "kty": "OKP", "crv": "Ed25519", "x": "A" * 43}]},
])
def test_bad_jwks_is_a_config_fault(key: SigningKey, doc: dict[str, Any]) -> None:
    with pytest.raises(GrantKeyError):
        verify(issue(key), doc)


def test_pem_round_trip(key: SigningKey, keyset: dict[str, Any]) -> None:
    pem = grants.private_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = grants.from_pem(key.kid, pem, key.created)
    assert again.kid == key.kid and again.created == key.created
    assert verify(issue(again), keyset)["job"] == "4242"
    assert "PRIVATE" not in repr(again) and "private=" not in repr(again)


def test_from_pem_creation_time(key: SigningKey) -> None:
    before = datetime.now(UTC)
    loaded = grants.from_pem(key.kid, grants.private_pem(key))
    assert before <= loaded.created <= datetime.now(UTC)
    with pytest.raises(GrantKeyError, match="timezone-aware"):
        grants.from_pem(key.kid, grants.private_pem(key), datetime(2025, 1, 1))


def test_from_pem_refuses_other_keys() -> None:
    with pytest.raises(GrantKeyError, match="not an unencrypted PEM"):
        grants.from_pem("abcd", b"garbage", T0)
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(GrantKeyError, match="not an Ed25519"):
        grants.from_pem("abcd", rsa_pem, T0)
    with pytest.raises(GrantKeyError, match="key id"):
        grants.from_pem("a.b", rsa_pem, T0)


# ------------------------------------------------------------ issuing input


@pytest.mark.parametrize("over", [
    {"job_id": ""}, {"user": ""}, {"node": ""}, {"uid": -1}, {"uid": True}, {"uid": "1001"},
    {"gpus": [{"index": 1, "uuid": "a"}, {"index": 1, "uuid": "b"}]},
    {"gpus": [{"index": 1, "uuid": "a"}, {"index": 2, "uuid": "a"}]},
    {"gpus": [{"index": "1", "uuid": "a"}]}, {"gpus": [{"index": 1, "uuid": ""}]},
    {"expires_at": T0}, {"expires_at": T0 - timedelta(seconds=1)},
    {"expires_at": datetime(2030, 1, 1)},
    {"extra": {"uid": 0}}, {"extra": {"exp": 2**40}},
])
def test_issue_refuses_bad_input(key: SigningKey, over: dict[str, Any]) -> None:
    with pytest.raises(InputRejected):
        issue(key, **over)


def test_verify_refuses_bad_caller_input(key: SigningKey, keyset: dict[str, Any]) -> None:
    token = issue(key)
    with pytest.raises(InputRejected, match="timezone-aware"):
        verify(token, keyset, now=datetime(2025, 6, 1, 12, 1))
    with pytest.raises(InputRejected, match="distinct"):
        verify(token, keyset, gpus=[*GPUS, GPUS[0]])
    with pytest.raises(InputRejected, match="leeway"):
        verify(token, keyset, leeway_s=-1)


# --------------------------------------------------------------- robustness


_B64URL_TEXT = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                       max_size=80)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                     max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_strings_give_grant_error(text: str) -> None:
    keyset = grants.jwks([("k1", Ed25519PrivateKey.generate().public_key())])
    with pytest.raises(GrantError) as info:
        grants.verify_grant(text, keyset, job_id="1", uid=1, node="n", gpus=None, now=T0)
    assert info.value.code in grants.GRANT_ERROR_CODES


@settings(max_examples=300, deadline=None)
@given(st.lists(_B64URL_TEXT, min_size=1, max_size=5))
def test_random_segments_give_grant_error(parts: list[str]) -> None:
    keyset = grants.jwks([("k1", Ed25519PrivateKey.generate().public_key())])
    with pytest.raises(GrantError) as info:
        grants.verify_grant(".".join(parts), keyset, job_id="1", uid=1, node="n", gpus=None,
                            now=T0)
    assert info.value.code in grants.GRANT_ERROR_CODES


@settings(max_examples=300, deadline=None)
@given(header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64", "jwk"]),
                              _JSON | st.sampled_from(["EdDSA", "k1", "none", "HS256"])),
       payload=_JSON, signature=st.binary(max_size=70))
def test_random_headers_and_claims_give_grant_error(header: dict[str, Any], payload: Any,
                                                    signature: bytes) -> None:
    signer = Ed25519PrivateKey.generate()
    keyset = grants.jwks([("k1", signer.public_key())])
    body = b64url(json.dumps(payload).encode())
    head = b64url(json.dumps(header).encode())
    for sig in (signature, signer.sign(f"{head}.{body}".encode())):
        token = f"{head}.{body}.{b64url(sig)}"
        with pytest.raises(GrantError) as info:
            grants.verify_grant(token, keyset, job_id="1", uid=1, node="n", gpus=None, now=T0)
        assert info.value.code in grants.GRANT_ERROR_CODES


def test_module_imports_nothing_heavy() -> None:
    code = ("import sys, ztgpu.trust.grants; heavy = {'pydantic', 'yaml', 'aiohttp', 'psycopg', "
            "'qrcode', 'PIL', 'hypothesis'}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_a_given_jti_is_the_token_id(key: SigningKey, keyset: dict[str, Any]) -> None:
    claims = verify(issue(key, jti="grant-0001"), keyset)
    assert claims["jti"] == "grant-0001"
    assert verify(issue(key), keyset)["jti"] != verify(issue(key), keyset)["jti"]
