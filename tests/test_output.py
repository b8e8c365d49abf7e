"""What people read: `qrun status` and `qrun compare` fitted to 80 and 120 columns, status' filters
and JSON, compare's variants that differ only in damp, and `qrun logs` (progress bars collapsed,
--raw, --follow). Every case goes through the real console script on a real SQLite file."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from helpers import QRUN, run_qrun, submit_and_claim, wait_for, write_predictions
from qrun.comparison import comparison_rows
from qrun.cli.table import display_width
from qrun.db import queue
from qrun.db.states import Kind

MODEL_DIR = "qwen2-1.5b-antifraud-finetuned-on-november-dialogs-v3-final"
ERROR = ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 1; 79.10 GiB total capacity; 75.20 GiB already "
         "allocated) at layer 7/28: lower --batch-size")
ESCAPES = re.compile(r"\x1b")


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "models" / MODEL_DIR
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    return path


def _claim(db, job_id: int, worker: str = "host:1:gpu0", gpu: str = "0"):
    claimed = queue.claim_job(db, worker, gpu)
    assert claimed.id == job_id
    return claimed


def _succeed(db, tmp_path, spec: queue.JobSpec, metrics: dict, user: str = "alice") -> int:
    job_id = submit_and_claim(db, spec, worker="host:1:gpu0", gpu="0", user=user)
    records = []
    if spec.kind == Kind.EVAL:
        records.append(write_predictions(tmp_path / f"job{job_id}.predictions.jsonl",
                                         {"a": True, "b": False, "c": True, "d": False}))
    queue.finish_job(db, job_id, "host:1:gpu0", metrics, records)
    return job_id


def _scores(precision, recall, size) -> dict:
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall),
            "accuracy": 0.75, "invalid": 0.0, "auc": 0.9, "perplexity": 10.0, "model_size_bytes": size,
            "eval_samples": 4.0, "samples_per_s": 2.0}


def _eval(model, data, variant, upstream=None) -> queue.JobSpec:
    return queue.JobSpec(kind=Kind.EVAL, model=str(model), depends_on=upstream,
                         params={"data": str(data), "mode": "score", "variant": variant, "ppl_data": None})


def _damp_sweep(db, tmp_path, model) -> Path:
    """A baseline and w4g128 at damp 0.01 and at 0.05: same bits, same group, same label before."""
    data = tmp_path / "november-dialogs-test-split.jsonl"
    _succeed(db, tmp_path, _eval(model, data, "baseline"), _scores(0.8, 0.6, 3e9))
    for damp, precision in ((0.01, 0.5), (0.05, 0.7)):
        quantize = _succeed(db, tmp_path, queue.JobSpec(kind=Kind.QUANTIZE, model=str(model), params={
            "bits": 4, "group_size": 128, "damp_percent": damp}), {"quantize_s": 120.0})
        _succeed(db, tmp_path, _eval(model, data, "w4g128", quantize), _scores(precision, 0.5, 1e9))
    return data


@pytest.fixture
def team_queue(db, tmp_path, model):
    """A damp sweep (for compare), then a running job at layer 12/28, a failed one with a long error
    and a queued eval of another user's (for status)."""
    _damp_sweep(db, tmp_path, model)
    running, failed = queue.submit_jobs(db, [queue.JobSpec(kind=Kind.QUANTIZE, model=str(model), params={
        "bits": b, "group_size": 32}) for b in (3, 2)], user="alice")
    (waiting,) = queue.submit_jobs(db, [_eval(model, tmp_path / "d.jsonl", "w3g32", running)],
                                   user="bartholomew")
    _claim(db, running)
    queue.record_progress(db, running, "host:1:gpu0", 12, 28, "layer 12: mlp.down_proj")
    _claim(db, failed, "host:1:gpu1", "1")
    queue.fail_job(db, failed, "host:1:gpu1", ERROR)
    return {"running": running, "failed": failed, "waiting": waiting}


def _fits(text: str, width: int) -> list[str]:
    lines = text.splitlines()
    assert lines, "no output"
    for line in lines:
        assert display_width(line) <= width, f"{display_width(line)} > {width}: {line!r}"
        assert line == line.rstrip(), f"trailing spaces: {line!r}"
    assert not ESCAPES.search(text), "escape codes in piped output"
    return lines


@pytest.mark.parametrize("width", [80, 120])
def test_status_and_compare_fit_the_width_and_cut_nothing_that_matters(team_queue, width):
    status = run_qrun("status", env={"COLUMNS": str(width)}, check=True).stdout
    lines = _fits(status, width)
    header = lines[0].split()
    assert header[:4] == ["ID", "USER", "PARAMS", "STATUS"]  # MODEL and KIND give way first
    rows = {int(line.split()[0]): line for line in lines[1:]}
    assert "layer 12/28" in rows[team_queue["running"]] and "bartholomew" in rows[team_queue["waiting"]]
    assert "w3g32 score" in rows[team_queue["waiting"]] and "after " in rows[team_queue["waiting"]]
    if width == 120:
        assert "layer 12/28 · 42% · ETA " in rows[team_queue["running"]]
        assert re.search(r"\bfailed\b.*  CUDA out of( \S+)*…$", rows[team_queue["failed"]])

    compare = run_qrun("compare", env={"COLUMNS": str(width)}, check=True).stdout
    lines = _fits(compare, width)
    assert lines[0].startswith(MODEL_DIR)  # the title: names where whole paths do not fit
    table = "\n".join(lines[1:])
    for variant, numbers in (("baseline", "0.800"), ("w4g128·d0.01", "0.500 (-0.300)"),
                             ("w4g128·d0.05", "0.700 (-0.100)")):
        (row,) = [line for line in lines if line.startswith(variant + " ")]
        assert numbers in row, row
    assert "precision" in table and "recall" in table and "F1" in table


