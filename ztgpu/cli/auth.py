"""`ztgpu login`, `ztgpu status` (MFA part) and `ztgpu admin ...` (authd clients).

Heavy modules (cryptography, the HTTP client) are imported inside the
handlers so that `ztgpu --help` and the node commands stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import re
import sys
from pathlib import Path
from typing import Any

from ztgpu.errors import UsageError

_DURATION = re.compile(r"([0-9]+)([smhd])")


def parse_ttl(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``2d`` -> seconds; UsageError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"--ttl {text!r}: use a number and a unit, e.g. 30m, 1h, 2d")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _config(args: argparse.Namespace) -> Any:
    from ztgpu.config import load_config

    return load_config(args.config)


def _read_code(args: argparse.Namespace) -> str:
    if args.code_stdin:
        code = sys.stdin.readline().strip()
    else:
        code = getpass.getpass("MFA code (from your authenticator app): ").strip()
    if not re.fullmatch(r"[0-9]{6}", code):
        raise UsageError("the code is the 6 digits your authenticator app shows")
    return code


def _cmd_login(args: argparse.Namespace) -> int:
    from ztgpu.auth_client import credential, user_client
    from ztgpu.authd.authority import LOGIN

    config = _config(args)
    code = _read_code(args)
    with user_client(config, args.authd) as client:
        reply = client.request("POST", "/v1/login",
                               {"credential": credential(config, LOGIN), "code": code})
    print(f"MFA session for {reply['user']} valid until {reply['expires']}")
    _keep_session_key(reply)
    return 0


def _keep_session_key(reply: dict[str, Any]) -> None:
    """Keep the login's binding key in this login's session keyring."""
    from datetime import UTC, datetime

    from ztgpu.trust import session_keyring

    session_id, key = reply.get("session_id"), reply.get("session_key")
    if not isinstance(session_id, str) or not isinstance(key, str) or not key:
        return  # an older authd: sessions are per user only
    try:
        expires = datetime.fromisoformat(str(reply["expires"]).replace("Z", "+00:00"))
        lifetime = (expires - datetime.now(UTC)).total_seconds()
        session_keyring.store(f"{session_id}:{key}".encode(), int(lifetime))
    except (session_keyring.KeyringError, ValueError) as exc:
        print(f"warning: jobs cannot be bound to this login session: {exc}", file=sys.stderr)
        return
    print("jobs submitted from this login session are bound to it (where the site "
          "requires it, jobs from other logins wait for their own `ztgpu login`)")


def _cmd_job_bind(args: argparse.Namespace) -> int:
    """`ztgpu job bind JOB`: tell authd that this login session submitted JOB
    (run by the site's cli_filter after every sbatch/salloc/srun)."""
    import base64
    import hashlib
    import hmac
    import os
    import pwd

    from ztgpu.auth_client import credential, user_client
    from ztgpu.authd.authority import BIND, bind_message
    from ztgpu.slurm.env import parse_job_id
    from ztgpu.trust import session_keyring

    job_id = parse_job_id(args.job)
    stored = session_keyring.read()
    if stored is None:
        if not args.quiet:
            print(f"ztgpu: job {job_id} is not bound: this login session has no MFA session "
                  "key (run `ztgpu login` here)", file=sys.stderr)
        return 1
    session_id, _, key_text = stored.decode("ascii", "replace").partition(":")
    key = base64.b64decode(key_text)
    user = pwd.getpwuid(os.getuid()).pw_name
    mac = hmac.new(key, bind_message(user, job_id), hashlib.sha256).hexdigest()
    config = _config(args)
    with user_client(config, args.authd) as client:
        reply = client.request("POST", "/v1/bind", {
            "credential": credential(config, BIND), "job_id": job_id,
            "session_id": session_id, "mac": mac})
    if not args.quiet:
        print(f"job {job_id} bound to this login session"
              + (" and released" if reply.get("released") else ""))
    return 0


def mfa_status(args: argparse.Namespace) -> int:
    """`ztgpu status`: the caller's MFA session and jobs waiting for it."""
    from ztgpu.auth_client import credential, user_client
    from ztgpu.authd.authority import STATUS

    config = _config(args)
    with user_client(config, getattr(args, "authd", None)) as client:
        reply = client.request("POST", "/v1/status",
                               {"credential": credential(config, STATUS)})
    if args.json:
        import json

        print(json.dumps(reply, indent=2))
        return 0
    expires = reply.get("session_expires")
    if expires:
        print(f"{reply['user']}: MFA session valid until {expires}")
    else:
        print(f"{reply['user']}: no MFA session; run `ztgpu login`")
    if reply.get("user_hold"):
        print(f"  {reply['user_hold']}; ask the site's admins to release it")
    for job in reply.get("held_jobs", []):
        print(f"  job {job['job_id']} held since {job['since']}: {job['reason']}")
    return 0


def _admin_request(args: argparse.Namespace, path: str, body: dict[str, Any]) -> Any:
    from ztgpu.auth_client import credential, user_client
    from ztgpu.authd.authority import ADMIN

    config = _config(args)
    with user_client(config, args.authd) as client:
        return client.request("POST", path, {"credential": credential(config, ADMIN), **body})


def _print_enrolment(user: str, uri: str) -> None:
    from ztgpu.trust.totp import qr_text

    print(f"Enrolled {user}. Scan this code with an authenticator app (or enter the URI):")
    print(qr_text(uri))
    print(uri)
    print("Show it only to the user; it is not stored in clear anywhere.")


def _cmd_enroll(args: argparse.Namespace) -> int:
    if args.local:
        # Bootstrap on the authd host: the first admin cannot have an MFA
        # session yet. Needs the KEK and the store, i.e. authd's own account.
        from ztgpu.authd.__main__ import open_authority

        authority, store, spool = open_authority(_config(args), with_holder=False)
        try:
            uri = authority.enroll(args.user, by=f"local:{getpass.getuser()}")
        finally:
            store.close()
            spool.close()
    else:
        uri = _admin_request(args, "/v1/admin/enroll", {"user": args.user})["otpauth_uri"]
    _print_enrolment(args.user, uri)
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    reply = _admin_request(args, "/v1/admin/revoke", {"user": args.user,
                                                      "reason": args.reason})
    print(f"revoked {reply['user']} (revocation {reply['revocation']}); nodes end the "
          "user's jobs within seconds")
    return 0


def _cmd_holds(args: argparse.Namespace) -> int:
    holds = _admin_request(args, "/v1/admin/holds", {})["holds"]
    if not holds:
        print("no user is held")
    for hold in holds:
        print(f"{hold['user']}: held since {hold['held_at']} by node {hold['node']} "
              f"({hold['rule']}, job {hold['job_id'] or '-'}): {hold['reason']}")
    return 0


def _cmd_hold_release(args: argparse.Namespace) -> int:
    reply = _admin_request(args, "/v1/admin/holds/release", {"user": args.user,
                                                            "reason": args.reason})
    print(f"released {reply['user']} (hold {', '.join(map(str, reply['released']))}); "
          "their held jobs go back to the job gate")
    return 0


def _cmd_keys_export(args: argparse.Namespace) -> int:
    """The public key set from authd's own store (authd's account, on its host)."""
    import hashlib
    import json
    import os
    import tempfile

    from ztgpu.authd.__main__ import open_authority

    authority, store, spool = open_authority(_config(args), with_holder=False)
    try:
        document = authority.jwks()
    finally:
        store.close()
        spool.close()
    out = Path(args.out)
    data = json.dumps(document, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    for key in document.get("keys", []):
        digest = hashlib.sha256(str(key.get("x", "")).encode()).hexdigest()[:16]
        print(f"key {key.get('kid')}: sha256 {digest}")
    print(f"wrote {out}: copy it to every node's auth.grant_keys_file (root-owned)")
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    reply = _admin_request(args, "/v1/admin/keys/rotate", {})
    print(f"new grant-signing key {reply['kid']}; grants signed with older keys stay valid "
          "until they expire")
    return 0


def _cmd_jit_grant(args: argparse.Namespace) -> int:
    reply = _admin_request(args, "/v1/admin/jit", {
        "user": args.user, "node": args.node, "ttl_s": parse_ttl(args.ttl),
        "reason": args.reason})
    print(f"JIT access {reply['id']}: {reply['user']} on {reply['node']} until "
          f"{reply['expires']}")
    return 0


def _cmd_kek_rotate(args: argparse.Namespace) -> int:
    from ztgpu.authd.store import AuthStore
    from ztgpu.config import read_secret_file
    from ztgpu.sqldb import open_database
    from ztgpu.trust.kek import KeyRing

    ac = _config(args).authd
    new_kid = KeyRing.rotate(ac.kek_file)
    ring = KeyRing.load(ac.kek_file)
    dsn = (read_secret_file(ac.postgres_dsn_file, "authd.postgres_dsn_file")
           if ac.store == "postgres" and ac.postgres_dsn_file is not None else None)
    store = AuthStore(open_database(ac.store, sqlite_path=ac.sqlite_path, dsn=dsn))
    try:
        count = store.rewrap_secrets(
            lambda sealed, aad: ring.seal(ring.open(sealed, aad), aad)
            if ring.needs_rewrap(sealed) else sealed)
    finally:
        store.close()
    print(f"new key-encryption key {new_kid}; re-encrypted {count} secrets. Older keys stay "
          f"in {ac.kek_file} until you retire them.")
    return 0


def _cmd_kek_init(args: argparse.Namespace) -> int:
    from ztgpu.trust.kek import KeyRing

    path = _config(args).authd.kek_file
    ring = KeyRing.create(path, owner=args.owner)
    print(f"created key-encryption key {ring.current_kid} in {path} (mode 0600"
          + (f", owner {args.owner})" if args.owner else ")"))
    return 0


def add_auth_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `login` and `admin` on the `ztgpu` command line."""
    login = sub.add_parser("login", help="open an MFA session (one a day is enough)")
    login.add_argument("--authd", metavar="URL", help="authd URL (default: auth.authd_url)")
    login.add_argument("--code-stdin", action="store_true",
                       help="read the code from standard input (for scripts)")
    login.set_defaults(func=_cmd_login)

    job = sub.add_parser("job", help="jobs and the login session that submitted them")
    jsub = job.add_subparsers(dest="job_command", required=True)
    bind = jsub.add_parser("bind", help="bind a job to this login's MFA session (the site's "
                           "cli_filter runs it after each submission)")
    bind.add_argument("job", help="the job id sbatch/srun/salloc printed")
    bind.add_argument("--authd", metavar="URL", help="authd URL (default: auth.authd_url)")
    bind.add_argument("--quiet", action="store_true", help="print nothing when it works")
    bind.set_defaults(func=_cmd_job_bind)

    admin = sub.add_parser("admin", help="authd administration (needs a fresh MFA login)")
    admin.add_argument("--authd", metavar="URL", help="authd URL (default: auth.authd_url)")
    asub = admin.add_subparsers(dest="admin_command", required=True)
    enroll = asub.add_parser("enroll", help="create a user's TOTP secret and show its QR code")
    enroll.add_argument("user")
    enroll.add_argument("--local", action="store_true",
                        help="on the authd host, without MFA: bootstrap the first admin")
    enroll.set_defaults(func=_cmd_enroll)
    revoke = asub.add_parser("revoke", help="end a user's sessions and running GPU jobs")
    revoke.add_argument("--user", required=True)
    revoke.add_argument("--reason", required=True)
    revoke.set_defaults(func=_cmd_revoke)
    hold = asub.add_parser("hold", help="users whose GPU jobs a node's telemetry rule held "
                           "(response hold_user)").add_subparsers(dest="hold_command",
                                                                  required=True)
    hold.add_parser("list", help="users held now, by which node and why").set_defaults(
        func=_cmd_holds)
    release = hold.add_parser("release", help="let a held user's GPU jobs start again")
    release.add_argument("--user", required=True)
    release.add_argument("--reason", required=True)
    release.set_defaults(func=_cmd_hold_release)
    keys = asub.add_parser("keys", help="grant-signing keys").add_subparsers(
        dest="keys_command", required=True)
    keys.add_parser("rotate", help="start signing grants with a new key").set_defaults(
        func=_cmd_keys_rotate)
    export = keys.add_parser("export", help="on the authd host: write the grant-signing "
                             "public keys as the file nodes pin (auth.grant_keys_file)")
    export.add_argument("--out", required=True, help="file to write (0644)")
    export.set_defaults(func=_cmd_keys_export)
    jit = asub.add_parser("jit", help="just-in-time admin access").add_subparsers(
        dest="jit_command", required=True)
    jit_grant = jit.add_parser("grant", help="let a user onto a node for a while")
    jit_grant.add_argument("--user", required=True)
    jit_grant.add_argument("--node", required=True)
    jit_grant.add_argument("--ttl", required=True, help="e.g. 30m, 1h (at most 1d)")
    jit_grant.add_argument("--reason", required=True)
    jit_grant.set_defaults(func=_cmd_jit_grant)
    kek = asub.add_parser("kek", help="the key-encryption key (on the authd host)"
                          ).add_subparsers(dest="kek_command", required=True)
    kek.add_parser("rotate", help="add a new KEK and re-encrypt every secret").set_defaults(
        func=_cmd_kek_rotate)
    kek_init = kek.add_parser("init", help="create authd.kek_file with a first key")
    kek_init.add_argument("--owner", help="the user authd runs as (the file is 0600)")
    kek_init.set_defaults(func=_cmd_kek_init)
