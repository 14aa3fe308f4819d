"""The agent's state file: what a grant records survives, and older files open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ztgpu.noded.state import JobRecord, StateStore


def test_a_grants_partition_clock_and_ecc_counts_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.put(JobRecord(job_id="7", uid=1000, gid=1000, user="alice", minors=(0, 2),
                        granted_at="2026-01-01T00:00:00+00:00", partition="gpu",
                        account="proj-a", granted_us=123456789, ecc_at_grant=((0, 2), (2, 0))))
    store.close()
    record = StateStore(path).all()["7"]
    assert (record.partition, record.account, record.granted_us, record.ecc_at_grant) == (
        "gpu", "proj-a", 123456789, ((0, 2), (2, 0)))
    assert record.minors == (0, 2)


def test_a_state_file_from_before_the_grant_details_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:  # the jobs table as earlier versions wrote it
        db.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, uid INTEGER NOT NULL,"
                   " gid INTEGER NOT NULL, user TEXT NOT NULL, minors TEXT NOT NULL,"
                   " granted_at TEXT NOT NULL)")
        db.execute("INSERT INTO jobs VALUES ('9', 1001, 1001, 'bob', '[1]', '2026-01-01')")
    store = StateStore(path)
    record = store.all()["9"]
    assert (record.user, record.minors) == ("bob", (1,))
    # Nothing known from the grant: no partition, Xid from boot on, no ECC counts.
    assert (record.partition, record.account, record.granted_us,
            record.ecc_at_grant) == (None, None, 0, ())
    store.delete("9")
    assert store.all() == {}


def test_unreadable_grant_details_fall_back_to_none_known(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.put(JobRecord(job_id="5", uid=1, gid=1, user="u", minors=(3,), granted_at="t"))
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE job_meta SET meta = ? WHERE job_id = '5'",
                   ('{"partition": 7, "granted_us": "soon", "ecc_at_grant": [[3, "x"], 4]}',))
    record = StateStore(path).all()["5"]
    assert (record.partition, record.granted_us, record.ecc_at_grant) == (None, 0, ())
    with sqlite3.connect(path) as db:
        db.execute("UPDATE job_meta SET meta = 'not json' WHERE job_id = '5'")
    assert StateStore(path).all()["5"].partition is None
