"""Per-job GPU grants: JWTs signed with Ed25519 (EdDSA) by the authorisation daemon.

A grant says: user ``sub`` (uid ``uid``) may use exactly the GPUs ``gpus``
(each ``{"index", "uuid"}``) on node ``node`` for Slurm job ``job`` until
``exp``. The node agent verifies it against the daemon's public keys (a
JWKS of RFC 8037 ``OKP`` keys) and the job it is asked about; every check
that fails raises ``GrantError`` with a stable ``code``.

Only ``EdDSA`` is accepted, decided here and never from the token: a token
claiming ``none``, ``HS256`` (with a public key as the HMAC secret) or any
other algorithm is refused before its signature is looked at. Signing keys
rotate by publishing old and new public keys together: the token's ``kid``
picks the key.

Imports only PyJWT and ``cryptography`` besides the standard library, so
the node agent loads it quickly.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ztgpu.errors import ConfigError, Denied, InputRejected

ALGORITHM = "EdDSA"
DEFAULT_ISSUER = "ztgpu-authd"
# Far above a real grant (a few hundred bytes for eight GPUs); bounds the
# work done on input from anyone before its signature is checked.
MAX_TOKEN_CHARS = 16 * 1024

GRANT_ERROR_CODES: frozenset[str] = frozenset({
    "malformed", "bad_alg", "unknown_key", "bad_signature", "expired", "not_yet_valid",
    "wrong_issuer", "wrong_job", "wrong_uid", "wrong_node", "wrong_gpus",
})
RESERVED_CLAIMS: frozenset[str] = frozenset({
    "iss", "sub", "uid", "job", "node", "gpus", "iat", "nbf", "exp", "jti",
})

_KID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHOWABLE = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


class GrantError(Denied):
    """A grant was refused. ``code`` is one of ``GRANT_ERROR_CODES`` and never changes meaning.

    Messages name ids (job, uid, node, key id, GPU indices), never other
    token contents.
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in GRANT_ERROR_CODES:
            raise ValueError(f"unknown grant error code {code!r}")
        super().__init__(message)
        self.code = code


class GrantKeyError(ConfigError):
    """A signing key or a JWKS is unusable (the verifier's configuration, not the token)."""


@dataclass(frozen=True)
class SigningKey:
    """One Ed25519 signing key of the authorisation daemon; ``repr`` hides the key."""

    kid: str
    private: Ed25519PrivateKey = field(repr=False)
    created: datetime

    def public_key(self) -> Ed25519PublicKey:
        return self.private.public_key()


# ---------------------------------------------------------------------- keys


def new_signing_key(now: datetime | None = None) -> SigningKey:
    """Return a fresh Ed25519 key with a random 16-hex-digit kid, created ``now``."""
    return SigningKey(kid=secrets.token_hex(8), private=Ed25519PrivateKey.generate(),
                      created=_aware(now, "now"))


def private_pem(key: SigningKey) -> bytes:
    """Return ``key``'s private key as unencrypted PKCS#8 PEM (seal it before storing)."""
    return key.private.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def from_pem(kid: str, pem: bytes, created: datetime | None = None) -> SigningKey:
    """Rebuild a ``SigningKey`` from ``private_pem`` output.

    ``created`` is the key's creation time where the caller stored it; left
    out, the key records the time it was loaded.

    Raises ``GrantKeyError`` if ``kid`` is malformed, ``pem`` is not an
    unencrypted PEM private key, or the key is not Ed25519.
    """
    _check_kid(kid)
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        # Not chained: the parser's message is about the key's bytes.
        raise GrantKeyError(f"signing key {kid} is not an unencrypted PEM private key") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise GrantKeyError(f"signing key {kid} is not an Ed25519 key")
    if created is None:
        created = datetime.now(UTC)
    elif created.tzinfo is None:
        raise GrantKeyError(f"signing key {kid}: creation time must be timezone-aware")
    return SigningKey(kid=kid, private=private, created=created)


