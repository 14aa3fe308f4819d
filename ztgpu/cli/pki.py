"""``ztgpu pki``: create the site CA, issue, renew and inspect certificates.

``cryptography`` is imported inside the handlers only, so that every other
``ztgpu`` command starts without loading it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# ztgpu.trust.pki.ROLES; a test keeps them equal
_ROLES = ("node", "service", "controller", "auditor", "monitor")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _cmd_init(args: argparse.Namespace) -> int:
    from ztgpu.trust.pki import cert_not_after, init_ca, load_cert

    cert, key = init_ca(Path(args.dir), common_name=args.cn, days=args.days, owner=args.owner)
    print(f"CA certificate: {cert}")
    print(f"CA key:         {key}  (keep it on this host only; back it up offline)")
    print(f"valid until:    {cert_not_after(load_cert(cert)).isoformat()}")
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    from ztgpu.trust.pki import cert_not_after, issue, load_cert

    out = Path(args.out) if args.out else Path(args.dir)
    cert, key = issue(Path(args.dir), args.role, args.name, out, days=args.days,
                      dns_names=args.dns, ip_addresses=args.ip, owner=args.owner)
    print(f"certificate: {cert}")
    print(f"key:         {key}")
    print(f"expires:     {cert_not_after(load_cert(cert)).isoformat()}")
    return 0


def _cmd_renew(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from ztgpu.trust.pki import cert_not_after, load_cert, renew

    cert = Path(args.cert)
    renewed = renew(Path(args.dir), cert, Path(args.key), days=args.days,
                    renew_before=timedelta(hours=args.before_hours), force=args.force)
    expiry = cert_not_after(load_cert(cert)).isoformat()
    if renewed:
        print(f"renewed: {cert} valid until {expiry}")
    else:
        print(f"not due: {cert} expires {expiry}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from cryptography import x509

    from ztgpu.trust.pki import cert_not_after, identity_of, load_cert

    cert = load_cert(Path(args.cert))
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        role = "CA"
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        name = str(names[0].value) if names else cert.subject.rfc4514_string()
    else:
        ident = identity_of(cert)
        role, name = ident.role, ident.name
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [f"DNS:{d}" for d in san.get_values_for_type(x509.DNSName)]
        sans += [f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        sans = []
    print(f"role:       {role}")
    print(f"name:       {name}")
    print(f"serial:     {cert.serial_number:x}")
    print(f"not_before: {cert.not_valid_before_utc.isoformat()}")
    print(f"not_after:  {cert_not_after(cert).isoformat()}")
    print(f"san:        {', '.join(sans) if sans else '(none)'}")
    print(f"issuer:     {cert.issuer.rfc4514_string()}")
    return 0


def add_pki_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ztgpu pki {init,issue,renew,show}`` to the top-level sub-parsers."""
    pki = sub.add_parser("pki", help="site CA and TLS certificates").add_subparsers(
        dest="pki_command", required=True)

    init = pki.add_parser("init", help="create the site CA (ca.crt, ca.key) in a directory",
                          description="Create the site CA. Refuses if DIR/ca.key exists.")
    init.add_argument("--dir", required=True, help="CA directory (created 0700 if missing)")
    init.add_argument("--cn", default="ztgpu site CA", help="CA common name")
    init.add_argument("--days", type=int, default=3650, help="CA validity in days")
    init.add_argument("--owner", help="user to own the CA files")
    init.set_defaults(func=_cmd_init)

    issue = pki.add_parser("issue", help="issue a certificate and a new key",
                           description="Issue a certificate for one role and name, "
                           "with a new key, as OUT/NAME.crt and OUT/NAME.key (0600).")
    issue.add_argument("--dir", required=True, help="CA directory")
    issue.add_argument("--role", required=True, choices=_ROLES)
    issue.add_argument("--name", required=True, help="node or service name (the CN)")
    issue.add_argument("--out", help="output directory (default: the CA directory)")
    issue.add_argument("--days", type=_positive, default=7.0,
                       help="validity in days (default 7)")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME",
                       help="DNS subjectAltName (repeatable; a service defaults to NAME)")
    issue.add_argument("--ip", action="append", default=[], metavar="ADDR",
                       help="IP subjectAltName (repeatable)")
    issue.add_argument("--owner", help="user to own the key and certificate (service user)")
    issue.set_defaults(func=_cmd_issue)

    renew = pki.add_parser(
        "renew", help="renew a certificate if it is due (run daily from cron or a timer)",
        description="Re-issue CERT with the same role, name and SANs and a new key if it "
        "expires within --before-hours (or with --force), keeping the files' owners. "
        "Exits 0 whether or not it was due, so it is safe to run from a daily cron job "
        "or systemd timer; restart or reload the service that uses the files afterwards.")
    renew.add_argument("--dir", required=True, help="CA directory")
    renew.add_argument("--cert", required=True, help="certificate to renew")
    renew.add_argument("--key", required=True, help="its key (replaced by a new key)")
    renew.add_argument("--days", type=_positive, default=7.0,
                       help="validity of the new certificate in days (default 7)")
    renew.add_argument("--before-hours", type=_positive, default=48.0,
                       help="renew when it expires within this many hours (default 48)")
    renew.add_argument("--force", action="store_true", help="renew even if not due")
    renew.set_defaults(func=_cmd_renew)

    show = pki.add_parser("show", help="print a certificate's identity and validity")
    show.add_argument("cert", help="certificate file (PEM or DER)")
    show.set_defaults(func=_cmd_show)

