"""Plan and apply the suite's settings in slurm.conf.

``ztgpu install --slurm-conf PATH`` uses this module. It has two layers:

* :func:`plan` is pure: slurm.conf text in, new text and warnings out. It
  understands just enough of Slurm's parser (``src/common/parse_config.c``)
  to find top-level parameters: ``#`` starts a comment unless escaped with a
  backslash, a trailing backslash continues a line, keys are
  case-insensitive, one line may carry several ``Key=Value`` pairs, values
  may be double-quoted, ``Include FILE`` pulls in another file.
* :func:`install` reads the file, calls :func:`plan`, shows a unified diff
  and, unless it is a dry run, keeps a backup and replaces the file
  atomically.

Edits are conservative. A managed key already set to the wanted value on a
line of its own is left exactly as it is. Every other line keeps its bytes,
its position and its line ending. Anything the planner cannot edit safely
(a managed key sharing a line with other settings, on a continued line, set
with ``+=``, or on a line it cannot parse) is refused with a
:class:`~ztgpu.errors.ConfigError` naming the line, so the admin fixes it by
hand instead of the tool guessing.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ztgpu.errors import ConfigError, Fault, UsageError

__all__ = [
    "InstallResult",
    "Plan",
    "SlurmConfChange",
    "gate_changes",
    "install",
    "plan",
    "suite_changes",
]

_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_FLAG_RE = re.compile(r"[A-Za-z0-9_.:/-]+")  # flag words and plugin names
_MARKER_RE = re.compile(r"[A-Za-z0-9_.-]+")
# Characters a value we write may not contain: Slurm gives '#' and '\' a
# meaning even inside quotes, and a '"' cannot be quoted at all.
_UNWRITABLE_RE = re.compile(r'[#\\"\x00-\x1f\x7f]')
# One Key=Value pair as Slurm's own regex in parse_config.c matches it,
# including the "+=", "-=", "*=" and "/=" operators.
_PAIR_RE = re.compile(r'\s*([A-Za-z0-9_.]+)\s*([-*+/]?)=\s*(?:"([^"]*)"|(\S+))(?=\s|$)')
_INCLUDE_RE = re.compile(r"\s*include\s", re.IGNORECASE)
# Keys that open a multi-key record (a node, partition, ...), never a
# top-level parameter this module could manage.
_RECORD_KEYS = frozenset(
    {"nodename", "partitionname", "nodeset", "downnodes", "frontendname", "include"}
)
# Flag pairs slurmctld refuses to start with ("fatal: PrologFlags invalid
# combination", src/common/read_config.c; seen with Slurm 22.05). Adding a
# flag must not produce one of them.
_CONFLICTING_FLAGS: dict[str, tuple[tuple[str, str], ...]] = {
    "prologflags": (("nohold", "contain"), ("nohold", "x11")),
}


@dataclass(frozen=True)
class SlurmConfChange:
    """One top-level slurm.conf parameter the suite wants.

    Exactly one way of changing it is given:

    * ``value``: the parameter is set to exactly this value;
    * ``value`` with ``only_if_absent=True``: the parameter is added with this
      value only when slurm.conf does not set it at all; an existing setting
      is the admin's choice and stays;
    * ``ensure_flags``: for a comma-separated flag list (``PrologFlags``): the
      existing flags stay, the missing ones (compared case-insensitively) are
      appended.

    ``key`` is written with the spelling given here. Raises ``ValueError``
    for a change that could not be written safely (a programming error, not
    a user error).
    """

    key: str
    value: str | None = None
    ensure_flags: tuple[str, ...] = ()
    only_if_absent: bool = False

    def __post_init__(self) -> None:
        if not _KEY_RE.fullmatch(self.key) or self.key.lower() in _RECORD_KEYS:
            raise ValueError(f"not a top-level slurm.conf parameter name: {self.key!r}")
        if (self.value is None) == (not self.ensure_flags):
            raise ValueError(f"{self.key}: give exactly one of value or ensure_flags")
        if self.only_if_absent and self.value is None:
            raise ValueError(f"{self.key}: only_if_absent needs a value")
        if self.value is not None and (
            not self.value.strip()
            or self.value != self.value.strip()
            or _UNWRITABLE_RE.search(self.value)
        ):
            raise ValueError(f"{self.key}: value cannot be written to slurm.conf: {self.value!r}")
        for flag in self.ensure_flags:
            if not _FLAG_RE.fullmatch(flag):
                raise ValueError(f"{self.key}: not a flag name: {flag!r}")


@dataclass(frozen=True)
class Plan:
    """The text slurm.conf should have, and what the admin should check by hand."""

    text: str
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` found and did.

    ``diff`` is a unified diff from the current file to the planned one
    (empty when nothing changes). ``backup`` is the copy of the previous file
    when the file was rewritten, otherwise ``None``.
    """

    diff: str
    changed: bool
    backup: Path | None
    warnings: tuple[str, ...]


