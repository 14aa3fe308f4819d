"""Tests for ztgpu.slurm.conf: planning and installing the suite's slurm.conf lines."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztgpu.errors import ConfigError, Fault, UsageError
from ztgpu.slurm.conf import (
    SlurmConfChange,
    install,
    plan,
    suite_changes,
)

PROLOG = Path("/usr/libexec/ztgpu/prolog")
EPILOG = Path("/usr/libexec/ztgpu/epilog")
SUITE = suite_changes(PROLOG, EPILOG)
NOW = datetime(2024, 5, 17, 9, 30, 5, tzinfo=UTC)
BACKUP_NAME = "slurm.conf.ztgpu-backup-20240517T093005Z"

# A site's slurm.conf as config management leaves it: comments, a site
# prolog with a trailing comment, a lower-case key, PrologFlags=X11, Epilog
# set twice (Slurm reads the second), a commented-out Prolog, an Include,
# and multi-key node and partition lines.
SITE_CONF = """\
# slurm.conf for the gpulab cluster (written by the site's config management)
ClusterName=gpulab
SlurmctldHost=ctl01
AuthType=auth/munge
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
#
# Job hooks
prolog=/etc/slurm/site-prolog.sh   # site prolog: mounts scratch
PrologFlags=X11   # users asked for X11 forwarding
Epilog=/usr/local/sbin/old-epilog
#Prolog=/opt/experimental/prolog
SelectType=select/cons_tres
GresTypes=gpu
EPILOG=/usr/local/sbin/epilog-v2
Include /etc/slurm/nodes.d/extra.conf
NodeName=gpu[01-04] CPUs=64 RealMemory=512000 Gres=gpu:h100:4 State=UNKNOWN
PartitionName=gpu Nodes=gpu[01-04] Default=YES MaxTime=INFINITE State=UP
"""

SITE_CONF_PLANNED = """\
# slurm.conf for the gpulab cluster (written by the site's config management)
ClusterName=gpulab
SlurmctldHost=ctl01
AuthType=auth/munge
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
#
# Job hooks
# managed by ztgpu install
Prolog=/usr/libexec/ztgpu/prolog
# managed by ztgpu install
PrologFlags=X11,Alloc,Contain   # users asked for X11 forwarding
# (superseded by ztgpu install) Epilog=/usr/local/sbin/old-epilog
#Prolog=/opt/experimental/prolog
SelectType=select/cons_tres
GresTypes=gpu
# managed by ztgpu install
Epilog=/usr/libexec/ztgpu/epilog
Include /etc/slurm/nodes.d/extra.conf
NodeName=gpu[01-04] CPUs=64 RealMemory=512000 Gres=gpu:h100:4 State=UNKNOWN
PartitionName=gpu Nodes=gpu[01-04] Default=YES MaxTime=INFINITE State=UP

