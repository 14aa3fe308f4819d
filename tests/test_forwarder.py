"""The agent's audit forwarder against a real mutual-TLS 1.3 HTTPS collector stand-in.

The stand-in (``FakeCollector`` behind ``http.server`` + ``ssl``) keeps the
collector's side of the wire contract in memory: it checks the hash chain,
drops duplicates by seq, acknowledges its durable head, verifies checkpoint
signatures, and can be told to fail, to acknowledge less than it was sent,
or to drop idle connections.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztgpu.audit import forwarder as forwarder_module
from ztgpu.audit.events import GENESIS_PREV, checkpoint_message, event_hash
from ztgpu.audit.forwarder import Forwarder
from ztgpu.audit.spool import Spool

NODE = "gpu01"
FORWARDER_LOG = "ztgpu.forwarder"


# --- a throwaway PKI: ECDSA P-256 CA, server and client certificates ---------


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    posing_cert: Path
    posing_key: Path


def _name(cn: str, role: str | None = None) -> x509.Name:
    """A subject; with *role*, as the site PKI names its holders (OU=role)."""
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if role is not None:
        parts = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztgpu"),
                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role), *parts]
    return x509.Name(parts)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_pki(directory: Path) -> Pki:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("forwarder test CA"))
        .issuer_name(_name("forwarder test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName],
             role: str | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, role))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf("collector", ExtendedKeyUsageOID.SERVER_AUTH,
                              [x509.DNSName("localhost"),
                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                              role="service")
    client, client_key = leaf(NODE, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    # A node's certificate for its /metrics, with the collector host's names.
    posing, posing_key = leaf("gpu07", ExtendedKeyUsageOID.SERVER_AUTH,
                              [x509.DNSName("localhost"),
                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], role="node")
    pki = Pki(directory / "ca.crt", directory / "server.crt", directory / "server.key",
              directory / "client.crt", directory / "client.key", directory / "posing.crt",
              directory / "posing.key")
    pki.posing_cert.write_bytes(posing.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.posing_key, posing_key)
    pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    pki.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.server_key, server_key)
    _write_key(pki.client_key, client_key)
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki.ca_cert)
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


def server_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pki.ca_cert)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    return ctx


# --- the collector stand-in --------------------------------------------------


@dataclass
class FakeCollector:
    """The collector's side of the wire contract, in memory, with knobs for failures."""

    checkpoint_key: ec.EllipticCurvePublicKey | None = None
    #: Statuses to answer to the next POST /v1/events, one per request, nothing stored.
    fail_next: list[int] = field(default_factory=list)
    #: Request number (1-based) -> status to answer instead, nothing stored.
    fail_requests: dict[int, int] = field(default_factory=dict)
    #: Request numbers (1-based) whose batch is stored but answered with 500.
    store_then_fail: set[int] = field(default_factory=set)
    #: Store at most this many new events per request (acknowledge less than sent).
    store_limit: int | None = None
    #: Close a kept-alive connection after this many idle seconds.
    idle_timeout_s: float = 10.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    events: dict[int, dict[str, Any]] = field(default_factory=dict)
    head: int = 0
    head_hash: str = GENESIS_PREV
    batches: list[list[int]] = field(default_factory=list)
    duplicates: int = 0
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    peer_names: set[str] = field(default_factory=set)
    content_types: set[str] = field(default_factory=set)

    def handle(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if path == "/v1/events":
                return self._events(body)
            if path == "/v1/checkpoints":
                return self._checkpoint(body)
            return 404, {"error": f"no such path {path}"}

    def _events(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict) or body.get("node") != NODE:
            return 400, {"error": "bad batch"}
        batch = body["events"]
        self.batches.append([e["seq"] for e in batch])
        status = self.fail_requests.get(len(self.batches))
        if status is None and self.fail_next:
            status = self.fail_next.pop(0)
        if status is not None:
            return status, {"error": f"injected {status}", "acked_seq": self.head}
        head, head_hash, new, dups = self.head, self.head_hash, {}, 0
        for event in batch:
            seq = event["seq"]
            if seq <= head:
                if self.events.get(seq, new.get(seq, {})).get("hash") != event["hash"]:
                    return 409, {"error": f"seq {seq} differs from the stored one",
                                 "acked_seq": self.head}
                dups += 1
                continue
            if seq != head + 1 or event["prev"] != head_hash or event_hash(event) != event["hash"]:
                return 409, {"error": f"chain broken at seq {seq}", "acked_seq": self.head}
            if self.store_limit is not None and len(new) >= self.store_limit:
                break
            new[seq] = event
            head, head_hash = seq, event["hash"]
        self.events.update(new)
        self.head, self.head_hash, self.duplicates = head, head_hash, self.duplicates + dups
        if len(self.batches) in self.store_then_fail:
            return 500, {"error": "stored, but the reply got lost"}
        return 200, {"acked_seq": self.head, "accepted": len(new), "duplicates": dups}

    def _checkpoint(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        seq = body["seq"]
        if seq > self.head:
            return 409, {"error": f"seq {seq} not stored yet"}
        if body["hash"] != self.events[seq]["hash"] or self.checkpoint_key is None:
            return 400, {"error": "hash does not match the stored event"}
        try:
            self.checkpoint_key.verify(base64.b64decode(body["sig"]), checkpoint_message(body),
                                       ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return 400, {"error": "bad signature"}
        self.checkpoints.append(body)
        return 200, {"ok": True}

    def seqs_received(self) -> list[int]:
        with self.lock:
            return [seq for batch in self.batches for seq in batch]

    def stored(self) -> list[dict[str, Any]]:
        with self.lock:
            return [self.events[seq] for seq in sorted(self.events)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TlsServer

    def setup(self) -> None:
        self.timeout = self.server.collector.idle_timeout_s
        super().setup()

    def do_POST(self) -> None:
        collector = self.server.collector
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        cert = self.connection.getpeercert()  # type: ignore[attr-defined]
        with collector.lock:
            collector.content_types.add(self.headers.get("Content-Type", ""))
            collector.peer_names.update(v for rdn in cert["subject"] for k, v in rdn
                                        if k == "commonName")
        status, reply = collector.handle(self.path, body)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _TlsServer(ThreadingHTTPServer):
    """HTTPS with the TLS handshake in the request thread; tracks live connections."""

    daemon_threads = True

    def __init__(self, port: int, context: ssl.SSLContext, collector: FakeCollector) -> None:
        self.context = context
        self.collector = collector
        self.live: set[ssl.SSLSocket] = set()
        self.live_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self.collector.lock:
            self.collector.connections += 1
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except OSError:
            return
        with self.live_lock:
            self.live.add(tls)
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            with self.live_lock:
                self.live.discard(tls)
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that goes away mid-request is part of these tests

    def drop_connections(self) -> None:
        with self.live_lock:
            for tls in self.live:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(tls, socket.SHUT_RDWR)


@contextlib.contextmanager
def serving(collector: FakeCollector, pki: Pki, port: int = 0) -> Iterator[_TlsServer]:
    server = _TlsServer(port, server_context(pki), collector)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.drop_connections()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def accepting_and_closing(port: int) -> Iterator[list[int]]:
    """A port that accepts TCP and closes at once (no TLS service); counts attempts."""
    count = [0]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    listener.settimeout(0.02)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            count[0] += 1
            conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- helpers ------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def fill(spool: Spool, n: int, start: int = 0) -> list[dict[str, Any]]:
    return spool.append_many(
        [("hook.error", {"hook": "prolog", "reason": f"failure {start + i}"}) for i in range(n)]
    )


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "audit.db"


@pytest.fixture
def spool(spool_path: Path) -> Iterator[Spool]:
    with Spool.open(spool_path, NODE) as opened:
        yield opened


@pytest.fixture
def forwarders(pki: Pki) -> Iterator[Callable[..., Forwarder]]:
    """Build (and finally stop) forwarders with test-sized defaults."""
    made: list[Forwarder] = []

    def make(spool: Spool, port: int, **overrides: Any) -> Forwarder:
        kwargs: dict[str, Any] = {
            "url": f"https://127.0.0.1:{port}", "context": client_context(pki),
            "batch_max": 50, "retry_min_s": 0.05, "retry_max_s": 0.4, "timeout_s": 5.0,
            "keep_acked": 100_000, "checkpoint_interval_s": 3600.0, "sign": None,
        }  # fmt: skip
        kwargs.update(overrides)
        fwd = Forwarder(spool, **kwargs)
        made.append(fwd)
        return fwd

    yield make
    for fwd in made:
        fwd.stop()


def warnings_and_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == FORWARDER_LOG and r.levelno >= logging.WARNING]


# --- the checkpoint message -------------------------------------------------------


def test_checkpoint_message_format_is_stable() -> None:
    payload = {"ts": "2026-11-26T12:00:00.123456Z", "seq": 42, "node": "gpu01",
               "hash": "ab" * 32, "sig": "ignored"}
    assert checkpoint_message(payload) == (
        b"ztgpu-checkpoint-v1\n"
        b'{"hash":"' + b"ab" * 32 + b'","node":"gpu01","seq":42,'
        b'"ts":"2026-11-26T12:00:00.123456Z"}'
    )
    with pytest.raises(ValueError, match="lacks hash"):
        checkpoint_message({"node": "gpu01", "seq": 1, "ts": "x"})


# --- delivery -------------------------------------------------------------------


def test_every_event_arrives_once_in_order_in_bounded_batches(
    pki: Pki, spool: Spool, forwarders: Callable[..., Forwarder]
) -> None:
    events = fill(spool, 230)
    collector = FakeCollector()
    with serving(collector, pki) as server:
        fwd = forwarders(spool, server.server_port, batch_max=40)
        fwd.start()
        assert fwd.flush(10)
        assert collector.stored() == events
        assert collector.seqs_received() == list(range(1, 231))  # each once, in order
        assert [len(b) for b in collector.batches] == [40] * 5 + [30]
        assert collector.connections == 1, "one persistent connection"
        assert collector.peer_names == {NODE} and collector.content_types == {"application/json"}
        assert spool.acked_seq() == 230
        status = fwd.status()
        assert status["url"] == f"https://127.0.0.1:{server.server_port}"
        assert status["connected"] is True and status["last_error"] is None
        assert status["sent_batches"] == 6 and status["retry_in_s"] == 0.0
        assert status["last_success_ts"] is not None


def test_wake_sends_new_events_without_waiting_for_the_idle_timeout(
    pki: Pki, spool: Spool, forwarders: Callable[..., Forwarder],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(forwarder_module, "_IDLE_WAIT_S", 60.0)
    fill(spool, 3)
    collector = FakeCollector()
    with serving(collector, pki) as server:
        fwd = forwarders(spool, server.server_port)
        fwd.start()
        assert wait_for(lambda: spool.acked_seq() == 3)
        new = fill(spool, 2, start=3)
        fwd.wake()
        assert wait_for(lambda: spool.acked_seq() == 5, timeout=5)
        assert collector.stored()[-2:] == new


def test_idle_connection_closed_by_the_collector_is_reopened_without_backoff(
    pki: Pki, spool: Spool, forwarders: Callable[..., Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=FORWARDER_LOG)
    fill(spool, 5)
    collector = FakeCollector(idle_timeout_s=0.1)
    with serving(collector, pki) as server:
        fwd = forwarders(spool, server.server_port, retry_min_s=5.0, retry_max_s=5.0)
        fwd.start()
        assert fwd.flush(10)
        assert wait_for(lambda: not server.live)  # the collector dropped the idle connection
        fill(spool, 5, start=5)
        started = time.monotonic()
        assert fwd.flush(10)
        assert time.monotonic() - started < 4, "reconnected without a retry delay"
        assert collector.connections == 2 and collector.seqs_received() == list(range(1, 11))
        assert warnings_and_errors(caplog) == []


# --- failures -------------------------------------------------------------------


def test_collector_down_then_up_backs_off_then_drains(
    pki: Pki, spool: Spool, forwarders: Callable[..., Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=FORWARDER_LOG)
    events = fill(spool, 120)
    port = free_port()
    fwd = forwarders(spool, port, retry_min_s=0.05, retry_max_s=0.4)
    with accepting_and_closing(port) as attempts:
        fwd.start()
        time.sleep(1.5)  # the outage being measured
        status = fwd.status()
    # a busy loop would make thousands of attempts; backoff makes about 9
    assert 3 <= attempts[0] <= 25, attempts[0]
    assert spool.acked_seq() == 0 and status["connected"] is False
    assert status["last_error"] is not None and status["sent_batches"] == 0
    assert len(warnings_and_errors(caplog)) == 1, "logged once per state change, not per retry"
    collector = FakeCollector()
    with serving(collector, pki, port=port):
        assert fwd.flush(10)
        assert collector.stored() == events
        assert collector.seqs_received() == list(range(1, 121))
    assert fwd.status()["last_error"] is None
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_connection_refused_backoff_doubles_with_jitter_up_to_the_cap(
    spool: Spool, forwarders: Callable[..., Forwarder]
) -> None:
    fill(spool, 3)
    delays: list[float] = []
    pause = threading.Event()

    def sleep(seconds: float) -> bool:
        delays.append(seconds)
        return pause.wait(0.001)  # record the schedule without waiting it out

    fwd = forwarders(spool, free_port(), retry_min_s=0.1, retry_max_s=0.8, sleep=sleep)
    fwd.start()
    assert wait_for(lambda: len(delays) >= 40)
    fwd.stop()
    for n, delay in enumerate(delays[:40]):
        assert 0.05 <= delay <= min(0.8, 0.1 * 2**n), (n, delay)
    assert max(delays[5:40]) > 0.4, "the cap is reached"
    assert len(set(delays)) > 30, "jittered"
    status = fwd.status()
    assert "ConnectionRefusedError" in (status["last_error"] or "")
    assert spool.acked_seq() == 0


def test_server_errors_lose_nothing_and_duplicate_nothing(
    pki: Pki, spool: Spool, forwarders: Callable[..., Forwarder]
) -> None:
    events = fill(spool, 200)
    # requests 2 and 3 fail outright; request 5 stores its batch but answers 500
    collector = FakeCollector(fail_requests={2: 503, 3: 500}, store_then_fail={5})
    with serving(collector, pki) as server:
        fwd = forwarders(spool, server.server_port, batch_max=30)
        fwd.start()
        assert fwd.flush(15)
    assert collector.stored() == events  # nothing lost, each seq stored once
    assert spool.acked_seq() == 200
    assert set(collector.seqs_received()) == set(range(1, 201))
    # the failed ranges were sent again from the acknowledged position
    assert [b[0] for b in collector.batches][:7] == [1, 31, 31, 31, 61, 61, 91]
    assert collector.duplicates == 30, "the batch stored before the 500 was resent once"


def test_restarted_forwarder_resumes_from_the_acked_position(
    pki: Pki, spool_path: Path, forwarders: Callable[..., Forwarder]
) -> None:
    collector = FakeCollector()
    with serving(collector, pki) as server:
        with Spool.open(spool_path, NODE) as sp:
            fill(sp, 100)
            first = forwarders(sp, server.server_port)
            first.start()
            assert first.flush(10)
            first.stop()
            fill(sp, 40, start=100)
        before = len(collector.batches)
        with Spool.open(spool_path, NODE) as sp:
            assert sp.acked_seq() == 100
            second = forwarders(sp, server.server_port)
            second.start()
            assert second.flush(10)
            all_events = sp.read(limit=1000)
            second.stop()
    resent = [seq for batch in collector.batches[before:] for seq in batch]
    assert resent == list(range(101, 141)), "acknowledged events are not sent again"
    assert collector.stored() == all_events and collector.duplicates == 0


def test_partial_ack_makes_the_forwarder_resend_from_there(
    pki: Pki, spool: Spool, forwarders: Callable[..., Forwarder]
) -> None:
    events = fill(spool, 50)
    collector = FakeCollector(store_limit=7)
    with serving(collector, pki) as server:
        fwd = forwarders(spool, server.server_port, batch_max=20)
        fwd.start()
        assert fwd.flush(10)
    assert collector.stored() == events and collector.duplicates == 0
    starts = [b[0] for b in collector.batches]
    assert starts == list(range(1, 51, 7))
    assert all(len(b) <= 20 for b in collector.batches)
    assert spool.acked_seq() == 50


@pytest.mark.parametrize("refusal", ["broken_chain", "forbidden"])
def test_refusal_backs_off_at_the_cap_and_acks_nothing(
    refusal: str, pki: Pki, spool_path: Path, spool: Spool,
    forwarders: Callable[..., Forwarder], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=FORWARDER_LOG)
    events = fill(spool, 20)
    collector = FakeCollector()
    if refusal == "broken_chain":
        edited = {**events[4], "reason": "nothing happened"}  # seq 5 altered, hash kept
        conn = sqlite3.connect(spool_path)
        with conn:
            conn.execute("UPDATE events SET body = ? WHERE seq = 5", (json.dumps(edited),))
        conn.close()
        expected_text = "chain broken at seq 5"
    else:
        collector.fail_next = [403] * 1000
        expected_text = "injected 403"
    with serving(collector, pki) as server:
        fwd = forwarders(spool, server.server_port, batch_max=10, retry_min_s=0.01,
                         retry_max_s=0.3)
        fwd.start()
        assert wait_for(lambda: len(collector.batches) >= 2)
        time.sleep(0.7)
        attempts = len(collector.batches)
        assert wait_for(lambda: fwd.status()["retry_in_s"] > 0)
        status = fwd.status()
    assert attempts <= 6, f"{attempts} attempts: not backing off at retry_max_s"
    assert spool.acked_seq() == 0 and collector.events == {}
    assert all(b[0] == 1 for b in collector.batches), "always the same range"
    errors = warnings_and_errors(caplog)
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert expected_text in errors[0].getMessage()
    assert expected_text in (status["last_error"] or "") and status["connected"] is True
    assert 0 < status["retry_in_s"] <= 0.3


# --- checkpoints and pruning ---------------------------------------------------


def test_checkpoint_is_signed_over_the_newest_acked_event(
    pki: Pki, spool: Spool, forwarders: Callable[..., Forwarder]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    events = fill(spool, 30)
    collector = FakeCollector(checkpoint_key=key.public_key())
    with serving(collector, pki) as server:
        fwd = forwarders(spool, server.server_port, checkpoint_interval_s=0.1,
                         sign=lambda data: key.sign(data, ec.ECDSA(hashes.SHA256())))
        fwd.start()
        assert wait_for(lambda: len(collector.checkpoints) == 1)
        checkpoint = collector.checkpoints[0]
        time.sleep(0.35)  # several intervals without a new ack: no new checkpoint
        assert len(collector.checkpoints) == 1
        later = fill(spool, 5, start=30)
        fwd.wake()
        assert wait_for(lambda: len(collector.checkpoints) == 2)
        # The forwarder notes the checkpoint once it has read the reply.
        assert wait_for(lambda: fwd.status()["checkpoint_seq"] == 35)
    assert set(checkpoint) == {"node", "seq", "hash", "ts", "sig"}
    assert checkpoint["node"] == NODE and checkpoint["seq"] == 30
    assert checkpoint["hash"] == events[-1]["hash"]
    signed_at = datetime.strptime(checkpoint["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - signed_at).total_seconds()) < 60
    # the collector verified it; so does anyone holding the node's public key
    key.public_key().verify(base64.b64decode(checkpoint["sig"]), checkpoint_message(checkpoint),
                            ec.ECDSA(hashes.SHA256()))
    second = collector.checkpoints[1]
    assert second["seq"] == 35 and second["hash"] == later[-1]["hash"]
    with pytest.raises(InvalidSignature):
        key.public_key().verify(base64.b64decode(checkpoint["sig"]),
                                checkpoint_message({**checkpoint, "seq": 29}),
                                ec.ECDSA(hashes.SHA256()))


def test_pruning_keeps_the_local_spool_bounded_after_acks(
    pki: Pki, spool: Spool, forwarders: Callable[..., Forwarder]
) -> None:
    events = fill(spool, 300)
    retained: list[int] = []
    collector = FakeCollector()
    with serving(collector, pki) as server:

        def on_progress() -> None:
            retained.append(spool.count() - spool.unacked_count())

        fwd = forwarders(spool, server.server_port, batch_max=25, keep_acked=50,
                         on_progress=on_progress)
        fwd.start()
        assert fwd.flush(10)
    assert collector.stored() == events
    assert wait_for(lambda: len(retained) == 12)  # one callback per acknowledged batch
    assert max(retained) <= 50 + 5, retained  # keep_acked plus at most 10%
    assert spool.count() <= 55 and spool.read(limit=1000) == events[-spool.count():]
    assert spool.verify().ok
    nxt = fill(spool, 1, start=300)[0]
    assert nxt["seq"] == 301 and nxt["prev"] == events[-1]["hash"]


def test_a_server_with_a_certificate_of_another_role_gets_no_events(
    pki: Pki, spool: Spool, forwarders: Callable[..., Forwarder]
) -> None:
    """A node's certificate chains to the site CA and may carry the host's
    name (a node serves its /metrics), but only a service is a collector."""
    fill(spool, 3)
    posing = dataclasses.replace(pki, server_cert=pki.posing_cert, server_key=pki.posing_key)
    collector = FakeCollector()
    with serving(collector, posing) as server:
        fwd = forwarders(spool, server.server_port)
        fwd.start()
        assert not fwd.flush(2)
        assert collector.stored() == [] and spool.acked_seq() == 0
        assert "presented a node certificate, not a service's" in str(fwd.status()["last_error"])