def suite_changes(prolog: Path, epilog: Path,
                  task_prolog: Path | None = None) -> tuple[SlurmConfChange, ...]:
    """The slurm.conf settings the ztgpu suite needs, given its hook paths.

    Raises :class:`~ztgpu.errors.UsageError` when a path is not absolute
    (Slurm requires fully qualified hook paths) or contains characters that
    slurm.conf cannot carry.
    """
    hooks = [("prolog", prolog), ("epilog", epilog)]
    if task_prolog is not None:
        hooks.append(("task prolog", task_prolog))
    for name, path in hooks:
        _check_hook_path(name, path)
    task: tuple[SlurmConfChange, ...] = ()
    if task_prolog is not None:
        # TaskProlog runs in every task, as the user, before the user's
        # program starts; ours asks the agent to place the task in the job's
        # devices cgroup first, so that no task ever runs unconfined (this is
        # what keeps ConstrainDevices=no safe).
        task = (SlurmConfChange("TaskProlog", str(task_prolog)),)
    return (
        *task,
        # Set exactly: the node hooks are what grants and revokes GPU access;
        # a different Prolog/Epilog would leave jobs without (or with stale)
        # grants. A replaced site hook is reported as a warning.
        SlurmConfChange("Prolog", str(prolog)),
        SlurmConfChange("Epilog", str(epilog)),
        # Alloc: the node Prolog runs when the job is allocated, before any
        # step (and before the extern step), so the grant exists before
        # anything of the job can start. Contain: Slurm creates the extern
        # step that SSH adoption (pam_slurm_adopt) places logins into.
        # Existing flags (X11, Serial, ...) are site choices and stay; NoHold
        # cannot be combined with Contain, so plan() refuses it by name.
        SlurmConfChange("PrologFlags", ensure_flags=("Alloc", "Contain")),
        # Slurm's default is to wait for a hook forever, which would hang the
        # allocation if a hook hung; ours enforce their own, shorter deadline,
        # so 60 s is a backstop. An admin's existing value is kept.
        SlurmConfChange("PrologEpilogTimeout", "60", only_if_absent=True),
    )


def gate_changes(gate: Path) -> tuple[SlurmConfChange, ...]:
    """The slurm.conf setting of the optional job gate (``ztgpu install --gate``).

    Set exactly, like the node hooks: a site PrologSlurmctld it replaces is
    reported as a warning. slurmctld must be restarted to pick it up
    (``scontrol reconfigure`` is not enough).
    Raises :class:`~ztgpu.errors.UsageError` as :func:`suite_changes` does.
    """
    _check_hook_path("job gate", gate)
    return (SlurmConfChange("PrologSlurmctld", str(gate)),)


def cli_filter_changes() -> tuple[SlurmConfChange, ...]:
    """The slurm.conf setting of the submit-side binding (``ztgpu install
    --cli-filter``): Slurm's Lua cli_filter, which reads ``cli_filter.lua``
    beside slurm.conf. Other cli_filter plugins the site runs stay."""
    return (SlurmConfChange("CliFilterPlugins", ensure_flags=("cli_filter/lua",)),)


def _check_hook_path(name: str, path: Path) -> None:
    text = str(path)
    if not path.is_absolute() or _UNWRITABLE_RE.search(text) or text != text.strip():
        raise UsageError(
            f"{name} path {text!r} must be absolute and free of '#', '\\', '\"' "
            "and control characters"
        )


