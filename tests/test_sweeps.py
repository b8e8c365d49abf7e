"""Sweeps as first-class things: every submit's jobs share a sweep id (and an optional name), which
`cancel`, `retry` and the API select by; equal jobs are offered instead of added twice; variants get
labels unique within the set they are shown in. On real SQLite files and a real Postgres server."""

from __future__ import annotations

import itertools
import json
import re
import subprocess

import pytest

import qrun
from helpers import QRUN, run_qrun, wait_for, write_labeled
from qrun.db import queue
from qrun.db.errors import BadInput, TransitionError
from qrun.db.queue import JobSpec
from qrun.db.states import Kind
from qrun.variants import variant_key, variant_label, variant_labels

POINT = {"bits": 8, "group_size": 128, "desc_act": False, "sym": True, "damp_percent": 0.01, "calib": "/d/eval.jsonl",
         "calib_samples": 128, "calib_max_len": 1024}


# ---------------------------------------------------------------- labels


def test_a_label_says_bits_and_group_and_only_what_differs_in_the_set():
    damped = POINT | {"damp_percent": 0.05}
    assert variant_label(POINT) == "w8g128"
    assert variant_label(POINT, [POINT | {"bits": 4}]) == "w8g128"  # damp is equal inside the set
    assert variant_labels([POINT, damped, POINT | {"bits": 4}]) == ["w8g128·d0.01", "w8g128·d0.05", "w4g128·d0.01"]
    assert variant_label(POINT | {"group_size": -1, "desc_act": True, "sym": False}) == "w8gall-act-asym"
    assert variant_labels([POINT, POINT | {"calib": "/d/train.jsonl", "calib_samples": 256}]) == [
        "w8g128·cal:eval·n128", "w8g128·cal:train·n256"]
    # Calibration files of one name in two folders: the label shows the paths.
    assert variant_labels([POINT, POINT | {"calib": "/e/eval.jsonl"}]) == [
        "w8g128·cal:/d/eval.jsonl", "w8g128·cal:/e/eval.jsonl"]


def test_labels_are_unique_within_any_grid_of_different_variants():
    gptq = [POINT | dict(zip(("bits", "group_size", "desc_act", "sym", "damp_percent", "calib", "calib_samples",
                               "calib_max_len"), values))
            for values in itertools.product((4, 8), (64, 128), (False, True), (True, False), (0.01, 0.1),
                                            ("/d/a.jsonl", "/d/b.jsonl"), (64, 128), (512, 1024))]
    awq = [{"method": "awq", "bits": 4, "group_size": g, "calib": c, "calib_samples": 128, "calib_max_len": n}
           for g, c, n in itertools.product((64, 128), ("/d/a.jsonl", "/d/b.jsonl"), (512, 1024))]
    rtn = [{"method": "rtn", "bits": b, "group_size": g, "sym": sym}
           for b, g, sym in itertools.product((4, 8), (64, 128), (True, False))]
    others = [{"method": "fp8", "bits": 8, "needs_gpu": True}, {"method": "bnb-nf4", "bits": 4},
              {"method": "gguf", "bits": 4, "gguf_type": "q4_k_m"}, {"method": "gguf", "bits": 4, "gguf_type": "q4_0"}]
    grid = gptq + awq + rtn + others
    assert len({variant_key(p) for p in grid}) == len(grid)
    assert len(set(variant_labels(grid))) == len(grid)


def test_a_setting_that_a_method_does_not_take_neither_names_nor_tells_apart_its_variant():
    rtn = {"method": "rtn", "bits": 4, "group_size": 128}
    assert variant_labels([POINT | {"bits": 4}, rtn]) == ["w4g128", "rtn-w4g128"]  # no cal:... on RTN
    assert variant_key(rtn | {"damp_percent": 0.1}) == variant_key(rtn)
    assert variant_labels([{"method": "fp8", "bits": 8}, {"method": "gguf", "bits": 8, "gguf_type": "q8_0"},
                           {"method": "bnb-nf4", "bits": 4}]) == ["fp8", "gguf-q8_0", "bnb-nf4"]


# ---------------------------------------------------------------- sweep ids and names


