"""What the PAM module decides, shared by its two entry points.

:mod:`ztgpu.pam.pam_ztgpu` (loaded by pam_python inside sshd) and
:mod:`ztgpu.pam.exec_entry` (run by ``pam_exec``) both read the options of
their stack line with :func:`parse_options`, ask ztgpu-noded with
:func:`account` / :func:`open_session` / :func:`close_session`, and turn the
:class:`Outcome` into PAM's answer. Standard library plus
:mod:`ztgpu.node_client` only, imported lazily: this runs on every SSH login.

Options (``key=value`` words after the module on the stack line):

``socket=PATH``
    ztgpu-noded's socket (default ``/run/ztgpu/noded.sock``).
``timeout=SECONDS``
    How long to wait for the agent (default 5, at most 30).
``break_glass=NAME[,NAME...]``
    Accounts let in without asking the agent, so that they still get in
    when it is down. root always is. Their logins are recorded when the
    agent can be reached.
``action_no_agent|action_no_job|action_adopt_failure|action_error=deny|allow``
    What to do when the agent cannot be reached, the user has no job here,
    the session could not be put into the job, or anything else went wrong
    (a bug included). Every default is ``deny``.
``log=PATH``
    Also append each decision line to this file (root's, 0600); every line
    goes to syslog (authpriv) as well.
``mode=compute|login``
    ``compute`` (the default): the account and session checks above.
    ``login`` (login nodes, pam_python only): the auth phase asks for the
    user's TOTP code and opens their MFA session with authd, and the
    session phase keeps its binding key in the new login's session keyring,
    so a researcher's daily MFA is the SSH login itself (:func:`authenticate`).
``mfa=off|jit``
    On compute nodes: with ``jit``, a login that would be let in by a
    just-in-time admin grant (no job here) must give a TOTP code in the auth
    phase, which authd checks; the agent lets such a login through the
    account phase only after that check.
``config=PATH``
    The ztgpu configuration the auth phase reads (authd's URL, the site CA);
    default: the one ``ztgpu`` finds.
``state_dir=PATH``
    Login nodes: the root-only directory (0700) where the auth phase leaves
    the MFA session's key for the session phase (default
    ``/run/ztgpu/pam``); only a random ticket naming the file travels in the
    PAM environment.
``action_no_authd=deny|allow``
    Login nodes: what to do when authd cannot be reached for the TOTP check
    (``allow`` lets the login in without an MFA session).

An unknown option or a bad value is a configuration error: the login is
refused (except root and well-formed break-glass accounts) and the line
says which word is wrong. Nothing silently falls back to allowing.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_SOCKET = "/run/ztgpu/noded.sock"
ACTION_NAMES = ("no_agent", "no_job", "adopt_failure", "error", "no_authd")
#: PAM environment name carrying, from the auth phase to the session phase,
#: the ticket that names the file holding the MFA session's key (removed
#: before the shell starts; useless without root on the node if it leaked).
MFA_ENV = "ZTGPU_MFA_TICKET"
DEFAULT_STATE_DIR = "/run/ztgpu/pam"
#: A key the session phase did not collect is deleted after this long.
TICKET_TTL_S = 300
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-$")


class OptionError(ValueError):
    """A word of the module's stack line is not an option it knows."""


class Options:
    """The module's options, as parsed from its stack line."""

    def __init__(self) -> None:
        self.socket = DEFAULT_SOCKET
        self.timeout = 5.0
        self.break_glass: frozenset[str] = frozenset()
        self.actions = dict.fromkeys(ACTION_NAMES, "deny")
        self.log: str | None = None
        self.mode = "compute"
        self.mfa = "off"
        self.config: str | None = None
        self.state_dir = DEFAULT_STATE_DIR


def break_glass_of(argv: list[str]) -> frozenset[str]:
    """The break-glass accounts of a stack line, even one with other errors
    (a typo elsewhere must not lock the break-glass accounts out)."""
    names: frozenset[str] = frozenset()
    for word in argv:
        if word.startswith("break_glass="):
            try:
                names = _names(word.partition("=")[2])
            except OptionError:
                return frozenset()
    return names


def _log_only(argv: list[str]) -> Options | None:
    """Options carrying just the ``log=`` file of a stack line that does not
    parse, so the configuration error is written where the admin looks."""
    for word in argv:
        key, _, value = word.partition("=")
        if key == "log" and value.startswith("/"):
            opts = Options()
            opts.log = value
            return opts
    return None