# --------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class _Physical:
    raw: str  # the line without its line ending
    eol: str  # "\r\n", "\n" or "" (last line without a newline)


@dataclass(frozen=True)
class _Logical:
    first: int  # index of the first physical line
    last: int  # index of the last physical line (continuations)
    body: str  # comments and escapes stripped, continuations joined
    pairs: tuple[tuple[str, str, str], ...]  # (key, operator, value)
    leftover: str  # text that did not parse as Key=Value pairs
    include: bool


def _split_lines(text: str) -> list[_Physical]:
    lines: list[_Physical] = []
    for chunk in _chunks(text):
        if chunk.endswith("\r\n"):
            lines.append(_Physical(chunk[:-2], "\r\n"))
        elif chunk.endswith("\n"):
            lines.append(_Physical(chunk[:-1], "\n"))
        else:
            lines.append(_Physical(chunk, ""))
    return lines


def _chunks(text: str) -> list[str]:
    # Slurm reads with fgets(): only "\n" ends a line (unlike str.splitlines).
    parts = text.split("\n")
    chunks = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        chunks.append(parts[-1])
    return chunks


def _comment_start(raw: str) -> int:
    """Index of the '#' that starts a comment (not escaped), or len(raw)."""
    backslashes = 0
    for index, char in enumerate(raw):
        if char == "#" and backslashes % 2 == 0:
            return index
        backslashes = backslashes + 1 if char == "\\" else 0
    return len(raw)


def _unescape(text: str) -> str:
    # Slurm drops every backslash and keeps the character after it.
    return re.sub(r"\\(.?)", r"\1", text, flags=re.DOTALL)


def _parse_pairs(body: str) -> tuple[tuple[tuple[str, str, str], ...], str]:
    pairs: list[tuple[str, str, str]] = []
    pos = 0
    while pos < len(body) and body[pos:].strip():
        match = _PAIR_RE.match(body, pos)
        if match is None:
            return tuple(pairs), body[pos:].strip()
        quoted, bare = match.group(3), match.group(4)
        pairs.append((match.group(1), match.group(2), quoted if quoted is not None else bare))
        pos = match.end()
    return tuple(pairs), ""


def _logical_lines(lines: Sequence[_Physical]) -> list[_Logical]:
    result: list[_Logical] = []
    index = 0
    while index < len(lines):
        first = index
        pieces: list[str] = []
        while True:
            stripped = lines[index].raw[: _comment_start(lines[index].raw)].rstrip("\r")
            if stripped.endswith("\\") and index + 1 < len(lines):
                pieces.append(stripped[:-1])
                index += 1
                continue
            pieces.append(stripped)
            break
        body = _unescape("".join(pieces))
        include = _INCLUDE_RE.match(body + " ") is not None
        pairs, leftover = ((), "") if include else _parse_pairs(body)
        result.append(_Logical(first, index, body, pairs, leftover, include))
        index += 1
    return result


#: Lines that describe nodes, partitions and the like, not global settings.
_ENTITY_KEYS = frozenset({"nodename", "partitionname", "nodeset", "downnodes", "frontendname",
                          "switchname"})


def settings(text: str) -> dict[str, str]:
    """The global ``Key=Value`` settings of a slurm.conf-style text (slurm.conf,
    cgroup.conf), keys lower-cased, the last value of a key winning as in
    Slurm; node and partition lines and ``Include`` lines are left out."""
    found: dict[str, str] = {}
    for line in _logical_lines(_split_lines(text)):
        if line.include or not line.pairs or line.pairs[0][0].lower() in _ENTITY_KEYS:
            continue
        for key, _, value in line.pairs:
            found[key.lower()] = value
    return found


def _mentions(body: str, key: str) -> bool:
    pattern = r"(?<![A-Za-z0-9_.])" + re.escape(key) + r"\s*[-*+/]?="
    return re.search(pattern, body, re.IGNORECASE) is not None


def _render(value: str) -> str:
    return f'"{value}"' if any(char.isspace() for char in value) else value