def test_every_submit_gets_a_sweep_and_a_name_selects_it(any_db, tiny_qwen2):
    first = qrun.submit(str(tiny_qwen2), bits=[4, 8], db=any_db)
    named = qrun.submit(str(tiny_qwen2), bits=4, group_size=64, name="g64", db=any_db)
    assert re.fullmatch("[0-9a-f]{8}", first.sweep) and first.sweep != named.sweep
    assert [j.id for j in queue.jobs_of_sweep(any_db, first.sweep)] == first.ids
    assert [j.id for j in queue.jobs_of_sweep(any_db, "g64")] == named.ids
    # The name given again adds to that sweep.
    more = qrun.submit(str(tiny_qwen2), bits=8, group_size=64, name="g64", db=any_db)
    assert more.sweep == named.sweep
    assert [r["id"] for r in qrun.status(sweep="g64", db=any_db)] == named.ids + more.ids
    assert {r["sweep"] for r in qrun.status(sweep=named.sweep, db=any_db)} == {named.sweep}
    with pytest.raises(BadInput, match="--sweep 'nope' matches no job"):
        queue.jobs_of_sweep(any_db, "nope")


@pytest.mark.parametrize("name, message", [("", "1 to 64 printable"), ("x" * 65, "1 to 64 printable"),
                                           ("deadbeef", "looks like a sweep id")])
def test_a_bad_sweep_name_is_refused_before_the_table_is_touched(qrun_home, tiny_qwen2, name, message):
    with pytest.raises(BadInput, match=message):
        qrun.submit(str(tiny_qwen2), bits=4, name=name)
    assert not (qrun_home / "qrun.db").exists()


def test_cancel_and_retry_a_sweep(any_db, tiny_qwen2):
    sweep = qrun.submit(str(tiny_qwen2), bits=[4, 8], name="both", db=any_db)
    other = qrun.submit(str(tiny_qwen2), bits=2, db=any_db)
    claimed = queue.claim_job(any_db, "w1", None)
    queue.fail_job(any_db, claimed.id, "w1", "boom")  # job 1 failed; job 2 is queued
    assert qrun.cancel(sweep="both", db=any_db) == [sweep.ids[1]]  # the failed one is left as it is
    assert [r["status"] for r in qrun.status(sweep="both", db=any_db)] == ["failed", "cancelled"]
    assert qrun.retry(sweep=sweep.sweep, db=any_db) == sweep.ids
    assert [r["status"] for r in qrun.status(sweep="both", db=any_db)] == ["queued", "queued"]
    assert qrun.status(other.ids, db=any_db)[0]["status"] == "queued"  # another sweep: untouched
    with pytest.raises(BadInput, match="not both"):
        qrun.cancel([1], sweep="both", db=any_db)


# ---------------------------------------------------------------- equal jobs are offered, not added


def test_an_identical_quantize_job_is_offered_not_added_unless_rerun(any_db, tiny_qwen2, tmp_path):
    data = str(write_labeled(tmp_path / "test.jsonl"))
    first = qrun.submit(str(tiny_qwen2), bits=4, calib=data, db=any_db)  # --eval's file calibrates by default
    again = qrun.submit(str(tiny_qwen2), bits=4, calib=data, db=any_db)
    assert again.ids == [] and again.sweep is None
    assert [(e.id, e.kind, e.label, e.status) for e in again.existing] == [(first.ids[0], "quantize", "w4g128", "queued")]
    # With --eval: the variant's quantize job is used and its new eval waits for it; the baseline is new.
    evaluated = qrun.submit(str(tiny_qwen2), bits=4, eval=data, db=any_db)
    baseline, evaluation = (queue.get_job(any_db, i) for i in evaluated.ids)
    assert (baseline.kind, baseline.params["variant"], baseline.depends_on) == ("eval", "baseline", None)
    assert (evaluation.kind, evaluation.depends_on) == ("eval", first.ids[0])
    assert qrun.submit(str(tiny_qwen2), bits=4, eval=data, db=any_db).ids == []
    # A failed job is no result: the same submit then adds the job again.
    queue.cancel_jobs(any_db, first.ids)
    retried = qrun.submit(str(tiny_qwen2), bits=4, calib=data, db=any_db)
    assert len(retried.ids) == 1
    rerun = qrun.submit(str(tiny_qwen2), bits=4, eval=data, rerun=True, db=any_db)
    assert [queue.get_job(any_db, i).kind for i in rerun.ids] == ["eval", "quantize", "eval"]


def test_resubmitting_prints_which_job_has_the_result_and_adds_nothing(db, tiny_qwen2):
    run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", check=True)
    result = run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--bits", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2"]
    assert "quantize w4g128 already in job 1 (queued): pass --rerun to run it again" in result.stderr
    again = run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--bits", "8")
    assert (again.returncode, again.stdout) == (0, "")
    assert "already in job 2 (queued)" in again.stderr and "nothing new to add" in again.stderr
    rerun = run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--rerun", check=True)
    assert rerun.stdout.split() == ["3"]
    assert [j.id for j in queue.list_jobs(db)] == [1, 2, 3]


