"""TOTP: RFC 6238 vectors, the acceptance window, replay refusal, enrolment URI and QR text."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from ztgpu.trust import totp
from ztgpu.trust.totp import TotpError

RFC_SECRET = b"12345678901234567890"
# RFC 6238 Appendix B, SHA-1 column (8 digits); the 6-digit code is the last six.
RFC_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]
NOW = datetime(2025, 3, 1, 12, 0, 15, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@pytest.mark.parametrize(("unix", "code8"), RFC_VECTORS)
def test_rfc6238_vectors(unix: int, code8: str) -> None:
    assert totp.code_at(RFC_SECRET, at(unix)) == code8[-6:]
    step = totp.verify(RFC_SECRET, code8[-6:], at(unix), last_step=None)
    assert step == unix // 30


def test_new_secret_is_160_random_bits() -> None:
    a, b = totp.new_secret(), totp.new_secret()
    assert len(a) == 20 and len(b) == 20
    assert a != b


def test_codes_in_window_accepted_outside_refused() -> None:
    secret = totp.new_secret()
    now_step = totp.step_at(NOW)
    for offset in (-1, 0, 1):
        code = totp.code_at(secret, NOW + timedelta(seconds=30 * offset))
        assert totp.verify(secret, code, NOW, last_step=None) == now_step + offset
    for offset in (-2, 2):
        code = totp.code_at(secret, NOW + timedelta(seconds=30 * offset))
        # A different step's code could collide by chance (1 in 10^6); only
        # assert refusal when it differs from every code in the window.
        window = {totp.code_at(secret, NOW + timedelta(seconds=30 * o)) for o in (-1, 0, 1)}
        if code not in window:
            assert totp.verify(secret, code, NOW, last_step=None) is None
    # A wider window accepts the +-2 codes.
    code = totp.code_at(secret, NOW + timedelta(seconds=60))
    assert totp.verify(secret, code, NOW, last_step=None, window=2) == now_step + 2


def test_rfc_vector_outside_window_refused() -> None:
    # 1111111111's code, checked two steps (60 s) later.
    assert totp.verify(RFC_SECRET, "050471", at(1111111111 + 60), last_step=None) is None
    assert totp.verify(RFC_SECRET, "050471", at(1111111111 + 30), last_step=None) is not None


def test_code_is_accepted_once() -> None:
    secret = totp.new_secret()
    code = totp.code_at(secret, NOW)
    step = totp.verify(secret, code, NOW, last_step=None)
    assert step == totp.step_at(NOW)
    # The caller stored the step: the same code is refused, even a little later.
    assert totp.verify(secret, code, NOW, last_step=step) is None
    assert totp.verify(secret, code, NOW + timedelta(seconds=25), last_step=step) is None
    # An older code still inside the window is refused too.
    older = totp.code_at(secret, NOW - timedelta(seconds=30))
    if older != code:
        assert totp.verify(secret, older, NOW, last_step=step) is None
    # The next step's code is fine.
    later = NOW + timedelta(seconds=30)
    assert totp.verify(secret, totp.code_at(secret, later), later, last_step=step) == step + 1


@pytest.mark.parametrize("bad", ["", "12345", "1234567", "12345a", " 123456", "123456 ",
                                 "12 345", "١٢٣٤٥٦", "-12345", "+12345", "123456\n"])
def test_non_six_digit_codes_refused(bad: str) -> None:
    assert totp.verify(RFC_SECRET, bad, at(59), last_step=None) is None


def test_wrong_secret_refused() -> None:
    code = totp.code_at(RFC_SECRET, at(59))
    assert totp.verify(b"X" * 20, code, at(59), last_step=None) is None


def test_bad_parameters_raise() -> None:
    with pytest.raises(TotpError, match="at least 16 bytes"):
        totp.verify(b"short", "123456", NOW, last_step=None)
    with pytest.raises(TotpError, match="timezone-aware"):
        totp.code_at(RFC_SECRET, datetime(2025, 1, 1))
    with pytest.raises(TotpError, match="negative"):
        totp.verify(RFC_SECRET, "123456", NOW, last_step=None, window=-1)


def test_otpauth_uri() -> None:
    uri = totp.otpauth_uri(RFC_SECRET, "alice smith@hpc", issuer="Big Lab")
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth" and parts.netloc == "totp"
    assert parts.path == "/Big%20Lab:alice%20smith%40hpc"
    assert unquote(parts.path[1:]) == "Big Lab:alice smith@hpc"
    assert "+" not in uri and " " not in uri
    query = parse_qs(parts.query, strict_parsing=True)
    assert query == {"secret": ["GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"], "issuer": ["Big Lab"],
                     "algorithm": ["SHA1"], "digits": ["6"], "period": ["30"]}
    assert base64.b32decode(query["secret"][0]) == RFC_SECRET


def test_otpauth_uri_secret_has_no_padding() -> None:
    secret = b"0123456789abcdefg"  # 17 bytes: base32 would need padding
    query = parse_qs(urlsplit(totp.otpauth_uri(secret, "bob")).query)
    text = query["secret"][0]
    assert "=" not in text
    assert base64.b32decode(text + "=" * (-len(text) % 8)) == secret
    assert query["issuer"] == ["ztgpu"]
    assert urlsplit(totp.otpauth_uri(secret, "bob")).path == "/ztgpu:bob"


@pytest.mark.parametrize(("user", "issuer"), [("", "ztgpu"), ("a:b", "ztgpu"), ("bob", "x:y"),
                                              ("bob", "")])
def test_otpauth_uri_refuses_bad_labels(user: str, issuer: str) -> None:
    with pytest.raises(TotpError, match="colon"):
        totp.otpauth_uri(RFC_SECRET, user, issuer=issuer)


def _grid(text: str) -> list[str]:
    assert text.endswith("\n")
    return text[:-1].split("\n")


def test_qr_text_shape() -> None:
    uri = totp.otpauth_uri(totp.new_secret(), "alice")
    lines = _grid(totp.qr_text(uri))
    width = len(lines[0])
    assert all(len(line) == width for line in lines)
    assert set("".join(lines)) <= {" ", "▀", "▄", "█"}
    # Two modules per line: about square, fits an 80-column terminal.
    assert width <= 80
    assert abs(2 * len(lines) - width) <= 1
    # QR sizes are 17 + 4v modules, plus a 4-module quiet zone each side.
    assert (width - 8 - 17) % 4 == 0
    # The quiet zone (light, drawn as full blocks by default) surrounds the code.
    assert lines[0] == "█" * width and lines[1] == "█" * width
    assert all(line.startswith("████") and line.endswith("████") for line in lines)
    # The top-left finder pattern starts at module (4, 4): a dark run of 7.
    top = lines[2]  # modules rows 4 and 5
    # Row 4 is all dark (nothing drawn), row 5 dark-light*5-dark.
    assert top[4:11] == " ▄▄▄▄▄ "


def test_qr_text_draws_the_libraries_modules() -> None:
    # Read the text back into modules and compare with qrcode's own matrix.
    import qrcode

    uri = totp.otpauth_uri(RFC_SECRET, "alice")
    lines = _grid(totp.qr_text(uri))
    top = {" ": True, "▀": False, "▄": True, "█": False}     # dark = not drawn
    bottom = {" ": True, "▀": True, "▄": False, "█": False}
    modules = []
    for line in lines:
        modules.append([top[c] for c in line])
        modules.append([bottom[c] for c in line])
    ref = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=4)
    ref.add_data(uri.encode(), optimize=0)
    ref.make(fit=True)
    expected = [[bool(m) for m in row] for row in ref.get_matrix()]
    assert modules[:len(expected)] == expected
    assert all(not any(row) for row in modules[len(expected):])  # padding row is light
    assert ref.version == 7  # an enrolment URI: 45 modules + quiet zone = 53 columns


def test_qr_text_invert_swaps_light_and_dark() -> None:
    uri = "otpauth://totp/ztgpu:bob?secret=ABC"
    normal, inverted = _grid(totp.qr_text(uri)), _grid(totp.qr_text(uri, invert=True))
    swap = str.maketrans({" ": "█", "█": " ", "▀": "▄", "▄": "▀"})
    assert [line.translate(swap) for line in normal] == inverted
    assert inverted[0] == " " * len(inverted[0])


def test_qr_text_grows_with_data() -> None:
    small = _grid(totp.qr_text("otpauth://totp/x"))
    large = _grid(totp.qr_text("otpauth://totp/" + "x" * 200))
    assert len(large[0]) > len(small[0]) and len(large) > len(small)


def test_qr_text_refuses_data_too_large() -> None:
    assert totp.qr_text("x" * totp.QR_MAX_BYTES).count("\n") > 60  # version 40 still fits
    with pytest.raises(TotpError, match="do not fit"):
        totp.qr_text("x" * (totp.QR_MAX_BYTES + 1))
    with pytest.raises(TotpError, match="do not fit"):
        totp.qr_text("\u00e9" * 1200)  # 2400 bytes in UTF-8