def jwks(public_keys: Iterable[tuple[str, Ed25519PublicKey]]) -> dict[str, Any]:
    """Return a JWKS (``{"keys": [...]}``) of RFC 8037 OKP Ed25519 keys, in the given order.

    Raises ``GrantKeyError`` for a malformed or repeated kid.
    """
    keys: list[dict[str, str]] = []
    seen: set[str] = set()
    for kid, public in public_keys:
        _check_kid(kid)
        if kid in seen:
            raise GrantKeyError(f"key id {kid} appears twice in the JWKS")
        seen.add(kid)
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        keys.append({"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw), "kid": kid,
                     "alg": ALGORITHM, "use": "sig"})
    return {"keys": keys}


def parse_jwks(document: Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    """Return ``{kid: public key}`` from a JWKS made by ``jwks``.

    Every key must be ``kty`` OKP, ``crv`` Ed25519 with a 32-byte ``x``, a
    kid, and (when present) ``alg`` EdDSA and ``use`` sig.

    Raises ``GrantKeyError`` for anything else, or a repeated kid.
    """
    entries = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(entries, list):
        raise GrantKeyError("the JWKS has no 'keys' list")
    out: dict[str, Ed25519PublicKey] = {}
    for position, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise GrantKeyError(f"JWKS key #{position} is not an object")
        kid = entry.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise GrantKeyError(f"JWKS key #{position} has no valid kid")
        if kid in out:
            raise GrantKeyError(f"key id {kid} appears twice in the JWKS")
        if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            raise GrantKeyError(f"JWKS key {kid} is not an OKP Ed25519 key")
        if entry.get("alg", ALGORITHM) != ALGORITHM or entry.get("use", "sig") != "sig":
            raise GrantKeyError(f"JWKS key {kid} is not an EdDSA signature key")
        x = entry.get("x")
        raw = _unb64url(x) if isinstance(x, str) else None
        if raw is None or len(raw) != 32:
            raise GrantKeyError(f"JWKS key {kid} has no valid 32-byte 'x'")
        out[kid] = Ed25519PublicKey.from_public_bytes(raw)
    return out


# -------------------------------------------------------------------- grants


def issue_grant(key: SigningKey, *, job_id: str, uid: int, user: str, node: str,
                gpus: Sequence[Mapping[str, Any]], expires_at: datetime,
                issuer: str = DEFAULT_ISSUER, now: datetime | None = None,
                extra: Mapping[str, Any] | None = None, jti: str | None = None) -> str:
    """Sign a grant for ``user`` (``uid``) to use ``gpus`` on ``node`` for ``job_id``.

    Claims: ``iss``, ``sub`` (user), ``uid``, ``job``, ``node``, ``gpus``
    (sorted by index), ``iat`` = ``nbf`` = ``now``, ``exp`` =
    ``expires_at`` (whole seconds, rounded down), ``jti`` (random unless given), and the
    JSON-serialisable ``extra`` claims; the header carries ``kid``.

    Raises ``InputRejected`` for an empty job, user, node or issuer, a uid
    that is not a non-negative int, a malformed GPU list (repeated index or
    uuid included), a naive or already-past ``expires_at``, or an ``extra``
    claim that would replace one of ``RESERVED_CLAIMS``.
    """
    issued = _aware(now, "now")
    expires = _aware(expires_at, "expires_at")
    for what, value in (("job id", job_id), ("user", user), ("node", node),
                        ("issuer", issuer)):
        if not isinstance(value, str) or not value:
            raise InputRejected(f"a grant needs a non-empty {what}")
    if not _is_int(uid) or uid < 0:
        raise InputRejected(f"a grant's uid must be a non-negative integer, not {uid!r}")
    gpu_list = _gpu_list(gpus)
    if gpu_list is None:
        raise InputRejected("a grant's GPUs must be distinct {'index': int >= 0, "
                            "'uuid': non-empty str} objects")
    iat = int(issued.timestamp())
    exp = int(expires.timestamp())
    if exp <= iat:
        raise InputRejected(f"grant for job {job_id} would expire before it is issued")
    clash = RESERVED_CLAIMS & set(extra or {})
    if clash:
        raise InputRejected(f"extra grant claims may not replace {sorted(clash)}")
    claims: dict[str, Any] = {
        **(extra or {}),
        "iss": issuer, "sub": user, "uid": uid, "job": job_id, "node": node,
        "gpus": [{"index": i, "uuid": u} for i, u in gpu_list],
        "iat": iat, "nbf": iat, "exp": exp, "jti": jti or secrets.token_urlsafe(16),
    }
    return jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid})


