"""Load: 8 processes each submitting 1,250 jobs (one transaction per job) while 4 processes claim
and finish them, all on one SQLite file -> 10,000 jobs, each claimed exactly once, none lost; then
`qrun status` over the 10,000 jobs, through the real console script.

Throughput and status's time are measured by bench/queue_throughput.py, not asserted here.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time

import pytest

from helpers import QRUN, racing_processes

pytestmark = pytest.mark.reliability

SUBMITTERS, JOBS_EACH, CLAIMERS = 8, 1250, 4
TOTAL = SUBMITTERS * JOBS_EACH


def _submitter(url: str, index: int, start, out) -> None:
    from qrun.db import queue
    from qrun.db.queue import JobSpec
    from qrun.db.session import open_database
    from qrun.db.states import Kind

    db = open_database(url)
    start.wait()
    ids = []
    for n in range(JOBS_EACH):
        ids += queue.submit_jobs(db, [JobSpec(kind=Kind.QUANTIZE, model=f"/models/m{index}",
                                              params={"bits": 4, "group_size": 128, "n": n})], user=f"user{index}")
    out.put(("submit", index, ids))


def _claimer(url: str, index: int, start, submitting_done, out) -> None:
    from qrun.db import queue
    from qrun.db.session import open_database

    db = open_database(url)
    name = f"host:{os.getpid()}:claimer{index}"
    start.wait()
    claimed = []
    while True:
        job = queue.claim_job(db, name, None, lease_s=600)
        if job is not None:
            claimed.append(job.id)
            queue.finish_job(db, job.id, name, {"n": 1.0})
        elif submitting_done.is_set() and queue.pending_count(db) == 0:
            break
        else:
            time.sleep(0.005)  # the submitters have not caught up yet
    out.put(("claim", index, claimed))


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    """Run the race once; the tests below check what it left."""
    from qrun.db.session import open_database

    home = tmp_path_factory.mktemp("load") / "qrun-home"
    home.mkdir()
    url = f"sqlite:///{home / 'qrun.db'}"
    open_database(url).dispose()
    ctx = racing_processes()
    start, submitting_done, out = ctx.Barrier(SUBMITTERS + CLAIMERS), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_submitter, args=(url, i, start, out)) for i in range(SUBMITTERS)]
    procs += [ctx.Process(target=_claimer, args=(url, i, start, submitting_done, out)) for i in range(CLAIMERS)]
    for p in procs:
        p.start()
    results = {"submit": {}, "claim": {}}
    try:
        for _ in range(SUBMITTERS):
            side, index, ids = out.get(timeout=600)
            results[side][index] = ids
        submitting_done.set()  # claimers stop once the table is drained
        for _ in range(CLAIMERS):
            side, index, ids = out.get(timeout=600)
            results[side][index] = ids
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return home, results


def test_ten_thousand_jobs_each_claimed_exactly_once(raced):
    home, results = raced
    submitted = [i for ids in results["submit"].values() for i in ids]
    claimed = [i for ids in results["claim"].values() for i in ids]
    assert len(submitted) == len(set(submitted)) == TOTAL
    assert sorted(claimed) == sorted(submitted)  # each exactly once, none lost
    assert all(results["claim"][i] for i in range(CLAIMERS))  # all four really claimed
    with sqlite3.connect(home / "qrun.db") as conn:
        assert conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall() == [("succeeded", TOTAL)]
        assert conn.execute("SELECT count(*) FROM events WHERE transition = 'claim'").fetchone() == (TOTAL,)
        assert conn.execute("SELECT job_id FROM events WHERE transition = 'claim' GROUP BY job_id "
                            "HAVING count(*) > 1").fetchall() == []
        assert conn.execute("SELECT count(*) FROM jobs WHERE attempts != 1").fetchone() == (0,)
        by_user = dict(conn.execute("SELECT submitted_by, count(*) FROM jobs GROUP BY submitted_by"))
    assert by_user == {f"user{i}": JOBS_EACH for i in range(SUBMITTERS)}


def test_status_lists_all_ten_thousand_jobs(raced):
    """The real console script over the raced table; how fast it is belongs to bench/queue_throughput.py."""
    home, _ = raced
    result = subprocess.run([QRUN, "status"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "QRUN_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == TOTAL + 1 and lines[0].split()[:6] == ["ID", "USER", "MODEL", "KIND", "PARAMS", "STATUS"]
    assert lines[-1].split()[3:6] == ["quantize", "w4g128", "succeeded"] and lines[-1].split()[0] == str(TOTAL)
