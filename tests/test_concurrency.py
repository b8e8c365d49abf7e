"""Several processes claiming from one SQLite file, or one Postgres database: every job claimed exactly
once, none lost."""

import os
from datetime import timedelta

import pytest

from helpers import racing_processes
from qrun.db import queue
from qrun.db.queue import JobSpec
from qrun.db.schema import Job
from qrun.db.states import Kind, Status


@pytest.fixture
def db(any_db):
    """Every test here runs on SQLite and on Postgres (conftest's any_db)."""
    return any_db


def _claimer(url: str, name: str, barrier, holding, out) -> None:
    from qrun.db.session import open_database

    database = open_database(url)
    barrier.wait()
    claimed = []
    held = False
    while queue.pending_count(database):  # a claim that lost its pick to another claimer comes back empty
        if (job := queue.claim_job(database, name, None)) is None:
            continue
        claimed.append(job.id)
        if not held:  # every claimer holds a job at once: they compete however busy the box is
            holding.wait(timeout=60)
            held = True
        queue.finish_job(database, job.id, name, {"by": 1.0})
    out.put((name, claimed))


def test_processes_claim_each_job_exactly_once(db):
    ids = queue.submit_jobs(db, [JobSpec(kind=Kind.QUANTIZE, model="/m", params={"n": i}) for i in range(120)])
    ctx = racing_processes()
    barrier, holding, out = ctx.Barrier(4), ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(db.url, f"p{i}", barrier, holding, out)) for i in range(4)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    claimed = [job_id for jobs in results.values() for job_id in jobs]
    assert sorted(claimed) == ids  # each exactly once, none lost
    assert all(results.values())  # all four held a job at the same time
    assert {j.status for j in queue.list_jobs(db)} == {"succeeded"}


# ---------------------------------------------------------------- housekeeping races
#
# Every claim first settles expired leases and, when nothing is ready, fails orphans of failed jobs.
# Claimers released at the same moment all see the same expired lease and the same orphan: exactly
# one of them may settle each, and none may crash for having lost the race (on Postgres, before the
# rows were locked, the losers got TransitionError from the guarded UPDATE).

RACERS = 6
RACE_ROUNDS = 6
BARRIER_TIMEOUT_S = 120


def _racer(url: str, barrier, rounds: int, out) -> None:
    from qrun.db.session import open_database

    database = open_database(url)
    errors = []
    barrier.wait(BARRIER_TIMEOUT_S)  # everyone connected
    for _ in range(rounds):
        barrier.wait(BARRIER_TIMEOUT_S)  # the parent has set this round's table up
        try:
            queue.claim_job(database, f"racer-{os.getpid()}", None)
        except Exception as exc:  # noqa: BLE001 - any error is the finding
            errors.append(f"{type(exc).__name__}: {exc}")
        barrier.wait(BARRIER_TIMEOUT_S)  # round over: the parent checks
    database.dispose()
    out.put(errors)


def _expired_and_orphan(db, attempts_left: bool) -> tuple[int, int, int]:
    """One running job whose lease ran out (with or without attempts left), and one queued job whose
    upstream failed. Straight into the table, as a dead worker and a failed job leave them."""
    now = queue.utcnow()
    common = dict(kind=Kind.QUANTIZE.value, params={}, model="/m", submitted_by="t", created_at=now)
    with db.transaction() as s:
        expired = Job(status=Status.RUNNING.value, worker="dead-worker", attempts=1,
                      max_attempts=3 if attempts_left else 1, started_at=now,
                      lease_expires_at=now - timedelta(seconds=5), **common)
        upstream = Job(status=Status.FAILED.value, attempts=1, finished_at=now, error="boom", **common)
        s.add_all([expired, upstream])
        s.flush()
        orphan = Job(status=Status.QUEUED.value, depends_on=upstream.id, **{**common, "kind": Kind.EVAL.value})
        s.add(orphan)
        s.flush()
        return expired.id, upstream.id, orphan.id


@pytest.mark.reliability
def test_racing_claimers_settle_each_expired_lease_and_orphan_once(db):
    ctx = racing_processes()
    barrier, out = ctx.Barrier(RACERS + 1), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(db.url, barrier, RACE_ROUNDS, out)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    barrier.wait(BARRIER_TIMEOUT_S)
    for round_no in range(RACE_ROUNDS):
        attempts_left = round_no % 2 == 0  # released (and claimed again), or failed for good
        expired, upstream, orphan = _expired_and_orphan(db, attempts_left)
        barrier.wait(BARRIER_TIMEOUT_S)  # go
        barrier.wait(BARRIER_TIMEOUT_S)  # all claimers done
        expired_events = [e.transition for e in queue.events_of(db, expired)]
        if attempts_left:  # released once; before the fix, Postgres released it again from its new holder
            assert expired_events.count("release") == 1, expired_events
            assert expired_events.count("claim") <= 1, expired_events  # one racer may take it up again
        else:
            assert expired_events == ["fail"], expired_events
            assert queue.get_job(db, expired).status == "failed"
        assert [e.transition for e in queue.events_of(db, orphan)] == ["fail"]
        assert queue.get_job(db, orphan).error == f"upstream job {upstream} failed"
    errors = [e for _ in procs for e in out.get(timeout=BARRIER_TIMEOUT_S)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert errors == []


# ---------------------------------------------------------------- opening a new database together

OPENERS = 8
OPEN_ROUNDS = 12


def _opener(urls: list[str], barrier, out) -> None:
    from qrun.db.session import open_database

    errors = []
    for url in urls:
        barrier.wait(BARRIER_TIMEOUT_S)  # all open this round's new database at once
        try:
            open_database(url).dispose()
        except Exception as exc:  # noqa: BLE001 - any error is the finding
            errors.append(f"{type(exc).__name__}: {exc}")
    out.put(errors)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_database_urls(request, tmp_path):
    """OPEN_ROUNDS databases nobody has opened yet: SQLite files not yet created, or empty Postgres databases."""
    if request.param == "sqlite":
        for i in range(OPEN_ROUNDS):
            (tmp_path / f"round{i}").mkdir()  # qrun makes the file, never the directory --db names
        yield [f"sqlite:///{tmp_path / f'round{i}' / 'qrun.db'}" for i in range(OPEN_ROUNDS)]
        return
    server = request.getfixturevalue("postgres_server")
    urls = [server.fresh_url() for _ in range(OPEN_ROUNDS)]
    yield urls
    for url in urls:
        server.drop(url)


@pytest.mark.reliability
def test_processes_opening_a_new_database_at_once_all_succeed(new_database_urls):
    """Two `qrun run` starting on a new SQLite file: one died with "database ... cannot be opened
    (database is locked)" (switching the new file to WAL does not wait for the busy timeout)."""
    from sqlalchemy import inspect, select

    from qrun.db.schema import SCHEMA_VERSION, Base, Meta
    from qrun.db.session import open_database

    ctx = racing_processes()
    barrier, out = ctx.Barrier(OPENERS), ctx.Queue()
    procs = [ctx.Process(target=_opener, args=(new_database_urls, barrier, out)) for _ in range(OPENERS)]
    for p in procs:
        p.start()
    errors = [e for _ in procs for e in out.get(timeout=BARRIER_TIMEOUT_S * OPEN_ROUNDS)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert errors == []
    for url in new_database_urls:
        database = open_database(url)
        assert set(inspect(database.engine).get_table_names()) == set(Base.metadata.tables)
        with database.transaction() as s:
            assert [(m.key, m.value) for m in s.scalars(select(Meta))] == [("schema_version", str(SCHEMA_VERSION))]
        database.dispose()
