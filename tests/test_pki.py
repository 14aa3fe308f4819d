"""The site PKI: real TLS 1.3 handshakes over loopback, key modes, renewal, signatures, CLI."""

from __future__ import annotations

import os
import pwd
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztgpu.cli import pki as pki_cli
from ztgpu.cli.main import main
from ztgpu.trust import pki
from ztgpu.trust.pki import Identity, PkiError

NOBODY = pwd.getpwnam("nobody")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


# ------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Site:
    ca: Path          # CA directory
    ca_cert: Path
    certs: Path       # where leaf certificates go
    server: tuple[Path, Path]   # service "collector" for localhost / 127.0.0.1
    client: tuple[Path, Path]   # node "gpu01"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    ca_cert, _ = pki.init_ca(tmp_path / "ca")
    certs = tmp_path / "certs"
    server = pki.issue(tmp_path / "ca", "service", "collector", certs,
                       dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    client = pki.issue(tmp_path / "ca", "node", "gpu01", certs)
    return Site(tmp_path / "ca", ca_cert, certs, server, client)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Prove file modes do not depend on a restrictive umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------- TLS over loopback


@dataclass
class Handshake:
    peer: Identity | None = None        # the client's identity as the server saw it
    version: str | None = None
    reply: bytes | None = None          # what the client received
    server_error: OSError | None = None
    client_error: OSError | None = None


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              server_hostname: str = "localhost") -> Handshake:
    """One connection over loopback: the server reads the peer identity and replies."""
    result = Handshake()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    assert der is not None
                    result.peer = pki.identity_from_der(der)
                    result.version = tls.version()
                    tls.sendall(f"hello {result.peer.role}/{result.peer.name}".encode())
        except OSError as exc:
            result.server_error = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            result.reply = tls.recv(100)
    except OSError as exc:
        result.client_error = exc
    finally:
        thread.join(15)
        listener.close()
    assert not thread.is_alive()
    return result


def server_ctx(site: Site) -> ssl.SSLContext:
    return pki.server_context(site.ca_cert, *site.server)


def test_mutual_tls13_and_server_sees_client_identity(site: Site) -> None:
    result = handshake(server_ctx(site), pki.client_context(site.ca_cert, *site.client))
    assert result.server_error is None and result.client_error is None
    assert result.version == "TLSv1.3"
    assert result.peer == Identity(role="node", name="gpu01")
    assert result.reply == b"hello node/gpu01"


def test_client_connects_by_ip_san(site: Site) -> None:
    result = handshake(server_ctx(site), pki.client_context(site.ca_cert, *site.client),
                       server_hostname="127.0.0.1")
    assert result.reply == b"hello node/gpu01"


def test_tls12_only_client_refused(site: Site) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(cafile=str(site.ca_cert))
    old.load_cert_chain(*map(str, site.client))
    result = handshake(server_ctx(site), old)
    assert result.reply is None and result.peer is None
    assert isinstance(result.server_error, ssl.SSLError)
    assert "UNSUPPORTED_PROTOCOL" in str(result.server_error)


def test_client_without_certificate_refused(site: Site) -> None:
    result = handshake(server_ctx(site), pki.client_context(site.ca_cert, None, None))
    assert result.reply is None and result.peer is None
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(result.server_error)
    assert isinstance(result.client_error, ssl.SSLError)


def test_expired_client_certificate_refused(site: Site) -> None:
    old = pki.issue(site.ca, "node", "gpu02", site.certs, days=1,
                    now=datetime.now(UTC) - timedelta(days=10))
    result = handshake(server_ctx(site), pki.client_context(site.ca_cert, *old))
    assert result.reply is None and result.peer is None
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert "certificate has expired" in str(result.server_error)


def test_client_certificate_from_another_ca_refused(site: Site, tmp_path: Path) -> None:
    # Same CA name, different key: only the signature tells them apart.
    pki.init_ca(tmp_path / "rogue")
    rogue = pki.issue(tmp_path / "rogue", "node", "gpu01", tmp_path / "rogue-certs")
    result = handshake(server_ctx(site), pki.client_context(site.ca_cert, *rogue))
    assert result.reply is None and result.peer is None
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)


