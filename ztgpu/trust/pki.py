"""The site PKI: one private CA, short-lived role certificates, TLS 1.3 contexts.

Every daemon-to-daemon link in the suite (node agent -> collector, collector
-> SIEM, auditor -> collector) is mutual TLS 1.3 under one site CA. A
certificate names exactly one identity: ``OU`` is the role (``node``,
``service``, ``auditor``) and ``CN`` the name (node or service name), and
both are checked on every use.

Keys are ECDSA P-256 and every signature is SHA-256, which rsyslog's GnuTLS
driver and OpenSSL 3 both accept. Private keys are written unencrypted (the
daemons start unattended) and are never group- or world-readable: they are
created 0600 before any byte is written, and every function that loads a
key refuses one whose mode grants group or other access.

Leaf certificates are short-lived (7 days by default) and renewed by
``renew`` from a daily timer; there is no revocation list.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import re
import ssl
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztgpu.errors import Fault
from ztgpu.trust.private_files import create_exclusive, owner_ids

#: ``monitor``: a Prometheus server scraping the suite's ``/metrics``.
ROLES: tuple[str, ...] = ("node", "service", "controller", "auditor", "monitor")

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
ORGANIZATION = "ztgpu"
# Certificates start this long before "now", so that a peer whose clock is a
# little behind still accepts a freshly issued one.
CLOCK_SKEW = timedelta(minutes=5)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_EKU: dict[str, tuple[x509.ObjectIdentifier, ...]] = {
    "node": (ExtendedKeyUsageOID.CLIENT_AUTH,),
    "auditor": (ExtendedKeyUsageOID.CLIENT_AUTH,),
    "monitor": (ExtendedKeyUsageOID.CLIENT_AUTH,),
    # Slurm's controller (the job gate): the only client of authd's gate.
    "controller": (ExtendedKeyUsageOID.CLIENT_AUTH,),
    "service": (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
}


class PkiError(Fault):
    """A certificate, key or CA operation failed. Messages never carry key material."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is: one role from ``ROLES`` and one name."""

    role: str
    name: str


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


# --------------------------------------------------------------------- public


def init_ca(directory: Path, *, common_name: str = "ztgpu site CA", days: int = 3650,
            owner: str | None = None) -> tuple[Path, Path]:
    """Create a new site CA in ``directory``; return ``(ca.crt, ca.key)``.

    ``directory`` is created 0700 if missing (and then given to ``owner``).
    ``ca.key`` is created 0600 with ``O_EXCL|O_NOFOLLOW``, so it is never
    readable by others, not even while being written, and an existing key
    (or a link in its place) is never replaced. ``ca.crt`` is 0644. With
    ``owner``, both files belong to that user and its primary group.

    Raises ``PkiError`` if ``ca.key`` already exists, ``owner`` is not a
    user, ``days`` is not positive, or a file cannot be written.
    """
    if days <= 0:
        raise PkiError(f"CA validity must be at least one day, not {days}")
    if not common_name.strip():
        raise PkiError("the CA common name must not be empty")
    ids = owner_ids(owner, PkiError)
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    if key_path.exists() or key_path.is_symlink():
        raise PkiError(f"{key_path} already exists; refusing to replace the site CA key")
    _make_dir(directory, ids)

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=False, cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    create_exclusive(key_path, _key_pem(key), ids, PkiError)
    try:
        _replace_files([(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, ids)])
    except BaseException:
        # Without its certificate the key is useless; remove it so that a
        # rerun can succeed.
        with contextlib.suppress(OSError):
            key_path.unlink()
        raise
    return cert_path, key_path


def issue(ca_dir: Path, role: str, name: str, out_dir: Path, *, days: float = 7.0,
          dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = (),
          owner: str | None = None, now: datetime | None = None) -> tuple[Path, Path]:
    """Issue a certificate with a new key; return ``(out_dir/<name>.crt, out_dir/<name>.key)``.

    The subject is ``O=ztgpu, OU=<role>, CN=<name>``; it is valid from
    ``now`` minus five minutes to ``now + days``. The SAN holds the given DNS
    names and IP addresses; a ``service`` given no DNS name gets ``<name>``.
    Each file is written to a temporary file and renamed into place (the key
    0600, the certificate 0644). ``out_dir`` is created 0700 if missing. With
    ``owner``, both files (and a created ``out_dir``) belong to that user.

    Raises ``PkiError`` for an unknown role, a bad name, DNS name or IP
    address, an unknown owner, a validity that is not positive or outlasts
    the CA, an unusable CA, or a file that cannot be written.
    """
    _check_identity(role, name)
    dns, ips = _check_sans(dns_names, ip_addresses)
    if role == "service" and not dns:
        dns = [name]
    ids = owner_ids(owner, PkiError)
    ca = _load_ca(Path(ca_dir))
    out_dir = Path(out_dir)
    _make_dir(out_dir, ids)
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    _issue_into(ca, role, name, dns, ips, cert_path, key_path,
                days=days, now=_aware(now), key_ids=ids, cert_ids=ids)
    return cert_path, key_path


