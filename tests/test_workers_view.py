"""`qrun workers`: every worker registers in the job table, reports while it works, says goodbye when
it stops; one that stops reporting shows as lost. On SQLite and on Postgres."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import update

from helpers import run_qrun
from qrun.db import queue
from qrun.db.schema import Worker
from qrun.db.states import Kind
from qrun.runner.worker import QueueWorker


def workers_json(db) -> dict[str, dict]:
    result = run_qrun("--db", db.url, "workers", "--json", check=True)
    return {w["slot"]: w for w in json.loads(result.stdout)}


def test_a_worker_registers_and_says_when_it_stopped(any_db):
    worker = QueueWorker(any_db.url, "cpu7", use_gpu=False, lease_s=30)
    (row,) = queue.list_workers(any_db)
    assert (row.name, row.slot, row.device, row.stopped_at) == (worker.name, "cpu7", "cpu", None)
    assert workers_json(any_db)["cpu7"]["state"] == "idle"
    assert worker.drain(burst=True) == []  # nothing to do: it stops
    shown = workers_json(any_db)["cpu7"]
    assert (shown["state"], shown["jobs_done"], shown["node"]) == ("stopped", 0, row.node)


def test_a_worker_that_stopped_reporting_is_shown_lost(any_db):
    for slot in ("cpu0", "cpu1"):
        queue.register_worker(any_db, f"host:1{slot[-1]}:{slot}", "host", slot, "cpu", None)
    queue.worker_heartbeat(any_db, "host:11:cpu1", job=None)
    with any_db.transaction() as s:  # cpu0's last word was 31 s ago
        s.execute(update(Worker).where(Worker.slot == "cpu0")
                  .values(heartbeat_at=queue.utcnow() - timedelta(seconds=31)))
    shown = workers_json(any_db)
    assert shown["cpu0"]["state"] == "lost"
    assert shown["cpu1"]["state"] == "idle"
    table = run_qrun("--db", any_db.url, "workers", check=True).stdout.splitlines()
    assert table[0].split() == ["WORKER", "NODE", "DEVICE", "STATE", "LAST", "SEEN", "JOBS", "DONE"]
    assert any(line.startswith("cpu0") and " lost " in line for line in table[1:]), table


def test_a_worker_waiting_for_its_next_jobs_kernels_stays_alive_and_says_what_it_waits_for(any_db):
    """Before it claims a job, a worker waits for the kernels the job uses (a fresh GPU machine's
    Marlin build: minutes). Meanwhile its row keeps reporting, so it is not shown lost after 30 s, and
    says what it waits for; the claim clears it. A fresh process: the wait here is GPTQModel's import
    by the worker's build thread (seconds), the part of every wait that comes first."""
    import subprocess
    import sys
    import textwrap

    from helpers import REPO

    (job_id,) = queue.submit_jobs(any_db, [queue.JobSpec(kind=Kind.QUANTIZE, model="/models/m", params={"bits": 4})])
    probe = textwrap.dedent("""
        import json, sys, threading, time
        from qrun.db import queue
        from qrun.db.session import open_database
        from qrun.runner.worker import QueueWorker
        from qrun.workers.warmup import KernelBuilds
        db = open_database(sys.argv[1])
        worker = QueueWorker(db.url, "cpu0", use_gpu=False, lease_s=30)
        registered = queue.list_workers(db)[0].heartbeat_at
        worker._builds = KernelBuilds(["a_kernel_no_job_uses"])  # its thread imports GPTQModel first
        waiting = threading.Thread(target=worker._wait_for_kernels, args=(queue.get_job(db, int(sys.argv[2])),))
        waiting.start()
        seen = []
        while waiting.is_alive():
            (row,) = queue.list_workers(db)
            seen.append([row.activity, row.heartbeat_at > registered])
            time.sleep(0.1)
        after_wait = queue.list_workers(db)[0].activity
        queue.claim_job(db, "host:9:another-worker", None, 30)  # the job went elsewhere meanwhile
        worker._one_round(burst=False)  # nothing to claim here: idle again
        print(json.dumps({"seen": seen, "after_wait": after_wait, "after_round": queue.list_workers(db)[0].activity}))
    """)
    result = subprocess.run([sys.executable, "-c", probe, any_db.url, str(job_id)], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    said = f"preparing job {job_id}: importing GPTQModel"
    assert [said, True] in report["seen"], report["seen"][-5:]  # said, with a fresh heartbeat, while it waited
    assert report["after_wait"] == said and report["after_round"] is None
    assert workers_json(any_db)["cpu0"]["state"] == "idle"
    queue.worker_heartbeat(any_db, queue.list_workers(any_db)[0].name, job=None, activity=said)
    assert workers_json(any_db)["cpu0"]["state"] == said  # as `qrun workers` shows it
    queue.worker_heartbeat(any_db, queue.list_workers(any_db)[0].name, job=job_id)  # as a claim reports
    shown = workers_json(any_db)["cpu0"]
    assert (shown["state"], shown["activity"]) == (f"running job {job_id}", None)


def test_qrun_status_shows_which_worker_readies_a_queued_job(any_db):
    """A fresh machine's kernel build takes minutes before the job is claimed: `qrun status` says so in
    the job's row, not a bare `queued`, for as long as that worker reports; once it runs, its progress."""
    (job_id,) = queue.submit_jobs(any_db, [queue.JobSpec(kind=Kind.QUANTIZE, model="/models/m", params={"bits": 4})])
    queue.register_worker(any_db, "host:1:gpu1", "host", "gpu1", "cuda:1", "1")
    queue.worker_heartbeat(any_db, "host:1:gpu1", job=None,
                           activity=queue.preparing_activity(job_id, "GPTQModel kernel marlin_bf16"))

    def row() -> str:
        table = run_qrun("--db", any_db.url, "status", "--wide", check=True).stdout.splitlines()
        return next(line for line in table if line.split()[0] == str(job_id))

    assert "queued" in row() and "preparing on gpu1: GPTQModel kernel marlin_bf16" in row()
    (shown,) = json.loads(run_qrun("--db", any_db.url, "status", "--json", check=True).stdout)
    assert shown["preparing"] == {"worker": "gpu1", "doing": "GPTQModel kernel marlin_bf16"}
    with any_db.transaction() as s:  # its last word was 31 s ago: lost, it readies nothing
        s.execute(update(Worker).values(heartbeat_at=queue.utcnow() - timedelta(seconds=31)))
    assert "preparing" not in row()
    queue.worker_heartbeat(any_db, "host:1:gpu1", job=None, activity=queue.preparing_activity(job_id, "x"))
    queue.claim_job(any_db, "host:1:gpu1", "1", 30)
    queue.worker_heartbeat(any_db, "host:1:gpu1", job=job_id)  # as a claim reports: the activity is cleared
    assert "running" in row() and "preparing" not in row()
    assert json.loads(run_qrun("--db", any_db.url, "status", "--json", check=True).stdout)[0]["preparing"] is None