def test_client_refuses_server_from_another_ca(site: Site, tmp_path: Path) -> None:
    rogue_ca, _ = pki.init_ca(tmp_path / "rogue")
    rogue_client = pki.issue(tmp_path / "rogue", "node", "gpu01", tmp_path / "rogue-certs")
    result = handshake(server_ctx(site), pki.client_context(rogue_ca, *rogue_client))
    assert result.reply is None
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_client_refuses_node_certificate_as_server(site: Site) -> None:
    # A node certificate has only clientAuth: it cannot impersonate the collector.
    node = pki.issue(site.ca, "node", "localhost", site.certs)
    result = handshake(pki.server_context(site.ca_cert, *node),
                       pki.client_context(site.ca_cert, *site.client))
    assert result.reply is None
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert "unsuitable certificate purpose" in str(result.client_error)


def test_client_checks_server_hostname(site: Site) -> None:
    result = handshake(server_ctx(site), pki.client_context(site.ca_cert, *site.client),
                       server_hostname="collector.example")
    assert result.reply is None
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in str(result.client_error)


def test_contexts_are_tls13_only_and_require_certificates(site: Site) -> None:
    for ctx in (server_ctx(site), pki.client_context(site.ca_cert, *site.client)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert pki.client_context(site.ca_cert, None, None, check_hostname=False).check_hostname \
        is False


def test_world_readable_key_refused_by_contexts(site: Site) -> None:
    cert, key = site.server
    key.chmod(0o644)
    with pytest.raises(PkiError, match="chmod 600"):
        pki.server_context(site.ca_cert, cert, key)
    site.client[1].chmod(0o640)
    with pytest.raises(PkiError, match="mode 0640"):
        pki.client_context(site.ca_cert, *site.client)
    with pytest.raises(PkiError, match="readable beyond its owner"):
        pki.sign(site.client[1], b"data")


def test_mismatched_key_and_missing_ca_refused(site: Site) -> None:
    with pytest.raises(PkiError, match="cannot load certificate"):
        pki.server_context(site.ca_cert, site.server[0], site.client[1])
    with pytest.raises(PkiError, match="cannot load CA certificate"):
        pki.server_context(site.ca / "missing.crt", *site.server)
    with pytest.raises(PkiError, match="both"):
        pki.client_context(site.ca_cert, site.client[0], None)


# ------------------------------------------------------------- CA and issue


def test_init_ca_modes_and_extensions(tmp_path: Path, umask_zero: None) -> None:
    cert_path, key_path = pki.init_ca(tmp_path / "ca", common_name="Site X CA", days=30)
    assert mode(tmp_path / "ca") == 0o700
    assert mode(key_path) == 0o600
    assert mode(cert_path) == 0o644
    cert = pki.load_cert(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Site X CA"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = pki.cert_not_after(cert) - datetime.now(UTC)
    assert timedelta(days=29) < lifetime <= timedelta(days=30)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"


def test_init_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    _, key_path = pki.init_ca(tmp_path / "ca")
    before = key_path.read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        pki.init_ca(tmp_path / "ca")
    assert key_path.read_bytes() == before


def test_init_ca_refuses_dangling_link_at_key(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    target = tmp_path / "elsewhere.key"
    (tmp_path / "ca" / "ca.key").symlink_to(target)
    with pytest.raises(PkiError, match="already exists"):
        pki.init_ca(tmp_path / "ca")
    assert not target.exists()


def test_issue_modes_subject_and_extensions(site: Site, umask_zero: None) -> None:
    cert_path, key_path = pki.issue(site.ca, "service", "siem-relay", site.certs / "new",
                                    ip_addresses=["10.0.0.5", "fd00::5"])
    assert (cert_path, key_path) == (site.certs / "new" / "siem-relay.crt",
                                     site.certs / "new" / "siem-relay.key")
    assert mode(key_path) == 0o600 and mode(cert_path) == 0o644
    assert mode(site.certs / "new") == 0o700
    assert not [p for p in (site.certs / "new").iterdir() if p.name.startswith(".")]
    cert = pki.load_cert(cert_path)
    assert cert.subject.rfc4514_string() == "CN=siem-relay,OU=service,O=ztgpu"
    assert cert.issuer == pki.load_cert(site.ca_cert).subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["siem-relay"]  # service default
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5",
                                                                          "fd00::5"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = pki.load_cert(site.ca_cert).extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


@pytest.mark.parametrize("role", ["node", "auditor"])
def test_client_roles_get_client_auth_only_and_no_default_san(site: Site, role: str) -> None:
    cert_path, _ = pki.issue(site.ca, role, "x1", site.certs)
    cert = pki.load_cert(cert_path)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert pki.identity_of(cert) == Identity(role=role, name="x1")


def test_issue_validity_window_follows_now(site: Site) -> None:
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    cert_path, _ = pki.issue(site.ca, "node", "gpu03", site.certs, days=1.5, now=now)
    cert = pki.load_cert(cert_path)
    assert cert.not_valid_before_utc == now - timedelta(minutes=5)
    assert pki.cert_not_after(cert) == now + timedelta(days=1, hours=12)
    assert pki.cert_not_after(cert).tzinfo is not None


def test_issue_gives_a_new_key_each_time(site: Site) -> None:
    first = site.client[1].read_bytes()
    pki.issue(site.ca, "node", "gpu01", site.certs)
    assert site.client[1].read_bytes() != first


@pytest.mark.parametrize(("role", "name", "message"), [
    ("admin", "gpu01", "unknown role"),
    ("Node", "gpu01", "unknown role"),
    ("node", "", "bad name"),
    ("node", "-gpu01", "bad name"),
    ("node", "../etc/passwd", "bad name"),
    ("node", "gpu01\n", "bad name"),
    ("node", "gpu 01", "bad name"),
    ("node", "a" * 65, "bad name"),
])
def test_issue_rejects_bad_role_or_name(site: Site, role: str, name: str,
                                        message: str) -> None:
    before = sorted(site.certs.iterdir())
    with pytest.raises(PkiError, match=message):
        pki.issue(site.ca, role, name, site.certs)
    assert sorted(site.certs.iterdir()) == before


def test_issue_rejects_bad_sans_days_and_overlong_validity(site: Site) -> None:
    with pytest.raises(PkiError, match="bad IP address"):
        pki.issue(site.ca, "service", "c2", site.certs, ip_addresses=["10.0.0.300"])
    with pytest.raises(PkiError, match="bad DNS name"):
        pki.issue(site.ca, "service", "c2", site.certs, dns_names=["bad name"])
    with pytest.raises(PkiError, match="positive"):
        pki.issue(site.ca, "node", "n2", site.certs, days=0)
    with pytest.raises(PkiError, match="outlive the site CA"):
        pki.issue(site.ca, "node", "n2", site.certs, days=365 * 20)
    assert not (site.certs / "c2.key").exists() and not (site.certs / "n2.key").exists()


def test_issue_with_another_ca_key_refused(site: Site, tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "rogue")
    (site.ca / "ca.key").write_bytes((tmp_path / "rogue" / "ca.key").read_bytes())
    with pytest.raises(PkiError, match="does not match"):
        pki.issue(site.ca, "node", "n3", site.certs)


@needs_root
def test_owner_chowns_key_and_certificate(site: Site, tmp_path: Path) -> None:
    cert_path, key_path = pki.issue(site.ca, "service", "relay", tmp_path / "svc",
                                    owner="nobody")
    for path in (cert_path, key_path, tmp_path / "svc"):
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert mode(key_path) == 0o600
    with pytest.raises(PkiError, match="unknown user 'no-such-user-zt'"):
        pki.issue(site.ca, "service", "relay2", tmp_path / "svc", owner="no-such-user-zt")
    assert not (tmp_path / "svc" / "relay2.key").exists()


# -------------------------------------------------------------------- renew


def test_renew_not_due_changes_nothing(site: Site) -> None:
    cert_path, key_path = site.client
    before = cert_path.read_bytes(), key_path.read_bytes()
    assert pki.renew(site.ca, cert_path, key_path) is False
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_renew_due_keeps_identity_and_sans_with_new_key(site: Site) -> None:
    now = datetime.now(UTC)
    cert_path, key_path = pki.issue(site.ca, "service", "collector2", site.certs,
                                    dns_names=["collector2", "collector2.site"],
                                    ip_addresses=["192.0.2.7"], now=now - timedelta(days=6))
    old_cert, old_key = pki.load_cert(cert_path), key_path.read_bytes()
    assert pki.renew(site.ca, cert_path, key_path, days=7, now=now) is True
    new = pki.load_cert(cert_path)
    assert key_path.read_bytes() != old_key
    assert new.public_key() != old_cert.public_key()
    assert new.serial_number != old_cert.serial_number
    assert serialization.load_pem_private_key(key_path.read_bytes(),
                                              password=None).public_key() == new.public_key()
    assert pki.identity_of(new) == Identity(role="service", name="collector2")
    assert new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
        old_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert new.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        old_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert pki.cert_not_after(new) == (now + timedelta(days=7)).replace(microsecond=0)
    assert mode(key_path) == 0o600 and mode(cert_path) == 0o644
    # The renewed pair works in a real handshake.
    result = handshake(pki.server_context(site.ca_cert, cert_path, key_path),
                       pki.client_context(site.ca_cert, *site.client),
                       server_hostname="collector2.site")
    assert result.reply == b"hello node/gpu01"


def test_renew_force_and_renew_before(site: Site) -> None:
    cert_path, key_path = site.client
    old_key = key_path.read_bytes()
    assert pki.renew(site.ca, cert_path, key_path, renew_before=timedelta(days=8)) is True
    assert key_path.read_bytes() != old_key
    old_key = key_path.read_bytes()
    assert pki.renew(site.ca, cert_path, key_path, force=True) is True
    assert key_path.read_bytes() != old_key


def test_renew_expired_certificate(site: Site) -> None:
    cert_path, key_path = pki.issue(site.ca, "auditor", "alice", site.certs, days=1,
                                    now=datetime.now(UTC) - timedelta(days=30))
    assert pki.renew(site.ca, cert_path, key_path) is True
    assert pki.cert_not_after(pki.load_cert(cert_path)) > datetime.now(UTC) + timedelta(days=6)


def test_renew_refuses_certificate_of_another_ca(site: Site, tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "rogue")
    cert_path, key_path = pki.issue(tmp_path / "rogue", "node", "gpu01", tmp_path / "r")
    before = cert_path.read_bytes()
    with pytest.raises(PkiError, match="signature does not verify"):
        pki.renew(site.ca, cert_path, key_path, force=True)
    assert cert_path.read_bytes() == before


@needs_root
def test_renew_keeps_file_owners(site: Site, tmp_path: Path) -> None:
    cert_path, key_path = pki.issue(site.ca, "service", "relay", tmp_path / "svc",
                                    owner="nobody")
    assert pki.renew(site.ca, cert_path, key_path, force=True) is True
    for path in (cert_path, key_path):
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)


# --------------------------------------------------------------- identities


def _self_signed(subject: x509.Name) -> x509.Certificate:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))


