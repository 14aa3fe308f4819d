"""The durable SQLite audit spool: chaining, permissions, concurrency, crashes."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ztgpu.audit.events import GENESIS_PREV, EventError, event_hash
from ztgpu.audit.spool import Spool, SystemClock
from ztgpu.errors import SpoolError

REPO_ROOT = Path(__file__).resolve().parents[1]
NODE = "gpu01"
GPU0 = {"index": 0, "uuid": "GPU-aaaa", "minor": 0}
GRANT: dict[str, Any] = {
    "job_id": "17", "uid": 1001, "user": "alice", "gpus": [GPU0], "outcome": "granted",
}  # fmt: skip


class FixedClock:
    """Always the same instant, so events are reproducible."""

    def __init__(self, moment: datetime = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)):
        self.moment = moment

    def now(self) -> datetime:
        return self.moment


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "audit.db"


@pytest.fixture
def spool(spool_path: Path) -> Iterator[Spool]:
    with Spool.open(spool_path, NODE, FixedClock()) as opened:
        yield opened


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def hook_error(spool: Spool, i: int) -> dict[str, Any]:
    return spool.append("hook.error", hook="prolog", reason=f"failure {i}")


# --- the event as stored --------------------------------------------------


def test_append_builds_the_envelope(spool: Spool) -> None:
    event = spool.append("job.grant", **GRANT)
    assert event == {
        "v": 1,
        "code": "job.grant",
        "severity": "info",
        "node": NODE,
        "seq": 1,
        "ts": "2026-11-26T12:00:00.123456Z",
        "prev": GENESIS_PREV,
        **GRANT,
        "hash": event_hash(event),
    }
    assert spool.head() == (1, event["hash"])


def test_appended_events_chain(spool: Spool) -> None:
    events = [hook_error(spool, i) for i in range(4)]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e["prev"] for e in events[1:]] == [e["hash"] for e in events[:-1]]
    assert spool.read() == events
    assert spool.verify().ok and spool.verify().checked == 4


def test_returned_event_does_not_alias_caller_data(spool: Spool) -> None:
    gpus = [dict(GPU0)]
    event = spool.append("job.grant", **{**GRANT, "gpus": gpus})
    gpus[0]["index"] = 7
    assert event["gpus"][0]["index"] == 0
    assert spool.read()[0]["gpus"][0]["index"] == 0


def test_invalid_event_writes_nothing(spool: Spool) -> None:
    with pytest.raises(EventError, match="missing required fields"):
        spool.append("job.grant", job_id="17")
    with pytest.raises(EventError, match="unknown event code"):
        spool.append("job.nonsense")
    with pytest.raises(EventError, match="envelope"):
        spool.append("hook.error", hook="prolog", reason="x", seq=99)
    assert spool.count() == 0 and spool.head() == (0, GENESIS_PREV)


def test_append_many_is_one_all_or_nothing_transaction(spool: Spool) -> None:
    stored = spool.append_many(
        [("agent.start", {"version": "0.1", "gpu_backend": "sim", "gpus": [GPU0]}),
         ("job.grant", GRANT)]
    )  # fmt: skip
    assert [e["seq"] for e in stored] == [1, 2] and stored[1]["prev"] == stored[0]["hash"]
    with pytest.raises(EventError):
        spool.append_many([("job.grant", GRANT), ("job.grant", {"job_id": "1"})])
    assert spool.count() == 2
    assert spool.append_many([]) == []


def test_naive_clock_is_refused_and_nothing_is_written(spool_path: Path) -> None:
    naive = FixedClock(datetime(2026, 11, 26, 12, 0))
    with Spool.open(spool_path, NODE, naive) as sp:
        with pytest.raises(EventError, match="timezone-aware"):
            hook_error(sp, 0)
        assert sp.count() == 0
        assert sp.head() == (0, GENESIS_PREV)


def test_system_clock_is_aware_utc() -> None:
    now = SystemClock().now()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)


# --- reading --------------------------------------------------------------


def test_read_filters_and_pages(spool: Spool) -> None:
    spool.append("job.grant", **GRANT)
    spool.append("job.grant", **{**GRANT, "job_id": "18"})
    hook_error(spool, 0)
    spool.append("job.release", **GRANT)
    assert [e["seq"] for e in spool.read(job_id="17")] == [1, 4]
    assert [e["seq"] for e in spool.read(code="job.grant")] == [1, 2]
    assert [e["seq"] for e in spool.read(after_seq=1, limit=2)] == [2, 3]
    assert [e["seq"] for e in spool.read(after_seq=4)] == []
    assert [e["seq"] for e in spool.last(2)] == [3, 4]
    assert [e["seq"] for e in spool.last(10)] == [1, 2, 3, 4]
    assert spool.count() == 4
    with pytest.raises(SpoolError, match="limit"):
        spool.read(limit=0)


def test_empty_spool(spool: Spool) -> None:
    assert spool.head() == (0, GENESIS_PREV)
    assert spool.count() == 0 and spool.read() == [] and spool.last(3) == []
    assert spool.verify().ok and spool.verify().checked == 0


def test_closed_spool_raises_spool_error(spool_path: Path) -> None:
    sp = Spool.open(spool_path, NODE, FixedClock())
    sp.close()
    with pytest.raises(SpoolError):
        hook_error(sp, 0)
    with pytest.raises(SpoolError):
        sp.read()


# --- files, reopen, ownership ---------------------------------------------


def test_spool_file_is_private(spool_path: Path, spool: Spool) -> None:
    hook_error(spool, 0)
    assert stat.S_IMODE(spool_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool_path.parent.stat().st_mode) == 0o700
    wal = spool_path.with_name(spool_path.name + "-wal")
    assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600


def test_existing_loose_file_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    with Spool.open(path, NODE, FixedClock()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_symlinked_spool_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "audit.db").symlink_to(target)
    with pytest.raises(SpoolError, match="cannot create spool file"):
        Spool.open(tmp_path / "audit.db", NODE, FixedClock())


def test_wal_and_full_sync_are_on(spool_path: Path, spool: Spool) -> None:
    conn = sqlite3.connect(spool_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    # FULL (2); this catches builds whose default is NORMAL (this one defaults to FULL)
    assert spool._conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_seq_is_gapless_across_reopen(spool_path: Path) -> None:
    with Spool.open(spool_path, NODE, FixedClock()) as sp:
        first = [hook_error(sp, i) for i in range(3)]
    with Spool.open(spool_path, NODE, FixedClock()) as sp:
        assert sp.head() == (3, first[-1]["hash"])
        nxt = hook_error(sp, 3)
        assert nxt["seq"] == 4 and nxt["prev"] == first[-1]["hash"]
        result = sp.verify()
    assert result.ok and result.checked == 4


def test_spool_of_another_node_is_refused(spool_path: Path) -> None:
    with Spool.open(spool_path, NODE, FixedClock()) as sp:
        hook_error(sp, 0)
    with pytest.raises(SpoolError, match="belongs to node 'gpu01', not 'gpu02'"):
        Spool.open(spool_path, "gpu02", FixedClock())


def test_empty_node_name_is_refused(spool_path: Path) -> None:
    with pytest.raises(SpoolError, match="node name"):
        Spool.open(spool_path, "", FixedClock())
    assert not spool_path.exists()


def test_unwritable_directory_raises_spool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolError, match="cannot create spool directory"):
        Spool.open(blocker / "sub" / "audit.db", NODE, FixedClock())


# --- tampering ------------------------------------------------------------


def tamper(path: Path, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(sql, params)
    finally:
        conn.close()


def test_verify_names_an_edited_row(spool_path: Path, spool: Spool) -> None:
    events = [hook_error(spool, i) for i in range(5)]
    edited = {**events[2], "reason": "all fine"}
    tamper(spool_path, "UPDATE events SET body = ? WHERE seq = 3", json.dumps(edited))
    result = spool.verify()
    assert not result.ok and result.first_bad_seq == 3 and result.checked == 2


def test_verify_names_a_deleted_row(spool_path: Path, spool: Spool) -> None:
    for i in range(5):
        hook_error(spool, i)
    tamper(spool_path, "DELETE FROM events WHERE seq = 2")
    result = spool.verify()
    assert not result.ok and result.first_bad_seq == 3
    assert result.problem == "gap: expected seq 2, found 3"


def test_verify_names_an_undecodable_row(spool_path: Path, spool: Spool) -> None:
    for i in range(3):
        hook_error(spool, i)
    tamper(spool_path, "UPDATE events SET body = '{not json' WHERE seq = 2")
    result = spool.verify()
    assert not result.ok and result.first_bad_seq == 2


# --- concurrency and crashes ------------------------------------------------

APPEND_N = """
import sys, time
from pathlib import Path
from ztgpu.audit.spool import Spool
path, who, n, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
with Spool.open(path, "gpu01") as sp:
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    for i in range(n):
        sp.append("hook.error", hook=who, reason=f"{who} {i}")
        time.sleep(0.001)  # let the other writer's busy handler win now and then
