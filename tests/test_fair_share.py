"""Fair sharing between users: the claim policy (priority, then the submitter's recent usage of the
workers, then id) on SQLite and Postgres, and the priority caps an admin sets (`qrun cap-priority`)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from helpers import run_qrun
from sqlalchemy import update

from qrun.db import queue
from qrun.db.errors import BadInput
from qrun.db.schema import Event, Job
from qrun.db.session import open_database
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
    with pytest.raises(BadInput, match="only qrun's admins"):
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


# ---------------------------------------------------------------- usage: worker time, decayed


def _drain_one_worker(db) -> list[int]:
    """Claim and finish every job with one worker, in turn; the ids in the order claimed."""
    order = []
    while (job := queue.claim_job(db, "w1", None)) is not None:
        order.append(job.id)
        _finish(db, job)
    return order


def test_a_lone_job_is_claimed_second_behind_another_users_long_sweep(any_db):
    """One worker, bob's 12 jobs, then carol's one: once bob's first job has run, carol has used the
    workers less than bob, so hers comes next, not after bob's eleven others."""
    bob = queue.submit_jobs(any_db, _specs(12), user="bob")
    (carol,) = queue.submit_jobs(any_db, _specs(1), user="carol")
    assert _drain_one_worker(any_db) == [bob[0], carol] + bob[1:]


def test_a_lone_job_starts_at_the_next_free_worker_among_three_users(any_db):
    """Two workers (two processes: each reads the other's runs from the table), alice's 9 jobs, bob's
    10 and carol's one, submitted last: the first worker to be free takes carol's."""
    alice = queue.submit_jobs(any_db, _specs(9), user="alice")
    bob = queue.submit_jobs(any_db, _specs(10), user="bob")
    (carol,) = queue.submit_jobs(any_db, _specs(1), user="carol")
    other = open_database(any_db.url)
    try:
        first = queue.claim_job(any_db, "w1", None)
        second = queue.claim_job(other, "w2", None)
        assert (first.id, second.id) == (alice[0], bob[0])
        _finish(other, second)
        assert queue.claim_job(other, "w2", None).id == carol
        _finish(any_db, first)
        assert queue.claim_job(any_db, "w1", None).id == alice[1]
    finally:
        other.dispose()


def _ran(db, job_id: int, began_ago: timedelta, ended_ago: timedelta) -> None:
    """Pretend the finished job ran from `began_ago` to `ended_ago` (the queue's functions write now)."""
    now = queue.utcnow()
    with db.transaction() as s:
        s.execute(update(Job).where(Job.id == job_id).values(started_at=now - began_ago, finished_at=now - ended_ago))
        s.execute(update(Event).where(Event.job_id == job_id, Event.transition == "claim").values(at=now - began_ago))
        s.execute(update(Event).where(Event.job_id == job_id, Event.transition == "succeed").values(at=now - ended_ago))


def _history(url: str, runs: list[tuple[str, timedelta, timedelta]]) -> None:
    """Runs of (user, began ago, ended ago), made by another process (a fresh connection)."""
    maker = open_database(url)
    try:
        for user, began_ago, ended_ago in runs:
            (job_id,) = queue.submit_jobs(maker, _specs(1), user=user)
            _finish(maker, queue.claim_job(maker, "old-worker", None))
            _ran(maker, job_id, began_ago, ended_ago)
    finally:
        maker.dispose()


def test_usage_is_worker_time_not_jobs(any_db):
    """alice ran one job of two hours that ended just now, bob five of one minute: bob's next job goes
    first, though alice's is older and bob ran more jobs."""
    minute = timedelta(minutes=1)
    _history(any_db.url, [("alice", 120 * minute, timedelta(0))]
             + [("bob", (n + 1) * minute, n * minute) for n in range(5)])
    (alice,) = queue.submit_jobs(any_db, _specs(1), user="alice")
    (bob,) = queue.submit_jobs(any_db, _specs(1), user="bob")
    assert _drain_one_worker(any_db) == [bob, alice]


def test_old_usage_fades(any_db):
    """alice's two-hour run ended ten hours ago (forgotten: it halves every hour), bob's five minutes
    just now: alice's job goes first, though bob's is older and his run was shorter."""
    _history(any_db.url, [("alice", timedelta(hours=12), timedelta(hours=10)),
                          ("bob", timedelta(minutes=6), timedelta(minutes=1))])
    usage = queue.user_usage(any_db)
    assert usage.get("alice", 0) < 1 and 290 < usage["bob"] < 300  # five minutes, a minute ago
    (bob,) = queue.submit_jobs(any_db, _specs(1), user="bob")
    (alice,) = queue.submit_jobs(any_db, _specs(1), user="alice")
    assert _drain_one_worker(any_db) == [alice, bob]



def test_a_job_given_back_keeps_its_users_turn(any_db):
    """A claimer that read the queue while alice's only job ran elsewhere still gives her the next turn
    once that job is given back (Ctrl-C, a lost worker): the release puts her back among those waiting."""
    _history(any_db.url, [("bob", timedelta(minutes=30), timedelta(minutes=1))])
    bob = queue.submit_jobs(any_db, _specs(3), user="bob")
    (alice,) = queue.submit_jobs(any_db, _specs(1), user="alice")
    other = open_database(any_db.url)
    try:
        assert queue.claim_job(other, "w2", None).id == alice  # she has used nothing
        assert queue.claim_job(any_db, "w1", None).id == bob[0]  # this claimer's first read: only bob waits
        queue.release_job(other, alice, "w2", "stopped (Ctrl-C)")
        assert queue.claim_job(any_db, "w1", None).id == alice
    finally:
        other.dispose()