# ---------------------------------------------------------------- a sweep is what was asked, reused jobs included


def _as_bob(db, ids) -> None:
    """Make these jobs a teammate's."""
    from sqlalchemy import update

    from qrun.db.schema import Job

    with db.transaction() as s:
        s.execute(update(Job).where(Job.id.in_(list(ids))).values(submitted_by="bob"))


def _work_the_queue(db) -> None:
    """Claim and succeed every job as a worker would; an eval measures f1 0.9 (baseline), 0.85 (damp 0.01)
    or 0.8 (damp 0.05), with sizes that order them so."""
    scores = {None: (0.9, 3e6), 0.01: (0.85, 1.2e6), 0.05: (0.8, 1.1e6)}
    while (job := queue.claim_job(db, "w", None)) is not None:
        damp = queue.get_job(db, job.depends_on).params["damp_percent"] if job.depends_on else None
        f1, size = scores[damp]
        queue.finish_job(db, job.id, "w", {"f1": f1, "model_size_bytes": size} if job.kind == "eval" else {})


def test_a_sweep_includes_the_equal_jobs_it_reused_with_the_labels_it_gave_them(any_db, tiny_qwen2, tmp_path):
    data = str(write_labeled(tmp_path / "test.jsonl"))
    teammate = qrun.submit(str(tiny_qwen2), bits=4, eval=data, db=any_db)  # baseline, w4g128 (damp 0.01), eval
    _as_bob(any_db, teammate.ids)
    study = qrun.submit(str(tiny_qwen2), bits=4, damp=[0.01, 0.05], eval=data, name="damp-study", db=any_db)
    assert sorted(e.id for e in study.existing) == teammate.ids and len(study.ids) == 2
    everything = sorted(teammate.ids + study.ids)
    assert [j.id for j in queue.jobs_of_sweep(any_db, "damp-study")] == everything
    assert [r["id"] for r in qrun.status(sweeps=["damp-study"], db=any_db)] == everything
    assert [r["id"] for r in qrun.status(sweep=study.sweep, db=any_db)] == everything
    members = queue.sweep_members(any_db, ["damp-study"])
    assert [members[i] for i in everything] == ["baseline", "w4g128·d0.01", "w4g128·d0.01", "w4g128·d0.05",
                                                "w4g128·d0.05"]
    _work_the_queue(any_db)
    rows = qrun.compare(sweep="damp-study", db=any_db)
    assert [(r["variant"], r["f1"]) for r in rows] == [
        ("baseline", 0.9), ("w4g128·d0.01", 0.85), ("w4g128·d0.05", 0.8)]


def test_cancelling_a_sweep_leaves_a_teammates_reused_job_unless_forced(any_db, tiny_qwen2):
    teammate = qrun.submit(str(tiny_qwen2), bits=4, db=any_db)
    _as_bob(any_db, teammate.ids)
    mine = qrun.submit(str(tiny_qwen2), bits=[4, 8], name="mine", db=any_db)
    assert [e.id for e in mine.existing] == teammate.ids
    assert qrun.cancel(sweep="mine", db=any_db) == mine.ids
    assert queue.get_job(any_db, teammate.ids[0]).status == "queued"
    assert qrun.cancel(sweep="mine", force=True, db=any_db) == teammate.ids
    assert [(e["action"], e["detail"]) for e in qrun.audit(db=any_db)] == [("cancel", "of bob, --force")]


# ---------------------------------------------------------------- the command's output


def test_dry_run_prints_the_planned_jobs_as_a_table(db, tiny_qwen2, tmp_path):
    data = str(write_labeled(tmp_path / "test.jsonl"))
    args = ("submit", "--model", str(tiny_qwen2), "--bits", "4", "--damp", "0.01", "--damp", "0.05",
            "--eval", data, "--dry-run")
    result = run_qrun(*args, check=True)
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["#", "KIND", "VARIANT", "PARAMS", "AFTER"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["1", "eval", "baseline"], ["2", "quantize", "w4g128·d0.01"], ["3", "eval", "w4g128·d0.01"],
        ["4", "quantize", "w4g128·d0.05"], ["5", "eval", "w4g128·d0.05"]]
    assert "damp=0.05" in lines[4] and "calib=test.jsonl×128" in lines[4]
    assert lines[3].split()[-1] == "#2" and lines[5].split()[-1] == "#4"
    assert "{" not in result.stdout  # a table, not Python dicts
    planned = json.loads(run_qrun(*args, "--json", check=True).stdout)
    assert [(p["n"], p["kind"], p["variant"], p["after"]) for p in planned] == [
        (1, "eval", "baseline", None), (2, "quantize", "w4g128·d0.01", None), (3, "eval", "w4g128·d0.01", 2),
        (4, "quantize", "w4g128·d0.05", None), (5, "eval", "w4g128·d0.05", 4)]
    assert queue.list_jobs(db) == []  # nothing added


