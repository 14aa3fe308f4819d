"""The GPU device files Slurm numbers on a node, in Slurm's order, from gres.conf.

Slurm gives a node's GPUs the gres indices 0, 1, ... (what ``SLURM_JOB_GPUS``
carries) in the order its gres.conf parser yields their device files. The
node agent maps index *i* to a device file by its own rule; :func:`gpu_files`
reads gres.conf the way slurmd does (``src/interfaces/gres.c``,
``src/common/parse_config.c`` and ``src/common/hostlist.c``; the same in
Slurm 22.05 and 26.x) so that the agent can check its rule at start:

* keys are case-insensitive; ``#`` starts a comment unless escaped with a
  backslash; a trailing backslash continues a line; a value may be
  double-quoted;
* a line starts with ``Name=``, ``NodeName=`` or (alone) ``AutoDetect=``;
  ``NodeName=<hostlist>`` limits the line to those nodes;
* ``File=/dev/nvidia[0-3]`` expands a range in ascending order, while a
  comma list (``/dev/nvidia1,/dev/nvidia0``) keeps the order written;
* all lines that start with ``Name=`` come first, then all lines that start
  with ``NodeName=``, each group in file order: Slurm collects the two kinds
  of line separately, so a file that mixes them is not numbered top to
  bottom.

What gres.conf alone cannot tell (the caller must allow for it):

* with an AutoDetect mechanism on (anything but ``off``) slurmd sorts the
  GPUs itself, by file name and then in the order NVML (RSMI, ...) finds
  them: :attr:`GresGpuFiles.in_index_order` is False then;
* slurmd skips a listed file it cannot ``stat()`` and gives the files after
  it the next lower indices, so every listed file must exist;
* the node's ``Gres=gpu:N`` in slurm.conf keeps only the first N files.

Where the file does not give one device file per index, :func:`gpu_files`
raises :class:`~ztgpu.errors.ConfigError` rather than guess: ``Include``
(not followed), ``MultipleFiles=`` (one index, several files: MIG), GPUs of
several ``Type=`` (numbered in the order of slurm.conf's types), and every
line slurmd itself would refuse. Keys this module does not use are ignored.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from ztgpu.errors import ConfigError
from ztgpu.slurm.env import printable

__all__ = ["AUTODETECT_VALUES", "MAX_GPU_FILES", "GresGpuFiles", "gpu_files"]

#: The AutoDetect= values gres.conf(5) documents (Slurm 22.05 to 26.x).
AUTODETECT_VALUES = frozenset({"full", "nrt", "nvidia", "nvml", "off", "oneapi", "rsmi"})
#: Slurm allows at most 1024 File= entries per node (gres.conf(5), Count).
MAX_GPU_FILES = 1024
# Slurm's MAX_RANGE (src/common/hostlist.h): the most names one range gives.
_MAX_RANGE = 64 * 1024

_SPACE = " \t\n\r\f\v"
# One Key=Value pair, as keyvalue_pattern in Slurm's parse_config.c matches it.
_PAIR_RE = re.compile(r'\s*([A-Za-z0-9_.]+)\s*([-*+/]?)=\s*(?:"([^"]*)"|(\S+))(?=\s|\Z)',
                      re.ASCII)
_INCLUDE_RE = re.compile(r"\s*include(?:\s|\Z)", re.ASCII | re.IGNORECASE)
_GROUP_RE = re.compile(r"\[([^\[\]]*)\]")
_RANGE_RE = re.compile(r"([0-9]+)(?:-([0-9]+))?", re.ASCII)
_COUNT_RE = re.compile(r"([0-9]{1,19})([KMGTP]?)", re.ASCII | re.IGNORECASE)
_LINE_KEYS = ("name", "nodename", "autodetect")
_HOST_SEPARATORS = ", \t\n"


@dataclass(frozen=True)
class GresGpuFiles:
    """This node's GPU device files, as gres.conf gives them to Slurm.

    ``files`` are the files of the ``Name=gpu`` lines that apply to the node
    in the order Slurm's parser yields them (see the module docstring): no
    file twice, at most :data:`MAX_GPU_FILES`, each an absolute path. A
    ``Name=gpu`` line without ``File=`` adds none. ``autodetect`` is the
    lower-cased AutoDetect= value in force for the node: its node-specific
    one, else the global one, else None.
    """

    path: Path
    files: tuple[Path, ...]
    autodetect: str | None

    @property
    def in_index_order(self) -> bool:
        """True when ``files[i]`` is Slurm's gres index *i*: AutoDetect unset or ``off``.

        With a mechanism on, slurmd re-sorts the GPUs (by file name, then in
        the order the vendor library enumerates them), which gres.conf
        cannot tell.
        """
        return self.autodetect in (None, "off")


def gpu_files(path: Path, node_name: str) -> GresGpuFiles | None:
    """Read gres.conf at *path* for the node *node_name* (slurmd's NodeName).

    Returns None when *path* does not exist. ``NodeName=`` host lists match
    *node_name* exactly (``gpu[01-04]`` gives ``gpu01``, not ``gpu1``). Lines
    for other nodes must still be ``Key=Value`` pairs with a valid host list;
    their values are not checked further (slurmd on this node does not
    either).

    Raises:
        ConfigError: the file cannot be read or is not UTF-8; or a line
            slurmd would refuse (not ``Key=Value``, a malformed or reversed
            range such as ``[3-1]``, a first key other than Name, NodeName or
            AutoDetect, a key given twice, ``Count=`` not matching ``File=``,
            a device file listed twice, conflicting AutoDetect= values, an
            unknown AutoDetect= value); or a line this check cannot map to
            one file per index (``Include``, ``MultipleFiles=``, a relative
            ``File=`` path, ``Name=GPU`` in another case, AutoDetect= on a
            ``Name=`` line, which Slurm ignores, or, with AutoDetect unset or
            off, GPUs of several ``Type=``). The message names the file and
            the line number.
        ValueError: *node_name* is empty (a programming error).
    """
    if not node_name:
        raise ValueError("node_name must not be empty")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
    reader = _Reader(node_name)
    for lineno, body in _logical_lines(text):
        try:
            reader.line(lineno, body)
        except _Bad as exc:
            raise ConfigError(f"{path}: line {lineno}: {exc}") from None
    try:
        return reader.result(path)
    except _Bad as exc:
        raise ConfigError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------
# Lines and pairs


class _Bad(Exception):
    """Invalid content; gpu_files adds the file name and line number."""


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(number of the first physical line, text) per line Slurm parses.

    As parse_config.c: only "\\n" ends a line (fgets), comments go first,
    then an odd run of trailing backslashes joins the next line, then every
    backslash is dropped and the character after it kept.
    """
    physical = text.split("\n")
    if physical[-1] == "":
        physical.pop()
    result: list[tuple[int, str]] = []
    index = 0
    while index < len(physical):
        first = index + 1
        pieces: list[str] = []
        while index < len(physical):
            raw = physical[index]
            index += 1
            body = raw[: _comment_start(raw)]
            joined = _continued(body)
            if joined is None:
                pieces.append(body)
                break
            pieces.append(joined)
        result.append((first, re.sub(r"\\(.?)", r"\1", "".join(pieces), flags=re.DOTALL)))
    return result


def _comment_start(raw: str) -> int:
    """Index of the '#' that starts a comment (not escaped), or len(raw)."""
    backslashes = 0
    for index, char in enumerate(raw):
        if char == "#" and backslashes % 2 == 0:
            return index
        backslashes = backslashes + 1 if char == "\\" else 0
    return len(raw)


def _continued(body: str) -> str | None:
    """*body* without its continuation backslash, or None when it does not continue."""
    trimmed = body.rstrip(_SPACE)
    run = len(trimmed) - len(trimmed.rstrip("\\"))
    return trimmed[:-1] if run % 2 == 1 else None


def _pairs(body: str) -> list[tuple[str, str, str]]:
    """(lower-cased key, key as written, value) for each pair, in order."""
    pairs: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    pos = 0
    while body[pos:].strip(_SPACE):
        match = _PAIR_RE.match(body, pos)
        if match is None:
            raise _Bad(f"expected Key=Value, got {printable(body[pos:].strip(_SPACE))}")
        key, operator = match.group(1), match.group(2)
        if operator:
            raise _Bad(f"{key}{operator}= is not supported in gres.conf; write {key}=")
        if key.lower() in seen:
            raise _Bad(f"{key}= is given twice")
        seen.add(key.lower())
        quoted, bare = match.group(3), match.group(4)
        pairs.append((key.lower(), key, quoted if quoted is not None else bare))
        pos = match.end()
    return pairs


def _count(value: str) -> int:
    """A Count= value: digits with an optional K, M, G, T or P (powers of 1024)."""
    match = _COUNT_RE.fullmatch(value)
    if match is None:
        raise _Bad(f"Count={printable(value)} is not a number")
    power = " KMGTP".index(match.group(2).upper() or " ")
    return int(match.group(1)) << (10 * power)


# --------------------------------------------------------------------------
# Host lists (NodeName=, File=), as src/common/hostlist.c reads them


@dataclass(frozen=True)
class _Range:
    lo: int
    hi: int
    #: Digits of ``lo`` as written: numbers are zero-padded to this width.
    width: int

    def names(self) -> list[str]:
        return [f"{n:0{self.width}d}" for n in range(self.lo, self.hi + 1)]


_Segment: TypeAlias = str | tuple[_Range, ...]
_Pattern: TypeAlias = tuple[_Segment, ...]


def _patterns(text: str) -> list[_Pattern]:
    """Parse a host list: comma- or blank-separated names, each with ``[ranges]`` groups."""
    tokens: list[str] = []
    current: list[str] = []
    in_group = False
    for char in text:
        if char == "[":
            if in_group:
                raise _Bad(f"nested '[' in {printable(text)}")
            in_group = True
        elif char == "]":
            if not in_group:
                raise _Bad(f"']' without '[' in {printable(text)}")
            in_group = False
        elif char in _HOST_SEPARATORS and not in_group:
            if current:
                tokens.append("".join(current))
                current = []
            continue
        current.append(char)
    if in_group:
        raise _Bad(f"'[' without ']' in {printable(text)}")
    if current:
        tokens.append("".join(current))
    if not tokens:
        raise _Bad(f"empty list {printable(text)}")
    return [_pattern(token) for token in tokens]


def _pattern(token: str) -> _Pattern:
    segments: list[_Segment] = []
    pos = 0
    for match in _GROUP_RE.finditer(token):
        if match.start() > pos:
            segments.append(token[pos:match.start()])
        segments.append(_ranges(match.group(1), token))
        pos = match.end()
    if pos < len(token):
        segments.append(token[pos:])
    return tuple(segments)


def _ranges(group: str, token: str) -> tuple[_Range, ...]:
    ranges: list[_Range] = []
    for part in group.split(","):
        match = _RANGE_RE.fullmatch(part)
        if match is None:
            raise _Bad(f"{printable(token)}: {printable(part)} is not a number or "
                       f"a range such as 0-3")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise _Bad(f"{printable(token)}: range {part} runs backwards")
        if hi - lo + 1 > _MAX_RANGE:
            raise _Bad(f"{printable(token)}: range {part} has more than {_MAX_RANGE} numbers")
        ranges.append(_Range(lo, hi, len(match.group(1))))
    return tuple(ranges)


def _expand(text: str, limit: int) -> list[str]:
    """Every name of host list *text*, in Slurm's order (rightmost group fastest)."""
    names: list[str] = []
    for pattern in _patterns(text):
        total = 1
        for segment in pattern:
            if not isinstance(segment, str):
                total *= sum(r.hi - r.lo + 1 for r in segment)
        if len(names) + total > limit:
            raise _Bad(f"{printable(text)} names more than {limit} files")
        choices = [[segment] if isinstance(segment, str)
                   else [name for r in segment for name in r.names()]
                   for segment in pattern]
        names.extend("".join(parts) for parts in itertools.product(*choices))
    return names


def _matches(text: str, name: str) -> bool:
    """True when host list *text* names *name* (exactly, padding included)."""
    return any(_match(pattern, 0, name, 0) for pattern in _patterns(text))


def _match(pattern: _Pattern, seg: int, name: str, pos: int) -> bool:
    if seg == len(pattern):
        return pos == len(name)
    segment = pattern[seg]
    if isinstance(segment, str):
        return name.startswith(segment, pos) and _match(pattern, seg + 1, name, pos + len(segment))
    end = pos
    while end < len(name) and name[end] in "0123456789":
        end += 1
    for stop in range(pos + 1, end + 1):
        digits = name[pos:stop]
        number = int(digits)
        if (any(r.lo <= number <= r.hi and f"{number:0{r.width}d}" == digits for r in segment)
                and _match(pattern, seg + 1, name, stop)):
            return True
    return False


# --------------------------------------------------------------------------
# The file, line by line


@dataclass(frozen=True)
class _GpuLine:
    lineno: int
    files: tuple[Path, ...]
    type_name: str | None


@dataclass
class _Reader:
    node: str
    # Slurm keeps the two kinds of line in separate arrays, Name= first.
    name_lines: list[_GpuLine] = field(default_factory=list)
    node_lines: list[_GpuLine] = field(default_factory=list)
    seen: dict[Path, int] = field(default_factory=dict)
    global_autodetect: tuple[str, int] | None = None
    local_autodetect: tuple[str, int] | None = None

    def line(self, lineno: int, body: str) -> None:
        if not body.strip(_SPACE):
            return
        if _INCLUDE_RE.match(body):
            raise _Bad("Include is not followed by this check; put the node's GPU lines "
                       "in this file")
        pairs = _pairs(body)
        first, first_key, first_value = pairs[0]
        if first not in _LINE_KEYS:
            raise _Bad(f"a line must start with Name=, NodeName= or AutoDetect=, "
                       f"not {first_key}= (slurmd refuses it)")
        rest = {key: (written, value) for key, written, value in pairs[1:]}
        if "nodename" in rest:
            raise _Bad("NodeName= must be the first key on its line")
        if first == "autodetect":
            if rest:
                raise _Bad("a line that starts with AutoDetect= must hold nothing else "
                           "(start it with NodeName= to combine them)")
            self.global_autodetect = _agree(self.global_autodetect, first_value, lineno)
            return
        if first == "name":
            if "autodetect" in rest:
                raise _Bad("AutoDetect= on a line that starts with Name= has no effect in "
                           "Slurm; start the line with NodeName=")
            self._gpu_line(lineno, first_key, first_value, rest, self.name_lines)
            return
        if not _matches(first_value, self.node):
            return
        if "autodetect" in rest:
            self.local_autodetect = _agree(self.local_autodetect, rest["autodetect"][1], lineno)
        if "name" in rest:
            written, value = rest["name"]
            self._gpu_line(lineno, written, value, rest, self.node_lines)
        elif "autodetect" not in rest:
            raise _Bad("a NodeName= line needs Name= (or AutoDetect=)")

    def _gpu_line(self, lineno: int, key: str, name: str, rest: dict[str, tuple[str, str]],
                  lines: list[_GpuLine]) -> None:
        if name.lower() != "gpu":
            return
        if name != "gpu":
            raise _Bad(f"{key}={printable(name)}: write Name=gpu (slurmd compares the name "
                       f"case-sensitively when it maps GPU device files)")
        if "file" in rest and "files" in rest:
            raise _Bad("File= and Files= are the same key; give one")
        spec = rest.get("file", rest.get("files"))
        if "multiplefiles" in rest:
            if spec is not None:
                raise _Bad("File= and MultipleFiles= are mutually exclusive")
            raise _Bad("MultipleFiles= gives one GPU index several device files (MIG); "
                       "this check needs one file per index")
        type_name = rest["type"][1] if "type" in rest else None
        if spec is None:
            lines.append(_GpuLine(lineno, (), type_name))
            return
        files: list[Path] = []
        for entry in _expand(spec[1], MAX_GPU_FILES):
            if not entry.startswith("/"):
                raise _Bad(f"{spec[0]}= entry {printable(entry)} is not an absolute path")
            path = Path(entry)
            if path in self.seen:
                raise _Bad(f"{path} is listed twice (also on line {self.seen[path]})")
            self.seen[path] = lineno
            files.append(path)
        if "count" in rest and _count(rest["count"][1]) != len(files):
            raise _Bad(f"{rest['count'][0]}={printable(rest['count'][1])} does not match "
                       f"the {len(files)} file(s) of {spec[0]}=")
        lines.append(_GpuLine(lineno, tuple(files), type_name))

    def result(self, path: Path) -> GresGpuFiles:
        chosen = self.local_autodetect or self.global_autodetect
        lines = self.name_lines + self.node_lines
        found = GresGpuFiles(path=path, files=tuple(f for line in lines for f in line.files),
                             autodetect=chosen[0] if chosen else None)
        if len(found.files) > MAX_GPU_FILES:
            raise _Bad(f"more than {MAX_GPU_FILES} GPU files for node {self.node}")
        types = {line.type_name.lower() if line.type_name else None for line in lines}
        if found.in_index_order and len(types) > 1:
            shown = ", ".join(sorted(t or "(none)" for t in types))
            numbers = ", ".join(str(line.lineno) for line in lines)
            raise _Bad(f"lines {numbers}: GPUs of several Type= ({shown}): Slurm numbers "
                       f"them in the order of the node's Gres= types in slurm.conf, which "
                       f"this check does not read")
        return found


def _agree(previous: tuple[str, int] | None, value: str, lineno: int) -> tuple[str, int]:
    """The AutoDetect= *value* (lower-cased), which must match an earlier one."""
    lower = value.lower()
    if lower not in AUTODETECT_VALUES:
        raise _Bad(f"AutoDetect={printable(value)} is not one of "
                   f"{', '.join(sorted(AUTODETECT_VALUES))}")
    if previous is not None and previous[0] != lower:
        raise _Bad(f"AutoDetect={value} conflicts with AutoDetect={previous[0]} "
                   f"on line {previous[1]}")
    return previous or (lower, lineno)
