"""ztgpu-collectord as a real process: mutual TLS, identity binding, bad input."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztgpu.audit.events import GENESIS_PREV, REGISTRY, build_event, format_timestamp
from ztgpu.testing.collector_process import CollectorClient, CollectorProcess, SitePki
from ztgpu.testing.slurm_cluster import wait_for
from ztgpu.trust.pki import client_context


def make_events(node: str, start: int, count: int, prev: str = GENESIS_PREV,
                reason: str = "test") -> list[dict[str, Any]]:
    events, ts = [], format_timestamp(datetime.now(UTC))
    for seq in range(start, start + count):
        event = build_event(REGISTRY["agent.stop"], node, seq, prev, ts, {"reason": reason})
        prev = event["hash"]
        events.append(event)
    return events


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SitePki, CollectorProcess]]:
    base = tmp_path_factory.mktemp("collector")
    pki = SitePki(base / "pki")
    collector = CollectorProcess(base / "c", pki, collector={"max_body_bytes": 65536,
                                                             "max_batch_events": 100})
    collector.start()
    yield pki, collector
    collector.stop()


_OPEN: list[CollectorClient] = []


def connect(site: tuple[SitePki, CollectorProcess], role: str, name: str) -> CollectorClient:
    """A client with a fresh certificate; closed when the module ends."""
    pki, collector = site
    client = CollectorClient(collector.url, pki.context(role, name))
    _OPEN.append(client)
    return client


@pytest.fixture(scope="module", autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    for client in _OPEN:
        client.close()
    _OPEN.clear()


@pytest.fixture(scope="module")
def auditor(site: tuple[SitePki, CollectorProcess]) -> CollectorClient:
    return connect(site, "auditor", "audit1")


def own_events(auditor: CollectorClient, code: str) -> list[dict[str, Any]]:
    status, body = auditor.get("/v1/events", node="collector", code=code, limit=10000)
    assert status == 200
    return list(body["events"])


def head(auditor: CollectorClient, node: str) -> int:
    status, body = auditor.get("/v1/nodes")
    assert status == 200
    return next((n["head_seq"] for n in body["nodes"] if n["node"] == node), 0)


def tls_connect(url: str, context: ssl.SSLContext) -> None:
    """Open a TLS connection and send one request; raise if the server refuses."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(b"GET /v1/nodes HTTP/1.1\r\nHost: x\r\n\r\n")
        data = tls.recv(100)
        if not data:
            raise ConnectionResetError("closed")


def refusals_mentioning(auditor: CollectorClient, text: str) -> int:
    return sum(text in e["reason"] for e in own_events(auditor, "audit.refused"))


# ---- transport security -----------------------------------------------------

def test_no_client_certificate_is_refused_and_recorded(
    site: tuple[SitePki, CollectorProcess], auditor: CollectorClient
) -> None:
    pki, collector = site
    before = refusals_mentioning(auditor, "no client certificate")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_connect(collector.url, client_context(pki.ca_cert, None, None))
    wait_for(lambda: refusals_mentioning(auditor, "no client certificate") > before, 10,
             "the refusal to be recorded")


def test_expired_certificate_is_refused_and_recorded(
    site: tuple[SitePki, CollectorProcess], auditor: CollectorClient, tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    pki, collector = site
    cert, key = pki.issue("node", "old01", days=1, out_dir=tmp_path,
                          now=datetime.now(UTC) - timedelta(days=3))
    before = refusals_mentioning(auditor, "expired")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_connect(collector.url, client_context(pki.ca_cert, cert, key))
    wait_for(lambda: refusals_mentioning(auditor, "expired") > before, 10,
             "the refusal to be recorded")


def test_certificate_from_another_ca_is_refused(
    site: tuple[SitePki, CollectorProcess], auditor: CollectorClient, tmp_path: Path
) -> None:
    pki, collector = site
    rogue = SitePki(tmp_path / "rogue")
    cert, key = rogue.issue("node", "gpu01")
    before = refusals_mentioning(auditor, "TLS handshake failed")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_connect(collector.url, client_context(pki.ca_cert, cert, key))
    wait_for(lambda: refusals_mentioning(auditor, "TLS handshake failed") > before, 10,
             "the refusal to be recorded")


def test_tls_1_2_is_refused(site: tuple[SitePki, CollectorProcess]) -> None:
    pki, collector = site
    cert, key = pki.issue("node", "tls12")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca_cert)
    context.load_cert_chain(cert, key)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_connect(collector.url, context)