def test_piped_output_without_columns_is_whole_and_plain(team_queue):
    status = run_qrun("status", env={"NO_COLOR": ""}, check=True).stdout
    assert not ESCAPES.search(status) and all(line == line.rstrip() for line in status.splitlines())
    assert MODEL_DIR in status and "bartholomew" in status  # nothing cut or dropped
    compare = run_qrun("compare", check=True).stdout
    header = next(line for line in compare.splitlines() if line.startswith("variant "))
    assert "not->fraud" in header and len(header) < 250  # whole, and not forced to a 250-column width
    assert all(line == line.rstrip() for line in compare.splitlines())


def test_compare_keeps_variants_that_differ_only_in_damp(db, tmp_path, model):
    _damp_sweep(db, tmp_path, model)
    rows = comparison_rows(db)
    assert [(r["variant"], r["damp_percent"], r["precision"]) for r in rows] == [
        ("baseline", None, 0.8), ("w4g128·d0.01", 0.01, 0.5), ("w4g128·d0.05", 0.05, 0.7)]
    csv_header = run_qrun("compare", "--format", "csv", check=True).stdout.splitlines()[0].split(",")
    assert {"variant", "damp_percent", "calib", "calib_samples"} <= set(csv_header)


def test_narrow_compare_stacks_each_variant(db, tmp_path, model):
    _damp_sweep(db, tmp_path, model)
    lines = _fits(run_qrun("compare", env={"COLUMNS": "40"}, check=True).stdout, 40)
    assert "variant     w4g128·d0.05" in lines and "precision   0.700 (-0.100)" in lines


# ---------------------------------------------------------------- status: a team's view


def _age(db_file: Path, job_id: int, hours: float) -> None:
    """Pretend the job finished `hours` ago (the queue's functions always write now)."""
    then = datetime.utcnow() - timedelta(hours=hours)
    with sqlite3.connect(db_file) as conn:
        conn.execute("UPDATE jobs SET created_at = ?, finished_at = ? WHERE id = ?", (then, then, job_id))


def _ids(*args) -> list[int]:
    return [j["id"] for j in json.loads(run_qrun("status", "--json", *args, check=True).stdout)]


def test_status_shows_active_and_recent_jobs_and_filters_like_sacct(team_queue, qrun_home, model):
    old = team_queue["running"] - 1  # the last eval of the damp sweep
    _age(qrun_home / "qrun.db", old, hours=3)
    everything = _ids("--all")
    assert old in everything and old not in _ids()  # finished 3 h ago: only with --all or --since
    assert old in _ids("--since", "4h") and old not in _ids("--since", "2h") and old in _ids(str(old))
    assert _ids("--user", "bartholomew") == [team_queue["waiting"]]
    assert _ids("--state", "running", "--state", "failed") == [team_queue["running"], team_queue["failed"]]
    assert _ids("--model", MODEL_DIR, "--all") == everything and _ids("--model", "other") == []
    assert _ids("--mine", "--all") == []  # everything was submitted as alice or bartholomew
    assert _ids("--all", "--limit", "2") == everything[-2:]
    since = (datetime.now().astimezone() - timedelta(hours=4)).isoformat(timespec="seconds")
    assert old in _ids("--since", since)
    bad = run_qrun("status", "--since", "yesterday")
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr


def test_status_json_schema(team_queue):
    jobs = {j["id"]: j for j in json.loads(run_qrun("status", "--json", "--all", check=True).stdout)}
    running, failed = jobs[team_queue["running"]], jobs[team_queue["failed"]]
    assert running["progress"] | {"eta_s": None} == {"done": 12, "total": 28, "module": "layer 12: mlp.down_proj",
                                                     "unit": "layer", "percent": 42, "eta_s": None}
    assert running["progress"]["eta_s"] >= 0 and running["model_name"] == MODEL_DIR
    assert failed["error"] == ERROR  # whole, as in `qrun logs`
    iso = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
    assert all(iso.match(j["created_at"]) for j in jobs.values())
    evals = [j for j in jobs.values() if j["kind"] == "eval" and j["status"] == "succeeded"]
    assert all(type(j["metrics"]["eval_samples"]) is int and type(j["metrics"]["model_size_bytes"]) is int
               and type(j["metrics"]["precision"]) is float for j in evals)


def test_unknown_column_is_bad_input(db):
    result = run_qrun("status", "--columns", "id,colour")
    assert result.returncode == 2 and "no column 'colour'" in result.stderr and result.stdout == ""


