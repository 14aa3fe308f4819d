"""SIEM export: RFC 5424 formatting, RFC 5425 framing, JSON lines, and delivery
to a real rsyslog TLS receiver."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztgpu.audit.events import GENESIS_PREV, event_hash
from ztgpu.collector.siem import (
    BOM,
    JsonlWriter,
    SiemError,
    SyslogTlsSender,
    event_json,
    format_rfc5424,
    frame,
)
from ztgpu.testing.rsyslog import RsyslogHarnessError, RsyslogReceiver
from ztgpu.trust import pki

SAMPLE: dict[str, Any] = {
    "v": 1,
    "code": "job.grant",
    "severity": "info",
    "node": "gpu-node01",
    "seq": 7,
    "ts": "2026-11-26T12:00:00.123456Z",
    "prev": "a" * 64,
    "hash": "b" * 64,
    "job_id": "1234",
    "uid": 1000,
    "user": "alice",
    "gpus": [{"index": 0, "uuid": "GPU-0000", "minor": 0}],
    "outcome": "granted",
}


# ---- an RFC 5424 parser that checks the ABNF (section 6) ------------------

_HEADER = re.compile(
    rb"<(?P<pri>[0-9]{1,3})>(?P<version>[1-9][0-9]{0,2}) "
    rb"(?P<timestamp>-|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
    rb"(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})) "
    rb"(?P<hostname>[\x21-\x7e]{1,255}) (?P<app>[\x21-\x7e]{1,48}) "
    rb"(?P<procid>[\x21-\x7e]{1,128}) (?P<msgid>[\x21-\x7e]{1,32}) "
)
_SD_NAME = re.compile(rb'[\x21-\x7e]{1,32}')
_SD_NAME_FORBIDDEN = set(b'= ]"')


@dataclass
class Parsed:
    pri: int
    timestamp: str
    hostname: str
    app: str
    procid: str
    msgid: str
    sd: dict[str, dict[str, str]]
    msg: bytes


def _sd_name(data: bytes, pos: int) -> tuple[str, int]:
    match = _SD_NAME.match(data, pos)
    assert match, f"SD-NAME expected at {pos}: {data[pos:pos + 40]!r}"
    name = match.group()
    cut = next((i for i, b in enumerate(name) if b in _SD_NAME_FORBIDDEN), len(name))
    assert cut > 0, f"empty SD-NAME at {pos}"
    return name[:cut].decode("ascii"), pos + cut


def parse_rfc5424(data: bytes) -> Parsed:
    """Parse one message, asserting the RFC 5424 ABNF; unescapes PARAM-VALUEs."""
    header = _HEADER.match(data)
    assert header, f"not an RFC 5424 header: {data[:120]!r}"
    pri = int(header["pri"])
    assert 0 <= pri <= 191
    assert header["version"] == b"1"
    pos = header.end()
    sd: dict[str, dict[str, str]] = {}
    if data[pos:pos + 1] == b"-":
        pos += 1
    else:
        assert data[pos:pos + 1] == b"[", "STRUCTURED-DATA must be '-' or SD-ELEMENTs"
        while data[pos:pos + 1] == b"[":
            sd_id, pos = _sd_name(data, pos + 1)
            assert sd_id not in sd, f"duplicate SD-ID {sd_id}"
            params: dict[str, str] = {}
            while data[pos:pos + 1] == b" ":
                name, pos = _sd_name(data, pos + 1)
                assert data[pos:pos + 2] == b'="', f"PARAM-NAME must be followed by '=\"' ({name})"
                pos += 2
                value = bytearray()
                while True:
                    assert pos < len(data), "unterminated PARAM-VALUE"
                    byte = data[pos]
                    if byte == ord("\\") and data[pos + 1:pos + 2] in (b'"', b"\\", b"]"):
                        value += data[pos + 1:pos + 2]
                        pos += 2
                    elif byte == ord('"'):
                        pos += 1
                        break
                    else:
                        assert byte != ord("]"), "unescaped ']' in PARAM-VALUE"
                        value.append(byte)
                        pos += 1
                params[name] = value.decode("utf-8")  # PARAM-VALUE is UTF-8
            assert data[pos:pos + 1] == b"]", f"SD-ELEMENT must end with ']' at {pos}"
            pos += 1
            sd[sd_id] = params
    msg = b""
    if pos < len(data):
        assert data[pos:pos + 1] == b" ", "MSG must follow STRUCTURED-DATA after one SP"
        msg = data[pos + 1:]
        if msg.startswith(BOM):
            msg[len(BOM):].decode("utf-8")  # MSG-UTF8 must be valid UTF-8
    return Parsed(pri=pri, timestamp=header["timestamp"].decode(),
                  hostname=header["hostname"].decode(), app=header["app"].decode(),
                  procid=header["procid"].decode(), msgid=header["msgid"].decode(),
                  sd=sd, msg=msg)


def _body(parsed: Parsed) -> Any:
    assert parsed.msg.startswith(BOM)
    return json.loads(parsed.msg[len(BOM):].decode("utf-8"))


# ---- format_rfc5424 ------------------------------------------------------


def test_sample_event_exact_message() -> None:
    body = json.dumps(SAMPLE, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = (
        b"<110>1 2026-11-26T12:00:00.123456Z gpu-node01 ztgpu - job.grant "
        b'[ztgpu@32473 seq="7" hash="' + b"b" * 64 + b'" job_id="1234" user="alice" '
        b'uid="1000" outcome="granted"] \xef\xbb\xbf' + body.encode()
    )
    assert format_rfc5424(SAMPLE) == expected
    parsed = parse_rfc5424(expected)
    assert parsed.procid == "-"
    assert _body(parsed) == SAMPLE


def test_app_name_and_optional_params() -> None:
    event = {k: v for k, v in SAMPLE.items() if k not in {"job_id", "user", "uid", "outcome"}}
    parsed = parse_rfc5424(format_rfc5424(event, app_name="ztgpu-collectord"))
    assert parsed.app == "ztgpu-collectord"
    assert parsed.sd == {"ztgpu@32473": {"seq": "7", "hash": "b" * 64}}
    long_app = parse_rfc5424(format_rfc5424(event, app_name="a" * 60))
    assert long_app.app == "a" * 48


def test_param_values_are_escaped() -> None:
    tricky = 'ev"il\\us]er'
    message = format_rfc5424({**SAMPLE, "user": tricky, "outcome": "]]"})
    assert b'user="ev\\"il\\\\us\\]er"' in message
    assert b'outcome="\\]\\]"' in message
    parsed = parse_rfc5424(message)
    assert parsed.sd["ztgpu@32473"]["user"] == tricky
    assert parsed.sd["ztgpu@32473"]["outcome"] == "]]"
    assert _body(parsed)["user"] == tricky


def test_message_body_is_bom_and_canonical_json() -> None:
    event = {**SAMPLE, "user": "zoë", "reason": "ünïcode ✓"}
    message = format_rfc5424(event)
    head, sep, body = message.partition(b"] " + BOM)
    assert sep, "the MSG must start with a UTF-8 BOM right after the structured data"
    assert body == event_json(event)
    assert json.loads(body.decode("utf-8")) == event
    assert "zoë".encode() in head  # PARAM-VALUE is UTF-8, not escaped ASCII
    # canonical: sorted keys, no spaces, no ASCII escaping
    assert body.decode() == json.dumps(event, sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=False)


@pytest.mark.parametrize(("severity", "pri"), [
    ("info", 13 * 8 + 6),
    ("warning", 13 * 8 + 4),
    ("critical", 13 * 8 + 2),
    ("bogus", 13 * 8 + 4),
    (None, 13 * 8 + 4),
    (3, 13 * 8 + 4),
])
def test_severity_maps_to_pri(severity: object, pri: int) -> None:
    assert parse_rfc5424(format_rfc5424({**SAMPLE, "severity": severity})).pri == pri


def test_msgid_is_truncated_to_32_printable_ascii() -> None:
    long_code = "policy." + "x" * 40
    parsed = parse_rfc5424(format_rfc5424({**SAMPLE, "code": long_code}))
    assert parsed.msgid == long_code[:32]
    odd = parse_rfc5424(format_rfc5424({**SAMPLE, "code": "job grant✓"}))
    assert odd.msgid == "job_grant_"
    assert parse_rfc5424(format_rfc5424({**SAMPLE, "code": None})).msgid == "-"


def test_control_characters_are_stripped_from_header_and_params() -> None:
    event = {**SAMPLE, "code": "job.\ngr\x00ant", "node": "gpu-\r\nnode01\x7f",
             "user": "ali\x1bce\n", "outcome": "\x85granted"}
    message = format_rfc5424(event, app_name="zt\tgpu")
    head = message.partition(BOM)[0]
    assert not any(b < 0x20 or b == 0x7F for b in head), head
    parsed = parse_rfc5424(message)
    assert (parsed.msgid, parsed.hostname, parsed.app) == ("job.grant", "gpu-node01", "ztgpu")
    assert parsed.sd["ztgpu@32473"]["user"] == "alice"
    assert parsed.sd["ztgpu@32473"]["outcome"] == "granted"
    # The body keeps the original values (JSON escapes them).
    assert _body(parsed)["user"] == "ali\x1bce\n"


@pytest.mark.parametrize("node", ["gpu node", "nöde", "n" * 256, "", None, "\n"])
def test_invalid_hostname_becomes_nil(node: object) -> None:
    assert parse_rfc5424(format_rfc5424({**SAMPLE, "node": node})).hostname == "-"


@pytest.mark.parametrize("ts", ["2026-13-01T00:00:00Z", "2026-11-26 12:00:00Z",
                                "2026-11-26T12:00:00.1234567Z", "yesterday", 1764158400,
                                None, "2026-11-26T12:00:60Z"])
def test_invalid_timestamp_becomes_nil(ts: object) -> None:
    assert parse_rfc5424(format_rfc5424({**SAMPLE, "ts": ts})).timestamp == "-"


def test_timestamp_with_offset_is_kept() -> None:
    ts = "2026-11-26T13:00:00.5+01:00"
    assert parse_rfc5424(format_rfc5424({**SAMPLE, "ts": ts})).timestamp == ts


def test_odd_values_never_raise() -> None:
    event: dict[str, Any] = {**SAMPLE, "user": 1234, "uid": None, "job_id": 99, "seq": "7",
                             "outcome": ["a", "b"], "score": float("nan"),
                             "blob": b"\x00\x01", "when": {1: "x"}, "bad": "\udcff"}
    parsed = parse_rfc5424(format_rfc5424(event))
    params = parsed.sd["ztgpu@32473"]
    assert params["user"] == "1234"
    assert "uid" not in params
    assert params["job_id"] == "99"
    assert params["outcome"] == "['a', 'b']"
    body = _body(parsed)
    assert body["score"] == "nan"
    assert body["when"] == {"1": "x"}
    assert body["bad"] == "\udcff"  # lone surrogate survives as a JSON escape


_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
                    st.lists(st.text(), max_size=3),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


@given(st.dictionaries(
    st.one_of(st.sampled_from(["v", "code", "severity", "node", "seq", "ts", "prev", "hash",
                               "job_id", "uid", "user", "outcome", "reason", "gpus"]),
              st.text(max_size=8)),
    _values, max_size=14),
    st.text(max_size=60))
def test_any_event_gives_a_well_formed_message(event: dict[str, Any], app_name: str) -> None:
    parsed = parse_rfc5424(format_rfc5424(event, app_name=app_name))
    assert parsed.procid == "-"
    assert set(parsed.sd["ztgpu@32473"]) <= {"seq", "hash", "job_id", "user", "uid", "outcome"}
    assert isinstance(_body(parsed), dict)


# ---- frame ---------------------------------------------------------------


def test_frame_counts_octets() -> None:
    assert frame(b"abc") == b"3 abc"
    assert frame("é✓".encode()) == b"5 " + "é✓".encode()
    assert frame(b"") == b"0 "
    message = format_rfc5424(SAMPLE)
    length, _, rest = frame(message).partition(b" ")
    assert int(length) == len(message)
    assert rest == message


# ---- JsonlWriter ---------------------------------------------------------


def test_jsonl_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "export" / "sub" / "audit.jsonl"
    events = [{**SAMPLE, "seq": i, "user": "zoë"} for i in range(1, 4)]
    old_umask = os.umask(0o002)
    try:
        with JsonlWriter(path) as writer:
            writer.write(events[:2])
            writer.write([])
            writer.write(events[2:])
    finally:
        os.umask(old_umask)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert [json.loads(line) for line in lines[:-1]] == events
    assert lines[0] == event_json(events[0])
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    # A second writer appends, it does not truncate.
    with JsonlWriter(path) as writer:
        writer.write([{**SAMPLE, "seq": 4}])
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_jsonl_closes_off_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(event_json(SAMPLE) + b"\n" + b'{"torn":')
    with JsonlWriter(path) as writer:
        writer.write([{**SAMPLE, "seq": 8}])
    lines = path.read_text().splitlines()
    assert lines[1] == '{"torn":'
    assert json.loads(lines[2])["seq"] == 8


def test_jsonl_failure_is_a_siem_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    writer = JsonlWriter(blocker / "audit.jsonl")
    with pytest.raises(SiemError, match=r"audit\.jsonl"):
        writer.write([SAMPLE])
    writer.close()


# ---- delivery to a real rsyslog TLS receiver -----------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path


def _make_pki(base: Path) -> Pki:
    ca_crt, _ = pki.init_ca(base / "ca")
    server_crt, server_key = pki.issue(base / "ca", "service", "siem", base / "certs",
                                       dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    client_crt, client_key = pki.issue(base / "ca", "service", "collector", base / "certs")
    return Pki(ca_crt, server_crt, server_key, client_crt, client_key)


@pytest.fixture(scope="module")
def site_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("site-pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("other-pki"))


def tls13_client(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(ca)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def _chain(count: int, node: str = "gpu-node01") -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    prev = GENESIS_PREV
    codes = ["job.grant", "job.release", "gpu.open_denied"]
    for seq in range(1, count + 1):
        event: dict[str, Any] = {
            "v": 1, "code": codes[seq % 3], "severity": ["info", "info", "warning"][seq % 3],
            "node": node, "seq": seq, "ts": f"2026-11-26T12:00:{seq % 60:02d}.{seq:06d}Z",
            "prev": prev, "job_id": str(1000 + seq), "uid": 1000 + seq % 7,
            "user": f"user{seq % 7}", "outcome": "granted",
        }
        event["hash"] = event_hash(event)
        prev = event["hash"]
        events.append(event)
    return events


@pytest.fixture
def receiver(site_pki: Pki, request: pytest.FixtureRequest) -> Iterator[RsyslogReceiver]:
    driver = getattr(request, "param", "gtls")
    with RsyslogReceiver(site_pki.ca, site_pki.server_crt, site_pki.server_key,
                         driver=driver) as running:
        yield running


def _check_delivered(lines: list[str], events: list[Mapping[str, Any]]) -> None:
    assert len(lines) == len(events)
    for line, event in zip(lines, events, strict=True):
        assert f" {event['code']} " in line
        assert f'seq="{event["seq"]}"' in line
        assert f'hash="{event["hash"]}"' in line
        parsed = parse_rfc5424(line.encode("utf-8"))
        assert _body(parsed) == event


@pytest.mark.parametrize("receiver", ["gtls", "ossl"], indirect=True)
def test_thousand_events_arrive_in_order(receiver: RsyslogReceiver, site_pki: Pki) -> None:
    events = _chain(1000)
    context = tls13_client(site_pki.ca, site_pki.client_crt, site_pki.client_key)
    with SyslogTlsSender(receiver.address, receiver.port, context) as sender:
        for start in range(0, len(events), 100):
            sender.send([format_rfc5424(e) for e in events[start:start + 100]])
        assert sender.tls_version == "TLSv1.3"
        lines = receiver.wait_for(1000, timeout=60)
    _check_delivered(lines, events)
    assert [parse_rfc5424(line.encode()).sd["ztgpu@32473"]["seq"] for line in lines] == [
        str(i) for i in range(1, 1001)]


def test_sender_rejects_receiver_from_another_ca(receiver: RsyslogReceiver, site_pki: Pki,
                                                 other_pki: Pki) -> None:
    context = tls13_client(other_pki.ca, other_pki.client_crt, other_pki.client_key)
    with SyslogTlsSender(receiver.address, receiver.port, context) as sender:
        with pytest.raises(SiemError, match=r"TLS handshake .* failed.*certificate verify"):
            sender.send([format_rfc5424(SAMPLE)])
        assert not sender.connected
    assert receiver.messages() == []


@pytest.mark.parametrize("receiver", ["gtls", "ossl"], indirect=True)
@pytest.mark.parametrize("client", ["none", "other-ca"])
def test_refused_client_certificate_is_reported(receiver: RsyslogReceiver, site_pki: Pki,
                                                other_pki: Pki, client: str) -> None:
    """Under TLS 1.3 the receiver refuses a client certificate after the
    client's handshake is done; the sender must not report that as sent."""
    if client == "none":
        context = tls13_client(site_pki.ca, None, None)
    else:
        context = tls13_client(site_pki.ca, other_pki.client_crt, other_pki.client_key)
    with SyslogTlsSender(receiver.address, receiver.port, context) as sender:
        with pytest.raises(SiemError, match="refused the session"):
            sender.send([format_rfc5424(SAMPLE)])
        assert not sender.connected
    assert receiver.messages() == []


