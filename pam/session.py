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

An unknown option or a bad value is a configuration error: the login is
refused (except root and well-formed break-glass accounts) and the line
says which word is wrong. Nothing silently falls back to allowing.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_SOCKET = "/run/ztgpu/noded.sock"
ACTION_NAMES = ("no_agent", "no_job", "adopt_failure", "error")
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
        elif key == "log":
            if not value.startswith("/"):
                raise OptionError(f"log={value!r} is not an absolute path")
            opts.log = value
        else:
            known = ", ".join(["socket", "timeout", "break_glass", "log",
                               *(f"action_{a}" for a in ACTION_NAMES)])
            raise OptionError(f"unknown option {key!r} (known: {known})")
    return opts


class Outcome:
    """What the module answers: allowed or not, and what the user is told."""

    def __init__(self, allowed: bool, message: str = "", *, error: bool = False) -> None:
        self.allowed = allowed
        self.message = message
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

    return call(opts.socket, op, timeout=opts.timeout,
                actions=opts.actions, **payload)


def account(argv: list[str], user: str, rhost: str, service: str) -> Outcome:
    """Account phase: may *user* log in on this compute node?"""
    def work(opts: Options, who: str) -> Outcome:
        if user == "root" or user in opts.break_glass:
            _record_break_glass(opts, who, user, rhost, service)
            return Outcome(True)
        reply = _ask(opts, "ssh_account", user=user, rhost=rhost, service=service)
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
                 target: str) -> Outcome:
    """Session phase: put the session (``target``: this process or its
    parent) into the user's job on this node."""
    def work(opts: Options, who: str) -> Outcome:
        from ztgpu.errors import AgentUnreachable, Fault

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
        _ask(opts, "ssh_close", user=user, rhost=rhost, service=service, target=target)
        return Outcome(True)
    guarded("close_session", argv, user, rhost, service, work)
    return Outcome(True)