def test_cancel_and_retry_take_a_sweep_on_the_command_line(qrun_home, tiny_qwen2):
    ids = json.loads(run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--bits", "8",
                              "--name", "first", "--json", check=True).stdout)
    cancelled = run_qrun("cancel", "--sweep", "first", check=True)
    assert f"cancelled {ids[0]}, {ids[1]}" in cancelled.stderr
    assert "has no queued or running job" in run_qrun("cancel", "--sweep", "first", check=True).stderr
    assert f"queued again: {ids[0]}, {ids[1]}" in run_qrun("retry", "--sweep", "first", check=True).stderr
    missing = run_qrun("retry", "--sweep", "second")
    assert (missing.returncode, missing.stderr.strip()) == (
        2, "Error: --sweep 'second' matches no job: give a sweep id or name from `qrun status --json`")
    neither = run_qrun("retry")
    assert neither.returncode == 2 and "JOB_IDS" in neither.stderr and "qrun retry --help" in neither.stderr


# ---------------------------------------------------------------- retrying someone else's job


def test_retrying_another_users_job_needs_force(any_db):
    (job_id,) = queue.submit_jobs(any_db, [JobSpec(kind=Kind.QUANTIZE, model="/m", params={"bits": 4})], user="bob")
    queue.cancel_jobs(any_db, [job_id], user="bob")
    with pytest.raises(TransitionError, match=f"job {job_id} belongs to bob: add --force to retry another user's job"):
        queue.retry_jobs(any_db, [job_id], user="alice")
    assert queue.get_job(any_db, job_id).status == "cancelled"
    queue.retry_jobs(any_db, [job_id], user="alice", force=True)
    assert queue.get_job(any_db, job_id).status == "queued"
    assert queue.events_of(any_db, job_id)[-1].detail == "by alice"


def test_retry_on_the_command_line_refuses_another_users_job_without_force(db, qrun_home):
    (job_id,) = queue.submit_jobs(db, [JobSpec(kind=Kind.QUANTIZE, model="/m", params={"bits": 4})],
                                  user="someone-else")
    queue.cancel_jobs(db, [job_id], force=True)
    refused = run_qrun("retry", str(job_id))
    assert (refused.returncode, refused.stderr.strip()) == (
        2, f"Error: job {job_id} belongs to someone-else: add --force to retry another user's job")
    assert queue.get_job(db, job_id).status == "cancelled"
    run_qrun("retry", str(job_id), "--force", check=True)
    assert queue.get_job(db, job_id).status == "queued"


# ---------------------------------------------------------------- submit --wait


def _finish_as_a_worker(db, outcomes: dict[int, bool]) -> None:
    """Claim each queued job as a worker would and succeed or fail it (no Ray: the waiting is tested)."""
    for _ in outcomes:
        job = queue.claim_job(db, "w-test", None)
        if outcomes[job.id]:
            queue.finish_job(db, job.id, "w-test", {"wall_s": 1.0})
        else:
            queue.fail_job(db, job.id, "w-test", "CUDA out of memory\ntraceback...")


@pytest.mark.parametrize("second_succeeds, code", [(True, 0), (False, 1)])
def test_submit_wait_prints_each_finished_job_and_exits_1_when_one_failed(db, qrun_home, tiny_qwen2,
                                                                         second_succeeds, code):
    waiting = subprocess.Popen([QRUN, "submit", "--model", str(tiny_qwen2), "--bits", "4", "--bits", "8", "--wait"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(queue.list_jobs(db)) == 2, 60, "the submit to add its jobs")
        assert waiting.poll() is None  # still waiting: nothing has run
        _finish_as_a_worker(db, {1: True, 2: second_succeeds})
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == code, err
    lines = out.splitlines()
    assert lines[:2] == ["1", "2"]  # the new ids first, as without --wait
    assert lines[2].startswith("job 1 quantize w4g128 succeeded in ")
    if second_succeeds:
        assert lines[3].startswith("job 2 quantize w8g128 succeeded in ")
    else:
        assert lines[3].startswith("job 2 quantize w8g128 failed in ") and lines[3].endswith(": CUDA out of memory")