def test_watch_when_piped_prints_the_table_then_only_changed_rows(db, tmp_path, model):
    (job_id,) = queue.submit_jobs(db, [queue.JobSpec(kind=Kind.QUANTIZE, model=str(model), params={"bits": 4})])
    watcher = subprocess.Popen([QRUN, "status", "--watch"], stdout=subprocess.PIPE, text=True)
    try:
        first = watcher.stdout.readline() + watcher.stdout.readline()
        assert "queued" in first
        _claim(db, job_id)
        queue.record_progress(db, job_id, "host:1:gpu0", 1, 2, None)
        queue.finish_job(db, job_id, "host:1:gpu0", {})
        out, _ = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    assert watcher.returncode == 0 and not ESCAPES.search(out)
    assert re.search(r"^-- \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$", out, re.M)
    assert out.rstrip().splitlines()[-1].split()[:1] == [str(job_id)] and "succeeded" in out.splitlines()[-1]


# ---------------------------------------------------------------- logs


def _tqdm_log(path: Path) -> bytes:
    """A log as a job writes it: a line, a real tqdm bar redrawn with \\r, a bar repainted on new
    lines, a line."""
    from tqdm import tqdm

    with open(path, "w", encoding="utf-8") as f:
        f.write("loading model\n")
        f.flush()
        for _ in tqdm(range(5), desc="Quantizing", file=f, mininterval=0, miniters=1, ncols=60):
            pass  # tqdm ends the bar's line when it closes
        for done in range(3):
            f.write(f"Layer 0 Finalize {done}/2 | 0:00:0{done} / 0:00:02 [{done}/2]\n")
        f.write("saved\n")
    return path.read_bytes()


def _job_with_log(db, tmp_path, model) -> tuple[int, Path]:
    (job_id,) = queue.submit_jobs(db, [queue.JobSpec(kind=Kind.QUANTIZE, model=str(model), params={"bits": 4})])
    _claim(db, job_id)
    log = tmp_path / f"job-{job_id}.log"
    log.touch()
    queue.set_log_path(db, job_id, str(log))
    return job_id, log


def test_logs_collapse_progress_bar_redraws(db, tmp_path, model):
    job_id, log = _job_with_log(db, tmp_path, model)
    raw = _tqdm_log(log)
    assert raw.count(b"\r") >= 5  # tqdm really redrew the line
    out = run_qrun("logs", str(job_id), check=True).stdout.splitlines()
    events, text = [line for line in out if line.startswith("# ")], [line for line in out if not line.startswith("# ")]
    assert re.match(r"^# \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d submit: - -> queued \(by ", events[0])
    assert text[0] == "loading model" and text[-1] == "saved" and len(text) == 4
    assert re.match(r"^Quantizing: 100%\|█+\| 5/5 ", text[1])
    assert text[2] == "Layer 0 Finalize 2/2 | 0:00:02 / 0:00:02 [2/2]"
    assert subprocess.run([QRUN, "logs", "--raw", str(job_id)], capture_output=True, check=True).stdout.endswith(raw)
    assert run_qrun("logs", "--tail", "1", str(job_id), check=True).stdout.splitlines()[-1] == "saved"


def test_logs_follow_until_the_job_finishes_and_exit_with_its_outcome(db, tmp_path, model):
    job_id, log = _job_with_log(db, tmp_path, model)
    follower = subprocess.Popen([QRUN, "logs", "-f", str(job_id)], stdout=subprocess.PIPE, text=True)
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write("layer 1 done\n")
            f.flush()
            wait_for(lambda: "layer 1 done" in follower.stdout.readline(), 30, "the first line, followed")
            f.write("Quantizing:  50%|█████     | 1/2\rQuantizing: 100%|██████████| 2/2\n")
            f.write("layer 2 done\n")
        time.sleep(0.6)
        queue.fail_job(db, job_id, "host:1:gpu0", "boom at layer 2/2")
        out, _ = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == 1  # it failed
    lines = out.splitlines()
    assert "Quantizing: 100%|██████████| 2/2" in lines and "layer 2 done" in lines
    assert not any("50%" in line for line in lines)
    assert lines[-1].endswith("fail: running -> failed (boom at layer 2/2)")


def test_control_characters_in_a_model_name_never_reach_the_terminal(qrun_home, db):
    """A directory name is anyone's choice on a shared server: an escape sequence in it is shown
    written out, and a newline in it does not split the row."""
    from qrun.db import queue
    from qrun.db.queue import JobSpec
    from qrun.db.states import Kind

    queue.submit_jobs(db, [JobSpec(Kind.QUANTIZE, "/models/evil\x1b[2J\x1b[31mRED", {"bits": 4}),
                           JobSpec(Kind.QUANTIZE, "/models/two\nlines", {"bits": 8, "gpus": 2})])
    for env in ({}, {"COLUMNS": "200"}):
        out = run_qrun("status", env=env, check=True).stdout
        assert "\x1b" not in out and "evil\\x1b[2J\\x1b[31mRED" in out
        assert len(out.strip().splitlines()) == 3 and "two\\nlines" in out
    assert "needs 2 GPUs of one node" in out