def test_node_cannot_submit_another_nodes_events(
    site: tuple[SitePki, CollectorProcess], auditor: CollectorClient
) -> None:
    gpu01 = connect(site, "node", "gpu01")
    events = make_events("gpu02", 1, 3)
    assert gpu01.post("/v1/events", {"node": "gpu02", "events": events})[0] == 403
    # Claiming its own name in the body but carrying another node's events:
    status, body = gpu01.post("/v1/events", {"node": "gpu01", "events": events})
    assert status == 403 and "gpu02" in body["error"]
    assert head(auditor, "gpu02") == 0
    assert refusals_mentioning(auditor, "cannot submit events of 'gpu02'") >= 1


def test_roles_are_enforced(site: tuple[SitePki, CollectorProcess],
                            auditor: CollectorClient) -> None:
    node = connect(site, "node", "gpu03")
    assert node.get("/v1/events", node="gpu03")[0] == 403
    # A service (authd) may send its own chain, but nothing under another name.
    service = connect(site, "service", "authd")
    assert service.post("/v1/events", {"node": "authd", "events": make_events("authd", 1, 1)}
                        )[0] == 200
    assert service.post("/v1/events", {"node": "gpu03", "events": make_events("gpu03", 1, 1)}
                        )[0] == 403
    assert auditor.post("/v1/events", {"node": "audit1", "events": []})[0] == 403
    assert auditor.request("DELETE", "/v1/events")[0] == 405
    assert auditor.request("PUT", "/v1/checkpoints", b"{}")[0] == 405


def test_node_named_like_the_collector_cannot_write_its_chain(
    site: tuple[SitePki, CollectorProcess], auditor: CollectorClient
) -> None:
    impostor = connect(site, "node", "collector")
    before = head(auditor, "collector")
    status, _ = impostor.post("/v1/events", {"node": "collector",
                                             "events": make_events("collector", before + 1, 1)})
    assert status == 403


# ---- ingestion over HTTP ----------------------------------------------------

def test_events_are_acked_only_up_to_the_stored_head(
    site: tuple[SitePki, CollectorProcess], auditor: CollectorClient
) -> None:
    node = connect(site, "node", "gpu10")
    events = make_events("gpu10", 1, 60)
    status, body = node.post("/v1/events", {"node": "gpu10", "events": events[:40]})
    assert (status, body["acked_seq"], body["accepted"]) == (200, 40, 40)
    status, body = node.post("/v1/events", {"node": "gpu10", "events": events[20:]})
    assert (status, body["acked_seq"], body["accepted"], body["duplicates"]) == (200, 60, 20, 20)
    tampered = dict(events[-1], reason="rewritten")
    status, body = node.post("/v1/events", {"node": "gpu10", "events": [tampered]})
    assert status == 409 and body["acked_seq"] == 60
    wait_for(lambda: any(e["source_node"] == "gpu10"
                         for e in own_events(auditor, "audit.chain_broken")), 10,
             "the broken chain to be recorded")
    status, body = auditor.get("/v1/chain", node="gpu10", limit=100)
    assert [e["seq"] for e in body["events"]] == list(range(1, 61))


def test_gap_is_recorded(site: tuple[SitePki, CollectorProcess],
                         auditor: CollectorClient) -> None:
    node = connect(site, "node", "gpu11")
    events = make_events("gpu11", 1, 10)
    assert node.post("/v1/events", {"node": "gpu11", "events": events[:3]})[0] == 200
    status, body = node.post("/v1/events", {"node": "gpu11", "events": events[5:]})
    assert status == 200 and body["acked_seq"] == 10
    gaps = [e for e in own_events(auditor, "audit.gap") if e["source_node"] == "gpu11"]
    assert [(g["expected_seq"], g["received_seq"]) for g in gaps] == [(4, 6)]