# --- ztgpu (managed by ztgpu install) ---
PrologEpilogTimeout=60
"""

# Already set up by hand exactly as the suite wants (other spellings).
CONFIGURED_CONF = """\
ClusterName=gpulab
prolog="/usr/libexec/ztgpu/prolog"
Epilog = /usr/libexec/ztgpu/epilog
PrologFlags=contain,alloc,Serial
PrologEpilogTimeout=300
NodeName=n1 CPUs=4 Gres=gpu:4
"""


def effective(text: str) -> dict[str, str]:
    """A deliberately simple reader of single-key lines: last setting wins."""
    values: dict[str, str] = {}
    for line in text.split("\n"):
        body = line.split("#", 1)[0].strip()
        tokens = body.split()
        if len(tokens) == 1 and "=" in tokens[0]:
            key, value = tokens[0].split("=", 1)
            values[key.lower()] = value.strip('"')
    return values


def flags(value: str) -> list[str]:
    return [flag.lower() for flag in value.split(",") if flag]


# ---------------------------------------------------------------- plan


def test_site_conf_is_planned_as_expected() -> None:
    result = plan(SITE_CONF, SUITE)

    assert result.text == SITE_CONF_PLANNED


def test_site_conf_warnings_name_the_include_and_the_replaced_hooks() -> None:
    result = plan(SITE_CONF, SUITE)

    assert result.warnings == (
        "slurm.conf includes other files (line 16: Include /etc/slurm/nodes.d/extra.conf): "
        "check they do not set Prolog, Epilog, PrologFlags, PrologEpilogTimeout",
        "line 9: Prolog was '/etc/slurm/site-prolog.sh', now '/usr/libexec/ztgpu/prolog'",
        "line 15: Epilog was '/usr/local/sbin/epilog-v2', now '/usr/libexec/ztgpu/epilog'",
    )


def test_planning_twice_changes_nothing_more() -> None:
    once = plan(SITE_CONF, SUITE)
    twice = plan(once.text, SUITE)

    assert twice.text == once.text
    # Nothing is replaced the second time; the Include still needs a look.
    assert len(twice.warnings) == 1
    assert twice.warnings[0].startswith("slurm.conf includes other files (line 19:")


def test_conf_already_as_wanted_is_left_byte_for_byte() -> None:
    result = plan(CONFIGURED_CONF, SUITE)

    assert result.text == CONFIGURED_CONF
    assert result.warnings == ()


def test_existing_timeout_is_kept_and_missing_flag_added_case_insensitively() -> None:
    text = "PrologFlags=contain,Serial\nPrologEpilogTimeout=300\n"

    result = plan(text, SUITE).text

    assert "# managed by ztgpu install\nPrologFlags=contain,Serial,Alloc\n" in result
    assert "PrologEpilogTimeout=300\n" in result
    assert "PrologEpilogTimeout=60" not in result


def test_commented_out_settings_do_not_count_as_present() -> None:
    text = "#Prolog=/old\n# PrologFlags=Contain\nClusterName=c\n"

    result = plan(text, SUITE).text

    assert result.startswith("#Prolog=/old\n# PrologFlags=Contain\nClusterName=c\n\n")
    assert effective(result)["prolog"] == str(PROLOG)
    assert effective(result)["prologflags"] == "Alloc,Contain"


def test_empty_conf_gets_just_the_block() -> None:
    result = plan("", SUITE).text

    assert result == (
        "# --- ztgpu (managed by ztgpu install) ---\n"
        "Prolog=/usr/libexec/ztgpu/prolog\n"
        "Epilog=/usr/libexec/ztgpu/epilog\n"
        "PrologFlags=Alloc,Contain\n"
        "PrologEpilogTimeout=60\n"
    )


def test_block_is_extended_not_repeated_when_a_later_run_adds_a_key() -> None:
    first = plan("ClusterName=c\n", [SlurmConfChange("Prolog", "/a")]).text
    second = plan(first, [SlurmConfChange("Prolog", "/b"), SlurmConfChange("Epilog", "/e")]).text

    assert second == (
        "ClusterName=c\n\n# --- ztgpu (managed by ztgpu install) ---\nProlog=/b\nEpilog=/e\n"
    )


def test_superseded_line_loses_its_old_managed_comment() -> None:
    # A previous run managed the first Prolog; an admin then added another.
    text = "# managed by ztgpu install\nProlog=/a\nProlog=/other\n"

    result = plan(text, [SlurmConfChange("Prolog", "/a")]).text

    assert result == (
        "# (superseded by ztgpu install) Prolog=/a\n# managed by ztgpu install\nProlog=/a\n"
    )
    assert plan(result, [SlurmConfChange("Prolog", "/a")]).text == result


def test_quoted_value_with_spaces_round_trips() -> None:
    change = [SlurmConfChange("Prolog", "/opt/gpu hooks/prolog")]

    result = plan("", change).text

    assert 'Prolog="/opt/gpu hooks/prolog"\n' in result
    assert plan(result, change).text == result


def test_crlf_line_endings_are_kept() -> None:
    text = SITE_CONF.replace("\n", "\r\n")

    result = plan(text, SUITE).text

    assert result == SITE_CONF_PLANNED.replace("\n", "\r\n")
    assert plan(result, SUITE).text == result


def test_last_line_without_newline_gets_one_before_the_block() -> None:
    result = plan("ClusterName=c", [SlurmConfChange("Epilog", "/e")]).text

    assert result == "ClusterName=c\n\n# --- ztgpu (managed by ztgpu install) ---\nEpilog=/e\n"


def test_indentation_of_a_rewritten_line_is_kept() -> None:
    result = plan("  Prolog=/old\n", [SlurmConfChange("Prolog", "/new")]).text

    assert result == "# managed by ztgpu install\n  Prolog=/new\n"


def test_marker_names_the_comments() -> None:
    result = plan("Prolog=/a\nProlog=/b\n", [SlurmConfChange("Prolog", "/c")], marker="site")

    assert result.text == (
        "# (superseded by site install) Prolog=/a\n# managed by site install\nProlog=/c\n"
    )


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("ClusterName=c\nProlog=/a Epilog=/b\n", 2, "shares the line"),
        ("NodeName=n1 CPUs=4 prolog=/x\n", 1, "shares the line"),
        ("ClusterName=c\n\nPrologFlags=\\\nX11,Contain\n", 3, "continued"),
        ("PrologFlags=X11,Contain \\\n  ,Alloc\n", 1, "cannot parse"),
        ("PrologFlags=nohold,X11\n", 1, "combines nohold with Contain"),
        ("PrologFlags+=Contain\n", 1, "PrologFlags+="),
        ('ClusterName=c\nEpilog="/a b\n', 2, "cannot parse"),
    ],
)
def test_lines_that_cannot_be_edited_safely_are_refused(text: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        plan(text, SUITE)

    assert f"line {line}:" in str(caught.value)
    assert words in str(caught.value)


def test_flag_slurmctld_cannot_combine_with_contain_is_refused_by_name() -> None:
    # slurmctld 22.05: "fatal: PrologFlags invalid combination: NoHold cannot
    # be combined with Contain and/or X11".
    with pytest.raises(ConfigError, match="line 2: PrologFlags=Alloc,NoHold,Contain combines"):
        plan("ClusterName=c\nPrologFlags=Alloc,NoHold\n", SUITE)


def test_unparsable_line_without_managed_keys_is_left_and_reported() -> None:
    text = "ClusterName=c\nthis is not slurm syntax\n"

    result = plan(text, [SlurmConfChange("Prolog", "/p")])

    assert result.text.startswith(text)
    assert result.warnings == (
        "line 2: cannot parse 'this is not slurm syntax'; left unchanged "
        "(slurmctld may reject it)",
    )


def test_escaped_hash_is_part_of_the_value_not_a_comment() -> None:
    # Slurm reads this as Epilog=/x#y, which is not what is wanted: replace it.
    result = plan("Epilog=/x\\#y\n", [SlurmConfChange("Epilog", "/e")])

    assert result.text == "# managed by ztgpu install\nEpilog=/e\n"
    assert result.warnings == ("line 1: Epilog was '/x#y', now '/e'",)


def test_two_changes_to_one_key_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="same key"):
        plan("", [SlurmConfChange("Prolog", "/a"), SlurmConfChange("prolog", "/b")])


# ------------------------------------------------------ property: plan

_MANAGED_KEYS = ["Prolog", "prolog", "EPILOG", "Epilog", "PrologFlags", "prologflags",
                 "PrologEpilogTimeout"]
_paths = st.from_regex(r"/[a-z]{1,6}(/[a-z0-9_.-]{1,6}){0,2}", fullmatch=True)
_flag_lists = st.lists(
    st.sampled_from(["X11", "NoHold", "alloc", "Contain", "Serial", "DeferBatch"]),
    min_size=1, max_size=4,
).map(",".join)
_trailing = st.sampled_from(["", "   # note", " #x"])


@st.composite
def _managed_line(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(_MANAGED_KEYS))
    if key.lower() == "prologflags":
        value = draw(_flag_lists)
    elif key.lower() == "prologepilogtimeout":
        value = str(draw(st.integers(1, 999)))
    else:
        value = draw(_paths)
    return f"{key}={value}{draw(_trailing)}"


_lines = st.one_of(
    _managed_line(),
    st.sampled_from([
        "",
        "#",
        "# a comment that mentions Prolog=/x",
        "ClusterName=gpulab",
        "SlurmctldHost=ctl01",
        "NodeName=gpu[01-02] CPUs=8 Gres=gpu:2 State=UNKNOWN",
        "PartitionName=gpu Nodes=ALL Default=YES",
        "Include /etc/slurm/extra.conf",
    ]),
)
_confs = st.tuples(
    st.lists(_lines, max_size=14), st.sampled_from(["\n", "\r\n"]), st.booleans()
).map(lambda t: t[1].join(t[0]) + (t[1] if t[2] and t[0] else ""))


@given(_confs)
def test_plan_is_idempotent_and_sets_what_slurm_will_read(text: str) -> None:
    before = effective(text)
    if "nohold" in flags(before.get("prologflags", "")):
        with pytest.raises(ConfigError, match="NoHold"):
            plan(text, SUITE)
        return

    once = plan(text, SUITE).text

    assert plan(once, SUITE).text == once
    after = effective(once)
    assert after["prolog"] == str(PROLOG)
    assert after["epilog"] == str(EPILOG)
    assert set(flags(after["prologflags"])) == (
        set(flags(before.get("prologflags", ""))) | {"alloc", "contain"}
    )
    assert after["prologepilogtimeout"] == before.get("prologepilogtimeout", "60")
    # Lines not about the managed keys survive, in order, untouched.
    untouched = [
        line for line in text.replace("\r\n", "\n").split("\n")
        if line.strip() and not any(k.lower() in line.lower() for k in _MANAGED_KEYS)
    ]
    kept = [line for line in once.replace("\r\n", "\n").split("\n") if line in untouched]
    assert kept == untouched
    # One line-ending style in, the same out.
    if "\r\n" in text:
        assert once.count("\n") == once.count("\r\n")


# ------------------------------------------------------------- install


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "slurm.conf"
    path.write_text(SITE_CONF)
    path.chmod(0o640)
    return path


def _backups(directory: Path) -> list[Path]:
    return sorted(directory.glob("slurm.conf.ztgpu-backup-*"))


def test_dry_run_reports_the_diff_and_writes_nothing(conf: Path) -> None:
    before = conf.stat()

    result = install(conf, SUITE, dry_run=True, now=NOW)

    assert result.changed is True
    assert result.backup is None
    assert conf.read_text() == SITE_CONF
    assert conf.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in conf.parent.iterdir()) == ["slurm.conf"]
    assert result.diff.startswith(f"--- {conf} (current)\n+++ {conf} (ztgpu)\n")
    assert "\n-prolog=/etc/slurm/site-prolog.sh   # site prolog: mounts scratch\n" in result.diff
    assert "\n+Prolog=/usr/libexec/ztgpu/prolog\n" in result.diff
    assert "\n+PrologEpilogTimeout=60\n" in result.diff


def test_install_backs_up_then_writes_with_the_same_mode(conf: Path) -> None:
    result = install(conf, SUITE, dry_run=False, now=NOW)

    assert result.changed is True
    assert result.backup == conf.parent / BACKUP_NAME
    assert result.backup.read_bytes() == SITE_CONF.encode()
    assert conf.read_text() == SITE_CONF_PLANNED
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert stat.S_IMODE(result.backup.stat().st_mode) == 0o640
    assert result.warnings == plan(SITE_CONF, SUITE).warnings
    # Only the file and its backup: no temporary file left behind.
    assert sorted(p.name for p in conf.parent.iterdir()) == ["slurm.conf", BACKUP_NAME]


def test_rerun_changes_nothing_and_makes_no_second_backup(conf: Path) -> None:
    install(conf, SUITE, dry_run=False, now=NOW)
    written = conf.stat()

    again = install(conf, SUITE, dry_run=False, now=NOW + timedelta(hours=1))

    assert again.changed is False
    assert again.backup is None
    assert again.diff == ""
    assert conf.stat().st_mtime_ns == written.st_mtime_ns
    assert [p.name for p in _backups(conf.parent)] == [BACKUP_NAME]


def test_existing_backup_is_never_overwritten(conf: Path) -> None:
    earlier = conf.parent / BACKUP_NAME
    earlier.write_text("an older backup\n")

    result = install(conf, SUITE, dry_run=False, now=NOW)

    assert result.backup == conf.parent / f"{BACKUP_NAME}.1"
    assert earlier.read_text() == "an older backup\n"
    assert result.backup.read_text() == SITE_CONF


def test_backup_name_uses_utc(conf: Path) -> None:
    paris = timezone(timedelta(hours=2))

    result = install(conf, SUITE, dry_run=False, now=datetime(2024, 5, 17, 11, 30, 5, tzinfo=paris))

    assert result.backup == conf.parent / BACKUP_NAME


def test_failed_replace_leaves_the_original_and_no_temporary_file(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)

    with pytest.raises(Fault, match="No space left on device"):
        install(conf, SUITE, dry_run=False, now=NOW)

    assert conf.read_text() == SITE_CONF
    assert sorted(p.name for p in conf.parent.iterdir()) == ["slurm.conf", BACKUP_NAME]


def test_file_edited_by_someone_else_meanwhile_is_not_overwritten(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mkstemp = tempfile.mkstemp

    def mkstemp_then_admin_edits(prefix: str, dir: Path) -> tuple[int, str]:
        made = real_mkstemp(prefix=prefix, dir=dir)
        conf.write_text(SITE_CONF + "MaxJobCount=20000\n")
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_admin_edits)

    with pytest.raises(Fault, match="changed while ztgpu install ran"):
        install(conf, SUITE, dry_run=False, now=NOW)

    assert conf.read_text() == SITE_CONF + "MaxJobCount=20000\n"
    assert sorted(p.name for p in conf.parent.iterdir()) == ["slurm.conf", BACKUP_NAME]


def test_symlinked_conf_edits_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "slurm.conf"
    target.write_text(SITE_CONF)
    link = tmp_path / "slurm.conf"
    link.symlink_to(target)

    result = install(link, SUITE, dry_run=False, now=NOW)

    assert link.is_symlink()
    assert target.read_text() == SITE_CONF_PLANNED
    assert result.backup == shared / BACKUP_NAME
    assert f"{link} is a symbolic link; the file edited is {target}" in result.warnings


def test_crlf_file_keeps_crlf_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "slurm.conf"
    path.write_bytes(SITE_CONF.replace("\n", "\r\n").encode())

    install(path, SUITE, dry_run=False, now=NOW)

    assert path.read_bytes() == SITE_CONF_PLANNED.replace("\n", "\r\n").encode()


def test_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "slurm.conf"

    with pytest.raises(ConfigError, match="cannot read") as caught:
        install(missing, SUITE, dry_run=True)

    assert str(missing) in str(caught.value)
    assert caught.value.exit_code == 2


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        install(tmp_path, SUITE, dry_run=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_a_config_error(conf: Path) -> None:
    conf.chmod(0)

    with pytest.raises(ConfigError, match="Permission denied"):
        install(conf, SUITE, dry_run=True)


def test_non_utf8_file_is_a_config_error_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "slurm.conf"
    data = b"ClusterName=caf\xe9\nProlog=/old\n"
    path.write_bytes(data)

    with pytest.raises(ConfigError, match="not UTF-8"):
        install(path, SUITE, dry_run=False, now=NOW)

    assert path.read_bytes() == data
    assert _backups(tmp_path) == []


def test_refused_line_names_file_and_line_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "slurm.conf"
    path.write_text("ClusterName=c\nProlog=/a Epilog=/b\n")

    with pytest.raises(ConfigError) as caught:
        install(path, SUITE, dry_run=False, now=NOW)

    assert str(caught.value).startswith(f"{path}: line 2: Prolog shares the line")
    assert path.read_text() == "ClusterName=c\nProlog=/a Epilog=/b\n"
    assert _backups(tmp_path) == []


def test_naive_now_is_refused(conf: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        install(conf, SUITE, dry_run=False, now=datetime(2024, 5, 17))

    assert conf.read_text() == SITE_CONF


# ------------------------------------------------------- changes


def test_suite_changes_are_the_hooks_flags_and_timeout() -> None:
    assert (
        SlurmConfChange("Prolog", "/usr/libexec/ztgpu/prolog"),
        SlurmConfChange("Epilog", "/usr/libexec/ztgpu/epilog"),
        SlurmConfChange("PrologFlags", ensure_flags=("Alloc", "Contain")),
        SlurmConfChange("PrologEpilogTimeout", "60", only_if_absent=True),
    ) == SUITE


@pytest.mark.parametrize("bad", [Path("hooks/prolog"), Path("/opt/a#b/prolog")])
def test_suite_changes_refuse_paths_slurm_cannot_use(bad: Path) -> None:
    with pytest.raises(UsageError, match="must be absolute"):
        suite_changes(bad, EPILOG)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"key": "Prolog"},
        {"key": "Prolog", "value": "/a", "ensure_flags": ("X",)},
        {"key": "PrologFlags", "ensure_flags": ("a,b",)},
        {"key": "Prolog", "value": '/a"b'},
        {"key": "Prolog", "value": " /a"},
        {"key": "NodeName", "value": "n1"},
        {"key": "Bad Key", "value": "1"},
        {"key": "PrologFlags", "ensure_flags": ("X",), "only_if_absent": True},
    ],
)
def test_changes_that_cannot_be_written_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SlurmConfChange(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------- real Slurm parser


def _slurm_missing() -> str | None:
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root"
    return None


@pytest.mark.slurm
@pytest.mark.skipif(_slurm_missing() is not None, reason=str(_slurm_missing()))
def test_real_slurmctld_reads_the_installed_settings() -> None:
    from ztgpu.testing.slurm_cluster import slurm_cluster

    hook = Path(shutil.which("true") or "/bin/true")
    results = []

    def before_start(cluster: object) -> None:
        path: Path = cluster.slurm_conf  # type: ignore[attr-defined]
        text = path.read_text().replace(
            "ClusterName=ztgputest\n",
            "ClusterName=ztgputest\nprolog=/bin/false\nPrologFlags=Serial\n"
            "Epilog=/bin/false\nEPILOG=/bin/false\n",
        )
        path.write_text(text)
        results.append(install(path, suite_changes(hook, hook), dry_run=False))

    with slurm_cluster(before_start=before_start) as cluster:
        shown = cluster.slurm(["scontrol", "show", "config"])

    assert results[0].changed is True
    config = {
        name.strip(): value.strip()
        for name, _, value in (line.partition("=") for line in str(shown).splitlines())
    }
    assert config["Prolog"] == str(hook)
    assert config["Epilog"] == str(hook)
    assert set(config["PrologFlags"].split(",")) == {"Alloc", "Contain", "Serial"}
    assert config["PrologEpilogTimeout"] == "60"