def verify_grant(token: str, jwks: Mapping[str, Any], *, job_id: str, uid: int, node: str,
                 gpus: Sequence[Mapping[str, Any]] | None, now: datetime | None = None,
                 issuer: str = DEFAULT_ISSUER, leeway_s: int = 30) -> dict[str, Any]:
    """Return the claims of ``token`` if it grants exactly this job, uid, node and GPUs.

    Checks, in order: the token's shape; ``alg`` is EdDSA (``bad_alg``);
    its ``kid`` is in ``jwks`` (``unknown_key``); the signature
    (``bad_signature``); the claims' presence and types (``malformed``);
    ``iss`` (``wrong_issuer``); ``exp`` and ``nbf`` against ``now`` with
    ``leeway_s`` seconds of clock skew allowed (``expired``,
    ``not_yet_valid``); then ``job`` (``wrong_job``), ``uid``
    (``wrong_uid``), ``node`` (``wrong_node``) and the set of
    ``(index, uuid)`` pairs (``wrong_gpus``; skipped when ``gpus`` is
    ``None``).

    Raises ``GrantError`` for each refusal above, with that code;
    ``GrantKeyError`` if ``jwks`` itself is malformed; ``InputRejected``
    for a naive ``now``, a negative leeway or a malformed ``gpus``.
    """
    keys = parse_jwks(jwks)
    when = _aware(now, "now").timestamp()
    if leeway_s < 0:
        raise InputRejected(f"grant leeway must not be negative, not {leeway_s}")
    expected_gpus: frozenset[tuple[int, str]] | None = None
    if gpus is not None:
        gpu_list = _gpu_list(gpus)
        if gpu_list is None:
            raise InputRejected("expected GPUs must be distinct {'index': int >= 0, "
                                "'uuid': non-empty str} objects")
        expected_gpus = frozenset(gpu_list)

    claims = _verified_claims(token, keys)

    if claims["iss"] != issuer:
        raise GrantError("wrong_issuer", f"grant was issued by {_show(claims['iss'])}, "
                         f"not {_show(issuer)}")
    if when >= claims["exp"] + leeway_s:
        raise GrantError("expired", f"grant for job {_show(claims['job'])} has expired")
    if when < claims["nbf"] - leeway_s:
        raise GrantError("not_yet_valid",
                         f"grant for job {_show(claims['job'])} is not valid yet "
                         "(clocks out of step?)")
    if claims["job"] != job_id:
        raise GrantError("wrong_job", f"grant is for job {_show(claims['job'])}, "
                         f"not job {_show(job_id)}")
    if claims["uid"] != uid:
        raise GrantError("wrong_uid", f"grant for job {_show(job_id)} is for uid "
                         f"{claims['uid']}, not uid {uid}")
    if claims["node"] != node:
        raise GrantError("wrong_node", f"grant for job {_show(job_id)} is for node "
                         f"{_show(claims['node'])}, not {_show(node)}")
    if expected_gpus is not None:
        granted = frozenset((g["index"], g["uuid"]) for g in claims["gpus"])
        if granted != expected_gpus:
            raise GrantError("wrong_gpus", f"grant for job {_show(job_id)} names GPUs "
                             f"{sorted(i for i, _ in granted)}, the job has "
                             f"{sorted(i for i, _ in expected_gpus)} (or their uuids differ)")
    return claims


