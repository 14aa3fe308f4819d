"""The ``pam_exec`` face of the ztgpu PAM module, for sites without pam_python.

``ztgpu install --pam SERVICE --pam-module exec`` writes the ``pam_exec`` wrapper
into the hooks directory; the stack lines then read::

    account  required  pam_exec.so stdout quiet /usr/libexec/ztgpu/pam_exec socket=...
    session  required  pam_exec.so stdout quiet /usr/libexec/ztgpu/pam_exec socket=...

pam_exec runs the wrapper as a child of the process that opened the PAM
session (sshd's ``[priv]`` process), with ``PAM_TYPE``, ``PAM_USER``,
``PAM_RHOST`` and ``PAM_SERVICE`` in its environment; the agent therefore
adopts the wrapper's *parent*. What the user should read goes to stdout
(``stdout`` shows it through the PAM conversation); exit 0 lets the login
on, anything else refuses it. Options are those of :mod:`ztgpu.pam.session`.
"""

from __future__ import annotations

import os
import sys

from ztgpu.pam.session import account, close_session, log_line, open_session

EXIT_ALLOWED = 0
EXIT_REFUSED = 1


def main(argv: list[str]) -> int:
    try:
        phase = os.environ.get("PAM_TYPE", "")
        user = os.environ.get("PAM_USER", "")
        rhost = os.environ.get("PAM_RHOST", "")
        service = os.environ.get("PAM_SERVICE", "") or "sshd"
        if phase == "account":
            outcome = account(argv, user, rhost, service)
        elif phase == "open_session":
            outcome = open_session(argv, user, rhost, service, "parent")
        elif phase == "close_session":
            outcome = close_session(argv, user, rhost, service, "parent")
        else:  # never "auth": a success there could stand in for a password
            log_line(None, f"pam_exec: PAM_TYPE {phase!r} is not handled (use it for account "
                     f"and session only); refused", error=True)
            return EXIT_REFUSED
        if outcome.message:
            print(outcome.message, flush=True)
        return EXIT_ALLOWED if outcome.allowed else EXIT_REFUSED
    except Exception as exc:  # noqa: BLE001 - a bug here must still refuse, and be found
        import traceback

        log_line(None, f"pam_exec: internal error, refused: {exc!r}\n{traceback.format_exc()}",
                 error=True)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