def renew(ca_dir: Path, cert_path: Path, key_path: Path, *, days: float = 7.0,
          renew_before: timedelta = timedelta(days=2), force: bool = False,
          now: datetime | None = None) -> bool:
    """Re-issue ``cert_path`` with a new key if it expires within ``renew_before``.

    Returns ``True`` when renewed: the new certificate has the same role,
    name and SANs, is valid for ``days`` from ``now``, and both files are
    replaced by rename, keeping their owner and group (a missing key file
    takes the certificate's). The two renames are separate: a reader that
    loads the pair between them sees a mismatch and must retry. Returns
    ``False``, changing nothing, when not due and not ``force``.

    Raises ``PkiError`` if the certificate is unreadable, not issued by this
    CA, or carries no valid identity, and for the failures of ``issue``.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    ca = _load_ca(Path(ca_dir))
    cert = load_cert(cert_path)
    _check_issued_by(cert, ca.cert, str(cert_path))
    ident = identity_of(cert)
    when = _aware(now)
    if not force and cert_not_after(cert) - when > renew_before:
        return False
    dns, ips = _sans_of(cert)
    cert_ids = _file_ids(cert_path)
    key_ids = _file_ids(key_path) if key_path.exists() else cert_ids
    _issue_into(ca, ident.role, ident.name, dns, ips, cert_path, key_path,
                days=days, now=when, key_ids=key_ids, cert_ids=cert_ids)
    return True


def identity_of(cert: x509.Certificate) -> Identity:
    """Return the role (``OU``) and name (``CN``) of ``cert``'s subject.

    Raises ``PkiError`` unless the subject has exactly one ``OU`` naming a
    role in ``ROLES`` and exactly one ``CN`` that is a valid name.
    """
    role = _single_attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU")
    name = _single_attribute(cert, NameOID.COMMON_NAME, "CN")
    _check_identity(role, name)
    return Identity(role=role, name=name)


@functools.lru_cache(maxsize=1024)
def identity_from_der(der: bytes) -> Identity:
    """``identity_of`` for a DER certificate (``SSLSocket.getpeercert(True)``).

    The same certificate bytes always name the same identity, so the answer
    is cached (a kept-alive client presents one certificate per request).
    Raises ``PkiError`` if ``der`` is not a certificate or has no valid identity.
    """
    return identity_of(_parse_der(der))


def load_cert(path: Path) -> x509.Certificate:
    """Load a PEM (or DER) certificate; raise ``PkiError`` naming ``path`` on failure."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read certificate {path}: {exc.strerror}") from exc
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{path} is not a valid certificate") from exc


