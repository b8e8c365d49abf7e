"""What one `claim_job` costs over a queue shaped like tests/test_reliability_load.py's: USERS users'
jobs interleaved (10,000 by default), claimed and finished by one process that keeps WORKERS jobs in hand,
as that many claimers would. Prints the mean wall and CPU milliseconds per claim (CPU time is the
steadier figure on a shared box). A benchmark, not a test.

    python bench/claim_cost.py                                   # 8 users x 1,250 jobs, 4 in hand
    python bench/claim_cost.py --queue-module /tmp/old_queue.py  # another db/queue.py, to compare
        (git show REV:db/queue.py > /tmp/old_queue.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path


def load_queue(path: str | None):
    """qrun.db.queue, or the module at `path` (an older db/queue.py) standing in for it."""
    if path is None:
        from qrun.db import queue

        return queue
    spec = importlib.util.spec_from_file_location("queue_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["queue_under_test"] = module
    spec.loader.exec_module(module)
    return module


def measure(queue, users: int, jobs_each: int, workers: int) -> tuple[int, float, float]:
    """(claims, wall s, CPU s) spent inside claim_job."""
    from qrun.db.session import open_database
    from qrun.db.states import Kind

    home = Path(tempfile.mkdtemp(prefix="qrun-claim-cost-"))
    try:
        db = open_database(f"sqlite:///{home / 'qrun.db'}")
        for n in range(jobs_each):
            for user in range(users):
                queue.submit_jobs(db, [queue.JobSpec(kind=Kind.QUANTIZE, model=f"/m{user}", params={"n": n})],
                                  user=f"user{user}")
        wall = cpu = 0.0
        claims, held = 0, []
        while True:
            began, began_cpu = time.perf_counter(), time.process_time()
            job = queue.claim_job(db, f"w{claims % workers}", None, lease_s=600)
            wall += time.perf_counter() - began
            cpu += time.process_time() - began_cpu
            if job is None and not held:
                return claims, wall, cpu
            if job is not None:
                claims += 1
                held.append(job)
            if job is None or len(held) >= workers:
                done = held.pop(0)
                queue.finish_job(db, done.id, done.worker, {"n": 1.0})
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--jobs-each", type=int, default=1250)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--queue-module", default=None, help="another db/queue.py to measure instead")
    args = parser.parse_args()
    claims, wall, cpu = measure(load_queue(args.queue_module), args.users, args.jobs_each, args.workers)
    print(f"{claims} claims: {1000 * wall / claims:.2f} ms wall, {1000 * cpu / claims:.2f} ms CPU per claim_job")


if __name__ == "__main__":
    main()