BAD_BODIES: list[tuple[str, bytes, int]] = [
    ("not json", b"{nope", 400),
    ("json array", b"[1,2,3]", 400),
    ("missing events", b'{"node": "gpu20"}', 400),
    ("events not a list", b'{"node": "gpu20", "events": {"a": 1}}', 400),
    ("empty list", b'{"node": "gpu20", "events": []}', 400),
    ("event of wrong type", b'{"node": "gpu20", "events": [42]}', 400),
    ("deep nesting", b'{"node": "gpu20", "events": ' + b"[" * 100000 + b"]" * 100000 + b"}",
     413),
    ("seq as string", json.dumps({"node": "gpu20", "events": [
        dict(make_events("gpu20", 1, 1)[0], seq="1")]}).encode(), 400),
    ("huge seq", json.dumps({"node": "gpu20", "events": [
        dict(make_events("gpu20", 1, 1)[0], seq=10**30)]}).encode(), 400),
    ("unknown code", json.dumps({"node": "gpu20", "events": [
        dict(make_events("gpu20", 1, 1)[0], code="job.teleport")]}).encode(), 400),
    ("extra envelope-ish field", json.dumps({"node": "gpu20", "events": [
        dict(make_events("gpu20", 1, 1)[0], Bad=1)]}).encode(), 400),
    ("lone surrogate", b'{"node": "gpu20", "events": [{"v": 1, "code": "agent.stop", '
     b'"severity": "info", "node": "gpu20", "seq": 1, "ts": "2026-11-26T12:00:00.000000Z", '
     b'"prev": "' + GENESIS_PREV.encode() + b'", "hash": "' + b"a" * 64 +
     b'", "reason": "\\ud800"}]}', 400),
    ("too many events", json.dumps({"node": "gpu20", "events": make_events("gpu20", 1, 101)}
                                   ).encode(), 413),
    ("oversized body", b'{"node": "gpu20", "events": ["' + b"x" * 70000 + b'"]}', 413),
]


@pytest.mark.parametrize(("label", "body", "status"), BAD_BODIES,
                         ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_4xx_and_store_nothing(
    site: tuple[SitePki, CollectorProcess], auditor: CollectorClient,
    label: str, body: bytes, status: int
) -> None:
    node = connect(site, "node", "gpu20")
    got, reply = node.request("POST", "/v1/events", body, {"Content-Type": "application/json"})
    assert got == status, (label, reply)
    assert isinstance(reply, dict) and reply.get("error")
    assert head(auditor, "gpu20") == 0
    assert auditor.get("/v1/nodes")[0] == 200  # still serving


def test_wrong_content_type_is_refused(site: tuple[SitePki, CollectorProcess]) -> None:
    node = connect(site, "node", "gpu21")
    status, _ = node.request("POST", "/v1/events", b"{}", {"Content-Type": "text/plain"})
    assert status == 415


def test_rejections_are_recorded_but_rate_limited(tmp_path: Path) -> None:
    pki = SitePki(tmp_path / "pki")
    with CollectorProcess(tmp_path / "c", pki) as collector:
        node = CollectorClient(collector.url, pki.context("node", "gpu22"))
        auditor = CollectorClient(collector.url, pki.context("auditor", "a"))
        try:
            for _ in range(40):
                node.request("POST", "/v1/events", b"[]", {"Content-Type": "application/json"})
            wait_for(lambda: len(own_events(auditor, "audit.rejected")) >= 10, 10,
                     "rejections to be recorded")
            time.sleep(0.5)
            recorded = own_events(auditor, "audit.rejected")
            assert len(recorded) == 10  # the limit per sender per minute
            assert all(e["peer"] == "127.0.0.1" for e in recorded)
        finally:
            node.close()
            auditor.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(payload=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["node", "events", "v", "seq", "code", "x"]) | st.text(),
                      children, max_size=5),
    max_leaves=20))
def test_garbage_never_stores_and_never_breaks_the_service(
    site: tuple[SitePki, CollectorProcess], auditor: CollectorClient, payload: Any
) -> None:
    client = _garbage_client(site)
    status, reply = client.post("/v1/events", {"node": "gpu30", "events": [payload]})
    assert 400 <= status < 500, reply
    status, reply = client.post("/v1/events", payload)
    assert 400 <= status < 500, reply
    status, reply = client.post("/v1/checkpoints", payload)
    assert 400 <= status < 500, reply
    assert head(auditor, "gpu30") == 0


_GARBAGE: dict[str, CollectorClient] = {}


def _garbage_client(site: tuple[SitePki, CollectorProcess]) -> CollectorClient:
    url = site[1].url
    if url not in _GARBAGE:
        _GARBAGE[url] = connect(site, "node", "gpu30")
    return _GARBAGE[url]