def _dominant_eol(lines: Sequence[_Physical]) -> str:
    crlf = sum(1 for line in lines if line.eol == "\r\n")
    lf = sum(1 for line in lines if line.eol == "\n")
    return "\r\n" if crlf > lf else "\n"


# --------------------------------------------------------------------------
# Planning


def plan(text: str, changes: Sequence[SlurmConfChange], marker: str = "ztgpu") -> Plan:
    """Return the slurm.conf text with ``changes`` applied, and warnings.

    Guarantees:

    * idempotent: ``plan(plan(t, c).text, c).text == plan(t, c).text``;
    * a key set several times is updated where Slurm reads it (the last
      time); earlier lines are commented out with a
      ``# (superseded by MARKER install)`` prefix;
    * an updated key keeps its line's position and indentation (and its
      trailing comment when flags are only added), is spelled as in the
      change, and gets a
      ``# managed by MARKER install`` line directly above (once);
    * an absent key is appended under a ``# --- MARKER (managed by MARKER
      install) ---`` block at the end (extended, not repeated, on later runs);
    * a key already set as wanted on a line of its own is not touched;
    * every other line is kept byte for byte, including its line ending;
      new lines use the file's dominant line ending;
    * ``Include`` lines are left alone and reported in ``warnings``, since
      the included files may set the same keys.

    Raises :class:`~ztgpu.errors.ConfigError` naming the line when a managed
    key is on a line with other settings, on a backslash-continued line, set
    with an operator (``+=`` ...) or on a line that does not parse, or when
    the flags would form a combination slurmctld refuses (``PrologFlags``
    with ``NoHold`` and ``Contain``). Raises
    ``ValueError`` for an invalid ``marker`` or two changes to the same key.
    """
    if not _MARKER_RE.fullmatch(marker):
        raise ValueError(f"marker must be letters, digits, '.', '_' or '-': {marker!r}")
    wanted = {change.key.lower(): change for change in changes}
    if len(wanted) != len(changes):
        raise ValueError("two changes name the same key")

    managed_comment = f"# managed by {marker} install"
    header = f"# --- {marker} (managed by {marker} install) ---"
    superseded = f"# (superseded by {marker} install) "

    lines = _split_lines(text)
    eol = _dominant_eol(lines)
    warnings: list[str] = []
    # key (lower case) -> [(physical index, current value)], in file order
    found: dict[str, list[tuple[int, str]]] = {key: [] for key in wanted}

    for logical in _logical_lines(lines):
        lineno = logical.first + 1
        if logical.include:
            names = ", ".join(change.key for change in changes)
            warnings.append(
                f"slurm.conf includes other files (line {lineno}: {logical.body.strip()}): "
                f"check they do not set {names}"
            )
            continue
        if logical.leftover:
            for change in changes:
                if _mentions(logical.body, change.key):
                    raise ConfigError(
                        f"line {lineno}: cannot parse {logical.body.strip()!r}, which sets "
                        f"{change.key}; fix the line by hand and rerun"
                    )
            warnings.append(
                f"line {lineno}: cannot parse {logical.body.strip()!r}; left unchanged "
                "(slurmctld may reject it)"
            )
            continue
        for key, operator, value in logical.pairs:
            if key.lower() not in wanted:
                continue
            if len(logical.pairs) > 1:
                raise ConfigError(
                    f"line {lineno}: {key} shares the line with other settings "
                    f"({logical.body.strip()}); put {key}= on a line of its own and rerun"
                )
            if logical.last != logical.first:
                raise ConfigError(
                    f"line {lineno}: {key} is on a line continued with '\\'; "
                    "join the lines by hand and rerun"
                )
            if operator:
                raise ConfigError(
                    f"line {lineno}: {key}{operator}= cannot be managed; "
                    f"write it as {key}=VALUE and rerun"
                )
            found[key.lower()].append((logical.first, value))

    block = _find_block(lines, header)

    def is_marked(index: int) -> bool:
        if index > 0 and lines[index - 1].raw.strip() == managed_comment:
            return True
        return block is not None and block[0] < index <= block[1]

    replace: dict[int, str] = {}
    insert_above: dict[int, str] = {}
    drop: set[int] = set()
    appended: list[str] = []

    for change in changes:
        occurrences = found[change.key.lower()]
        if not occurrences:
            initial = change.value if change.value is not None else ",".join(change.ensure_flags)
            _check_conflicts(change.key, initial, None)
            appended.append(f"{change.key}={_render(initial)}")
            continue
        if change.only_if_absent:
            continue
        last, current = occurrences[-1]
        new_value = _new_value(change, current)
        if change.ensure_flags:
            _check_conflicts(change.key, current if new_value is None else new_value, last + 1)
        if new_value is None and len(occurrences) == 1:
            continue
        if new_value is not None:
            # A trailing comment described the old value: it stays when flags
            # are only added, and goes when the value is replaced (the
            # warning, the diff and the backup still show it).
            keep_comment = change.value is None
            replace[last] = _rewrite(lines[last].raw, change.key, new_value, keep_comment)
            if change.value is not None:
                warnings.append(
                    f"line {last + 1}: {change.key} was {current!r}, now {new_value!r}"
                )
        if not is_marked(last):
            insert_above[last] = managed_comment
        for index, _ in occurrences[:-1]:
            replace[index] = superseded + lines[index].raw
            if index > 0 and lines[index - 1].raw.strip() == managed_comment:
                drop.add(index - 1)

    out: list[str] = []
    for index, line in enumerate(lines):
        line_eol = line.eol or eol
        if index in drop:
            continue
        if index in insert_above:
            out.append(insert_above[index] + line_eol)
        out.append(replace.get(index, line.raw))
        at_end = index == len(lines) - 1
        out.append(line_eol if line.eol or (appended and at_end) else "")
        if appended and block is not None and index == block[1]:
            out.extend(entry + eol for entry in appended)
    if appended and block is None:
        if lines and lines[-1].raw.strip():
            out.append(eol)
        out.append(header + eol)
        out.extend(entry + eol for entry in appended)
    return Plan("".join(out), tuple(warnings))


