"""`qrun workers`: every worker registers in the job table, reports while it works, says goodbye when
it stops; one that stops reporting shows as lost. On SQLite and on Postgres."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import update

from conftest import run_qrun
from qrun.db import queue
from qrun.db.schema import Worker
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
