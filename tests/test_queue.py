"""The queue's transitions on a real SQLite file and a real Postgres database: claim, leases, attempts,
cancel, dependencies, schema."""

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from qrun.db import queue
from qrun.db.errors import BadInput, JobLost, SchemaTooNew, TransitionError
from qrun.db.queue import JobSpec
from qrun.db.schema import SCHEMA_VERSION, Event, Job, Meta
from qrun.db.session import open_database
from qrun.db.states import Kind, Status


@pytest.fixture
def db(any_db):
    """Every test here runs on SQLite and on Postgres (conftest's any_db)."""
    return any_db


def spec(**kw) -> JobSpec:
    return JobSpec(kind=kw.pop("kind", Kind.QUANTIZE), model=kw.pop("model", "/models/m"),
                   params=kw.pop("params", {"bits": 4}), **kw)


def test_claim_takes_highest_priority_then_oldest(db):
    low, high, high2 = queue.submit_jobs(db, [spec(priority=0), spec(priority=5), spec(priority=5)])
    order = [queue.claim_job(db, f"w{i}", None).id for i in range(3)]
    assert order == [high, high2, low]
    assert queue.claim_job(db, "w9", None) is None


def test_claim_records_holder_attempt_and_lease(db):
    (job_id,) = queue.submit_jobs(db, [spec()])
    job = queue.claim_job(db, "host:1:gpu0", "3", lease_s=30)
    assert (job.id, job.status, job.worker, job.gpu, job.attempts) == (job_id, "running", "host:1:gpu0", "3", 1)
    assert job.lease_expires_at > job.started_at
    assert [e.transition for e in queue.events_of(db, job_id)] == ["submit", "claim"]


def test_dependent_job_waits_for_upstream(db):
    up, down = queue.submit_jobs(db, [spec(), spec(kind=Kind.EVAL, after=0)])
    assert queue.get_job(db, down).depends_on == up
    assert queue.claim_job(db, "w1", None).id == up
    assert queue.claim_job(db, "w2", None) is None  # downstream not ready while upstream runs
    queue.finish_job(db, up, "w1", {"x": 1.0})
    assert queue.claim_job(db, "w2", None).id == down


def test_failed_upstream_fails_dependents_with_reason(db):
    up, down = queue.submit_jobs(db, [spec(), spec(kind=Kind.EVAL, after=0)])
    queue.claim_job(db, "w1", None)
    queue.fail_job(db, up, "w1", "boom")
    assert queue.claim_job(db, "w2", None) is None
    job = queue.get_job(db, down)
    assert job.status == "failed" and job.error == f"upstream job {up} failed"


def _expire(db, job_id):
    with db.transaction() as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(lease_expires_at=queue.utcnow() - timedelta(seconds=1)))


def test_expired_lease_requeues_then_fails_after_max_attempts(db):
    (job_id,) = queue.submit_jobs(db, [spec(max_attempts=2)])
    queue.claim_job(db, "dead-worker", None)
    _expire(db, job_id)
    assert queue.reap_expired_leases(db) == [job_id]
    job = queue.get_job(db, job_id)
    assert job.status == "queued" and "dead-worker lost" in job.error and job.worker is None
    assert queue.claim_job(db, "second", None).attempts == 2
    _expire(db, job_id)
    queue.reap_expired_leases(db)
    job = queue.get_job(db, job_id)
    assert job.status == "failed" and "no attempts left" in job.error


def test_old_holder_cannot_finish_a_requeued_job(db):
    (job_id,) = queue.submit_jobs(db, [spec()])
    queue.claim_job(db, "old", None)
    _expire(db, job_id)
    queue.claim_job(db, "new", None)  # reaps, then claims again
    with pytest.raises(JobLost):
        queue.finish_job(db, job_id, "old", {"m": 1})
    with pytest.raises(JobLost):
        queue.record_progress(db, job_id, "old", 1, 2, None)
    queue.finish_job(db, job_id, "new", {"m": 2})
    assert queue.metrics_of(db, [job_id]) == {job_id: {"m": 2.0}}


def test_finishing_twice_is_refused(db):
    (job_id,) = queue.submit_jobs(db, [spec()])
    queue.claim_job(db, "w", None)
    queue.finish_job(db, job_id, "w", {"m": 1})
    with pytest.raises(JobLost):
        queue.finish_job(db, job_id, "w", {"m": 1})
    assert len(queue.metrics_of(db, [job_id])[job_id]) == 1


def test_cancel_running_job_reaches_worker_at_next_progress(db):
    (job_id,) = queue.submit_jobs(db, [spec()])
    queue.claim_job(db, "w", None)
    queue.record_progress(db, job_id, "w", 1, 4, "layer 1")
    queue.cancel_jobs(db, [job_id])
    with pytest.raises(JobLost, match="cancelled"):
        queue.record_progress(db, job_id, "w", 2, 4, "layer 2")
    assert queue.get_job(db, job_id).status == "cancelled"


