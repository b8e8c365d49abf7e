"""`qrun eval` of a model that already has an equal eval job (same model, data and settings, not failed
or cancelled) adds no second one: it names the existing job, as submit does for the jobs it reuses."""

from __future__ import annotations

import json

import qrun
from helpers import invoke_main, write_labeled
from qrun.db import queue


def _eval(*args: str):
    result = invoke_main("eval", *args)
    assert result.exit_code == 0, result.output
    return result


def _eval_jobs(db) -> list[int]:
    return [j.id for j in queue.list_jobs(db) if j.kind == "eval"]


def test_an_equal_eval_is_named_not_added_again(db, tiny_qwen2, tmp_path):
    data = str(write_labeled(tmp_path / "dialogs.jsonl"))
    first = _eval("--model", str(tiny_qwen2), "--data", data)
    (job,) = _eval_jobs(db)
    assert first.stdout.strip() == str(job) and first.stderr == ""

    again = _eval("--model", str(tiny_qwen2), "--data", data, "--json")
    assert json.loads(again.stdout) == [job] and _eval_jobs(db) == [job]
    assert again.stderr.strip() == f"baseline eval already in job {job} (queued): pass --rerun to run it again"

    other_mode = _eval("--model", str(tiny_qwen2), "--data", data, "--mode", "generate")  # not equal: a new job
    rerun = _eval("--model", str(tiny_qwen2), "--data", data, "--rerun")
    assert _eval_jobs(db) == [job, int(other_mode.stdout), int(rerun.stdout)] and rerun.stderr == ""


def test_a_failed_eval_is_not_reused(db, tiny_qwen2, tmp_path):
    data = str(write_labeled(tmp_path / "dialogs.jsonl"))
    failed = qrun.evaluate(str(tiny_qwen2), data=data, db=db)
    assert failed.existing is None
    assert queue.claim_job(db, "w", None).id == failed
    queue.fail_job(db, failed, "w", "out of memory")
    again = qrun.evaluate(str(tiny_qwen2), data=data, db=db)
    assert again != failed and again.existing is None


def test_the_baseline_eval_of_a_submit_is_reused_by_qrun_eval(db, tiny_qwen2, tmp_path):
    data = str(write_labeled(tmp_path / "dialogs.jsonl"))
    submitted = qrun.submit(str(tiny_qwen2), bits=4, group_size=32, eval=data, db=db)
    baseline = submitted.ids[0]
    found = qrun.evaluate(str(tiny_qwen2), data=data, db=db)
    assert found == baseline and (found.existing.id, found.existing.label, found.existing.status) == (
        baseline, "baseline", "queued")
    assert len(queue.list_jobs(db)) == len(submitted.ids)
