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

from ztgpu.pam.session import Outcome, account, close_session, log_line, open_session

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
    if outcome.allowed:
        return int(pamh.PAM_SUCCESS)
    return int(pamh.PAM_SYSTEM_ERR if outcome.error and refused != pamh.PAM_SESSION_ERR
               else refused)


def _run(pamh: Any, argv: list[str], phase: str) -> int:
    try:
        user, rhost, service = _facts(pamh)
        if phase == "account":
            return _answer(pamh, account(argv[1:], user, rhost, service), pamh.PAM_PERM_DENIED)
        if phase == "open_session":
            return _answer(pamh, open_session(argv[1:], user, rhost, service, "self"),
                           pamh.PAM_SESSION_ERR)
        close_session(argv[1:], user, rhost, service, "self")
        return int(pamh.PAM_SUCCESS)
    except Exception as exc:  # noqa: BLE001 - a bug here must still refuse, and be found
        import traceback

        log_line(None, f"{phase}: internal error, refused: {exc!r}\n{traceback.format_exc()}",
                 error=True)
        return int(pamh.PAM_SYSTEM_ERR)


def pam_sm_authenticate(pamh: Any, flags: int, argv: list[str]) -> int:
    """Not used on compute nodes (sshd checks the key); lets the stack decide."""
    return int(pamh.PAM_IGNORE)


def pam_sm_setcred(pamh: Any, flags: int, argv: list[str]) -> int:
    return int(pamh.PAM_IGNORE)


def pam_sm_acct_mgmt(pamh: Any, flags: int, argv: list[str]) -> int:
    return _run(pamh, argv, "account")


def pam_sm_open_session(pamh: Any, flags: int, argv: list[str]) -> int:
    return _run(pamh, argv, "open_session")


def pam_sm_close_session(pamh: Any, flags: int, argv: list[str]) -> int:
    return _run(pamh, argv, "close_session")