def _names(value: str) -> frozenset[str]:
    names = value.split(",")
    if not all(0 < len(n) <= 32 and _NAME_CHARS.issuperset(n) for n in names):
        raise OptionError(f"break_glass={value!r} is not a comma-separated list of user names")
    return frozenset(names)


def parse_options(argv: list[str]) -> Options:
    """Parse ``key=value`` words. Raises OptionError naming the bad word."""
    opts = Options()
    for word in argv:
        key, eq, value = word.partition("=")
        if not eq:
            raise OptionError(f"option {word!r} has no '=': options are key=value")
        if key == "socket":
            if not value.startswith("/"):
                raise OptionError(f"socket={value!r} is not an absolute path")
            opts.socket = value
        elif key == "timeout":
            try:
                opts.timeout = float(value)
            except ValueError:
                raise OptionError(f"timeout={value!r} is not a number of seconds") from None
            if not 0 < opts.timeout <= 30:
                raise OptionError(f"timeout={value!r} must be more than 0 and at most 30")
        elif key == "break_glass":
            opts.break_glass = _names(value)
        elif key.startswith("action_") and key[len("action_"):] in ACTION_NAMES:
            if value not in ("deny", "allow"):
                raise OptionError(f"{key}={value!r}: the action is 'deny' or 'allow'")
            opts.actions[key[len("action_"):]] = value
        elif key in ("log", "config", "state_dir"):
            if not value.startswith("/"):
                raise OptionError(f"{key}={value!r} is not an absolute path")
            setattr(opts, key, value)
        elif key == "mode":
            if value not in ("compute", "login"):
                raise OptionError(f"mode={value!r}: the mode is 'compute' or 'login'")
            opts.mode = value
        elif key == "mfa":
            if value not in ("off", "jit"):
                raise OptionError(f"mfa={value!r}: 'off' or 'jit'")
            opts.mfa = value
        else:
            known = ", ".join(["socket", "timeout", "break_glass", "log", "mode", "mfa",
                               "config", "state_dir", *(f"action_{a}" for a in ACTION_NAMES)])
            raise OptionError(f"unknown option {key!r} (known: {known})")
    if opts.mode == "login" and opts.mfa != "off":
        raise OptionError("mfa=jit is for compute nodes, not mode=login")
    return opts


class Outcome:
    """What the module answers: allowed or not, and what the user is told."""

    def __init__(self, allowed: bool, message: str = "", *, error: bool = False,
                 ignore: bool = False) -> None:
        self.allowed = allowed
        self.message = message
        #: Not this module's concern (PAM_IGNORE).
        self.ignore = ignore
        #: The refusal came from a failure (not a decision): PAM is told so.
        self.error = error