def test_query_api_rejects_bad_parameters(auditor: CollectorClient) -> None:
    for query in ({"since": "yesterday"}, {"job": "1;drop"}, {"limit": "0"},
                  {"limit": "99999999"}, {"after": "not-a-cursor"}, {"bogus": "1"},
                  {"node": "../x"}):
        status, body = auditor.get("/v1/events", **query)
        assert status == 400, (query, body)
    assert auditor.get("/v1/chain", node="")[0] == 400
    assert auditor.get("/v1/chain", node="gpu10", after_seq="-1")[0] == 400


def test_sigterm_records_stop(tmp_path: Path) -> None:
    pki = SitePki(tmp_path / "pki")
    collector = CollectorProcess(tmp_path / "c", pki).start()
    assert collector.stop() == 0
    collector.start()
    client = CollectorClient(collector.url, pki.context("auditor", "a"))
    try:
        codes = [e["code"] for e in client.get("/v1/events", node="collector")[1]["events"]]
        assert codes[:3] == ["collector.start", "collector.stop", "collector.start"]
    finally:
        client.close()
        collector.stop()


@pytest.mark.parametrize("code", ["audit.gap", "collector.start"])
def test_nodes_cannot_send_collector_only_events(
    site: tuple[SitePki, CollectorProcess], auditor: CollectorClient, code: str
) -> None:
    node = connect(site, "node", "gpu40")
    fields = ({"source_node": "gpu41", "expected_seq": 1, "received_seq": 9}
              if code == "audit.gap" else {"version": "1", "store": "sqlite"})
    forged = build_event(REGISTRY[code], "gpu40", 1, GENESIS_PREV,
                         format_timestamp(datetime.now(UTC)), fields)
    status, body = node.post("/v1/events", {"node": "gpu40", "events": [forged]})
    assert status == 403 and code in body["error"]
    assert head(auditor, "gpu40") == 0


def test_a_refusal_is_recorded_before_it_is_answered(tmp_path: Path) -> None:
    """Kill -9 the collector the moment it answers 403 or 409: the refusal's own
    record must already be stored."""
    pki = SitePki(tmp_path / "pki")
    collector = CollectorProcess(tmp_path / "c", pki)
    try:
        collector.start()
        node = CollectorClient(collector.url, pki.context("node", "gpu01"))
        assert node.post("/v1/events", {"node": "gpu01",
                                        "events": make_events("gpu01", 1, 1)})[0] == 200
        node.close()
        collector.stop()
        for round_no in range(6):
            collector.start()
            node = CollectorClient(collector.url, pki.context("node", "gpu01"))
            try:
                if round_no % 2:  # 409: a batch that does not continue its own chain
                    events = make_events("gpu01", 2, 1, prev="a" * 64)
                    want = 409
                else:  # 403: another node's events
                    events = make_events(f"gpu{20 + round_no}", 1, 1)
                    want = 403
                status, _ = node.post("/v1/events", {"node": "gpu01", "events": events})
                assert status == want
                collector.kill()
            finally:
                node.close()
        collector.start()
        auditor = CollectorClient(collector.url, pki.context("auditor", "audit1"))
        try:
            refused = own_events(auditor, "audit.refused") + own_events(auditor,
                                                                        "audit.rejected")
            broken = own_events(auditor, "audit.chain_broken")
        finally:
            auditor.close()
        for round_no in range(0, 6, 2):
            assert any(f"gpu{20 + round_no}" in e["reason"] for e in refused), refused
        assert len(broken) == 3, broken
    finally:
        collector.stop()


def test_metrics_count_what_each_node_stored_and_need_a_monitor(
    site: tuple[SitePki, CollectorProcess]
) -> None:
    from ztgpu.testing.prometheus import fetch_metrics, sample_value, samples

    pki, collector = site
    node = connect(site, "node", "gpu21")
    status, _ = node.post("/v1/events", {"node": "gpu21", "events": make_events("gpu21", 1, 7)})
    assert status == 200
    status, text = fetch_metrics(collector.url, pki.context("monitor", "prometheus"))
    assert status == 200, text
    found = samples(text)
    assert sample_value(found, "ztgpu_collector_ingested_events_total", node="gpu21") == 7
    assert (sample_value(found, "ztgpu_http_request_duration_seconds_count",
                         route="/v1/events", method="POST", status="200") or 0) >= 1
    status, text = fetch_metrics(collector.url, pki.context("node", "gpu21"))
    assert status == 403 and "may not use GET /metrics" in text
