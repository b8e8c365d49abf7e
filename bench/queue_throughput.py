"""Queue throughput on one SQLite file: N processes submitting while M processes claim and finish.

Prints jobs per second for submitting and for claiming (claim + finish, the whole life of a job in
the table), and how long `qrun status` takes over the full table. A benchmark, not a test: the
numbers depend on the disk and the cores. tests/test_reliability_load.py asserts the guarantees.

    python bench/queue_throughput.py                          # 8 x 1,250 submitted, 4 claimers
    python bench/queue_throughput.py --submitters 2 --jobs-each 500 --claimers 2 --batch 10
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def submitter(url: str, index: int, jobs: int, batch: int, start, out) -> None:
    from qrun.db import queue
    from qrun.db.queue import JobSpec
    from qrun.db.session import open_database
    from qrun.db.states import Kind

    db = open_database(url)
    start.wait()
    began = time.perf_counter()
    ids: list[int] = []
    for first in range(0, jobs, batch):
        specs = [JobSpec(kind=Kind.QUANTIZE, model=f"/models/m{index}", params={"bits": 4, "n": n})
                 for n in range(first, min(first + batch, jobs))]
        ids += queue.submit_jobs(db, specs, user=f"user{index}")
    out.put(("submit", index, ids, began, time.perf_counter()))


def claimer(url: str, index: int, submitting_done, start, out) -> None:
    from qrun.db import queue
    from qrun.db.session import open_database

    db = open_database(url)
    name = f"claimer{index}"
    start.wait()
    began = time.perf_counter()
    claimed: list[int] = []
    while True:
        job = queue.claim_job(db, name, None, lease_s=600)
        if job is not None:
            claimed.append(job.id)
            queue.finish_job(db, job.id, name, {"n": 1.0})
            continue
        if submitting_done.is_set() and queue.pending_count(db) == 0:
            break
        time.sleep(0.005)  # the submitters have not caught up: look again
    out.put(("claim", index, claimed, began, time.perf_counter()))


def run(url: str, submitters: int, jobs_each: int, claimers: int, batch: int, timeout: float = 1800) -> dict:
    """Run the race; returns what each side did and when (perf_counter seconds)."""
    ctx = mp.get_context("spawn")
    start, submitting_done, out = ctx.Barrier(submitters + claimers), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=submitter, args=(url, i, jobs_each, batch, start, out)) for i in range(submitters)]
    procs += [ctx.Process(target=claimer, args=(url, i, submitting_done, start, out)) for i in range(claimers)]
    for p in procs:
        p.start()
    results = {"submit": {}, "claim": {}}
    for _ in range(submitters):
        side, index, ids, began, ended = out.get(timeout=timeout)
        results[side][index] = (ids, began, ended)
    submitting_done.set()
    for _ in range(claimers):
        side, index, ids, began, ended = out.get(timeout=timeout)
        results[side][index] = (ids, began, ended)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"{p.name} exited {p.exitcode}")
    return results


def rate(part: dict) -> tuple[int, float]:
    """(jobs, seconds from the first start to the last end) of one side."""
    jobs = sum(len(ids) for ids, _, _ in part.values())
    seconds = max(e for _, _, e in part.values()) - min(b for _, b, _ in part.values())
    return jobs, seconds


def time_status(home: Path, repeats: int = 3) -> float:
    qrun = Path(sys.executable).parent / "qrun"
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run([str(qrun), "status"], env={**os.environ, "QRUN_HOME": str(home)}, check=True,
                       stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submitters", type=int, default=8)
    parser.add_argument("--jobs-each", type=int, default=1250)
    parser.add_argument("--claimers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="jobs per submit transaction (1: one job per submit)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qrun-bench-") as tmp:
        home = Path(tmp)
        os.environ["QRUN_HOME"] = str(home)
        from qrun.db.session import open_database

        url = open_database().url
        began = time.perf_counter()
        results = run(url, args.submitters, args.jobs_each, args.claimers, args.batch)
        wall = time.perf_counter() - began
        submitted, submit_s = rate(results["submit"])
        claimed, claim_s = rate(results["claim"])
        print(f"cores: {os.cpu_count()}; SQLite file on {home}; batch of {args.batch} job(s) per submit")
        print(f"submit: {submitted} jobs by {args.submitters} processes in {submit_s:.1f}s = "
              f"{submitted / submit_s:,.0f} jobs/s")
        print(f"claim+finish: {claimed} jobs by {args.claimers} processes in {claim_s:.1f}s = "
              f"{claimed / claim_s:,.0f} jobs/s (claiming ran alongside submitting)")
        print(f"wall: {wall:.1f}s")
        print(f"`qrun status` over {submitted} jobs: {time_status(home):.2f}s (best of 3, console script)")


if __name__ == "__main__":
    main()
