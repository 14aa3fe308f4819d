"""Time-based one-time passwords (RFC 6238) as authenticator apps use them.

SHA-1, 6 digits, 30-second steps: the parameters every authenticator app
(Google Authenticator, FreeOTP, Aegis, 1Password, ...) supports. The HMAC
and the constant-time comparison are PyCA ``cryptography``'s.

A code is accepted at most once: ``verify`` returns the time step it
matched, the caller stores it with the user's secret and passes it back as
``last_step`` next time, and any step at or before it is refused. Secrets
are 160 random bits (RFC 4226 recommends at least 128; 160 is the HMAC-SHA1
block the apps expect) and are stored sealed (``ztgpu.trust.kek``).
"""

from __future__ import annotations

import base64
import importlib
import re
import secrets
from datetime import datetime
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor import InvalidToken
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from ztgpu.errors import Fault

DIGITS = 6
PERIOD_S = 30
SECRET_BYTES = 20
# cryptography refuses HMAC keys shorter than this (RFC 4226: at least 128 bits).
MIN_SECRET_BYTES = 16
# Byte-mode capacity of the largest QR code (version 40) at error correction M.
QR_MAX_BYTES = 2331

_CODE = re.compile(r"[0-9]{6}")  # not \d: that matches other scripts' digits too


class TotpError(Fault):
    """A TOTP secret, time or label is unusable. Messages never carry the secret."""


def new_secret() -> bytes:
    """Return a new random 160-bit TOTP secret."""
    return secrets.token_bytes(SECRET_BYTES)


def otpauth_uri(secret: bytes, user: str, issuer: str = "ztgpu") -> str:
    """Return the ``otpauth://totp/...`` URI that authenticator apps enrol from.

    The label is ``issuer:user`` and the ``issuer`` parameter repeats the
    issuer (Google's Key URI format); both parts are percent-encoded (a space
    becomes ``%20``, not ``+``). The secret is base32 without padding.

    Raises ``TotpError`` if the secret is shorter than 128 bits, or ``user``
    or ``issuer`` is empty or contains a colon (the label's separator).
    """
    _totp(secret)
    for what, value in (("user", user), ("issuer", issuer)):
        if not value or ":" in value:
            raise TotpError(f"the TOTP {what} name must be non-empty and contain no colon")
    label = f"{quote(issuer, safe='')}:{quote(user, safe='')}"
    params = urlencode(
        [("secret", base64.b32encode(secret).decode().rstrip("=")),
         ("issuer", issuer),
         ("algorithm", "SHA1"),
         ("digits", str(DIGITS)),
         ("period", str(PERIOD_S))],
        quote_via=quote,
    )
    return f"otpauth://totp/{label}?{params}"


def qr_text(uri: str, *, invert: bool = False) -> str:
    """Draw ``uri`` as a QR code in text, for a terminal; lines end with ``\\n``.

    Each character holds two modules stacked vertically (``█ ▀ ▄`` and space),
    so modules come out about square and an enrolment URI (QR version 7,
    45 modules plus a 4-module quiet zone on each side) is 53 columns wide
    and 27 lines high. Characters are drawn for *light* modules, which shows
    a correct code on the usual light-on-dark terminal; pass ``invert=True``
    for a terminal with dark text on a light background.

    Raises ``TotpError`` if ``uri`` does not fit in a QR code.
    """
    # Imported here: only enrolment draws codes, and the PAM module that
    # verifies codes should not pay for loading qrcode.
    data = uri.encode()
    if len(data) > QR_MAX_BYTES:
        raise TotpError(f"{len(data)} bytes do not fit in a QR code (at most {QR_MAX_BYTES})")
    qrcode = importlib.import_module("qrcode")
    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=4)
    code.add_data(data, optimize=0)  # one byte-mode segment: capacity exactly QR_MAX_BYTES
    code.make(fit=True)
    dark: list[list[bool]] = [[bool(m) for m in row] for row in code.get_matrix()]
    width = len(dark[0])
    if len(dark) % 2:
        dark.append([False] * width)  # the quiet zone continues below
    # Index: top module drawn + 2 * bottom module drawn.
    glyphs = (" ", "▀", "▄", "█")
    lines = []
    for top, bottom in zip(dark[0::2], dark[1::2], strict=True):
        lines.append("".join(glyphs[(t == invert) + 2 * (b == invert)]
                             for t, b in zip(top, bottom, strict=True)))
    return "\n".join(lines) + "\n"


def step_at(when: datetime) -> int:
    """Return the RFC 6238 time step (30-second counter since the epoch) of ``when``.

    Raises ``TotpError`` if ``when`` has no time zone.
    """
    if when.tzinfo is None:
        raise TotpError("times given to TOTP must be timezone-aware")
    return int(when.timestamp()) // PERIOD_S


def code_at(secret: bytes, when: datetime) -> str:
    """Return the 6-digit code for ``secret`` at ``when`` (for demos and tests).

    Raises ``TotpError`` for a secret shorter than 128 bits or a naive time.
    """
    return _totp(secret).generate(step_at(when) * PERIOD_S).decode()


def verify(secret: bytes, code: str, now: datetime, last_step: int | None,
           window: int = 1) -> int | None:
    """Check ``code`` against the steps ``step_at(now) - window .. + window``.

    Returns the matched step, which the caller must store and pass as
    ``last_step`` next time, or ``None`` when ``code`` is not exactly six
    ASCII digits, matches none of the steps, or matches only steps at or
    before ``last_step`` (already used). Every step in the window is
    compared (constant-time) whether or not an earlier one matched.

    Raises ``TotpError`` for a secret shorter than 128 bits, a naive
    ``now`` or a negative ``window``.
    """
    if window < 0:
        raise TotpError(f"the TOTP window must not be negative, not {window}")
    totp = _totp(secret)
    current = step_at(now)
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        return None
    token = code.encode()
    matched: int | None = None
    for step in range(current - window, current + window + 1):
        if step < 0 or (last_step is not None and step <= last_step):
            continue
        try:
            totp.verify(token, step * PERIOD_S)
        except InvalidToken:
            continue
        if matched is None:
            matched = step
    return matched


def _totp(secret: bytes) -> TOTP:
    if len(secret) < MIN_SECRET_BYTES:
        raise TotpError(f"a TOTP secret must be at least {MIN_SECRET_BYTES} bytes, "
                        f"not {len(secret)}")
    # SHA-1 is what RFC 6238 and every authenticator app use; HMAC-SHA1 is not
    # affected by SHA-1's collision attacks.
    return TOTP(secret, DIGITS, SHA1(), PERIOD_S)  # noqa: S303
