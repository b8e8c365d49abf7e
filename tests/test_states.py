"""The state machine: the enum and the database agree, and every wrong transition is refused."""

import re

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from qrun.db import queue
from qrun.db.errors import JobLost, JobNotFound, TransitionError
from qrun.db.queue import JobSpec
from qrun.db.schema import Job
from qrun.db.states import TRANSITIONS, Kind, Status


@pytest.fixture
def db(any_db):
    """Every test here runs on SQLite and on Postgres (conftest's any_db)."""
    return any_db


def _constraint_values(name: str) -> set[str]:
    check = next(c for c in Job.__table__.constraints if getattr(c, "name", None) == name)
    return set(re.findall(r"'([a-z]+)'", str(check.sqltext)))


def _set_column(db, job_id: int, column: str, value: str) -> None:
    """Raw SQL, past the queue's transitions: only the database's own constraint can refuse it."""
    with db.transaction() as s:
        s.execute(text(f"UPDATE jobs SET {column} = :value WHERE id = :id"), {"value": value, "id": job_id})


def test_enum_and_database_constraint_agree(db):
    assert _constraint_values("job_status_known") == {s.value for s in Status}
    assert _constraint_values("job_kind_known") == {k.value for k in Kind}
    (job_id,) = queue.submit_jobs(db, [JobSpec(kind=Kind.QUANTIZE, model="/m", params={"bits": 4})])
    # The table the database really made takes every value of the enums, and nothing else.
    for column, values, constraint in (("status", Status, "job_status_known"), ("kind", Kind, "job_kind_known")):
        for value in values:
            _set_column(db, job_id, column, value.value)
        with pytest.raises(IntegrityError, match=rf"(?i)check constraint.*{constraint}"):  # SQLite: CHECK
            _set_column(db, job_id, column, "bogus")
    job = queue.get_job(db, job_id)
    assert (job.status, job.kind) == (list(Status)[-1].value, list(Kind)[-1].value)  # the refused writes left none
    with pytest.raises(IntegrityError, match="(?i)check constraint.*job_status_known"):
        with db.transaction() as s:
            s.execute(text("INSERT INTO jobs (kind, status, params, model, priority, attempts, max_attempts, "
                           "progress_done, progress_total, submitted_by, created_at) VALUES "
                           "('quantize', 'bogus', '{}', 'm', 0, 0, 1, 0, 0, 'u', '2026-01-01')"))
    assert [j.id for j in queue.list_jobs(db)] == [job_id]


def _job_in(db, status: Status) -> int:
    (job_id,) = queue.submit_jobs(db, [JobSpec(kind=Kind.QUANTIZE, model="/m", params={"bits": 4})])
    if status == Status.QUEUED:
        return job_id
    job = queue.claim_job(db, "w1", None)
    assert job.id == job_id
    if status == Status.SUCCEEDED:
        queue.finish_job(db, job_id, "w1", {})
    elif status == Status.FAILED:
        queue.fail_job(db, job_id, "w1", "boom")
    elif status == Status.CANCELLED:
        queue.cancel_jobs(db, [job_id])
    return job_id


WRONG = [(name, state) for name, (allowed, _) in TRANSITIONS.items() for state in Status if state not in allowed]


@pytest.mark.parametrize("transition,state", WRONG, ids=[f"{t}-from-{s.value}" for t, s in WRONG])
def test_wrong_transition_is_refused(db, transition, state):
    job_id = _job_in(db, state)
    actions = {
        "claim": lambda: queue.claim_job(db, "w2", None),
        "succeed": lambda: queue.finish_job(db, job_id, "w1", {}),
        "fail": lambda: queue.fail_job(db, job_id, "w1", "x"),
        "cancel": lambda: queue.cancel_jobs(db, [job_id]),
        "release": lambda: queue.release_job(db, job_id, "w1", "x"),
        "retry": lambda: queue.retry_jobs(db, [job_id]),
    }
    if transition == "claim":
        assert actions["claim"]() is None  # nothing claimable: the job is not queued
    else:
        with pytest.raises((TransitionError, JobLost)) as info:
            actions[transition]()
        assert f"job {job_id}" in str(info.value)
    assert queue.get_job(db, job_id).status == state.value


def test_unknown_job_is_named(db):
    with pytest.raises(JobNotFound, match="job 42 does not exist"):
        queue.cancel_jobs(db, [42])
    with pytest.raises(JobNotFound, match="job 42"):
        queue.retry_jobs(db, [42])