@pytest.mark.parametrize(("permitted", "accepted"), [("collector", True), ("intruder", False)])
def test_x509_name_receiver_checks_the_client_name(site_pki: Pki, permitted: str,
                                                   accepted: bool) -> None:
    context = tls13_client(site_pki.ca, site_pki.client_crt, site_pki.client_key)
    with RsyslogReceiver(site_pki.ca, site_pki.server_crt, site_pki.server_key,
                         auth_mode="x509/name", permitted_peers=[permitted]) as running, \
            SyslogTlsSender(running.address, running.port, context) as sender:
        if accepted:
            sender.send([format_rfc5424(SAMPLE)])
            _check_delivered(running.wait_for(1), [SAMPLE])
        else:
            with pytest.raises(SiemError, match="refused the session"):
                sender.send([format_rfc5424(SAMPLE)])
            assert running.messages() == []


def test_receiver_rejects_unquotable_config_values(site_pki: Pki) -> None:
    with pytest.raises(ValueError, match="quote"):
        RsyslogReceiver(site_pki.ca, site_pki.server_crt, site_pki.server_key,
                        auth_mode="x509/name", permitted_peers=['a"] evil'])
    with pytest.raises(ValueError, match="auth_mode"):
        RsyslogReceiver(site_pki.ca, site_pki.server_crt, site_pki.server_key,
                        auth_mode="x509/anything")


