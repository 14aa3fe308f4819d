"""gres.conf as slurmd numbers a node's GPUs: which device file has gres index i."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztgpu.errors import ConfigError
from ztgpu.slurm.gres_conf import MAX_GPU_FILES, GresGpuFiles, gpu_files


def conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gres.conf"
    path.write_text(text, encoding="utf-8")
    return path


def files_of(tmp_path: Path, text: str, node: str = "gpu01") -> list[str]:
    found = gpu_files(conf(tmp_path, text), node)
    assert found is not None
    return [str(f) for f in found.files]


def refused(tmp_path: Path, text: str, node: str = "gpu01") -> str:
    with pytest.raises(ConfigError) as info:
        gpu_files(conf(tmp_path, text), node)
    return str(info.value)


def nvidia(*minors: int) -> list[str]:
    return [f"/dev/nvidia{m}" for m in minors]


# ---- order -------------------------------------------------------------------

def test_range_expands_in_ascending_order(tmp_path: Path) -> None:
    path = conf(tmp_path, "AutoDetect=off\nName=gpu Type=h100 File=/dev/nvidia[0-3]\n")
    assert gpu_files(path, "gpu01") == GresGpuFiles(
        path=path, files=tuple(Path(f) for f in nvidia(0, 1, 2, 3)), autodetect="off")


def test_range_list_with_a_gap(tmp_path: Path) -> None:
    assert files_of(tmp_path, "Name=gpu File=/dev/nvidia[0,2-3]\n") == nvidia(0, 2, 3)


def test_comma_list_keeps_the_order_written(tmp_path: Path) -> None:
    # The case the agent must catch: Slurm's index 0 is /dev/nvidia1.
    found = gpu_files(conf(tmp_path, "Name=gpu File=/dev/nvidia1,/dev/nvidia0\n"), "gpu01")
    assert found is not None
    assert [str(f) for f in found.files] == nvidia(1, 0)
    assert found.in_index_order


def test_several_lines_append_in_file_order(tmp_path: Path) -> None:
    text = ("Name=gpu File=/dev/nvidia2\n"
            "Name=gpu File=/dev/nvidia[0-1]\n"
            "Name=gpu File=/dev/nvidia3\n")
    assert files_of(tmp_path, text) == nvidia(2, 0, 1, 3)


def test_name_lines_come_before_nodename_lines(tmp_path: Path) -> None:
    # Slurm collects lines starting with Name= and with NodeName= in two
    # separate arrays, Name= first (src/interfaces/gres.c).
    text = ("NodeName=gpu01 Name=gpu File=/dev/nvidia0\n"
            "Name=gpu File=/dev/nvidia1\n"
            "NodeName=gpu01 Name=gpu File=/dev/nvidia2\n")
    assert files_of(tmp_path, text) == nvidia(1, 0, 2)


def test_multi_group_names_vary_the_last_group_fastest(tmp_path: Path) -> None:
    text = "Name=gpu File=/dev/g[0-1]/card[0-1]\n"
    assert files_of(tmp_path, text) == ["/dev/g0/card0", "/dev/g0/card1",
                                        "/dev/g1/card0", "/dev/g1/card1"]


@given(st.permutations(range(8)))
def test_any_comma_order_is_kept(order: list[int]) -> None:
    # hypothesis forbids function-scoped fixtures such as tmp_path here.
    with tempfile.TemporaryDirectory() as tmp:
        files = ",".join(nvidia(*order))
        assert files_of(Path(tmp), f"Name=gpu File={files}\n") == nvidia(*order)


# ---- NodeName ----------------------------------------------------------------

NODES = ("NodeName=gpu[01-04,07] Name=gpu File=/dev/nvidia[0-1]\n"
         "NodeName=gpu05 Name=gpu File=/dev/nvidia[0-7]\n"
         "NodeName=cpu1,cpu2 Name=gpu File=/dev/nvidia9\n")


def test_other_nodes_lines_are_ignored(tmp_path: Path) -> None:
    assert files_of(tmp_path, NODES, "gpu07") == nvidia(0, 1)
    assert files_of(tmp_path, NODES, "gpu05") == nvidia(*range(8))
    assert files_of(tmp_path, NODES, "cpu2") == nvidia(9)


def test_nodename_padding_must_match_exactly(tmp_path: Path) -> None:
    assert files_of(tmp_path, NODES, "gpu1") == []
    assert files_of(tmp_path, NODES, "gpu06") == []


def test_nodename_with_two_groups(tmp_path: Path) -> None:
    text = "NodeName=r[1-2]n[01-02] Name=gpu File=/dev/nvidia0\n"
    assert files_of(tmp_path, text, "r2n01") == nvidia(0)
    assert files_of(tmp_path, text, "r3n01") == []


def test_lines_without_nodename_apply_to_every_node(tmp_path: Path) -> None:
    text = "Name=gpu File=/dev/nvidia0\nNodeName=other Name=gpu File=/dev/nvidia1\n"
    assert files_of(tmp_path, text, "anything") == nvidia(0)


def test_a_bad_value_on_another_nodes_line_is_not_this_nodes_problem(tmp_path: Path) -> None:
    # slurmd skips other nodes' lines without reading their values.
    text = "NodeName=other Name=gpu File=/dev/nvidia[3-1]\nName=gpu File=/dev/nvidia0\n"
    assert files_of(tmp_path, text) == nvidia(0)


# ---- AutoDetect ----------------------------------------------------------------

def test_global_autodetect(tmp_path: Path) -> None:
    found = gpu_files(conf(tmp_path, "AutoDetect=nvml\nName=gpu Type=a100 Count=4\n"), "gpu01")
    assert found is not None
    assert (found.autodetect, found.files, found.in_index_order) == ("nvml", (), False)


def test_node_specific_autodetect_trumps_the_global_one(tmp_path: Path) -> None:
    path = conf(tmp_path, "AutoDetect=nvml\n"
                          "NodeName=tux3 AutoDetect=off Name=gpu File=/dev/nvidia[0-1]\n")
    tux3, tux1 = gpu_files(path, "tux3"), gpu_files(path, "tux1")
    assert tux3 is not None and tux1 is not None
    assert (tux3.autodetect, [str(f) for f in tux3.files]) == ("off", nvidia(0, 1))
    assert (tux1.autodetect, tux1.files) == ("nvml", ())


def test_nodename_line_with_only_autodetect(tmp_path: Path) -> None:
    path = conf(tmp_path, "NodeName=tux[0-7] AutoDetect=rsmi\n")
    found = gpu_files(path, "tux5")
    assert found is not None and found.autodetect == "rsmi"
    other = gpu_files(path, "tux8")
    assert other is not None and other.autodetect is None


def test_no_autodetect_means_listed_order(tmp_path: Path) -> None:
    found = gpu_files(conf(tmp_path, "Name=gpu File=/dev/nvidia0\n"), "gpu01")
    assert found is not None
    assert (found.autodetect, found.in_index_order) == (None, True)


def test_conflicting_node_autodetect_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, "NodeName=gpu01 AutoDetect=nvml\n"
                                "NodeName=gpu[01-02] AutoDetect=off\n")
    assert "line 2" in message and "conflicts" in message


def test_unknown_autodetect_value_is_refused(tmp_path: Path) -> None:
    assert "line 1" in refused(tmp_path, "AutoDetect=nvlm\n")


def test_autodetect_on_a_name_line_is_refused(tmp_path: Path) -> None:
    # Slurm ignores it there ("In-line AutoDetect requires NodeName").
    message = refused(tmp_path, "Name=gpu File=/dev/nvidia0 AutoDetect=nvml\n")
    assert "line 1" in message and "NodeName" in message


# ---- syntax ----------------------------------------------------------------------

def test_keys_are_case_insensitive(tmp_path: Path) -> None:
    text = ("autodetect=OFF\n"
            "NODENAME=gpu01 NAME=gpu file=/dev/nvidia1 COUNT=1\n"
            "nAmE=gpu FiLe=/dev/nvidia0\n")
    found = gpu_files(conf(tmp_path, text), "gpu01")
    assert found is not None
    assert ([str(f) for f in found.files], found.autodetect) == (nvidia(0, 1), "off")


def test_comments_continuations_quotes_and_blanks(tmp_path: Path) -> None:
    text = ("# Slurm's GRES configuration\n"
            "\n"
            "   \n"
            "Name=gpu \\\n"
            '    File="/dev/nvidia[2-3]"   # two GPUs\n'
            "# Name=gpu File=/dev/nvidia9\n"
            "Name = gpu File=/dev/nvidia0\r\n")
    assert files_of(tmp_path, text) == nvidia(2, 3, 0)


def test_non_gpu_lines_and_unused_keys_are_ignored(tmp_path: Path) -> None:
    text = ("Name=mps Count=100 File=/dev/nvidia0\n"
            "Name=bandwidth Type=lustre Count=4G Flags=CountOnly\n"
            "Name=gpu Type=a100 Files=/dev/nvidia0 Cores=0-3 Links=-1,2 Flags=nvidia_gpu_env\n")
    assert files_of(tmp_path, text) == nvidia(0)


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert gpu_files(tmp_path / "gres.conf", "gpu01") is None


def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "gres.conf").mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        gpu_files(tmp_path / "gres.conf", "gpu01")


def test_reversed_range_names_the_line(tmp_path: Path) -> None:
    message = refused(tmp_path, "# GPUs\nName=gpu File=/dev/nvidia[3-1]\n")
    assert message.startswith(f"{tmp_path / 'gres.conf'}: line 2:")
    assert "backwards" in message


def test_line_without_equals_names_the_line(tmp_path: Path) -> None:
    message = refused(tmp_path, "Name=gpu File=/dev/nvidia0\n\ngarbage-without-equals\n")
    assert "line 3" in message and "garbage-without-equals" in message


@pytest.mark.parametrize("text", [
    "Name=gpu File=/dev/nvidia[0-1\n",        # '[' without ']'
    "Name=gpu File=/dev/nvidia0-1]\n",        # ']' without '['
    "Name=gpu File=/dev/nvidia[a-b]\n",       # not numbers
    "Name=gpu File=/dev/nvidia[]\n",          # empty group
    "NodeName=gpu[01-x] Name=gpu File=/dev/nvidia0\n",
    "Name=gpu File=nvidia0\n",                # not absolute
    "Name=gpu File\n",                        # no '='
    "Name=gpu File+=/dev/nvidia0\n",          # operator
    "Name=gpu File=/dev/nvidia0 file=/dev/nvidia1\n",  # key twice
    "Type=a100 Name=gpu File=/dev/nvidia0\n",  # slurmd wants Name/NodeName first
    "Name=gpu NodeName=gpu01 File=/dev/nvidia0\n",
    "AutoDetect=nvml Name=gpu File=/dev/nvidia0\n",
    "NodeName=gpu01 File=/dev/nvidia0\n",     # no Name=
])
def test_malformed_lines_are_refused(tmp_path: Path, text: str) -> None:
    assert ": line 1:" in refused(tmp_path, text)


def test_count_must_match_the_files(tmp_path: Path) -> None:
    assert files_of(tmp_path, "Name=gpu File=/dev/nvidia[0-1] Count=2\n") == nvidia(0, 1)
    message = refused(tmp_path, "Name=gpu File=/dev/nvidia[0-1] Count=3\n")
    assert "Count='3' does not match the 2 file(s)" in message


def test_a_file_listed_twice_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, "Name=gpu File=/dev/nvidia[0-1]\nName=gpu File=/dev/nvidia1\n")
    assert "line 2" in message and "also on line 1" in message


def test_too_many_files_are_refused(tmp_path: Path) -> None:
    assert str(MAX_GPU_FILES) in refused(tmp_path, "Name=gpu File=/dev/nvidia[0-1024]\n")


# ---- what this check cannot map -----------------------------------------------------

def test_include_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, "Name=gpu File=/dev/nvidia0\ninclude /etc/slurm/gres.d/gpu.conf\n")
    assert "line 2" in message and "Include is not followed" in message


def test_multiple_files_is_refused(tmp_path: Path) -> None:
    text = "Name=gpu MultipleFiles=/dev/nvidia0,/dev/nvidia-caps/nvidia-cap21\n"
    assert "MultipleFiles" in refused(tmp_path, text)


def test_gpu_name_in_another_case_is_refused(tmp_path: Path) -> None:
    assert "Name=gpu" in refused(tmp_path, "Name=GPU File=/dev/nvidia0\n")


def test_several_types_are_refused_without_autodetect(tmp_path: Path) -> None:
    text = "Name=gpu Type=v100 File=/dev/nvidia0\nName=gpu Type=a100 File=/dev/nvidia1\n"
    message = refused(tmp_path, text)
    assert "lines 1, 2" in message and "a100, v100" in message


def test_one_type_in_any_case_is_fine(tmp_path: Path) -> None:
    text = "Name=gpu Type=A100 File=/dev/nvidia0\nName=gpu Type=a100 File=/dev/nvidia1\n"
    assert files_of(tmp_path, text) == nvidia(0, 1)
