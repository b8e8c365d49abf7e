"""Errors outside a job's own code never stop a worker: the runner never falls over.

A real worker (QueueWorker, in this process, no Ray) drains real quantize jobs on a tiny model.
Each test breaks one place around the job -- claiming, recording progress, finishing, failing,
the job's log, its working directory, freeing memory, the loop itself -- and asserts three
things: the worker is still draining (it returns only when the queue is empty), the broken job's
recorded error is the real cause, and the next job runs. Faults come in three kinds: real ones
(a log path that is a directory, SQLite really locked by another connection), and, where a real
one cannot be had on demand, an exception raised from the real function's place (monkeypatch).
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from sqlalchemy.exc import OperationalError

from helpers import drain_here
from qrun.db import queue
from qrun.db.queue import JobSpec
from qrun.db.states import Kind
from qrun.runner.worker import QueueWorker
from qrun.workers import jobs as job_module

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

QUANTIZE = {"bits": 4, "group_size": 32, "calib_samples": 8, "calib_max_len": 64, "batch_size": 4}


def database_is_locked() -> OperationalError:
    """What SQLAlchemy raises when SQLite's busy timeout runs out: the database is out of reach."""
    return OperationalError("UPDATE jobs ...", {}, sqlite3.OperationalError("database is locked"))


def submit_two(db, model, **first_params) -> tuple[int, int]:
    """Two quantize jobs; the first is the one each test breaks, the second must run regardless."""
    first, second = queue.submit_jobs(db, [
        JobSpec(kind=Kind.QUANTIZE, model=str(model), params=QUANTIZE | first_params, max_attempts=1),
        JobSpec(kind=Kind.QUANTIZE, model=str(model), params=QUANTIZE | {"bits": 8}),
    ])
    return first, second


def fail_for_job(monkeypatch, target, name: str, job_id: int, error: Exception, times: int = 1) -> list[int]:
    """Make target.name raise `error` the first `times` calls made for job_id (the job id is the
    second positional argument of the queue's functions); every other call runs the real code."""
    real = getattr(target, name)
    calls = []

    def broken(*args, **kwargs):
        if len(args) > 1 and args[1] == job_id and len(calls) < times:
            calls.append(job_id)
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, broken)
    return calls


def status_error(db, job_id: int) -> tuple[str, str | None]:
    job = queue.get_job(db, job_id)
    return job.status, job.error


# ---------------------------------------------------------------- the database out of reach


