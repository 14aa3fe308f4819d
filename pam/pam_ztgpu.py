"""The pam_python face of the ztgpu PAM module (compute nodes).

``ztgpu install --pam SERVICE`` writes a two-line loader into the hooks
directory that puts the suite's install location on ``sys.path`` and
imports the ``pam_sm_*`` functions below; the stack line then reads::

    account  required  pam_python.so /usr/libexec/ztgpu/pam_ztgpu.py socket=... [options]
    session  required  pam_python.so /usr/libexec/ztgpu/pam_ztgpu.py socket=... [options]

pam_python runs inside sshd's ``[priv]`` process (as root), so the session
the agent adopts is that process, which the user's shell is forked from.
Options are those of :mod:`ztgpu.pam.session`. Every function answers: a
failure gives the configured action (deny by default), never a traceback
lost in syslog.
"""

from __future__ import annotations

from ztgpu.pam.session import (
    Outcome,
    account,
    authenticate,
    close_session,
    log_line,
    open_session,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _facts(pamh: Any) -> tuple[str, str, str]:
    user = pamh.get_user(None)
    return (str(user or ""), str(getattr(pamh, "rhost", None) or ""),
            str(getattr(pamh, "service", None) or "sshd"))


def _tell(pamh: Any, outcome: Outcome) -> None:
    if not outcome.message:
        return
    style = pamh.PAM_TEXT_INFO if outcome.allowed else pamh.PAM_ERROR_MSG
    try:
        pamh.conversation(pamh.Message(style, outcome.message))
    except Exception as exc:  # noqa: BLE001 - no conversation (non-interactive client): logged only
        log_line(None, f"could not show the user {outcome.message!r}: {exc}")


def _answer(pamh: Any, outcome: Outcome, refused: int) -> int:
    _tell(pamh, outcome)
    if outcome.ignore:
        return int(pamh.PAM_IGNORE)
    if outcome.allowed:
        return int(pamh.PAM_SUCCESS)
    return int(pamh.PAM_SYSTEM_ERR if outcome.error and refused != pamh.PAM_SESSION_ERR
               else refused)


def _env(pamh: Any) -> tuple[Any, Any]:
    """Read and set (None: remove) a PAM environment variable."""
    def get(name: str) -> str | None:
        try:
            value = pamh.env.get(name)
        except Exception:  # noqa: BLE001 - no such variable
            return None
        return None if value is None else str(value)

    def put(name: str, value: str | None) -> None:
        if value is None:
            if get(name) is not None:
                del pamh.env[name]
        else:
            pamh.env[name] = value
    return get, put


def _run(pamh: Any, argv: list[str], phase: str) -> int:
    try:
        user, rhost, service = _facts(pamh)
        if phase == "auth":
            def prompt(text: str) -> str:
                reply = pamh.conversation(pamh.Message(pamh.PAM_PROMPT_ECHO_OFF, text))
                return str(reply.resp or "")
            _, put = _env(pamh)
            return _answer(pamh, authenticate(argv[1:], user, rhost, service, prompt, put),
                           pamh.PAM_AUTH_ERR)
        if phase == "account":
            return _answer(pamh, account(argv[1:], user, rhost, service), pamh.PAM_PERM_DENIED)
        if phase == "open_session":
            get, put = _env(pamh)
            return _answer(pamh, open_session(argv[1:], user, rhost, service, "self", get, put),
                           pamh.PAM_SESSION_ERR)
        close_session(argv[1:], user, rhost, service, "self")
        return int(pamh.PAM_SUCCESS)
    except Exception as exc:  # noqa: BLE001 - a bug here must still refuse, and be found
        import traceback

        log_line(None, f"{phase}: internal error, refused: {exc!r}\n{traceback.format_exc()}",
                 error=True)
        return int(pamh.PAM_SYSTEM_ERR)


def pam_sm_authenticate(pamh: Any, flags: int, argv: list[str]) -> int:
    """TOTP: on login nodes (``mode=login``) for every login, on compute nodes
    (``mfa=jit``) for just-in-time admin logins; otherwise PAM_IGNORE."""
    return _run(pamh, argv, "auth")


def pam_sm_setcred(pamh: Any, flags: int, argv: list[str]) -> int:
    """Nothing to set (the MFA session's key is kept in the session phase);
    success, since with only this module in the auth phase an ignore would
    fail sshd's pam_setcred."""
    return int(pamh.PAM_SUCCESS)


def pam_sm_acct_mgmt(pamh: Any, flags: int, argv: list[str]) -> int:
    return _run(pamh, argv, "account")


def pam_sm_open_session(pamh: Any, flags: int, argv: list[str]) -> int:
    return _run(pamh, argv, "open_session")


def pam_sm_close_session(pamh: Any, flags: int, argv: list[str]) -> int:
    return _run(pamh, argv, "close_session")
