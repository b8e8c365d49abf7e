"""Fair sharing between users: the claim policy (priority, then the submitter's running jobs, then id)
on SQLite and Postgres, and the priority caps an admin sets (`qrun cap-priority`)."""

from __future__ import annotations

import os

import pytest
from helpers import run_qrun

from qrun.db import queue
from qrun.db.errors import BadInput
from qrun.db.states import Kind


def _specs(n: int, priority: int = 0) -> list[queue.JobSpec]:
    return [queue.JobSpec(kind=Kind.QUANTIZE, model="/m", params={"bits": 4, "n": i}, priority=priority)
            for i in range(n)]


def _finish(db, job) -> None:
    queue.finish_job(db, job.id, job.worker, {})


def test_two_workers_take_turns_between_users(any_db):
    a = queue.submit_jobs(any_db, _specs(6), user="alice")
    b = queue.submit_jobs(any_db, _specs(2), user="bob")
    claimed = []
    for _round in range(4):  # claim, claim, finish both
        first = queue.claim_job(any_db, "w1", None)
        second = queue.claim_job(any_db, "w2", None)
        claimed += [first.id, second.id]
        _finish(any_db, first)
        _finish(any_db, second)
    assert set(b) <= set(claimed[:4])
    assert claimed[:4] == [a[0], b[0], a[1], b[1]]
    assert claimed[4:] == a[2:]


def test_priority_still_comes_first(any_db):
    low = queue.submit_jobs(any_db, _specs(2), user="bob")
    high = queue.submit_jobs(any_db, _specs(3, priority=5), user="alice")
    got = [queue.claim_job(any_db, f"w{i}", None).id for i in range(5)]
    assert got == high + low  # alice's running jobs do not let bob's lower-priority job in first


def test_fewest_running_first_among_three_users(any_db):
    a = queue.submit_jobs(any_db, _specs(4), user="alice")
    b = queue.submit_jobs(any_db, _specs(4), user="bob")
    c = queue.submit_jobs(any_db, _specs(4), user="carol")
    got = [queue.claim_job(any_db, f"w{i}", None).id for i in range(6)]
    assert got == [a[0], b[0], c[0], a[1], b[1], c[1]]


def test_waiting_eval_does_not_stop_the_turns(any_db):
    """A user's first job in id order that is not ready (its upstream runs) is passed over."""
    a = queue.submit_jobs(any_db, [queue.JobSpec(kind=Kind.QUANTIZE, model="/m", params={"bits": 4}),
                                   queue.JobSpec(kind=Kind.EVAL, model="/m", params={}, after=0)], user="alice")
    b = queue.submit_jobs(any_db, _specs(1), user="bob")
    assert queue.claim_job(any_db, "w1", None).id == a[0]
    assert queue.claim_job(any_db, "w2", None).id == b[0]
    assert queue.claim_job(any_db, "w3", None) is None  # the eval waits for its quantize job


def test_priority_caps_in_the_meta_table(any_db):
    queue.set_priority_cap(any_db, "alice", 3)
    assert queue.priority_cap(any_db, "alice") == 3
    assert queue.priority_caps(any_db) == {"alice": 3}
    from qrun.sweeps import check_priority_cap

    check_priority_cap(any_db, 3, user="alice")
    check_priority_cap(any_db, 100, user="bob")
    with pytest.raises(BadInput, match="above the cap of 3 set for alice"):
        check_priority_cap(any_db, 4, user="alice")
    queue.set_priority_cap(any_db, "alice", None)
    check_priority_cap(any_db, 4, user="alice")


def test_cap_priority_command_and_submit_refusal(qrun_home, tiny_qwen2):
    me = queue.current_user()
    r = run_qrun("cap-priority", me, "2")
    assert r.returncode == 0, r.stderr
    assert run_qrun("cap-priority").stdout.split() == [me, "2"]
    refused = run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--priority", "3")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "above the cap of 2 set for" in lines[0], refused.stderr
    ok = run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--priority", "2")
    assert ok.returncode == 0, ok.stderr
    assert run_qrun("cap-priority", me, "--clear").returncode == 0
    assert run_qrun("cap-priority").stdout == ""
    assert run_qrun("cap-priority", me).returncode == 2  # neither a cap nor --clear


def test_only_the_database_owner_sets_caps(db, monkeypatch):
    from qrun.housekeeping import check_admin as _check_admin

    _check_admin(db)  # the owner (this test created the file)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(db.url[len("sqlite:///"):]).st_uid + 1)
    with pytest.raises(BadInput, match="only the owner of"):
        _check_admin(db)


def test_the_runner_sees_the_same_pick(any_db):
    """most_urgent_ready_job (which job the runner makes room for) follows the claim policy."""
    queue.submit_jobs(any_db, _specs(3), user="alice")
    (b,) = queue.submit_jobs(any_db, [queue.JobSpec(kind=Kind.QUANTIZE, model="/m", params={"gpus": 2})],
                             user="bob")
    queue.claim_job(any_db, "w1", None)
    assert queue.most_urgent_ready_job(any_db) == (b, 2)


def test_every_way_in_meets_the_cap(any_db):
    """queue.submit_jobs itself refuses (qrun eval and the API submit through it), adding nothing."""
    queue.set_priority_cap(any_db, "alice", 1)
    with pytest.raises(BadInput, match="above the cap of 1 set for alice"):
        queue.submit_jobs(any_db, _specs(1) + _specs(1, priority=2), user="alice")
    assert queue.list_jobs(any_db) == []
    assert len(queue.submit_jobs(any_db, _specs(1, priority=2), user="bob")) == 1
