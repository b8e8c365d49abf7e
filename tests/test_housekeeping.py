"""`qrun prune` and `qrun du` with real files under a temporary QRUN_HOME (SQLite), and their queries on
SQLite and Postgres: old finished jobs go with their files and rows; queued and running jobs, and a job
that a kept job depends on, stay."""

from __future__ import annotations

import json
from datetime import timedelta

from helpers import run_qrun
from sqlalchemy import func, select, update

from qrun.db import queue
from qrun.db.schema import Artifact, Event, Job, Metric
from qrun.db.session import artifacts_root, logs_root
from qrun.db.states import Kind

OLD = timedelta(days=40)


def _run(db, job_id: int, *, ok: bool = True, age: timedelta = OLD, files: bool = True, size: int = 1000):
    """Claim and finish job_id (the only ready one), with an artifact directory, a predictions file and
    logs of `size` bytes each on disk, finished `age` ago."""
    job = queue.claim_job(db, f"w{job_id}", None)
    assert job.id == job_id
    arts = []
    if files:
        model_dir = artifacts_root() / f"job-{job_id}"
        model_dir.mkdir()
        (model_dir / "model.safetensors").write_bytes(b"x" * size)
        preds = artifacts_root() / f"job-{job_id}-predictions.jsonl"
        preds.write_bytes(b"p" * size)
        arts = [queue.ArtifactRecord("model", str(model_dir), size, "0" * 64),
                queue.ArtifactRecord("predictions", str(preds), size, "0" * 64)]
        (logs_root() / f"job-{job_id}.log").write_bytes(b"l" * size)
        (logs_root() / f"job-{job_id}.d").mkdir()
        (logs_root() / f"job-{job_id}.d" / "scratch").write_bytes(b"s" * size)
    if ok:
        queue.finish_job(db, job_id, job.worker, {"f1": 0.9}, arts)
    else:
        queue.fail_job(db, job_id, job.worker, "boom")
    with db.transaction() as s:
        s.execute(update(Job).where(Job.id == job_id).values(finished_at=queue.utcnow() - age))


def _specs(*kinds_after):
    return [queue.JobSpec(kind=kind, model="/models/qwen-tiny", params={"n": i}, after=after)
            for i, (kind, after) in enumerate(kinds_after)]


def _scene(db):
    """1: old quantize whose eval 2 is recent (both kept); 3: old quantize + 4: its old eval (both go);
    5: old failed job of bob; 6: running; 7: queued (never touched)."""
    q1, e2 = queue.submit_jobs(db, _specs((Kind.QUANTIZE, None), (Kind.EVAL, 0)), user="alice")
    q3, e4 = queue.submit_jobs(db, _specs((Kind.QUANTIZE, None), (Kind.EVAL, 0)), user="alice")
    _run(db, q1)
    _run(db, e2, age=timedelta(days=1))
    _run(db, q3)
    _run(db, e4)
    (f5,) = queue.submit_jobs(db, _specs((Kind.QUANTIZE, None)), user="bob")
    _run(db, f5, ok=False, files=False)
    (r6,) = queue.submit_jobs(db, _specs((Kind.QUANTIZE, None)), user="bob")
    queue.claim_job(db, "w6", None)
    (q7,) = queue.submit_jobs(db, _specs((Kind.QUANTIZE, None)), user="alice")
    with db.transaction() as s:  # running and queued jobs created long ago are still never pruned
        s.execute(update(Job).where(Job.id.in_([r6, q7])).values(created_at=queue.utcnow() - OLD))
    return [q1, e2, q3, e4, f5, r6, q7]