def test_cancel_needs_force_for_another_users_job(db):
    (job_id,) = queue.submit_jobs(db, [spec()], user="alice")
    with pytest.raises(TransitionError, match=f"job {job_id} belongs to alice: add --force"):
        queue.cancel_jobs(db, [job_id], user="bob")
    assert queue.get_job(db, job_id).status == "queued"
    queue.cancel_jobs(db, [job_id], user="bob", force=True)
    assert queue.get_job(db, job_id).status == "cancelled"


def test_retryable_failure_requeues_within_attempts(db):
    (job_id,) = queue.submit_jobs(db, [spec(max_attempts=2)])
    queue.claim_job(db, "w", None)
    assert queue.fail_job(db, job_id, "w", "out of memory", retryable=True) == Status.QUEUED
    queue.claim_job(db, "w", None)
    assert queue.fail_job(db, job_id, "w", "out of memory", retryable=True) == Status.FAILED


def test_release_does_not_count_an_attempt(db):
    (job_id,) = queue.submit_jobs(db, [spec()])
    queue.claim_job(db, "w", None)
    queue.release_job(db, job_id, "w", "Ctrl-C")
    job = queue.get_job(db, job_id)
    assert (job.status, job.attempts, job.worker) == ("queued", 0, None)


def test_retry_resets_attempts(db):
    (job_id,) = queue.submit_jobs(db, [spec()])
    queue.claim_job(db, "w", None)
    queue.fail_job(db, job_id, "w", "boom")
    queue.retry_jobs(db, [job_id])
    job = queue.get_job(db, job_id)
    assert (job.status, job.attempts, job.error) == ("queued", 0, None)


@pytest.mark.reliability
def test_priority_must_fit_in_64_bits(db):
    """The column is signed 64-bit: beyond it SQLite raises OverflowError and Postgres 'bigint out of
    range'. The db layer refuses first, naming --priority, and writes nothing."""
    for bad in (2**63, -(2**63) - 1, 10**30):
        with pytest.raises(BadInput, match=rf"--priority {bad} is out of range: give a whole number between"):
            queue.submit_jobs(db, [spec(), spec(priority=bad)])
    assert queue.list_jobs(db) == []  # not even the batch's valid job
    low, high = queue.submit_jobs(db, [spec(priority=-(2**63)), spec(priority=2**63 - 1)])
    assert [queue.claim_job(db, "w", None).id for _ in range(2)] == [high, low]
    assert (queue.get_job(db, high).priority, queue.get_job(db, low).priority) == (2**63 - 1, -(2**63))


def test_submit_is_all_or_nothing(db):
    # The first job is written (flushed) before the second's upstream, index 7, is found missing.
    with pytest.raises(IndexError):
        queue.submit_jobs(db, [spec(), spec(after=7)])
    assert queue.list_jobs(db) == []
    with db.transaction() as s:
        assert s.execute(select(func.count()).select_from(Event)).scalar() == 0  # nor its submit event


def test_newer_schema_is_refused(db):
    with db.transaction() as s:
        s.merge(Meta(key="schema_version", value=str(SCHEMA_VERSION + 1)))
    with pytest.raises(SchemaTooNew, match="newer than this qrun"):
        open_database(db.url)


def test_older_schema_is_migrated(db, monkeypatch):
    from qrun.db import session as session_module

    applied = []
    with db.transaction() as s:
        s.merge(Meta(key="schema_version", value=str(SCHEMA_VERSION - 1)))
    monkeypatch.setitem(session_module.MIGRATIONS, SCHEMA_VERSION - 1, lambda s: applied.append(True))
    reopened = open_database(db.url)
    with reopened.transaction() as s:
        assert s.get(Meta, "schema_version").value == str(SCHEMA_VERSION)
    assert applied == [True]


def test_sqlite_is_in_wal_mode(qrun_home):
    database = open_database()
    with database.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    database.dispose()


def test_a_lendable_worker_waits_behind_a_multi_gpu_job_until_it_is_placed(db):
    """A one-GPU worker that the runner may lend takes nothing while the most urgent ready job needs
    two GPUs and the runner has not placed it: a later one-GPU job must not overtake it meanwhile.
    Once it is passable the worker takes the later job; a CPU worker (passable=None) never waits."""
    first, big, later = queue.submit_jobs(db, [spec(), spec(params={"bits": 4, "gpus": 2}), spec()])
    assert queue.claim_job(db, "gpu0", "0", passable=frozenset()).id == first
    assert queue.claim_job(db, "gpu1", "1", passable=frozenset()) is None
    assert queue.get_job(db, later).status == "queued"
    assert queue.claim_job(db, "gpu1", "1", passable=frozenset({big})).id == later
    assert queue.get_job(db, big).status == "queued"
    (cpu_job,) = queue.submit_jobs(db, [spec()])
    assert queue.claim_job(db, "cpu0", None).id == cpu_job  # passable=None: jobs of several GPUs are skipped
    assert queue.claim_job(db, "gpu01", "0,1", gpus=2, only_multi_gpu=True).id == big