def _find_block(lines: Sequence[_Physical], header: str) -> tuple[int, int] | None:
    """(header index, index of the block's last line), or None."""
    starts = [index for index, line in enumerate(lines) if line.raw.strip() == header]
    if not starts:
        return None
    end = starts[-1]
    while end + 1 < len(lines) and lines[end + 1].raw.strip():
        end += 1
    return starts[-1], end


def _new_value(change: SlurmConfChange, current: str) -> str | None:
    """The value ``change`` wants instead of ``current``; None if it is satisfied."""
    if change.value is not None:
        return None if current == change.value else change.value
    flags = [flag.strip() for flag in current.split(",") if flag.strip()]
    have = {flag.lower() for flag in flags}
    missing = [flag for flag in change.ensure_flags if flag.lower() not in have]
    if not missing:
        return None
    return ",".join(flags + missing)


def _check_conflicts(key: str, value: str, lineno: int | None) -> None:
    """Raise ConfigError if ``value`` holds flags slurmctld refuses together."""
    have = {flag.strip().lower(): flag.strip() for flag in value.split(",")}
    for one, other in _CONFLICTING_FLAGS.get(key.lower(), ()):
        if one in have and other in have:
            where = f"line {lineno}: " if lineno is not None else ""
            raise ConfigError(
                f"{where}{key}={value} combines {have[one]} with {have[other]}, which "
                f"slurmctld refuses to start with; remove {have[one]} by hand and rerun"
            )


def _rewrite(raw: str, key: str, value: str, keep_comment: bool) -> str:
    """``raw`` with its setting replaced, keeping indentation (and comment)."""
    cut = _comment_start(raw)
    body, comment = raw[:cut], raw[cut:]
    indent = body[: len(body) - len(body.lstrip())]
    new_body = f"{indent}{key}={_render(value)}"
    if not (keep_comment and comment):
        return new_body
    return new_body + (body[len(body.rstrip()) :] or " ") + comment


# --------------------------------------------------------------------------
# Installing