def test_prune_queries(any_db):
    q1, e2, q3, e4, f5, r6, q7 = _scene(any_db)
    before = queue.utcnow() - timedelta(days=30)
    assert [c.id for c in queue.prune_candidates(any_db, before)] == [q3, e4, f5]
    assert [c.id for c in queue.prune_candidates(any_db, before, failed_only=True)] == [f5]
    assert [c.id for c in queue.prune_candidates(any_db, before, user="alice")] == [q3, e4]
    # with a cutoff of now, the recent eval and its quantize job go too (nothing kept depends on them)
    assert [c.id for c in queue.prune_candidates(any_db, queue.utcnow())] == [q1, e2, q3, e4, f5]
    # Asked to delete a job a kept job depends on (or a running one), the delete keeps it.
    assert queue.delete_finished_jobs(any_db, [q1, q3, e4, f5, r6]) == [q3, e4, f5]
    with any_db.transaction() as s:
        assert sorted(s.execute(select(Job.id)).scalars()) == [q1, e2, r6, q7]
        for table in (Event, Metric, Artifact):
            assert not set(s.execute(select(table.job_id)).scalars()) & {q3, e4, f5}
    rows = {r.id: r.artifact_bytes for r in queue.usage_rows(any_db)}
    assert rows == {q1: 2000, e2: 2000, r6: 0, q7: 0}


def test_prune_dry_run_then_yes_removes_files_and_rows(qrun_home, db):
    q1, e2, q3, e4, f5, r6, q7 = _scene(db)
    dry = run_qrun("prune", "--older-than", "30d", env={"COLUMNS": "200"})
    assert dry.returncode == 0, dry.stderr
    listed = [int(line.split()[0]) for line in dry.stdout.splitlines()[1:]]
    assert listed == [q3, e4, f5]
    assert ("would remove 3 job(s), freeing 7.8 KiB (8000 bytes); add --yes to remove them (3 of another user: "
            "add --force too)") in dry.stderr
    assert (artifacts_root() / f"job-{q3}").is_dir()  # a dry run removes nothing
    js = json.loads(run_qrun("prune", "--older-than", "30d", "--failed", "--json").stdout)
    assert [j["id"] for j in js["jobs"]] == [f5] and js["removed"] is False and js["others"] == 1

    # The jobs are alice's and bob's, not this user's: --yes alone is refused, as cancel and retry are.
    refused = run_qrun("prune", "--older-than", "30d", "--yes")
    assert (refused.returncode, refused.stderr.strip()) == (
        2, f"Error: job {q3} belongs to alice: add --force to prune another user's job")
    assert (artifacts_root() / f"job-{q3}").is_dir() and len(queue.list_jobs(db)) == 7
    done = run_qrun("prune", "--older-than", "30d", "--yes", "--force")
    assert done.returncode == 0, done.stderr
    assert "removed 3 job(s), freeing 7.8 KiB (8000 bytes)" in done.stderr
    for job_id in (q3, e4):
        assert not (artifacts_root() / f"job-{job_id}").exists()
        assert not (artifacts_root() / f"job-{job_id}-predictions.jsonl").exists()
        assert not (logs_root() / f"job-{job_id}.log").exists()
        assert not (logs_root() / f"job-{job_id}.d").exists()
    for job_id in (q1, e2):
        assert (artifacts_root() / f"job-{job_id}" / "model.safetensors").is_file()
        assert (logs_root() / f"job-{job_id}.log").is_file()
    with db.transaction() as s:
        assert sorted(s.execute(select(Job.id)).scalars()) == [q1, e2, r6, q7]
        assert s.execute(select(func.count()).select_from(Event).where(Event.job_id.in_([q3, e4, f5]))).scalar() == 0
    again = run_qrun("prune", "--older-than", "30d")
    assert again.returncode == 0 and "nothing to prune" in again.stderr
    bad = run_qrun("prune", "--older-than", "soon")
    assert bad.returncode == 2 and "--older-than 'soon'" in bad.stderr


def test_du_per_user_and_model(qrun_home, db):
    _scene(db)
    out = json.loads(run_qrun("du", "--json").stdout)
    users = {u["name"]: u for u in out["users"]}
    # alice: 4 finished jobs with 2 artifacts of 1000 B each, and 2 logs of 1000 B each; bob: none on disk
    assert users["alice"]["artifact_bytes"] == 8000 and users["alice"]["log_bytes"] == 8000
    assert users["alice"]["jobs"] == 5 and users["bob"]["bytes"] == 0
    assert out["models"] == [{"name": "qwen-tiny", "jobs": 7, "artifact_bytes": 8000, "log_bytes": 8000,
                              "bytes": 16000}]
    table = run_qrun("du", env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["USER", "JOBS", "ARTIFACTS", "LOGS", "TOTAL"]
    assert "15.6 KiB" in table.stdout
