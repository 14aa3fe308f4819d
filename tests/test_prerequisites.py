"""`make setup` installs everything the harnesses, the demo and the benchmarks start.

A fresh Debian 12 machine once failed `make test` because rsyslog's openssl
driver was used by a harness but installed only by hand on the developers'
machines. These tests make that class of mistake fail here, naming the
package: every prerequisite's package is in the Makefile's list, each is
installed and owned by that package, and no harness code starts a program
the prerequisite table does not list.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from ztgpu.testing import prerequisites
from ztgpu.testing.prerequisites import (
    PREREQUISITES,
    Prerequisite,
    PrerequisiteMissing,
    makefile_packages,
    require,
)

REPO = Path(__file__).resolve().parents[1]
MAKEFILE = REPO / "Makefile"
#: Code that starts external programs: the harnesses, the demo, the tests, the benchmarks.
HARNESS_CODE = [*sorted((REPO / "ztgpu" / "testing").glob("*.py")), REPO / "ztgpu" / "cli" /
                "demo.py", *sorted((REPO / "tests").glob("*.py")),
                *sorted((REPO / "bench").glob("*.py"))]
SUBPROCESS_CALLS = {"run", "Popen", "check_output", "check_call", "call"}


def _dpkg(*args: str) -> str:
    res = subprocess.run(["dpkg-query", *args], capture_output=True, text=True, timeout=30,
                         check=False)
    return res.stdout if res.returncode == 0 else ""


def _owner(path: Path) -> str | None:
    """The Debian package that ships ``path`` (trying its merged-/usr aliases)."""
    candidates = [path, path.resolve()]
    for where in list(candidates):
        for merged, legacy in (("/usr/bin/", "/bin/"), ("/usr/sbin/", "/sbin/"),
                               ("/usr/lib/", "/lib/")):
            if str(where).startswith(merged):
                candidates.append(Path(legacy + str(where)[len(merged):]))
    for where in candidates:
        res = subprocess.run(["dpkg", "-S", str(where)], capture_output=True, text=True,
                             timeout=30, check=False)
        if res.returncode != 0:
            continue
        for line in res.stdout.splitlines():  # skip "diversion by dash from: /bin/sh"
            if not line.startswith(("diversion by", "local diversion")):
                return line.split(":", 1)[0].split(",")[0].strip()
    return None


def _depends(package: str, depth: int = 2) -> set[str]:
    """``package`` and what it depends on, ``depth`` levels down."""
    seen, frontier = {package}, {package}
    for _ in range(depth):
        nxt: set[str] = set()
        for name in frontier:
            for alternative in _dpkg("-W", "-f=${Pre-Depends},${Depends}", name).split(","):
                for dep in alternative.split("|"):
                    word = dep.strip().split(" ")[0].split(":")[0]
                    if word and word not in seen:
                        nxt.add(word)
        seen |= nxt
        frontier = nxt
    return seen


def _programs_started(path: Path) -> list[tuple[int, str]]:
    """(line, program) for every literal program name this file starts or looks up."""
    tree = ast.parse(path.read_text(), filename=str(path))
    constants = {target.id: node.value.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 and isinstance(node.value.value, str)
                 for target in node.targets if isinstance(target, ast.Name)}

    def literal(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name) and node.id in constants:
            return constants[node.id]
        return None

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name = node.func.attr
        if name in SUBPROCESS_CALLS and node.args and isinstance(node.args[0],
                                                                ast.List | ast.Tuple):
            elements = node.args[0].elts
            program = literal(elements[0]) if elements else None
            if program is not None:
                found.append((node.lineno, program))
                # runuser -u USER -- PROGRAM ...: the program after "--" runs too
                words = [literal(e) for e in elements]
                if program == "runuser" and "--" in words:
                    after = words.index("--") + 1
                    if after < len(words) and words[after] is not None:
                        found.append((node.lineno, str(words[after])))
        if name == "which" and node.args and literal(node.args[0]) is not None:
            found.append((node.lineno, str(literal(node.args[0]))))
    return found


def test_the_makefile_package_list_is_read() -> None:
    packages = makefile_packages(MAKEFILE)
    assert {"slurm-wlm", "munge", "postgresql", "rsyslog"} <= packages
    assert not any(p.startswith("$") or p.endswith("\\") for p in packages)


def test_makefile_parsing_follows_continuation_lines(tmp_path: Path) -> None:
    makefile = tmp_path / "Makefile"
    makefile.write_text("X := 1\nDEB_PACKAGES := a b \\\n\tc \\\n  d\nOTHER := e\n")
    assert makefile_packages(makefile) == {"a", "b", "c", "d"}
    makefile.write_text("NOTHING := here\n")
    with pytest.raises(ValueError, match="DEB_PACKAGES"):
        makefile_packages(makefile)


def test_every_prerequisite_package_is_installed_by_make_setup() -> None:
    packages = makefile_packages(MAKEFILE)
    absent = sorted({f"{p.package} (for {p.name}: {p.used_by})"
                     for p in PREREQUISITES.values() if p.package not in packages})
    assert not absent, ("the harness needs Debian packages that `make setup` does not "
                        f"install; add them to DEB_PACKAGES: {', '.join(absent)}")


def test_every_prerequisite_is_installed_here() -> None:
    gone = [f"{p.name} (Debian package {p.package})" for p in prerequisites.missing()]
    assert not gone, f"missing after `make setup`: {', '.join(gone)}"


def test_each_prerequisite_comes_from_its_package() -> None:
    """The table's package names are checked against dpkg, not taken on trust."""
    wrong = []
    for item in PREREQUISITES.values():
        where = item.find()
        assert where is not None, f"{item.name} is missing (Debian package {item.package})"
        owner = _owner(where)
        if owner is None or owner not in _depends(item.package):
            wrong.append(f"{item.name}: {where} belongs to {owner}, which {item.package} "
                         "does not bring")
    assert not wrong, "; ".join(wrong)