def log_line(opts: Options | None, text: str, *, error: bool = False) -> None:
    """One line an admin will find: syslog (authpriv) and the ``log=`` file."""
    import syslog

    syslog.openlog("ztgpu-pam", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_ERR if error else syslog.LOG_INFO, text)
    if opts is not None and opts.log is not None:
        import os
        import time

        try:
            fd = os.open(opts.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                os.write(fd, f"{stamp} ztgpu-pam[{os.getpid()}] {text}\n".encode(
                    "utf-8", "replace"))
            finally:
                os.close(fd)
        except OSError as exc:
            syslog.syslog(syslog.LOG_ERR, f"cannot write {opts.log}: {exc.strerror}")


def _who(phase: str, user: str, rhost: str, service: str) -> str:
    return f"{service} {phase} user={user!r} rhost={rhost or '-'!r}"


def _fallback(opts: Options, action: str, who: str, why: str, *,
              message: str = "") -> Outcome:
    """A failure mode's named action, logged either way."""
    verdict = opts.actions[action]
    log_line(opts, f"{who}: {why}; action_{action}={verdict}", error=True)
    if verdict == "allow":
        return Outcome(True)
    return Outcome(False, message or f"ztgpu: access denied: {why}", error=True)


def guarded(phase: str, argv: list[str], user: str, rhost: str, service: str,
            work: Any) -> Outcome:
    """Run *work(opts, who)* so that nothing escapes: a configuration error,
    an unreachable agent or any exception gives its named action (deny by
    default) and a log line with the cause."""
    who = _who(phase, user, rhost, service)
    try:
        opts = parse_options(argv)
    except OptionError as exc:
        where = _log_only(argv)
        if user == "root" or user in break_glass_of(argv):
            log_line(where, f"{who}: configuration error ({exc}); {user} let in as "
                     f"root/break-glass", error=True)
            return Outcome(True)
        log_line(where, f"{who}: configuration error, login refused: {exc}", error=True)
        return Outcome(False, "ztgpu: access denied: the node's PAM configuration is "
                       "broken; tell the administrators", error=True)
    try:
        from ztgpu.errors import AgentUnreachable
    except Exception as exc:  # noqa: BLE001 - the suite itself cannot be imported
        return _fallback(opts, "error", who, f"the ztgpu package cannot be imported: {exc}")
    try:
        result: Outcome = work(opts, who)
        return result
    except AgentUnreachable as exc:
        if user == "root" or user in opts.break_glass:
            log_line(opts, f"{who}: {exc}; let in as root/break-glass", error=True)
            return Outcome(True)
        return _fallback(opts, "no_agent", who, f"the node agent cannot be reached ({exc})",
                         message="ztgpu: access denied: the node's access service is down")
    except Exception as exc:  # noqa: BLE001 - any failure takes its named action
        import traceback

        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        log_line(opts, f"{who}: internal error: {detail}\n{traceback.format_exc()}",
                 error=True)
        if user == "root" or user in opts.break_glass:
            return Outcome(True)
        return _fallback(opts, "error", who, f"internal error ({detail[:200]})",
                         message="ztgpu: access denied: internal error (logged)")


def _ask(opts: Options, op: str, **payload: Any) -> Any:
    from ztgpu.node_client import call

    actions = {k: v for k, v in opts.actions.items() if k != "no_authd"}
    return call(opts.socket, op, timeout=opts.timeout, actions=actions, **payload)


# ---- auth phase: TOTP ------------------------------------------------------

class TotpRefused(Exception):
    """authd did not accept the code (wrong, reused, user not enrolled...)."""


class AuthdUnreachable(Exception):
    """authd could not be asked."""


def login_as(user: str, code: str, config_path: str | None, timeout: float) -> dict[str, Any]:
    """Open *user*'s MFA session with authd as ``ztgpu login`` would, in a
    child process running as the user (so munge proves the user's uid, and
    root proves nothing on the user's behalf). Returns authd's answer.

    Raises TotpRefused or AuthdUnreachable.
    """
    import os
    import pwd
    import select
    import signal
    import time

    entry = pwd.getpwnam(user)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 70
        try:
            os.close(read_end)
            os.initgroups(user, entry.pw_gid)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            os.write(write_end, _login_child(code, config_path).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AuthdUnreachable(f"authd did not answer within {timeout:g}s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    from ztgpu.node_client import _loads

    try:
        answer = _loads(b"".join(chunks))
    except ValueError:
        raise AuthdUnreachable("the TOTP check ended without an answer") from None
    if not isinstance(answer, dict):
        raise AuthdUnreachable("the TOTP check ended without an answer")
    if answer.get("refused"):
        raise TotpRefused(str(answer.get("error")))
    if answer.get("unreachable"):
        raise AuthdUnreachable(str(answer.get("error")))
    reply = answer.get("reply")
    if not isinstance(reply, dict):
        raise AuthdUnreachable("authd's answer has no session")
    return reply


def _login_child(code: str, config_path: str | None) -> str:
    """In the child, as the user: POST /v1/login; the outcome as JSON."""
    import json

    try:
        from ztgpu.auth_client import AuthdRefused, credential, user_client
        from ztgpu.authd.authority import LOGIN
        from ztgpu.config import load_config

        config = load_config(config_path)
        with user_client(config) as client:
            reply = client.request("POST", "/v1/login",
                                   {"credential": credential(config, LOGIN), "code": code})
        return json.dumps({"reply": reply})
    except AuthdRefused as exc:
        return json.dumps({"refused": True, "error": f"{exc} ({exc.code})"})
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        return json.dumps({"unreachable": True, "error": f"{type(exc).__name__}: {exc}"})


def authenticate(argv: list[str], user: str, rhost: str, service: str,
                 prompt: Any, put_env: Any) -> Outcome:
    """Auth phase: a TOTP code, checked by authd. ``prompt(text)`` asks the
    user (echo off) and returns the answer; ``put_env(name, value)`` sets a
    PAM environment variable. ``Outcome.ignore``: not this module's concern."""
    def work(opts: Options, who: str) -> Outcome:
        if user == "root" or user in opts.break_glass:
            log_line(opts, f"{who}: no TOTP asked of root/break-glass")
            return Outcome(True)
        if opts.mode == "compute":
            if opts.mfa != "jit":
                return Outcome(True, ignore=True)
            need = _ask(opts, "ssh_auth", user=user, rhost=rhost, service=service)
            if need.get("mfa") is not True:
                log_line(opts, f"{who}: no TOTP needed ({need.get('reason')})")
                return Outcome(True)
        code = str(prompt("ztgpu TOTP code: ") or "").strip()
        if not (code.isdigit() and 6 <= len(code) <= 8):
            return _totp_failed(opts, who, user, rhost, service, "no code was given"
                                if not code else "the answer is not a TOTP code")
        try:
            reply = login_as(user, code, opts.config, max(opts.timeout, 10.0))
        except TotpRefused as exc:
            return _totp_failed(opts, who, user, rhost, service, f"authd refused it ({exc})")
        except AuthdUnreachable as exc:
            if opts.mode == "compute":
                return _totp_failed(opts, who, user, rhost, service,
                                    f"authd cannot be reached ({exc})")
            return _fallback(opts, "no_authd", who, f"authd cannot be reached ({exc})",
                             message="ztgpu: the MFA service cannot be reached")
        if opts.mode == "compute":
            _ask(opts, "ssh_mfa", user=user, rhost=rhost, service=service, passed=True)
            log_line(opts, f"{who}: TOTP accepted for just-in-time access")
            return Outcome(True)
        session_id, key = reply.get("session_id"), reply.get("session_key")
        if isinstance(session_id, str) and isinstance(key, str) and key:
            ticket = _leave_key(opts, f"{session_id}:{key}:{reply.get('expires')}")
            put_env(MFA_ENV, ticket)
        log_line(opts, f"{who}: TOTP accepted; MFA session until {reply.get('expires')}")
        return Outcome(True, f"ztgpu: MFA session open until {reply.get('expires')}")
    return guarded("auth", argv, user, rhost, service, work)


def _totp_failed(opts: Options, who: str, user: str, rhost: str, service: str,
                 why: str) -> Outcome:
    log_line(opts, f"{who}: TOTP check failed: {why}", error=True)
    if opts.mode == "compute":
        try:
            _ask(opts, "ssh_mfa", user=user, rhost=rhost, service=service, passed=False,
                 reason=why[:300])
        except Exception as exc:  # noqa: BLE001 - the refusal stands either way
            log_line(opts, f"{who}: the failed check was not recorded by the agent: {exc}",
                     error=True)
    return Outcome(False, "ztgpu: the TOTP code was not accepted")


def _state_dir(opts: Options) -> str:
    """The key directory: made root's 0700 if missing; refused if anyone
    else could write or read it."""
    import os
    import stat

    os.makedirs(opts.state_dir, mode=0o700, exist_ok=True)
    st = os.lstat(opts.state_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise OSError(f"{opts.state_dir} must be a directory of root's with mode 0700")
    return opts.state_dir


def _leave_key(opts: Options, value: str) -> str:
    """Keep *value* for the session phase in a root-only file; returns its ticket."""
    import os
    import secrets
    import time

    where = _state_dir(opts)
    for name in os.listdir(where):  # keys no session phase collected
        path = os.path.join(where, name)
        try:
            if time.time() - os.lstat(path).st_mtime > TICKET_TTL_S:
                os.unlink(path)
        except OSError:
            continue
    ticket = secrets.token_hex(16)
    fd = os.open(os.path.join(where, ticket),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    return ticket


def _collect_key(opts: Options, ticket: str) -> str | None:
    """The key the auth phase left under *ticket* (the file is removed)."""
    import os

    if len(ticket) != 32 or not all(c in "0123456789abcdef" for c in ticket):
        return None
    path = os.path.join(_state_dir(opts), ticket)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        value = os.read(fd, 4096).decode("ascii", "replace")
    finally:
        os.close(fd)
        os.unlink(path)
    return value or None


def keep_mfa_session(opts: Options, who: str, user: str, get_env: Any,
                     put_env: Any) -> Outcome:
    """Login nodes' session phase: the auth phase's binding key goes into the
    session keyring pam_keyinit just made for this login (owned by the user,
    possessed by the login's processes), and out of the PAM environment."""
    import pwd
    from datetime import UTC, datetime

    from ztgpu.trust import session_keyring

    ticket = get_env(MFA_ENV)
    if ticket:
        put_env(MFA_ENV, None)
    value = _collect_key(opts, str(ticket)) if ticket else None
    if not value:
        log_line(opts, f"{who}: no MFA session from the auth phase (the user can run "
                 f"`ztgpu login`)")
        return Outcome(True)
    session_id, key, expires = value.split(":", 2)
    entry = pwd.getpwnam(user)
    try:
        until = datetime.fromisoformat(expires.replace("Z", "+00:00"))
        lifetime = int((until - datetime.now(UTC)).total_seconds())
        session_keyring.store(f"{session_id}:{key}".encode(), lifetime,
                              owner=(entry.pw_uid, entry.pw_gid))
    except (session_keyring.KeyringError, ValueError) as exc:
        log_line(opts, f"{who}: the MFA session key could not be kept: {exc}", error=True)
        return Outcome(True, f"ztgpu: warning: jobs cannot be bound to this login ({exc}); "
                             f"run `ztgpu login`")
    log_line(opts, f"{who}: MFA session {session_id} kept in the login's session keyring")
    return Outcome(True)


def account(argv: list[str], user: str, rhost: str, service: str) -> Outcome:
    """Account phase: may *user* log in on this compute node?"""
    def work(opts: Options, who: str) -> Outcome:
        if opts.mode == "login":
            return Outcome(True, ignore=True)
        if user == "root" or user in opts.break_glass:
            _record_break_glass(opts, who, user, rhost, service)
            return Outcome(True)
        extra = {"jit_mfa": True} if opts.mfa == "jit" else {}
        reply = _ask(opts, "ssh_account", user=user, rhost=rhost, service=service, **extra)
        if reply.get("allow") is True:
            log_line(opts, f"{who}: allowed ({reply.get('code')})")
            return Outcome(True, str(reply.get("message") or ""))
        code = str(reply.get("code"))
        action = "no_job" if code == "no_job" else "error"
        return _fallback(opts, action, who, f"refused by the node agent ({code})",
                         message=str(reply.get("message") or "ztgpu: access denied"))
    return guarded("account", argv, user, rhost, service, work)


def _record_break_glass(opts: Options, who: str, user: str, rhost: str,
                        service: str) -> None:
    if user == "root":
        log_line(opts, f"{who}: allowed (root)")
        return
    log_line(opts, f"{who}: allowed (break-glass account)")
    try:
        _ask(opts, "ssh_account", user=user, rhost=rhost, service=service, break_glass=True)
    except Exception as exc:  # noqa: BLE001 - recording is best effort: the account must get in
        log_line(opts, f"{who}: break-glass login not recorded by the agent: {exc}",
                 error=True)


def open_session(argv: list[str], user: str, rhost: str, service: str,
                 target: str, get_env: Any = None, put_env: Any = None) -> Outcome:
    """Session phase: put the session (``target``: this process or its
    parent) into the user's job on this node; on login nodes, keep the auth
    phase's MFA session key (``get_env``/``put_env``: the PAM environment)."""
    def work(opts: Options, who: str) -> Outcome:
        from ztgpu.errors import AgentUnreachable, Fault

        if opts.mode == "login":
            if get_env is None or put_env is None:
                return Outcome(True, ignore=True)
            return keep_mfa_session(opts, who, user, get_env, put_env)

        glass = user in opts.break_glass and user != "root"
        try:
            reply = _ask(opts, "ssh_open", user=user, rhost=rhost, service=service,
                         target=target, break_glass=glass)
        except AgentUnreachable:
            raise
        except Fault as exc:
            if user == "root" or glass:
                log_line(opts, f"{who}: not adopted ({exc}); root/break-glass session "
                         f"allowed", error=True)
                return Outcome(True)
            return _fallback(opts, "adopt_failure", who, str(exc),
                             message="ztgpu: this session could not be put into your job")
        if reply.get("code") == "no_job":
            return _fallback(opts, "no_job", who, "no running job here to put the session in",
                             message=str(reply.get("message") or "ztgpu: access denied"))
        job = reply.get("job_id")
        log_line(opts, f"{who}: " + (f"adopted into job {job}" if reply.get("adopted")
                                      else "not adopted"))
        return Outcome(True, str(reply.get("message") or ""))
    return guarded("open_session", argv, user, rhost, service, work)


def close_session(argv: list[str], user: str, rhost: str, service: str,
                  target: str) -> Outcome:
    """Session end: recorded. Never refuses (PAM ignores close failures anyway)."""
    def work(opts: Options, who: str) -> Outcome:
        if opts.mode == "compute":
            _ask(opts, "ssh_close", user=user, rhost=rhost, service=service, target=target)
        return Outcome(True)
    guarded("close_session", argv, user, rhost, service, work)
    return Outcome(True)
