"""Several processes claiming from one SQLite file: every job claimed exactly once, none lost."""

import multiprocessing as mp

from qrun.db import queue
from qrun.db.queue import JobSpec
from qrun.db.states import Kind


def _claimer(url: str, name: str, barrier, out) -> None:
    from qrun.db.session import open_database

    database = open_database(url)
    barrier.wait()
    claimed = []
    while (job := queue.claim_job(database, name, None)) is not None:
        claimed.append(job.id)
        queue.finish_job(database, job.id, name, {"by": 1.0})
    out.put((name, claimed))


def test_processes_claim_each_job_exactly_once(db):
    ids = queue.submit_jobs(db, [JobSpec(kind=Kind.QUANTIZE, model="/m", params={"n": i}) for i in range(120)])
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(db.url, f"p{i}", barrier, out)) for i in range(4)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    claimed = [job_id for jobs in results.values() for job_id in jobs]
    assert sorted(claimed) == ids  # each exactly once, none lost
    assert sum(1 for jobs in results.values() if jobs) >= 2  # they really competed
    assert {j.status for j in queue.list_jobs(db)} == {"succeeded"}