def install(
    path: Path,
    changes: Sequence[SlurmConfChange],
    *,
    dry_run: bool,
    now: datetime | None = None,
) -> InstallResult:
    """Apply ``changes`` to the slurm.conf at ``path``.

    Always returns the diff and the warnings. With ``dry_run`` nothing is
    written. Otherwise, and only when the text changes:

    * the current file is copied, byte for byte and with its mode and owner,
      to ``NAME.ztgpu-backup-YYYYmmddTHHMMSSZ`` (UTC, from ``now``) in the
      same directory; an existing backup is never overwritten (``.1``,
      ``.2``, ... are tried instead);
    * the new text is written to a temporary file in the same directory,
      given the original's mode, uid and gid, fsynced, and renamed over the
      file, so readers see the old or the new file, never a mix.

    If ``path`` is a symbolic link, the file it points to is edited (and
    backed up next to it) and the link stays.

    Raises :class:`~ztgpu.errors.ConfigError` (naming the path) when the file
    is missing, unreadable, not UTF-8 or refused by :func:`plan`;
    :class:`~ztgpu.errors.Fault` when the backup or the new file cannot be
    written or the file changed while this ran (then the original is
    untouched). Raises ``ValueError`` for a naive ``now``.
    """
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    try:
        original = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read slurm.conf: {exc.strerror or exc}") from exc
    try:
        text = original.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}); convert it and rerun"
        ) from exc
    try:
        planned = plan(text, changes)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc

    changed = planned.text != text
    diff = _diff(text, planned.text, path) if changed else ""
    warnings = planned.warnings
    real = Path(os.path.realpath(path))
    if real != Path(os.path.abspath(path)):
        warnings += (f"{path} is a symbolic link; the file edited is {real}",)
    if dry_run or not changed:
        return InstallResult(diff, changed, None, warnings)

    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        meta = os.stat(real)
    except OSError as exc:
        raise ConfigError(f"{real}: cannot stat: {exc.strerror or exc}") from exc
    backup = _write_backup(real, original, meta, stamp)
    _replace_atomically(real, planned.text.encode("utf-8"), meta, original)
    return InstallResult(diff, True, backup, warnings)


def _diff(old: str, new: str, path: Path) -> str:
    def lines(text: str) -> list[str]:
        return [chunk if chunk.endswith("\n") else chunk + "\n" for chunk in _chunks(text)]

    return "".join(
        difflib.unified_diff(
            lines(old), lines(new), fromfile=f"{path} (current)", tofile=f"{path} (ztgpu)"
        )
    )


def _write_fd(fd: int, data: bytes, meta: os.stat_result) -> None:
    """Write ``data`` to ``fd``, give it ``meta``'s mode and owner, fsync, close."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, meta.st_mode & 0o7777)
        own = os.fstat(fd)
        if (own.st_uid, own.st_gid) != (meta.st_uid, meta.st_gid):
            os.fchown(fd, meta.st_uid, meta.st_gid)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_backup(real: Path, data: bytes, meta: os.stat_result, stamp: str) -> Path:
    base = f"{real.name}.ztgpu-backup-{stamp}"
    for attempt in range(1000):
        candidate = real.with_name(base if attempt == 0 else f"{base}.{attempt}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise Fault(f"{candidate}: cannot create backup: {exc.strerror or exc}") from exc
        try:
            _write_fd(fd, data, meta)
        except OSError as exc:
            candidate.unlink(missing_ok=True)
            raise Fault(f"{candidate}: cannot write backup: {exc.strerror or exc}") from exc
        return candidate
    raise Fault(f"{real.parent}: too many backups named {base}*; remove old ones and rerun")


def _replace_atomically(real: Path, data: bytes, meta: os.stat_result, expected: bytes) -> None:
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{real.name}.ztgpu-", dir=real.parent)
    except OSError as exc:
        raise Fault(f"{real.parent}: cannot create a temporary file: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    try:
        _write_fd(fd, data, meta)
        if real.read_bytes() != expected:
            raise Fault(f"{real}: changed while ztgpu install ran; nothing written, rerun")
        os.replace(tmp, real)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise Fault(f"{real}: cannot write the new file: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(real.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise Fault(f"{real.parent}: new slurm.conf written but not synced: {exc}") from exc