def test_a_locked_database_makes_the_worker_wait_not_stop(db, tiny_qwen2, monkeypatch):
    """Real: another connection holds SQLite's write lock past the worker's busy timeout."""
    monkeypatch.setattr("qrun.db.session.BUSY_TIMEOUT_S", 1)
    first, second = submit_two(db, tiny_qwen2)
    worker = QueueWorker(db.url, "cpu0", use_gpu=False, lease_s=30)
    holder = sqlite3.connect(db.url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(3.5, lambda: (holder.rollback(), holder.close())).start()
    started = time.monotonic()
    outcomes = drain_here(db, worker)
    assert time.monotonic() - started > 3.5  # it really waited for the lock
    assert outcomes == {first: "succeeded", second: "succeeded"}
    notices = worker.take_notices()
    assert any("database unavailable: database is locked; trying again in" in n for n in notices), notices
    assert notices[-1] == "cpu0: working again"


def test_finishing_waits_out_a_database_outage_and_keeps_the_result(db, tiny_qwen2, monkeypatch):
    first, second = submit_two(db, tiny_qwen2)
    calls = fail_for_job(monkeypatch, queue, "finish_job", first, database_is_locked(), times=2)
    worker = QueueWorker(db.url, "cpu0", use_gpu=False, lease_s=30)
    assert drain_here(db, worker) == {first: "succeeded", second: "succeeded"}
    assert calls == [first, first]
    assert [a.kind for a in queue.artifacts_of(db, [first])[first]] == ["model"]
    assert sum(f"job {first}: database unavailable: database is locked" in n for n in worker.take_notices()) == 2


def test_failing_waits_out_a_database_outage_and_records_the_cause(db, tiny_qwen2, monkeypatch):
    first, second = submit_two(db, tiny_qwen2, calib_samples=0)  # the job's own fault
    calls = fail_for_job(monkeypatch, queue, "fail_job", first, database_is_locked())
    assert drain_here(db) == {first: "failed", second: "succeeded"}
    assert calls == [first]
    status, error = status_error(db, first)
    assert status == "failed" and "calibration" in error, error


def test_progress_goes_on_while_the_database_is_out_of_reach(db, tiny_qwen2, monkeypatch):
    first, second = submit_two(db, tiny_qwen2)
    calls = fail_for_job(monkeypatch, queue, "record_progress", first, database_is_locked(), times=3)
    assert drain_here(db) == {first: "succeeded", second: "succeeded"}
    assert calls == [first] * 3


# ---------------------------------------------------------------- errors that are not the database's


@pytest.mark.parametrize("place", ["record_progress", "set_log_path"])
def test_a_bug_around_the_job_fails_that_job_with_its_cause(db, tiny_qwen2, monkeypatch, place):
    first, second = submit_two(db, tiny_qwen2)
    fail_for_job(monkeypatch, queue, place, first, ValueError(f"injected into {place}"))
    assert drain_here(db) == {first: "failed", second: "succeeded"}
    assert status_error(db, first) == ("failed", f"ValueError: injected into {place}")


def test_a_result_that_cannot_be_recorded_fails_the_job_and_removes_its_output(db, qrun_home, tiny_qwen2,
                                                                                monkeypatch):
    first, second = submit_two(db, tiny_qwen2)
    fail_for_job(monkeypatch, queue, "finish_job", first, ValueError("metric name too long"))
    assert drain_here(db) == {first: "failed", second: "succeeded"}
    status, error = status_error(db, first)
    assert (status, error) == ("failed", "RuntimeError: recording the result failed: ValueError: metric name too long")
    (kept,) = [p.name for p in (qrun_home / "artifacts").iterdir()]
    assert kept.endswith(f"job{second}")  # the first job's artifact went with its failure


def test_a_log_path_that_is_a_directory_fails_the_job_not_the_worker(db, qrun_home, tiny_qwen2):
    first, second = submit_two(db, tiny_qwen2)
    (qrun_home / "logs" / f"job-{first}.log").mkdir(parents=True)  # real: open() raises IsADirectoryError
    assert drain_here(db) == {first: "failed", second: "succeeded"}
    status, error = status_error(db, first)
    assert status == "failed"
    assert error.startswith("IsADirectoryError:") and f"job-{first}.log" in error, error


def test_a_working_directory_that_cannot_be_made_fails_the_job_not_the_worker(db, qrun_home, tiny_qwen2):
    first, second = submit_two(db, tiny_qwen2)
    logs = qrun_home / "logs"
    logs.mkdir(parents=True)
    (logs / f"job-{first}.d").write_text("a file where the job's directory goes")
    assert drain_here(db) == {first: "failed", second: "succeeded"}
    status, error = status_error(db, first)
    assert status == "failed"
    assert error.startswith("FileExistsError:") and f"job-{first}.d" in error, error


def test_freeing_memory_that_fails_leaves_the_worker_running(db, tiny_qwen2, monkeypatch):
    first, second = submit_two(db, tiny_qwen2)

    def broken():
        raise RuntimeError("a library changed its internals")

    monkeypatch.setattr(job_module, "drop_kept_tracebacks", broken)
    assert drain_here(db) == {first: "succeeded", second: "succeeded"}


def test_a_failing_round_of_the_loop_is_retried(db, tiny_qwen2, monkeypatch):
    """Claiming itself raises (a bug, not the database): the worker says so, waits, tries again."""
    first, second = submit_two(db, tiny_qwen2)
    real = queue.claim_job
    raised = []

    def claim_that_fails_once(*args, **kwargs):
        if not raised:
            raised.append(True)
            raise KeyError("claim bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(queue, "claim_job", claim_that_fails_once)
    worker = QueueWorker(db.url, "cpu0", use_gpu=False, lease_s=30)
    assert drain_here(db, worker) == {first: "succeeded", second: "succeeded"}
    assert worker.take_notices()[0] == "cpu0: KeyError: 'claim bug'; trying again in 1 s"



# ---------------------------------------------------------------- a job table that changes under the worker


def unlink_when(path, condition) -> threading.Thread:
    """In a thread: once condition() holds, delete the SQLite file at `path` with its -wal and -shm,
    as `rm qrun.db*` would while a worker holds it open."""
    def watch():
        deadline = time.monotonic() + 300
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_table_deleted_mid_job_stops_the_worker_and_its_result_is_not_reported_recorded(db, qrun_home,
                                                                                          tiny_qwen2):
    """The table's file goes while a job runs. SQLite goes on serving the worker from the deleted file,
    so the job's success is written there, where nobody will read it: the worker must not report it
    as recorded, must keep the job's output, must say what happened and must claim nothing more."""
    first, second = submit_two(db, tiny_qwen2)
    worker = QueueWorker(db.url, "cpu0", use_gpu=False, lease_s=30)
    deleting = unlink_when(qrun_home / "qrun.db", (qrun_home / "logs" / f"job-{first}.log").exists)
    outcomes = worker.drain(burst=True)
    deleting.join()
    assert outcomes == [(first, "not recorded")]
    notices = worker.take_notices()
    assert any(f"job {first} ended (succeeded) but the job table {qrun_home / 'qrun.db'} was deleted" in n
               and "its outcome is in no job table" in n for n in notices), notices
    assert [p.name for p in (qrun_home / "artifacts").iterdir()][0].endswith(f"job{first}")  # its output stays


def test_a_table_replaced_under_an_idle_worker_is_noticed_before_its_next_claim(db, qrun_home):
    worker = QueueWorker(db.url, "cpu0", use_gpu=False, lease_s=30)
    copy = qrun_home / "restored.db"
    with sqlite3.connect(qrun_home / "qrun.db") as live, sqlite3.connect(copy) as restored:
        live.backup(restored)  # a backup put back in place: the same table, another file
    copy.replace(qrun_home / "qrun.db")
    stopper = threading.Timer(60, worker.request_stop)  # serving: nothing else would end it
    stopper.start()
    assert worker.drain(burst=False) == []
    stopper.cancel()
    (notice,) = worker.take_notices()
    assert notice == (f"cpu0: the job table {qrun_home / 'qrun.db'} was replaced by another file since it was "
                      "opened: start qrun run again to work on the table there now; this worker takes no more jobs")


def corrupt(error: str = "database disk image is malformed"):
    from sqlalchemy.exc import DatabaseError

    return DatabaseError("UPDATE jobs ...", {}, sqlite3.DatabaseError(error))


def test_a_result_a_damaged_table_cannot_take_is_kept_and_said(db, qrun_home, tiny_qwen2, monkeypatch):
    """SQLite finds the table damaged when the worker records a finished job (and its failure): the
    job's output stays (it is the result), the worker names the job and stops, instead of removing the
    output and going on with the table's next job."""
    first, second = submit_two(db, tiny_qwen2)
    fail_for_job(monkeypatch, queue, "finish_job", first, corrupt())
    fail_for_job(monkeypatch, queue, "fail_job", first, corrupt())
    worker = QueueWorker(db.url, "cpu0", use_gpu=False, lease_s=30)
    assert worker.drain(burst=True) == []
    assert [p.name for p in (qrun_home / "artifacts").iterdir()][0].endswith(f"job{first}")
    assert queue.get_job(db, second).status == "queued"
    notices = worker.take_notices()
    assert notices[-1] == (f"cpu0: job {first} ran but its outcome could not be recorded: the job table "
                           f"{qrun_home / 'qrun.db'} is corrupt (database disk image is malformed): restore it from "
                           "a backup (`qrun doctor` checks a table); its output and log stay under QRUN_HOME; this "
                           "worker takes no more jobs"), notices
