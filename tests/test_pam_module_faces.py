"""The compiled module (pam_ztgpu.so) and the pam_python one decide the same.

Each case runs the real PAM library through ``pamtester`` on a private PAM
service whose stack ``ztgpu install --pam --pam-module KIND`` wrote, with a
scripted agent on a unix socket in place of ztgpu-noded: it records what the
module asked (parsed as the agent parses it) and answers what the case says,
including nonsense, a busy agent and no agent at all. The real agent behind
a real sshd is tests/test_pam_sshd.py's; this file pins down every failure
mode's action for both faces, cheaply.

The compiled module's JSON reader is also run on its own, built with
AddressSanitizer and UBSan, against Python's reading of the same bytes.
"""

from __future__ import annotations

import json
import random
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ztgpu.pam.install import source_path

from ztgpu.testing.prerequisites import require
from ztgpu.testing.sshd import PAM_DIR

ZTGPU = str(Path(sys.executable).with_name("ztgpu"))
KINDS = ["compiled", "python"]
DENY_ALL = {"no_agent": "deny", "no_job": "deny", "adopt_failure": "deny", "error": "deny"}


def ok(**result: object) -> bytes:
    return json.dumps({"ok": True, "result": result}).encode()


class ScriptedAgent:
    """A unix socket that answers each request with the next scripted answer
    (the last one repeats) and keeps the requests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answers: list[bytes] = [ok(allow=True, code="job", message="")]
        self.requests: list[dict[str, object]] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(16)
        self._server.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def script(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.requests = []

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(json.loads(data))
                answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                conn.sendall(answer + b"\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


class Service:
    def __init__(self, kind: str, base: Path) -> None:
        self.kind = kind
        self.base = base
        self.name = f"ztgpu-faces-{secrets.token_hex(4)}"
        self.log = base / "pam.log"
        self.config = base / "ztgpu.yaml"
        self.config.write_text(yaml.safe_dump({"paths": {
            "hooks_dir": str(base / "libexec"), "socket": str(base / "agent.sock")}}))
        self.path = PAM_DIR / self.name
        self.path.write_text("# private test PAM service (tests/test_pam_module_faces.py)\n")
        self.agent = ScriptedAgent(base / "agent.sock")

    def install(self, *options: str) -> None:
        res = subprocess.run([ZTGPU, "--config", str(self.config), "install", "--pam",
                              self.name, "--pam-module", self.kind,
                              *(f"--pam-option={o}" for o in (f"log={self.log}", *options))],
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr

    def edit(self, old: str, new: str) -> None:
        text = self.path.read_text()
        assert old in text, text
        self.path.write_text(text.replace(old, new))

    def pamtester(self, user: str, *ops: str,
                  rhost: str = "10.1.2.3") -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(require("pamtester")), "-I", f"rhost={rhost}", self.name,
                               user, *ops], capture_output=True, text=True, timeout=60,
                              check=False)

    def logged(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture(scope="module", params=KINDS)
def service(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(request.param, tmp_path_factory.mktemp(f"pam-{request.param}"))
    try:
        yield svc
    finally:
        svc.agent.close()
        svc.path.unlink(missing_ok=True)


@pytest.fixture
def svc(service: Service) -> Iterator[Service]:
    service.install()
    service.log.unlink(missing_ok=True)
    service.agent.script(ok(allow=True, code="job", message=""))
    yield service


def test_a_login_with_a_job_asks_the_agent_for_each_phase_with_the_same_fields(svc):
    svc.agent.script(ok(allow=True, code="job", jobs=["7"], message=""),
                     ok(adopted=True, job_id="7", message="ztgpu: this session runs in job 7"),
                     ok(closed=True))
    res = svc.pamtester("ztalice", "acct_mgmt", "open_session", "close_session",
                        rhost='odd"host\\name')
    assert res.returncode == 0, (res.stdout, res.stderr, svc.logged())
    assert "this session runs in job 7" in res.stdout + res.stderr
    fields = {"v": 1, "user": "ztalice", "rhost": 'odd"host\\name', "service": svc.name,
              "actions": DENY_ALL}
    assert svc.agent.requests == [
        {**fields, "op": "ssh_account"},
        {**fields, "op": "ssh_open", "target": "self", "break_glass": False},
        {**fields, "op": "ssh_close", "target": "self"}]
    log = svc.logged()
    assert "allowed (job)" in log and "adopted into job 7" in log, log


def test_no_job_is_denied_with_the_agents_message(svc):
    svc.agent.script(ok(allow=False, code="no_job",
                        message="ztgpu: access denied: you have no running job on n1."))
    res = svc.pamtester("ztcarol", "acct_mgmt")
    assert res.returncode != 0, res
    assert "you have no running job on n1." in res.stdout + res.stderr
    assert "refused by the node agent (no_job); action_no_job=deny" in svc.logged()
    svc.install("action_no_job=allow")
    assert svc.pamtester("ztcarol", "acct_mgmt").returncode == 0
    assert svc.agent.requests[-1]["actions"] == {**DENY_ALL, "no_job": "allow"}


def test_no_agent_denies_users_but_lets_root_and_break_glass_in(svc):
    svc.edit(f"socket={svc.base / 'agent.sock'}", f"socket={svc.base / 'gone.sock'}")
    res = svc.pamtester("ztalice", "acct_mgmt")
    assert res.returncode != 0 and "access service is down" in res.stdout + res.stderr, res
    assert "is not running (no socket at" in svc.logged()
    assert "action_no_agent=deny" in svc.logged()
    assert svc.pamtester("root", "acct_mgmt", "open_session").returncode == 0
    svc.install("break_glass=ztops,hpc")
    svc.edit(f"socket={svc.base / 'agent.sock'}", f"socket={svc.base / 'gone.sock'}")
    res = svc.pamtester("ztops", "acct_mgmt", "open_session", "close_session")
    assert res.returncode == 0, (res, svc.logged())
    assert "break-glass" in svc.logged()
    svc.install("action_no_agent=allow")
    svc.edit(f"socket={svc.base / 'agent.sock'}", f"socket={svc.base / 'gone.sock'}")
    assert svc.pamtester("ztalice", "acct_mgmt").returncode == 0
    assert "action_no_agent=allow" in svc.logged()


def test_a_break_glass_login_is_recorded_by_the_agent_without_being_asked(svc):
    svc.install("break_glass=ztops")
    svc.agent.script(ok(allow=False, code="no_job", message="no"),  # must not matter
                     ok(adopted=False, job_id=None, message=""))
    assert svc.pamtester("ztops", "acct_mgmt", "open_session").returncode == 0
    assert [(r["op"], r.get("break_glass")) for r in svc.agent.requests] == [
        ("ssh_account", True), ("ssh_open", True)]


@pytest.mark.parametrize("answer, why", [
    (b'{"ok":true,"result":[1,2,3]}', "a result that is not an object"),
    (b"not json at all", "not JSON"),
    (b'{"ok":true,"result":{"allow":true', "cut short"),
    (b'{"ok":"yes"}', "no boolean ok"),
    (b'{"ok":false,"kind":"bad_request","error":"\'user\' must be a user name"}',
     "a refused request"),
])
def test_an_answer_the_module_cannot_use_denies_as_an_internal_error(svc, answer, why):
    svc.agent.script(answer)
    res = svc.pamtester("ztalice", "acct_mgmt")
    assert res.returncode != 0, (why, res)
    assert "internal error" in res.stdout + res.stderr, (why, res)
    assert "action_error=deny" in svc.logged(), (why, svc.logged())
    assert svc.pamtester("root", "acct_mgmt").returncode == 0


def test_a_busy_agent_is_asked_again_within_the_timeout(svc):
    busy = b'{"ok":false,"kind":"busy","error":"agent busy"}'
    svc.agent.script(busy, busy, ok(allow=True, code="job", message=""))
    res = svc.pamtester("ztalice", "acct_mgmt")
    assert res.returncode == 0, (res, svc.logged())
    assert len(svc.agent.requests) == 3


def test_a_session_the_agent_cannot_adopt_takes_action_adopt_failure(svc):
    fault = b'{"ok":false,"kind":"fault","error":"could not put the session into job 7: boom"}'
    svc.agent.script(ok(allow=True, code="job", message=""), fault)
    res = svc.pamtester("ztalice", "acct_mgmt", "open_session")
    assert res.returncode != 0, res
    assert "could not be put into your job" in res.stdout + res.stderr, res
    assert "boom; action_adopt_failure=deny" in svc.logged(), svc.logged()
    svc.install("action_adopt_failure=allow")
    svc.agent.script(ok(allow=True, code="job", message=""), fault)
    assert svc.pamtester("ztalice", "acct_mgmt", "open_session").returncode == 0
    svc.agent.script(ok(adopted=False, code="no_job", job_id=None, message="none here"))
    res = svc.pamtester("ztalice", "open_session")
    assert res.returncode != 0 and "action_no_job=deny" in svc.logged(), res


@pytest.mark.parametrize("word, problem", [
    ("socket", "has no '='"),
    ("socket=relative", "not an absolute path"),
    ("timeout=0", "more than 0"),
    ("timeout=soon", "not a number"),
    ("action_no_job=maybe", "'deny' or 'allow'"),
    ("action_adopt_faliure=allow", "unknown option 'action_adopt_faliure'"),
    ("break_glass=a,,b", "not a comma-separated list"),
])
def test_a_bad_option_refuses_users_names_the_word_and_spares_break_glass(svc, word, problem):
    svc.install("break_glass=ztops")
    svc.edit("break_glass=ztops", f"break_glass=ztops {word}")
    res = svc.pamtester("ztalice", "acct_mgmt")
    assert res.returncode != 0 and "PAM configuration is broken" in res.stdout + res.stderr
    log = svc.logged()
    assert "configuration error, login refused" in log and problem in log, log
    assert svc.pamtester("root", "acct_mgmt").returncode == 0
    if not word.startswith("break_glass"):
        assert svc.pamtester("ztops", "acct_mgmt").returncode == 0
    assert svc.agent.requests == []


# ---- the compiled module's JSON reader, on its own ------------------------

@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reader") / "answer-reader"
    subprocess.run([str(require("gcc")), "-g", "-O1", "-Wall", "-Wextra", "-Werror",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-DZTGPU_PAM_SELFTEST", "-o", str(out), str(source_path())],
                   check=True, capture_output=True, text=True)
    return out


def read_with(reader: Path, raw: bytes) -> dict[str, str]:
    res = subprocess.run([str(reader)], input=raw, capture_output=True, timeout=30,
                         check=False)
    assert res.returncode == 0, (raw, res.stderr.decode(errors="replace")[-3000:])
    return dict(line.split("=", 1) for line in res.stdout.decode().splitlines())


def _no_constants(name: str) -> object:
    raise ValueError(name)


def _deepest(value: object, level: int = 0) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return max((_deepest(v, level + 1) for v in value), default=level)
    return level


def expected(raw: bytes) -> dict[str, str] | None:
    """What the C reader must find, read by Python; None: not an answer."""
    try:
        value = json.loads(raw.decode("ascii"), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("ok"), bool):
        return None
    if _deepest(value) > 32:  # the C reader refuses deeper nesting than answers have
        return None

    def text(obj: dict[str, object], key: str) -> str:
        v = obj.get(key)
        if not isinstance(v, str):
            return ""
        shown = []
        v = "".join("\ufffd" if c == "\0" or 0xD800 <= ord(c) < 0xE000 else c for c in v)
        for byte in v.encode("utf-8")[:1000]:
            ch = chr(byte)
            shown.append(f"\\x{byte:02x}" if byte < 0x20 or byte >= 0x7f or ch == "\\" else ch)
        return "".join(shown)

    def flag(obj: dict[str, object], key: str) -> str:
        v = obj.get(key)
        return str(int(v)) if isinstance(v, bool) else "-1"

    result = value.get("result") if value["ok"] else None
    res = result if isinstance(result, dict) else {}
    return {"valid": "1", "ok": str(int(value["ok"])), "has_result": str(int(bool(
        isinstance(result, dict)))), "allow": flag(res, "allow"), "adopted": flag(res, "adopted"),
        "kind": text(value, "kind"), "error": text(value, "error"), "code": text(res, "code"),
        "message": text(res, "message"), "job_id": text(res, "job_id")}


SEEDS = [
    b'{"ok":true,"result":{"allow":true,"code":"job","jobs":["7","8"],"message":""}}',
    b'{"ok":true,"result":{"adopted":true,"job_id":"7","message":"ztgpu: runs in job 7"}}',
    b'{"ok":false,"kind":"fault","error":"could not put the session into job 7: \\u00e9"}',
    b' {"ok" : true , "result" : {"allow" : false, "code" : "no_job", "message" : '
    b'"a\\"b\\\\c\\/d\\b\\f\\n\\r\\t\\ud83d\\ude00\\udc00"}, "x": [1, -0.5e+3, null, {}]} ',
    b'{"ok":true,"ok":false,"kind":"busy","error":"x","error":"last"}',
    b'{"ok":true,"result":{"allow":1,"code":7,"message":null}}',
]


@pytest.mark.parametrize("raw", SEEDS)
def test_the_readers_agree_on_answers(reader, raw):
    assert read_with(reader, raw) == expected(raw)


def test_the_readers_agree_on_mutated_answers(reader):
    """Random ASCII mutations of real answers: where Python reads an answer
    the C reader finds the same fields, where it does not the C reader says
    invalid, and the sanitizers see no bad access in either case."""
    rng = random.Random(1205)
    alphabet = b'{}[]":,\\ntrufalse0123456789.-+eE \t"okresultallowmessage\\u'
    cases = []
    for _ in range(400):
        raw = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(raw) + 1)
            op = rng.randrange(3)
            if op == 0 and raw:
                del raw[min(where, len(raw) - 1)]
            elif op == 1:
                raw[where:where] = bytes([rng.choice(alphabet)])
            elif raw:
                raw[min(where, len(raw) - 1)] = rng.choice(alphabet)
        cases.append(bytes(raw))
    cases += [SEEDS[0][:n] for n in range(len(SEEDS[0]))]  # every truncation
    cases += [b"[" * 5000, b'{"ok":true,"result":' * 200 + b"{}" + b"}" * 200]
    disagree = []
    for raw in cases:
        got = read_with(reader, raw)
        want = expected(raw)
        if (want is None and got["valid"] != "0") or (want is not None and got != want):
            disagree.append((raw, got, want))
    assert not disagree, disagree[:3]
    valid = sum(1 for raw in cases if expected(raw) is not None)
    assert 20 < valid < len(cases) - 20, valid  # both kinds were really tried
