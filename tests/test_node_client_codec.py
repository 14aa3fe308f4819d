"""The node client's JSON codec (no ``json`` import on the hooks' and PAM's
path) reads and writes exactly what the standard library does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztgpu import node_client
from ztgpu.errors import Fault

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20)


@given(values)
def test_dumps_is_json_and_loads_reads_it_back(value):
    text = node_client._dumps(value)
    assert json.loads(text) == value
    assert node_client._loads(text.encode()) == value
    assert node_client._loads(json.dumps(value, ensure_ascii=False).encode()) == value


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a":1} x', b"NaN", b'{"a":Infinity}',
                                 b"\xff", b"[1,]", b'{"a" 1}'])
def test_garbage_answers_are_a_fault(raw):
    with pytest.raises(Fault, match="not JSON"):
        node_client._result(raw)


@pytest.mark.parametrize("value", [float("nan"), {1: "x"}, object(), b"bytes"])
def test_what_json_cannot_say_is_not_sent(value):
    with pytest.raises(TypeError):
        node_client._dumps(value)


def test_calling_the_agent_imports_no_json_module(tmp_path):
    """The PAM module calls the agent on every SSH login: json costs ~15 ms."""
    code = ("import sys\n"
            "from ztgpu.node_client import call\n"
            "from ztgpu.errors import AgentUnreachable\n"
            "try:\n"
            f"    call({str(tmp_path / 'none.sock')!r}, 'ping', timeout=0.5, x={{'a': [1]}})\n"
            "except AgentUnreachable:\n"
            "    pass\n"
            "import ztgpu.pam.session, ztgpu.pam.pam_ztgpu\n"
            "print(sorted(m for m in sys.modules if m in ('json', 're', 'enum')))\n")
    res = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    assert res.stdout.strip() == "[]", res.stdout