"""

APPEND_FOREVER = """
import sys
from pathlib import Path
from ztgpu.audit.spool import Spool
sp = Spool.open(Path(sys.argv[1]), "gpu01")
sp.append("hook.error", hook="child", reason="started")
print("ready", flush=True)
i = 0
while True:
    sp.append_many([("hook.error", {"hook": "child", "reason": f"loop {i}"})] * (1 + i % 3))
    i += 1
"""


def test_threads_appending_concurrently_keep_the_chain(spool: Spool) -> None:
    def work(t: int) -> None:
        for i in range(50):
            spool.append("hook.error", hook=f"t{t}", reason=str(i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert spool.count() == 200
    assert spool.head()[0] == 200
    assert spool.verify().ok


class GatedClock:
    """A clock whose first reading waits until ``waiting`` more appends are queued.

    The first append's commit then runs while the others queue behind it,
    so group commit must write all of them in the next single commit.
    """

    def __init__(self, spool_ref: list[Spool], waiting: int, fail: bool = False) -> None:
        self.spool_ref, self.waiting, self.fail, self.calls = spool_ref, waiting, fail, 0

    def now(self) -> datetime:
        self.calls += 1
        if self.calls == 1:
            deadline = time.monotonic() + 10
            while len(self.spool_ref[0]._waiting) < self.waiting:
                assert time.monotonic() < deadline, "the other appends never queued"
                time.sleep(0.001)
            if self.fail:
                raise OSError("clock failed mid-commit")
        return datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


def _commits(spool: Spool) -> list[str]:
    seen: list[str] = []
    spool._conn.set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


def test_concurrent_appends_share_one_commit(spool_path: Path) -> None:
    ref: list[Spool] = []
    with Spool.open(spool_path, NODE, GatedClock(ref, waiting=7)) as spool:
        ref.append(spool)
        commits = _commits(spool)
        results: dict[int, list[dict[str, Any]]] = {}

        def work(i: int) -> None:
            results[i] = spool.append_many([("hook.error", {"hook": f"t{i}", "reason": "a"}),
                                            ("hook.error", {"hook": f"t{i}", "reason": "b"})])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert len(commits) == 2, "the seven appends queued behind the first share one commit"
        assert spool.count() == 16 and spool.verify().ok
        # Each append's events are contiguous (all or none, in order) and returned as stored.
        for events in results.values():
            assert [e["reason"] for e in events] == ["a", "b"]
            assert events[1]["seq"] == events[0]["seq"] + 1
        assert sorted(e["seq"] for r in results.values() for e in r) == list(range(1, 17))


def test_a_failed_group_commit_fails_every_append_in_it(spool_path: Path) -> None:
    ref: list[Spool] = []
    clock = GatedClock(ref, waiting=0, fail=True)
    with Spool.open(spool_path, NODE, clock) as spool:
        ref.append(spool)
        with pytest.raises(OSError, match="mid-commit"):
            hook_error(spool, 0)
        assert spool.count() == 0, "nothing of a failed batch is written"
        assert hook_error(spool, 1)["seq"] == 1, "the next append starts a fresh batch"

    ref.clear()
    clock = GatedClock(ref, waiting=3, fail=True)
    with Spool.open(spool_path, NODE, clock) as spool:
        ref.append(spool)
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                hook_error(spool, i)
            except OSError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        # The leader's batch failed; the three queued behind it commit in the next one.
        assert len(errors) == 1 and spool.count() == 4 and spool.verify().ok


def test_two_processes_appending_concurrently_keep_a_gapless_chain(
    spool_path: Path, tmp_path: Path
) -> None:
    with Spool.open(spool_path, NODE):
        pass
    go, n = tmp_path / "go", 150
    children = [
        subprocess.Popen(
            [sys.executable, "-c", APPEND_N, str(spool_path), who, str(n), str(go)],
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for who in ("a", "b")
    ]
    try:
        assert [c.stdout.readline().strip() for c in children if c.stdout] == ["ready"] * 2
        go.touch()  # both are open and waiting: start them together
        assert [c.wait(timeout=120) for c in children] == [0, 0]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
            if c.stdout:
                c.stdout.close()
    with Spool.open(spool_path, NODE) as sp:
        events = sp.read(limit=10 * n)
        result = sp.verify()
    assert result.ok and result.checked == 2 * n
    assert [e["seq"] for e in events] == list(range(1, 2 * n + 1))
    writers = "".join(e["hook"] for e in events)
    assert writers.count("ab") + writers.count("ba") >= 2, "the two writers did not overlap"
    # both really wrote, each in its own order
    for who in ("a", "b"):
        mine = [e["reason"] for e in events if e["hook"] == who]
        assert mine == [f"{who} {i}" for i in range(n)]


def test_sigkill_mid_stream_leaves_a_valid_spool(spool_path: Path) -> None:
    rng = random.Random(20261126)
    counts = []
    for _ in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", APPEND_FOREVER, str(spool_path)],
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.02, 0.2))
        finally:
            child.kill()  # SIGKILL
            child.wait(timeout=30)
            if child.stdout is not None:
                child.stdout.close()
        assert child.returncode == -9
        with Spool.open(spool_path, NODE) as sp:
            result = sp.verify()
            assert result.ok, result
            counts.append(sp.count())
            assert sp.head()[0] == counts[-1]
    assert counts == sorted(set(counts)), "every round appended something"
    with Spool.open(spool_path, NODE, FixedClock()) as sp:
        seq, digest = sp.head()
        nxt = hook_error(sp, 0)
        assert nxt["seq"] == seq + 1 and nxt["prev"] == digest
        assert sp.verify().ok and sp.verify().checked == seq + 1


# --- acknowledged position, backlog, pruning --------------------------------


class SteppingClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.moment = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.moment


def test_acked_position_persists_across_reopen(spool_path: Path) -> None:
    with Spool.open(spool_path, NODE, FixedClock()) as sp:
        assert sp.acked_seq() == 0
        for i in range(5):
            hook_error(sp, i)
        sp.mark_acked(3)
        assert sp.acked_seq() == 3
    with Spool.open(spool_path, NODE, FixedClock()) as sp:
        assert sp.acked_seq() == 3
        assert sp.unacked_count() == 2


def test_ack_only_moves_forward(spool: Spool) -> None:
    for i in range(5):
        hook_error(spool, i)
    spool.mark_acked(4)
    spool.mark_acked(2)
    spool.mark_acked(4)
    assert spool.acked_seq() == 4
    spool.mark_acked(5)
    assert spool.acked_seq() == 5 and spool.unacked_count() == 0


def test_ack_beyond_the_head_is_refused(spool: Spool) -> None:
    with pytest.raises(SpoolError, match="cannot acknowledge seq 1, the newest event is seq 0"):
        spool.mark_acked(1)
    for i in range(3):
        hook_error(spool, i)
    spool.mark_acked(2)
    with pytest.raises(SpoolError, match="cannot acknowledge seq 4"):
        spool.mark_acked(4)
    assert spool.acked_seq() == 2


def test_backlog_figures_follow_the_spool_clock(spool_path: Path) -> None:
    clock = SteppingClock()
    with Spool.open(spool_path, NODE, clock) as sp:
        assert sp.backlog() == {
            "head_seq": 0, "acked_seq": 0, "unacked": 0,
            "oldest_unacked_ts": None, "oldest_unacked_age_s": None,
        }  # fmt: skip
        hook_error(sp, 0)
        clock.moment += timedelta(seconds=10)
        hook_error(sp, 1)
        clock.moment += timedelta(seconds=5, microseconds=500000)
        hook_error(sp, 2)
        assert sp.oldest_unacked_ts() == "2026-11-26T12:00:00.000000Z"
        assert sp.backlog() == {
            "head_seq": 3, "acked_seq": 0, "unacked": 3,
            "oldest_unacked_ts": "2026-11-26T12:00:00.000000Z", "oldest_unacked_age_s": 15.5,
        }  # fmt: skip
        sp.mark_acked(1)
        clock.moment += timedelta(seconds=4.5)
        backlog = sp.backlog()
        assert backlog["unacked"] == 2 and sp.unacked_count() == 2
        assert backlog["oldest_unacked_ts"] == "2026-11-26T12:00:10.000000Z"
        assert backlog["oldest_unacked_age_s"] == 10.0
        sp.mark_acked(3)
        assert sp.backlog()["oldest_unacked_age_s"] is None
        assert sp.oldest_unacked_ts() is None


def test_prune_keeps_unacked_events_and_the_chain_continues(spool: Spool) -> None:
    events = [hook_error(spool, i) for i in range(10)]
    spool.mark_acked(7)
    assert spool.prune_acked(3) == 4  # seq 1..4 go; the newest 3 acked (5..7) stay
    assert [e["seq"] for e in spool.read()] == list(range(5, 11))
    assert spool.read() == events[4:]
    result = spool.verify()
    assert result.ok and result.checked == 6
    assert spool.head() == (10, events[-1]["hash"])
    nxt = hook_error(spool, 10)
    assert nxt["seq"] == 11 and nxt["prev"] == events[-1]["hash"]
    assert spool.verify().ok
    assert spool.prune_acked(3) == 0  # nothing more is acknowledged
    assert spool.acked_seq() == 7 and spool.unacked_count() == 4


def test_prune_with_keep_zero_keeps_only_the_newest_acked_event(spool_path: Path) -> None:
    with Spool.open(spool_path, NODE, FixedClock()) as sp:
        events = [hook_error(sp, i) for i in range(6)]
        sp.mark_acked(4)
        assert sp.prune_acked(0) == 3
        assert [e["seq"] for e in sp.read()] == [4, 5, 6]
        sp.mark_acked(6)
        assert sp.prune_acked(0) == 2
        # everything is acknowledged: the head row stays, the chain continues from it
        assert sp.read() == [events[-1]] and sp.count() == 1
        assert sp.verify().ok
    with Spool.open(spool_path, NODE, FixedClock()) as sp:
        assert sp.head() == (6, events[-1]["hash"])
        nxt = hook_error(sp, 6)
        assert nxt["seq"] == 7 and nxt["prev"] == events[-1]["hash"]
        assert sp.verify().ok and sp.verify().checked == 2
        with pytest.raises(SpoolError, match="keep must be >= 0"):
            sp.prune_acked(-1)


def test_prune_without_acks_deletes_nothing(spool: Spool) -> None:
    for i in range(4):
        hook_error(spool, i)
    assert spool.prune_acked(0) == 0
    assert spool.count() == 4 and spool.verify().ok


def test_verify_after_prune_still_checks_the_first_remaining_link(
    spool_path: Path, spool: Spool
) -> None:
    events = [hook_error(spool, i) for i in range(6)]
    spool.mark_acked(5)
    spool.prune_acked(2)  # seq 4.. remain, seq 3 is the recorded anchor
    tamper(spool_path, "DELETE FROM events WHERE seq = 4")
    result = spool.verify()
    assert not result.ok and result.first_bad_seq == 5
    assert result.problem == "gap: expected seq 4 after the pruned ones, found 5"
    forged = {**events[3], "prev": "f" * 64}
    forged["hash"] = event_hash(forged)
    tamper(spool_path, "INSERT INTO events (seq, ts, code, job_id, body, hash) "
                       "VALUES (4, ?, ?, NULL, ?, ?)",
           forged["ts"], forged["code"], json.dumps(forged), forged["hash"])  # fmt: skip
    result = spool.verify()
    assert not result.ok and result.first_bad_seq == 4
    assert result.problem == "prev does not match the hash of pruned seq 3"
