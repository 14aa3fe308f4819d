"""Identity proof with MUNGE: the client encodes, ztgpu-authd decodes.

:func:`encode` runs ``munge`` as the calling user; the credential it returns
names that user's uid and gid, sealed by munged with the site key.
:func:`decode` runs ``unmunge`` against a munged holding the same key and
returns who made the credential, when, and its payload. Payloads and
credentials travel on stdin only, never in argv (which every local user can
read in ``/proc/<pid>/cmdline``). Every call has a deadline; on expiry the
child's process group is killed. Standard library only: the ``ztgpu login``
client imports this module on every run.

Every failure raises :class:`MungeError` with a stable ``code``:

* ``"invalid"``: the credential is malformed, forged, made with another key,
  or restricted to another user (munge statuses 2-4, 8-14 and 18), or the
  input was rejected before munge ran;
* ``"expired"`` (15), ``"rewound"`` (16, encoded in munged's future),
  ``"replayed"`` (17);
* ``"unavailable"``: munge is not installed, munged cannot be reached
  (status 6), munge failed internally (1, 5), or its output was unreadable;
* ``"timeout"``: the deadline passed (or munge reported status 7).

Observed on Debian 12 with munge 0.5.15 against a private munged:

* Replay: decoding the same credential a second time against the same munged
  exits 17 with ``STATUS: Replayed credential (17)`` and *still prints the
  metadata and payload*; only the exit status tells them apart, so nothing
  from a non-zero exit is returned. The replay cache lives in that one
  munged, so decode every credential on the same daemon.
* Expiry: a credential made with ``-t 1`` and decoded 2.5 s later exits 15
  with ``STATUS: Expired credential (15)``, again with metadata and payload.
* A credential from a munged with another key exits 14 ("Invalid
  credential"); garbage after ``MUNGE:`` exits 8 ("Bad credential"); one made
  with ``-u`` for another uid exits 18 ("Unauthorized credential"), even for
  root.
* No socket: exit 6 at once ("Failed to access ... Did you start munged?").
  A socket nobody listens on: exit 6 after about 2.2 s of retries. A socket
  that accepts but never answers: munge gives up after about 10 s, exit 6,
  so the default 5 s deadline here fires first and reports ``"timeout"``.
* A TTL above munged's ``--max-ttl`` (3600 s by default) is clamped without
  an error; :attr:`MungeCredential.ttl_s` is the TTL munged applied.
* root may encode a credential naming any uid (``munge -U``), so a decoded
  uid proves "this uid, or root". :func:`encode` offers no such option.
* A 12,000-byte payload makes a 16,144-character credential; a payload of
  2 MB fails with status 1 ("Exceeded maximum memory allocation").
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Literal

from ztgpu.errors import Fault

if TYPE_CHECKING:  # annotations only: pathlib costs the login client ~3 ms to import
    from pathlib import Path

MungeErrorCode = Literal["expired", "replayed", "rewound", "invalid", "unavailable", "timeout"]

#: The longest credential :func:`decode` accepts (and :func:`encode` returns).
MAX_CREDENTIAL_LEN: Final = 16 * 1024
MUNGE: Final = "munge"
UNMUNGE: Final = "unmunge"
_DEFAULT_TIMEOUT_S: Final = 5.0
_STDERR_LIMIT: Final = 300
# munge's armor: "MUNGE:" + base64 + ":" (a subset of printable ASCII).
_CREDENTIAL_RE: Final = re.compile(r"MUNGE:[A-Za-z0-9+/=]+:", re.ASCII)

# munge_err_t (munge.h): the exit status of munge/unmunge and unmunge's STATUS.
_STATUS: Final[dict[int, tuple[MungeErrorCode, str]]] = {
    1: ("unavailable", "Internal error"),
    2: ("invalid", "Invalid argument"),
    3: ("invalid", "Exceeded maximum message length"),
    4: ("invalid", "Buffer overflow"),
    5: ("unavailable", "Out of memory"),
    6: ("unavailable", "Socket communication error"),
    7: ("timeout", "Socket timeout"),
    8: ("invalid", "Bad credential"),
    9: ("invalid", "Bad credential version"),
    10: ("invalid", "Bad credential cipher type"),
    11: ("invalid", "Bad credential MAC type"),
    12: ("invalid", "Bad credential compression type"),
    13: ("invalid", "Bad credential security realm"),
    14: ("invalid", "Invalid credential"),
    15: ("expired", "Expired credential"),
    16: ("rewound", "Rewound credential"),
    17: ("replayed", "Replayed credential"),
    18: ("invalid", "Unauthorized credential"),
}
# Codes whose stderr helps an operator (socket path, munged not started).
_SERVICE_CODES: Final = frozenset({"unavailable", "timeout"})


class MungeError(Fault):
    """munge or unmunge failed, or a credential was rejected.

    ``code`` is one of :data:`MungeErrorCode`; ``status`` is munge's numeric
    status where munge gave one. The message never contains the credential
    or the payload.
    """

    def __init__(self, code: MungeErrorCode, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.code: MungeErrorCode = code
        self.status = status


@dataclass(frozen=True)
class MungeCredential:
    """A credential munged accepted: who encoded it, where, when, and what it carries."""

    uid: int
    gid: int
    payload: bytes = field(repr=False)
    #: When munged sealed it (UTC, whole seconds).
    encoded_at: datetime
    #: The lifetime munged applied (after clamping to its --max-ttl).
    ttl_s: int
    #: The origin address recorded in the credential (numeric, as unmunge -N prints it).
    host: str

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.encoded_at.timestamp() + self.ttl_s, tz=UTC)


def check_credential(credential: object) -> str:
    """Return *credential* if it is a well-formed munge credential string.

    Well-formed: a ``str`` of at most :data:`MAX_CREDENTIAL_LEN` characters,
    ``MUNGE:`` then base64 then ``:``, nothing else (no whitespace, no
    newline). Raises MungeError("invalid") otherwise, without echoing it.
    """
    if not isinstance(credential, str):
        raise MungeError("invalid", "munge credential must be a string")
    if len(credential) > MAX_CREDENTIAL_LEN:
        raise MungeError("invalid", f"munge credential is longer than {MAX_CREDENTIAL_LEN} "
                                    "characters")
    if not _CREDENTIAL_RE.fullmatch(credential):
        raise MungeError("invalid", "munge credential is malformed (expected 'MUNGE:<base64>:' "
                                    "in printable ASCII on one line)")
    return credential


def encode_argv(*, socket: Path | None = None, ttl_s: int | None = None) -> list[str]:
    """The ``munge`` command line :func:`encode` runs (the payload goes on stdin)."""
    argv = [MUNGE]
    if socket is not None:
        argv += ["-S", str(socket)]
    if ttl_s is not None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
            raise ValueError(f"ttl_s must be a positive whole number of seconds, not {ttl_s!r}")
        argv += ["-t", str(ttl_s)]
    return argv


def decode_argv(*, socket: Path | None = None) -> list[str]:
    """The ``unmunge`` command line :func:`decode` runs (the credential goes on stdin).

    ``-N`` prints numbers only: no name-service or reverse-DNS lookups.
    """
    argv = [UNMUNGE, "-N"]
    if socket is not None:
        argv += ["-S", str(socket)]
    return argv


def encode(payload: bytes, *, socket: Path | None = None, ttl_s: int | None = None,
           timeout_s: float = _DEFAULT_TIMEOUT_S) -> str:
    """Seal *payload* in a credential naming the calling process's uid and gid.

    *socket* is munged's socket (munge's default when None); *ttl_s* the
    lifetime (munged's default, 300 s, when None). Returns the credential
    (``MUNGE:...:``, no newline). Raises MungeError: "invalid" for a payload
    whose credential would exceed :data:`MAX_CREDENTIAL_LEN`, otherwise the
    code for munge's status, with munge's own message.
    """
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    if len(payload) > MAX_CREDENTIAL_LEN:
        raise MungeError("invalid", f"munge payload of {len(payload)} bytes cannot fit in a "
                                    f"credential of {MAX_CREDENTIAL_LEN} characters")
    argv = encode_argv(socket=socket, ttl_s=ttl_s)
    rc, out, err = _run(argv, payload, timeout_s)
    if rc != 0:
        code, text = _STATUS.get(rc, ("unavailable", "munge failed"))
        detail = _stderr_text(err) or text
        raise MungeError(code, f"munge could not encode a credential: {detail} (status {rc})",
                         status=rc if rc in _STATUS else None)
    credential = out.decode("ascii", errors="replace").strip()
    if len(credential) > MAX_CREDENTIAL_LEN:
        raise MungeError("invalid", f"munge payload of {len(payload)} bytes makes a credential "
                                    f"longer than {MAX_CREDENTIAL_LEN} characters")
    try:
        return check_credential(credential)
    except MungeError as exc:
        raise MungeError("unavailable", "munge printed something that is not a credential") \
            from exc


def decode(credential: str, *, socket: Path | None = None,
           timeout_s: float = _DEFAULT_TIMEOUT_S) -> MungeCredential:
    """Have munged verify *credential*; return its encoder's identity and payload.

    The credential is checked with :func:`check_credential` before unmunge
    runs. A credential munged accepts is recorded in its replay cache, so a
    second decode on the same munged fails with "replayed". Raises
    MungeError with the code for munge's status; the message names the
    status, never the credential.
    """
    check_credential(credential)
    argv = decode_argv(socket=socket)
    rc, out, err = _run(argv, credential.encode("ascii"), timeout_s)
    if rc != 0:
        code, text = _STATUS.get(rc, ("unavailable", "unmunge failed"))
        message = f"munge credential not accepted: {text} (status {rc})"
        if code in _SERVICE_CODES:
            detail = _stderr_text(err).replace(credential, "<credential>")
            message = f"munged could not decode the credential: {detail or text} (status {rc})"
        raise MungeError(code, message, status=rc if rc in _STATUS else None)
    return _parse_decoded(out)


def _parse_decoded(out: bytes) -> MungeCredential:
    """Parse ``unmunge -N`` output: ``KEY: value`` lines, a blank line, the payload."""
    head, sep, payload = out.partition(b"\n\n")
    if not sep:
        raise MungeError("unavailable", "unmunge printed no metadata/payload separator")
    fields: dict[str, str] = {}
    for line in head.decode("ascii", errors="replace").split("\n"):
        key, colon, value = line.partition(":")
        if colon:
            fields[key.strip()] = value.strip()
    try:
        status = int(fields["STATUS"])
        uid, gid = int(fields["UID"]), int(fields["GID"])
        encoded = int(fields["ENCODE_TIME"])
        ttl_s, length = int(fields["TTL"]), int(fields["LENGTH"])
        host = fields["ENCODE_HOST"]
    except (KeyError, ValueError) as exc:
        raise MungeError("unavailable", f"unmunge output lacks a readable field: {exc}") from None
    if status != 0:
        code, text = _STATUS.get(status, ("invalid", "unknown status"))
        raise MungeError(code, f"munge credential not accepted: {text} (status {status})",
                         status=status)
    if length != len(payload):
        raise MungeError("unavailable", f"unmunge reported a {length}-byte payload but printed "
                                        f"{len(payload)} bytes")
    return MungeCredential(uid=uid, gid=gid, payload=payload,
                           encoded_at=datetime.fromtimestamp(encoded, tz=UTC),
                           ttl_s=ttl_s, host=host)


def _stderr_text(err: bytes) -> str:
    text = " ".join(err.decode("utf-8", errors="replace").split())
    return text[:_STDERR_LIMIT]


def _run(argv: list[str], stdin: bytes, timeout_s: float) -> tuple[int, bytes, bytes]:
    """Run *argv* with *stdin* in its own session; kill the session at the deadline."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, not {timeout_s!r}")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise MungeError("unavailable", f"cannot run {argv[0]}: {exc.strerror or exc} "
                                        "(is munge installed?)") from exc
    try:
        out, err = proc.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise MungeError("timeout", f"{argv[0]} did not finish within {timeout_s:g}s "
                                    "(is munged responding?)") from None
    except BaseException:
        _kill(proc)
        raise
    return proc.returncode, out, err


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(OSError, ValueError, subprocess.TimeoutExpired):
        proc.communicate(timeout=5)