def server_context(ca_cert: Path, cert: Path, key: Path, *,
                   client_cert: bool = True) -> ssl.SSLContext:
    """A TLS 1.3-only server context; by default it requires a client certificate from the CA.

    With ``client_cert=False`` a client may connect without one, but a
    certificate it presents must still chain to the CA.

    Raises ``PkiError`` if the key file grants group/other access or any
    file cannot be loaded (including a key that does not match ``cert``).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(context, Path(ca_cert), Path(cert), Path(key))
    if not client_cert:
        # Users' `ztgpu login` has no certificate (munge proves who they
        # are); a certificate that is presented must still verify.
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(ca_cert: Path, cert: Path | None, key: Path | None, *,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A TLS 1.3-only client context that requires the server's certificate from the CA.

    ``cert`` and ``key`` are the client certificate, or both ``None`` for
    none. With ``check_hostname`` the server's SAN must match the name the
    caller connects to. Raises ``PkiError`` as ``server_context`` does, and
    if only one of ``cert`` and ``key`` is given.
    """
    if (cert is None) != (key is None):
        raise PkiError("a client certificate needs both its certificate and its key file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = check_hostname
    _configure(context, Path(ca_cert), None if cert is None else Path(cert),
               None if key is None else Path(key))
    return context


def sign(key_path: Path, data: bytes) -> bytes:
    """Sign ``data`` with the EC key in ``key_path``; return a DER ECDSA-SHA256 signature.

    Raises ``PkiError`` if the key grants group/other access, cannot be
    read, or is not an EC key.
    """
    key = _load_key(Path(key_path))
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify_signature(cert_der: bytes, ca: x509.Certificate, data: bytes, signature: bytes,
                     *, at: datetime, role: str, name: str) -> None:
    """Return only if ``signature`` over ``data`` was made by ``role``/``name`` under ``ca``.

    Checks, in order, and raises ``PkiError`` saying which failed: the
    certificate is issued by ``ca`` (issuer name and CA signature), it is
    valid at ``at``, its identity is ``(role, name)``, and the ECDSA-SHA256
    signature verifies with its key.
    """
    cert = _parse_der(cert_der)
    _check_issued_by(cert, ca, "signer certificate")
    when = _aware(at)
    not_before, not_after = cert.not_valid_before_utc, cert_not_after(cert)
    if not not_before <= when <= not_after:
        raise PkiError(f"signer certificate is not valid at {when.isoformat()} "
                       f"(valid {not_before.isoformat()} to {not_after.isoformat()})")
    ident = identity_of(cert)
    if ident != Identity(role=role, name=name):
        raise PkiError(f"signer is {ident.role}/{ident.name}, expected {role}/{name}")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PkiError("signer certificate does not hold an EC key")
    try:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise PkiError(f"signature by {role}/{name} does not verify over the data") from exc


def cert_not_after(cert: x509.Certificate) -> datetime:
    """The end of ``cert``'s validity, as an aware UTC datetime."""
    return cert.not_valid_after_utc


# -------------------------------------------------------------------- private


def _issue_into(ca: _Ca, role: str, name: str, dns: Sequence[str],
                ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
                cert_path: Path, key_path: Path, *, days: float, now: datetime,
                key_ids: tuple[int, int] | None, cert_ids: tuple[int, int] | None) -> None:
    """Build, sign and write one leaf certificate with a new key."""
    if not days > 0:
        raise PkiError(f"certificate validity must be positive, not {days} days")
    not_after = now + timedelta(days=days)
    if not_after > cert_not_after(ca.cert):
        raise PkiError(f"a {days}-day certificate would outlive the site CA "
                       f"(expires {cert_not_after(ca.cert).isoformat()}); create a new CA")
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(_EKU[role])), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(_authority_key_id(ca.cert), critical=False)
    )
    general: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    general += [x509.IPAddress(ip) for ip in ips]
    if general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    # Key first: a crash between the renames leaves a new key with the old
    # certificate, which fails loudly on load rather than silently working.
    _replace_files([(key_path, _key_pem(key), 0o600, key_ids),
                    (cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, cert_ids)])


def _key_usage(*, digital_signature: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
        decipher_only=False)


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            _ec_public_key(ca_cert, "CA certificate"))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _check_identity(role: str, name: str) -> None:
    if role not in ROLES:
        raise PkiError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if not _NAME.fullmatch(name):
        raise PkiError(f"bad name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")


def _check_sans(dns_names: Sequence[str], ip_addresses: Sequence[str],
                ) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    dns = list(dns_names)
    for d in dns:
        if len(d) > 253 or not _DNS_NAME.fullmatch(d):
            raise PkiError(f"bad DNS name {d!r}")
    ips = []
    for text in ip_addresses:
        try:
            ips.append(ipaddress.ip_address(text))
        except ValueError as exc:
            raise PkiError(f"bad IP address {text!r}") from exc
    return dns, ips


def _sans_of(cert: x509.Certificate,
             ) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    ips = [ip for ip in san.get_values_for_type(x509.IPAddress)
           if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)]
    return list(san.get_values_for_type(x509.DNSName)), ips


def _single_attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier, label: str) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) != 1:
        what = "no" if not values else "several"
        raise PkiError(f"certificate {cert.subject.rfc4514_string()!r} has {what} {label}; "
                       "it is not a ztgpu identity")
    value = values[0].value
    if not isinstance(value, str):
        raise PkiError(f"certificate {label} is not a string")
    return value