def test_receiver_config_error_is_reported(site_pki: Pki,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = RsyslogReceiver(site_pki.ca, site_pki.server_crt, site_pki.server_key)
    monkeypatch.setattr(receiver, "render_config",
                        lambda: 'module(load="imtcp" noSuchParameter="1")\n')
    with pytest.raises(RsyslogHarnessError, match="noSuchParameter"):
        receiver.start()
    with pytest.raises(RsyslogHarnessError, match="not started"):
        _ = receiver.dir  # the private directory is gone again


def test_receiver_down_then_restarted(site_pki: Pki) -> None:
    events = _chain(3)
    context = tls13_client(site_pki.ca, site_pki.client_crt, site_pki.client_key)
    first = RsyslogReceiver(site_pki.ca, site_pki.server_crt, site_pki.server_key)
    first.start()
    try:
        port = first.port
        with SyslogTlsSender("127.0.0.1", port, context, server_name="localhost") as sender:
            sender.send([format_rfc5424(events[0])])
            _check_delivered(first.wait_for(1), events[:1])
            first.stop()
            # The receiver is gone: the stale connection is noticed, the
            # reconnect is refused, and the caller gets an error, not success.
            with pytest.raises(SiemError, match="cannot connect"):
                sender.send([format_rfc5424(events[1])])
            assert not sender.connected
            with RsyslogReceiver(site_pki.ca, site_pki.server_crt, site_pki.server_key,
                                 port=port) as second:
                sender.send([format_rfc5424(e) for e in events[1:]])
                _check_delivered(second.wait_for(2), events[1:])
    finally:
        first.stop()


def test_nothing_listening_is_a_siem_error(site_pki: Pki) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening
        context = tls13_client(site_pki.ca, site_pki.client_crt, site_pki.client_key)
        with SyslogTlsSender("127.0.0.1", port, context, timeout_s=2) as sender:
            with pytest.raises(SiemError, match="cannot connect"):
                sender.send([format_rfc5424(SAMPLE)])
            sender.send([])  # an empty batch needs no connection
            assert not sender.connected