@pytest.mark.parametrize(("attrs", "message"), [
    ([(NameOID.COMMON_NAME, "gpu01")], "no OU"),
    ([(NameOID.ORGANIZATIONAL_UNIT_NAME, "node")], "no CN"),
    ([(NameOID.ORGANIZATIONAL_UNIT_NAME, "node"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "service"),
      (NameOID.COMMON_NAME, "gpu01")], "several OU"),
    ([(NameOID.ORGANIZATIONAL_UNIT_NAME, "node"), (NameOID.COMMON_NAME, "a"),
      (NameOID.COMMON_NAME, "b")], "several CN"),
    ([(NameOID.ORGANIZATIONAL_UNIT_NAME, "root"), (NameOID.COMMON_NAME, "gpu01")],
     "unknown role"),
    ([(NameOID.ORGANIZATIONAL_UNIT_NAME, "node"), (NameOID.COMMON_NAME, "gpu 01")],
     "bad name"),
])
def test_identity_of_rejects_malformed_subjects(attrs: list[tuple[x509.ObjectIdentifier, str]],
                                                message: str) -> None:
    cert = _self_signed(x509.Name([x509.NameAttribute(oid, v) for oid, v in attrs]))
    with pytest.raises(PkiError, match=message):
        pki.identity_of(cert)
    with pytest.raises(PkiError, match=message):
        pki.identity_from_der(cert.public_bytes(serialization.Encoding.DER))