# ------------------------------------------------------------------- private


def _verified_claims(token: str, keys: Mapping[str, Ed25519PublicKey]) -> dict[str, Any]:
    """Check shape, algorithm, key and signature; return the typed-checked claims."""
    if not isinstance(token, str) or not token.isascii() or len(token) > MAX_TOKEN_CHARS \
            or token.count(".") != 2:
        raise GrantError("malformed", "not a signed grant (expected a compact JWS)")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise GrantError("malformed", "grant header is not valid") from None
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise GrantError("bad_alg", f"grant uses algorithm {_show(alg)}; only "
                         f"{ALGORITHM} is accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise GrantError("unknown_key", f"grant is signed with key {_show(kid)}, which is not "
                         "among the authorisation daemon's published keys")
    try:
        decoded = jwt.PyJWS(algorithms=[ALGORITHM]).decode_complete(
            token, key=keys[kid], algorithms=[ALGORITHM])
    except jwt.InvalidSignatureError:
        raise GrantError("bad_signature", f"grant signature does not verify under "
                         f"key {kid}") from None
    except jwt.InvalidAlgorithmError:
        raise GrantError("bad_alg", f"only {ALGORITHM} is accepted") from None
    except jwt.PyJWTError:
        raise GrantError("malformed", "grant is not a valid JWS") from None
    try:
        claims = json.loads(decoded["payload"])
    except (ValueError, RecursionError):
        raise GrantError("malformed", "grant claims are not JSON") from None
    if not isinstance(claims, dict):
        raise GrantError("malformed", "grant claims are not a JSON object")
    for name in ("iss", "sub", "job", "node", "jti"):
        if not isinstance(claims.get(name), str):
            raise GrantError("malformed", f"grant claim {name!r} is missing or not a string")
    if not _is_int(claims.get("uid")):
        raise GrantError("malformed", "grant claim 'uid' is missing or not an integer")
    for name in ("iat", "nbf", "exp"):
        if not _is_int(claims.get(name)):
            raise GrantError("malformed", f"grant claim {name!r} is missing or not an integer")
    if _gpu_list(claims.get("gpus")) is None:
        raise GrantError("malformed", "grant claim 'gpus' is not a list of distinct GPUs")
    return claims


def _gpu_list(gpus: object) -> list[tuple[int, str]] | None:
    """``[(index, uuid)]`` sorted by index, or ``None`` if malformed or not distinct."""
    if not isinstance(gpus, Sequence) or isinstance(gpus, str | bytes):
        return None
    out: list[tuple[int, str]] = []
    for gpu in gpus:
        if not isinstance(gpu, Mapping) or set(gpu) != {"index", "uuid"}:
            return None
        index, uuid = gpu["index"], gpu["uuid"]
        if not _is_int(index) or index < 0 or not isinstance(uuid, str) or not uuid:
            return None
        out.append((index, uuid))
    if len({i for i, _ in out}) != len(out) or len({u for _, u in out}) != len(out):
        return None
    return sorted(out)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_kid(kid: str) -> None:
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise GrantKeyError("a key id must be 1-64 letters, digits, '-' or '_'")


def _show(value: object) -> str:
    """An id for a message: quoted if it looks like an id, else a placeholder."""
    if isinstance(value, str) and _SHOWABLE.fullmatch(value):
        return repr(value)
    if _is_int(value):
        return str(value)
    return "(missing or unprintable)"


def _aware(when: datetime | None, what: str) -> datetime:
    if when is None:
        return datetime.now(UTC)
    if not isinstance(when, datetime) or when.tzinfo is None:
        raise InputRejected(f"grant time {what} must be a timezone-aware datetime")
    return when


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes | None:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        return None
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return data if _b64url(data) == text else None