def _parse_der(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PkiError("not a valid DER certificate") from exc


def _ec_public_key(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError(f"{what} does not hold an EC key")
    return key


def _check_issued_by(cert: x509.Certificate, ca: x509.Certificate, what: str) -> None:
    if cert.issuer != ca.subject:
        raise PkiError(f"{what} was issued by {cert.issuer.rfc4514_string()!r}, "
                       f"not by the site CA {ca.subject.rfc4514_string()!r}")
    algorithm = cert.signature_hash_algorithm
    if not isinstance(algorithm, hashes.SHA256):
        raise PkiError(f"{what} is not signed with ECDSA-SHA256")
    try:
        _ec_public_key(ca, "the site CA certificate").verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except InvalidSignature as exc:
        raise PkiError(f"{what} names the site CA as issuer but the CA's signature "
                       "does not verify (issued by another CA with the same name?)") from exc


def _load_ca(ca_dir: Path) -> _Ca:
    cert = load_cert(ca_dir / CA_CERT_NAME)
    key = _load_key(ca_dir / CA_KEY_NAME)
    if key.public_key() != _ec_public_key(cert, f"{ca_dir / CA_CERT_NAME}"):
        raise PkiError(f"{ca_dir / CA_KEY_NAME} does not match {ca_dir / CA_CERT_NAME}")
    return _Ca(cert=cert, key=key)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    _check_key_mode(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # Not chained: the parser's message is about the key's bytes.
        raise PkiError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an EC private key")
    return key


def _check_key_mode(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise PkiError(f"cannot use key {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise PkiError(f"key {path} has mode {mode & 0o777:04o}, readable beyond its "
                       f"owner; run: chmod 600 {path}")


def _configure(context: ssl.SSLContext, ca_cert: Path, cert: Path | None,
               key: Path | None) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=str(ca_cert))
    except OSError as exc:  # ssl.SSLError is an OSError
        raise PkiError(f"cannot load CA certificate {ca_cert}: {exc}") from exc
    if cert is None or key is None:
        return
    _check_key_mode(key)
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except OSError as exc:
        # The ssl message names the reason (missing file, key mismatch),
        # never key bytes.
        raise PkiError(f"cannot load certificate {cert} with key {key}: {exc}") from exc


def _aware(when: datetime | None) -> datetime:
    if when is None:
        return datetime.now(UTC)
    if when.tzinfo is None:
        raise PkiError("times given to the PKI must be timezone-aware")
    return when.astimezone(UTC)


def _file_ids(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise PkiError(f"cannot stat {path}: {exc.strerror}") from exc
    return st.st_uid, st.st_gid


def _make_dir(directory: Path, ids: tuple[int, int] | None) -> None:
    """Create ``directory`` 0700 (given to ``ids``) if missing; leave an existing one."""
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        if ids is not None:
            os.chown(directory, *ids)
    except OSError as exc:
        raise PkiError(f"cannot create directory {directory}: {exc.strerror}") from exc


def _replace_files(files: Sequence[tuple[Path, bytes, int, tuple[int, int] | None]]) -> None:
    """Stage each ``(path, data, mode, owner ids)`` beside its path, then rename all.

    Temporary files are created 0600 (``mkstemp``), given their owner and
    final mode before any rename, and removed if anything fails before the
    renames.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, data, mode, owner in files:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if owner is not None:
                    os.fchown(f.fileno(), *owner)
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
        for parent in {path.parent for _, path in staged}:
            _fsync_dir(parent)
    except OSError as exc:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise PkiError(f"cannot write {exc.filename or 'file'}: {exc.strerror}") from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ReloadingContext:
    """An SSL context that follows certificate renewal on disk.

    ``get()`` returns a context built by ``build``; when the modification
    time or size of any of ``files`` has changed since it was built (``ztgpu
    pki renew`` replaced the certificate and key), the next ``get()`` builds
    a new one, so long-running services pick up renewed certificates on
    their next connection without a restart. If the new files cannot be
    loaded (say the key was replaced but not yet the certificate), the
    previous context is kept and the reload is retried on the next call.
    """

    def __init__(self, build: Callable[[], ssl.SSLContext], files: Sequence[Path]) -> None:
        self._build = build
        self._files = [Path(f) for f in files]
        self._stamp = self._stamps()
        self._context = build()

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        out = []
        for path in self._files:
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((-1, -1))
        return tuple(out)

    def get(self) -> ssl.SSLContext:
        stamp = self._stamps()
        if stamp != self._stamp:
            try:
                self._context = self._build()
                self._stamp = stamp
            except PkiError:
                pass  # half-replaced files: keep the old context, try again later
        return self._context