def test_identity_from_der_and_load_cert_reject_garbage(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="not a valid DER certificate"):
        pki.identity_from_der(b"\x30\x03garbage")
    junk = tmp_path / "junk.crt"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(PkiError, match=re.escape(str(junk))):
        pki.load_cert(junk)
    with pytest.raises(PkiError, match=r"cannot read certificate .*missing\.crt"):
        pki.load_cert(tmp_path / "missing.crt")


def test_load_cert_reads_der(site: Site, tmp_path: Path) -> None:
    cert = pki.load_cert(site.client[0])
    der = tmp_path / "gpu01.der"
    der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    assert pki.load_cert(der) == cert


# --------------------------------------------------------------- signatures


def _signed(site: Site) -> tuple[bytes, x509.Certificate, bytes, bytes]:
    data = b"checkpoint seq=42 head=abcdef"
    der = pki.load_cert(site.client[0]).public_bytes(serialization.Encoding.DER)
    return der, pki.load_cert(site.ca_cert), data, pki.sign(site.client[1], data)


def test_sign_and_verify_signature(site: Site) -> None:
    der, ca, data, sig = _signed(site)
    pki.verify_signature(der, ca, data, sig, at=datetime.now(UTC), role="node", name="gpu01")


def test_verify_signature_failure_reasons(site: Site, tmp_path: Path) -> None:
    der, ca, data, sig = _signed(site)
    now = datetime.now(UTC)
    good = {"at": now, "role": "node", "name": "gpu01"}

    pki.init_ca(tmp_path / "rogue")  # same CA name, other key
    other_ca = pki.load_cert(tmp_path / "rogue" / "ca.crt")
    with pytest.raises(PkiError, match="CA's signature does not verify"):
        pki.verify_signature(der, other_ca, data, sig, **good)
    pki.init_ca(tmp_path / "named", common_name="Another CA")
    with pytest.raises(PkiError, match="not by the site CA"):
        pki.verify_signature(der, pki.load_cert(tmp_path / "named" / "ca.crt"), data, sig,
                             **good)
    with pytest.raises(PkiError, match="not valid at"):
        pki.verify_signature(der, ca, data, sig, at=now + timedelta(days=8), role="node",
                             name="gpu01")
    with pytest.raises(PkiError, match="not valid at"):
        pki.verify_signature(der, ca, data, sig, at=now - timedelta(hours=1), role="node",
                             name="gpu01")
    with pytest.raises(PkiError, match="signer is node/gpu01, expected node/gpu02"):
        pki.verify_signature(der, ca, data, sig, at=now, role="node", name="gpu02")
    with pytest.raises(PkiError, match="signer is node/gpu01, expected auditor/gpu01"):
        pki.verify_signature(der, ca, data, sig, at=now, role="auditor", name="gpu01")
    with pytest.raises(PkiError, match="does not verify over the data"):
        pki.verify_signature(der, ca, data + b"1", sig, **good)
    other_sig = pki.sign(site.server[1], data)  # right data, wrong key
    with pytest.raises(PkiError, match="does not verify over the data"):
        pki.verify_signature(der, ca, data, other_sig, **good)


