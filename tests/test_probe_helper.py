"""The isolation probe's kept helper: reused, restarted when it dies, killed when it hangs."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from ztgpu.errors import Fault
from ztgpu.noded.probe_helper import ProbeHelper

ECHO = """
import sys
for line in sys.stdin:
    if "hang" in line:
        import time; time.sleep(60)
    if "garbage" in line:
        sys.stdout.write("x" * 100 + "\\n"); sys.stdout.flush(); continue
    if "die" in line:
        sys.exit(3)
    sys.stdout.write(line); sys.stdout.flush()
"""


def _stand_in(tmp_path: Path) -> list[str]:
    script = tmp_path / "helper.py"
    script.write_text(ECHO)
    return [sys.executable, "-I", str(script)]


def test_one_helper_serves_many_probes(tmp_path: Path) -> None:
    helper = ProbeHelper(_stand_in(tmp_path))
    try:
        assert helper.ask('{"n": 1}', 10) == '{"n": 1}'
        first = helper.pid
        assert first is not None
        assert helper.ask('{"n": 2}', 10) == '{"n": 2}'
        assert helper.pid == first
    finally:
        helper.close()
    assert helper.pid is None


def test_a_helper_that_died_is_replaced_and_the_probe_still_answered(tmp_path: Path) -> None:
    helper = ProbeHelper(_stand_in(tmp_path))
    try:
        helper.ask("{}", 10)
        first = helper.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        time.sleep(0.2)
        assert helper.ask('{"again": true}', 10) == '{"again": true}'
        assert helper.pid not in (None, first)
        # One that dies on the request itself is retried once, then reported.
        with pytest.raises(Fault, match="exited without an answer"):
            helper.ask('{"die": 1}', 10)
    finally:
        helper.close()


def test_a_hung_helper_times_out_and_is_killed_with_its_children(tmp_path: Path) -> None:
    helper = ProbeHelper(_stand_in(tmp_path))
    try:
        helper.ask("{}", 10)
        hung = helper.pid
        assert hung is not None
        start = time.monotonic()
        with pytest.raises(Fault, match=r"timed out after 0\.5s"):
            helper.ask('{"hang": 1}', 0.5)
        assert time.monotonic() - start < 5
        assert helper.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(hung, 0)
        assert helper.ask('{"n": 3}', 10) == '{"n": 3}', "the next probe starts a new helper"
    finally:
        helper.close()


def test_the_real_probe_child_serves_request_lines(tmp_path: Path) -> None:
    """No targets: the real child still answers each line, and a bad line is answered too."""
    helper = ProbeHelper()
    try:
        assert json.loads(helper.ask(json.dumps({"paths": [], "targets": []}), 10)) == []
        bad = json.loads(helper.ask("not json", 10))
        assert bad["error"].startswith("bad request")
        assert json.loads(helper.ask(json.dumps({"paths": [], "targets": []}), 10)) == []
    finally:
        helper.close()