#: Programs of Debian's Essential packages (on every Debian system, never
#: installed by `make setup`); the test below checks that they are Essential.
ESSENTIAL = {"env", "cat", "true", "sh", "bash", "id", "sleep", "ls", "mknod", "chown",
             "chmod", "rm", "mkdir", "stat", "dpkg", "dpkg-query", "timeout", "chroot"}


def test_the_harness_starts_only_listed_programs() -> None:
    unknown = []
    for path in HARNESS_CODE:
        for line, program in _programs_started(path):
            name = Path(program).name if program.startswith("/") else program
            if name not in PREREQUISITES and name not in ESSENTIAL \
                    and name not in prerequisites.OPTIONAL:
                unknown.append(f"{path.relative_to(REPO)}:{line}: {program}")
    assert not unknown, ("programs started without an entry in "
                         "ztgpu/testing/prerequisites.py (add each with its Debian package, "
                         f"and the package to the Makefile): {'; '.join(unknown)}")


def test_the_scan_sees_literal_and_constant_program_names(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('import shutil, subprocess\nTOOL = "prometheus"\n'
                      'subprocess.run(["promtool", "check"])\n'
                      'subprocess.Popen([TOOL, "--config"])\n'
                      'subprocess.run(["runuser", "-u", "x", "--", "pamtester", "a"])\n'
                      'shutil.which("bpftool")\nsubprocess.run([variable])\n')
    assert [p for _, p in _programs_started(sample)] == [
        "promtool", "prometheus", "runuser", "pamtester", "bpftool"]


def test_essential_programs_really_are_essential() -> None:
    for program in sorted(ESSENTIAL):
        where = Prerequisite(program, "-", "-").find()
        assert where is not None, f"{program} is not on PATH"
        owner = _owner(where)
        assert owner is not None, f"{where} belongs to no Debian package"
        assert _dpkg("-W", "-f=${Essential}", owner).strip() == "yes", (
            f"{program} comes from {owner}, which is not Essential: add it to "
            "ztgpu/testing/prerequisites.py and the Makefile")


def test_a_missing_prerequisite_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Prerequisite("ztgpu-no-such-tool", "ztgpu-fake-package", "a test harness")
    monkeypatch.setitem(PREREQUISITES, fake.name, fake)
    with pytest.raises(PrerequisiteMissing, match=r"Debian package ztgpu-fake-package.*"
                       r"make setup"):
        require(fake.name)
    assert fake in prerequisites.missing()
    pattern = Prerequisite("ztgpu-module", "ztgpu-fake-driver", "a driver",
                           pattern="/nonexistent/*/ztgpu_module.so")
    monkeypatch.setitem(PREREQUISITES, pattern.name, pattern)
    with pytest.raises(PrerequisiteMissing, match=r"/nonexistent/.*ztgpu-fake-driver"):
        require(pattern.name)


def test_an_unlisted_prerequisite_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        require("a-program-nobody-listed")


def test_the_rsyslog_harness_refuses_a_missing_driver(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """The error that hid on a fresh machine now names the package before rsyslogd starts."""
    from ztgpu.testing.rsyslog import RsyslogHarnessError, RsyslogReceiver

    gone = Prerequisite("lmnsd_ossl", "rsyslog-openssl", "the SIEM receiver's ossl TLS driver",
                        pattern="/nonexistent/rsyslog/lmnsd_ossl.so")
    monkeypatch.setitem(PREREQUISITES, "lmnsd_ossl", gone)
    for name in ("ca.crt", "server.crt", "server.key"):
        (tmp_path / name).write_text("")
    receiver = RsyslogReceiver(tmp_path / "ca.crt", tmp_path / "server.crt",
                               tmp_path / "server.key", driver="ossl")
    with pytest.raises(RsyslogHarnessError, match="rsyslog-openssl"):
        receiver.start()