def test_verify_signature_expired_signer(site: Site) -> None:
    then = datetime.now(UTC) - timedelta(days=20)
    cert_path, key_path = pki.issue(site.ca, "node", "gpu09", site.certs, days=1, now=then)
    der = pki.load_cert(cert_path).public_bytes(serialization.Encoding.DER)
    sig = pki.sign(key_path, b"old")
    ca = pki.load_cert(site.ca_cert)
    pki.verify_signature(der, ca, b"old", sig, at=then + timedelta(hours=1), role="node",
                         name="gpu09")
    with pytest.raises(PkiError, match="not valid at"):
        pki.verify_signature(der, ca, b"old", sig, at=datetime.now(UTC), role="node",
                             name="gpu09")


# ---------------------------------------------------------------------- CLI


def test_cli_init_issue_show_renew(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    assert main(["pki", "init", "--dir", str(ca), "--cn", "Test CA", "--days", "100"]) == 0
    out = capsys.readouterr().out
    assert f"CA certificate: {ca / 'ca.crt'}" in out and str(ca / "ca.key") in out
    assert mode(ca / "ca.key") == 0o600

    assert main(["pki", "issue", "--dir", str(ca), "--role", "service", "--name", "collector",
                 "--out", str(tmp_path / "out"), "--days", "3", "--dns", "collector.site",
                 "--dns", "collector", "--ip", "10.1.2.3"]) == 0
    out = capsys.readouterr().out
    cert, key = tmp_path / "out" / "collector.crt", tmp_path / "out" / "collector.key"
    assert f"certificate: {cert}" in out and f"key:         {key}" in out
    expiry = pki.cert_not_after(pki.load_cert(cert))
    assert f"expires:     {expiry.isoformat()}" in out
    assert mode(key) == 0o600

    assert main(["pki", "show", str(cert)]) == 0
    out = capsys.readouterr().out
    assert "role:       service" in out and "name:       collector" in out
    assert "san:        DNS:collector.site, DNS:collector, IP:10.1.2.3" in out
    assert "issuer:     CN=Test CA,O=ztgpu" in out
    assert f"serial:     {pki.load_cert(cert).serial_number:x}" in out
    assert f"not_after:  {expiry.isoformat()}" in out

    # 3-day certificate, renew window 48 h: not due.
    assert main(["pki", "renew", "--dir", str(ca), "--cert", str(cert), "--key", str(key)]) == 0
    assert capsys.readouterr().out.startswith(f"not due: {cert} expires ")
    old_key = key.read_bytes()
    assert main(["pki", "renew", "--dir", str(ca), "--cert", str(cert), "--key", str(key),
                 "--before-hours", "100"]) == 0
    assert capsys.readouterr().out.startswith(f"renewed: {cert} valid until ")
    assert key.read_bytes() != old_key
    assert main(["pki", "renew", "--dir", str(ca), "--cert", str(cert), "--key", str(key),
                 "--force", "--days", "1"]) == 0
    out = capsys.readouterr().out
    assert f"valid until {pki.cert_not_after(pki.load_cert(cert)).isoformat()}" in out

    assert main(["pki", "show", str(ca / "ca.crt")]) == 0
    assert "role:       CA\nname:       Test CA" in capsys.readouterr().out


def test_cli_issue_defaults_out_to_ca_dir(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", "init", "--dir", str(tmp_path / "ca")]) == 0
    assert main(["pki", "issue", "--dir", str(tmp_path / "ca"), "--role", "node",
                 "--name", "gpu01"]) == 0
    assert pki.identity_of(pki.load_cert(tmp_path / "ca" / "gpu01.crt")) == \
        Identity("node", "gpu01")
    assert str(tmp_path / "ca" / "gpu01.key") in capsys.readouterr().out


def test_cli_errors_exit_nonzero_with_message(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ca = str(tmp_path / "ca")
    assert main(["pki", "init", "--dir", ca]) == 0
    capsys.readouterr()
    assert main(["pki", "init", "--dir", ca]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["pki", "issue", "--dir", ca, "--role", "node", "--name", "../x"]) == 1
    assert "bad name" in capsys.readouterr().err
    assert main(["pki", "issue", "--dir", str(tmp_path / "nope"), "--role", "node",
                 "--name", "x"]) == 1
    assert "cannot read certificate" in capsys.readouterr().err
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    assert main(["pki", "show", str(junk)]) == 1
    assert f"ztgpu: {junk} is not a valid certificate" in capsys.readouterr().err
    assert main(["pki", "renew", "--dir", ca, "--cert", str(junk), "--key",
                 str(tmp_path / "k")]) == 1
    assert "not a valid certificate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["pki", "issue", "--dir", ca, "--role", "root", "--name", "x"])
    assert usage.value.code == 2
    assert "invalid choice: 'root'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["pki", "issue", "--dir", ca, "--role", "node", "--name", "x", "--days", "-1"])
    assert usage.value.code == 2


def test_cli_roles_match_library() -> None:
    assert pki_cli._ROLES == pki.ROLES


def test_cli_start_does_not_import_cryptography() -> None:
    code = ("import sys, ztgpu.cli.main; ztgpu.cli.main.build_parser(); "
            "print('cryptography' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------ renewal in place


def test_reloading_context_follows_renewal_and_survives_half_written_files(site: Site) -> None:
    cert, key = site.client
    reloading = pki.ReloadingContext(lambda: pki.client_context(site.ca_cert, cert, key),
                                     [cert, key, site.ca_cert])
    first = reloading.get()
    assert reloading.get() is first  # nothing changed: same context
    assert pki.renew(site.ca, cert, key, force=True)
    renewed = reloading.get()
    assert renewed is not first
    result = handshake(server_ctx(site), renewed)
    assert result.peer == Identity("node", "gpu01") and result.client_error is None
    # A key replaced by garbage (renewal half done): the last good context stays.
    key.write_bytes(b"not a key")
    assert reloading.get() is renewed
