"""Why a job waits and what the views show of it: the REASON and place in line of queued jobs (`qrun
status`, its JSON and `qrun.status()`), the one line `submit --wait` and `logs -f` say while no runner
serves the table, `logs -f --tail`, the ETA, eval variants named as compare names them, narrow
terminals, and the message when filters match nothing. The library and the command in this process,
on SQLite and Postgres where the table matters."""

from __future__ import annotations

import json
import select
import subprocess
import time

import pytest
from helpers import QRUN, invoke_main, wait_for

import qrun
from qrun.db import queue
from qrun.db.states import Kind
from qrun.views import eta_s, progress_cell
from qrun.waiting import NO_RUNNER_LINE


def _quantize(n: int = 0, priority: int = 0, **params) -> queue.JobSpec:
    return queue.JobSpec(kind=Kind.QUANTIZE, model="/models/m", priority=priority,
                         params={"bits": 4, "group_size": 128, "n": n, **params})


def _worker(db, slot: str, gpu: str | None, node: str = "host", activity: str | None = None) -> str:
    """A live worker row, as a running `qrun run` keeps it."""
    name = f"{node}:1:{slot}"
    queue.register_worker(db, name, node, slot, "cuda" if gpu else "cpu", gpu)
    queue.worker_heartbeat(db, name, job=None, activity=activity)
    return name


def _waiting(db) -> dict[int, tuple]:
    return {r["id"]: (r["position"], r["reason"]) for r in qrun.status(db=db) if r["status"] == "queued"}


def test_each_queued_job_says_its_place_and_why_it_waits(any_db):
    """The line is the claim's: higher priority first, then the users' turns by usage, each user's jobs
    oldest first; a job after another one has no place yet."""
    _worker(any_db, "gpu0", "0")
    _worker(any_db, "gpu1", "1")
    (ran,) = queue.submit_jobs(any_db, [_quantize(0)], user="bob")
    queue.finish_job(any_db, queue.claim_job(any_db, "host:1:gpu0", "0").id, "host:1:gpu0", {})  # bob used a worker
    bob = queue.submit_jobs(any_db, [_quantize(1), _quantize(2)], user="bob")
    (after,) = queue.submit_jobs(any_db, [queue.JobSpec(kind=Kind.EVAL, model="/models/m", params={
        "data": "/d.jsonl", "mode": "score", "variant": "w4g128"}, depends_on=bob[0])], user="bob")
    (carol,) = queue.submit_jobs(any_db, [_quantize(3)], user="carol")
    (urgent,) = queue.submit_jobs(any_db, [_quantize(4, priority=5)], user="dave")
    assert _waiting(any_db) == {
        urgent: (1, "next in line"),
        carol: (2, "behind 1 job of higher priority"),
        bob[0]: (3, "behind 1 job of higher priority"),
        bob[1]: (4, "behind 1 job of higher priority"),
        after: (None, f"after job {bob[0]}"),
    }
    queue.claim_job(any_db, "host:1:gpu0", "0")  # dave's
    assert _waiting(any_db) == {carol: (1, "next in line"), bob[0]: (2, "other users' turn"),
                                bob[1]: (3, "other users' turn"), after: (None, f"after job {bob[0]}")}
    queue.claim_job(any_db, "host:1:gpu1", "1")  # carol's: she had used no worker
    assert _waiting(any_db)[bob[1]] == (2, "behind 1 earlier job of bob")
    assert ran not in _waiting(any_db)


def test_a_job_that_no_live_worker_can_run_says_what_it_needs(any_db):
    me = queue.current_user()
    (cpu,) = queue.submit_jobs(any_db, [_quantize(0)])
    (gpu,) = queue.submit_jobs(any_db, [_quantize(1, needs_gpu=True)])
    (two,) = queue.submit_jobs(any_db, [_quantize(2, gpus=2)])
    assert {job: reason for job, (_, reason) in _waiting(any_db).items()} == {
        cpu: "no runner serves this table", gpu: "no runner serves this table · needs a GPU",
        two: "no runner serves this table · needs 2 GPUs of one node"}
    _worker(any_db, "cpu0", None)
    reasons = {job: reason for job, (_, reason) in _waiting(any_db).items()}
    assert reasons == {cpu: "next in line", gpu: "needs a GPU", two: "needs 2 GPUs of one node"}
    _worker(any_db, "gpu0", "0", node="a")
    _worker(any_db, "gpu0", "0", node="b")  # two GPUs, but on two nodes
    assert _waiting(any_db)[two][1] == "needs 2 GPUs of one node" and _waiting(any_db)[gpu][1] != "needs a GPU"
    _worker(any_db, "gpu1", "1", node="b")
    assert _waiting(any_db) == {cpu: (1, "next in line"), gpu: (2, f"behind 1 earlier job of {me}"),
                                two: (3, f"behind 2 earlier jobs of {me}")}
    _worker(any_db, "cpu1", None, node="c", activity=queue.preparing_activity(cpu, "GPTQModel kernel gptq_cuda"))
    assert _waiting(any_db)[cpu] == (1, "preparing on cpu1: GPTQModel kernel gptq_cuda")


def test_status_shows_reason_and_place_and_keeps_who_on_a_narrow_terminal(qrun_home, db, monkeypatch):
    _worker(db, "gpu0", "0")
    queue.submit_jobs(db, [_quantize(n) for n in range(2)], user="bartholomew")
    running = queue.claim_job(db, "host:1:gpu0", "0")
    queue.record_progress(db, running.id, "host:1:gpu0", 12, 28, "layer 12: mlp.down_proj")
    monkeypatch.setenv("COLUMNS", "80")
    result = invoke_main("status")
    assert result.exit_code == 0, result.output
    header, first, second = result.stdout.splitlines()
    assert header.split() == ["ID", "USER", "PARAMS", "STATUS", "REASON", "PROGRESS"]  # MODEL, KIND, ... gave way
    assert first.split()[:4] == [str(running.id), "bartholomew", "w4g128", "running"] and "layer 12/28" in first
    assert second.split()[3:] == ["queued", "#1", "·", "next", "in", "line"]
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    monkeypatch.setenv("COLUMNS", "200")
    assert invoke_main("status").stdout.splitlines()[0].split()[:7] == [
        "ID", "USER", "MODEL", "KIND", "PARAMS", "STATUS", "REASON"]


def test_status_rows_are_the_json_rows_and_take_the_commands_filters(any_db):
    queue.submit_jobs(any_db, [_quantize(0)], user="alice")
    bob = queue.submit_jobs(any_db, [_quantize(1), _quantize(2)], user="bob")
    queue.finish_job(any_db, queue.claim_job(any_db, "w", None).id, "w", {"bits": 4.0})  # alice's
    rows = qrun.status(db=any_db)
    assert json.loads(json.dumps(rows)) == rows  # plain JSON: times are ISO strings
    printed = invoke_main("--db", any_db.url, "status", "--json")
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout) == rows
    assert [r["id"] for r in qrun.status(db=any_db, user="bob", state="queued", since="2h")] == bob
    assert [r["id"] for r in qrun.status(db=any_db, users="bob", model="m")] == bob  # one value, not letters
    assert qrun.status(db=any_db, state=["succeeded"], user=["alice", "bob"])[0]["finished_at"].endswith("Z")


def test_nothing_matched_names_the_filter(any_db, monkeypatch):
    monkeypatch.setenv("QRUN_DB", any_db.url)
    result = invoke_main("status")
    assert result.exit_code == 0 and "No jobs yet" in result.stderr
    queue.submit_jobs(any_db, [_quantize(0)], user="bob")
    queue.claim_job(any_db, "w", None)
    queue.submit_jobs(any_db, [_quantize(1)], user="alice")
    assert invoke_main("status", "--user", "nobody").stderr.strip() == "No job matches --user nobody."
    assert invoke_main("status", "--state", "failed").stderr.strip() == "No job matches --state failed."
    both = invoke_main("status", "--user", "alice", "--state", "running").stderr.strip()
    assert both == ("No job matches --user alice --state running among the active jobs and those finished in "
                    "the last hour: add --all for older ones.")
    ever = invoke_main("status", "--all", "--user", "alice", "--state", "running").stderr.strip()
    assert ever == "No job matches --user alice --state running together."


def test_no_eta_before_it_can_be_measured(db):
    queue.submit_jobs(db, [_quantize(0)])
    job = queue.claim_job(db, "w", None)
    for done, shown in ((0, False), (1, False), (2, True), (28, False)):
        queue.record_progress(db, job.id, "w", done, 28, "layer")
        now = queue.get_job(db, job.id)
        assert (eta_s(now) is not None, "ETA" in progress_cell(now)) == (shown, shown), done
        assert (qrun.status([job.id], db=db)[0]["progress"]["eta_s"] is not None) is shown


def test_evals_name_their_variant_as_compare_does(db):
    """A damp study: both evals measure `w4g128`; compare tells them apart by damp, and so does status."""
    quantize = queue.submit_jobs(db, [_quantize(0, damp_percent=d) for d in (0.01, 0.05)])
    evals = queue.submit_jobs(db, [queue.JobSpec(kind=Kind.EVAL, model="/models/m", depends_on=q, params={
        "data": "/d.jsonl", "mode": "score", "variant": "w4g128"}) for q in quantize])
    labels = {r["id"]: r["label"] for r in qrun.status(evals, db=db)}
    assert labels == {evals[0]: "eval w4g128·d0.01 score", evals[1]: "eval w4g128·d0.05 score"}
    table = invoke_main("status", "--columns", "id,params").stdout
    assert "eval w4g128·d0.01 score" in table and "eval w4g128·d0.05 score" in table


def _log(tmp_path, db, job_id: int, lines: int) -> None:
    path = tmp_path / f"job-{job_id}.log"
    path.write_text("".join(f"line {n}\n" for n in range(1, lines + 1)))
    queue.set_log_path(db, job_id, str(path))


def test_logs_follow_honours_tail(db, tmp_path):
    (job_id,) = queue.submit_jobs(db, [_quantize(0)])
    job = queue.claim_job(db, "w", None)
    _log(tmp_path, db, job_id, 10)
    queue.finish_job(db, job.id, "w", {})
    followed = invoke_main("logs", "-f", "--tail", "3", str(job_id))
    assert followed.exit_code == 0, followed.output
    assert [line for line in followed.stdout.splitlines() if not line.startswith("#")] == [
        "line 8", "line 9", "line 10"]
    raw = invoke_main("logs", "--raw", "--tail", "2", str(job_id))
    assert raw.stdout.endswith("\nline 9\nline 10\n") and "line 8" not in raw.stdout


def test_wait_says_once_that_no_runner_serves_the_table(any_db):
    (job_id,) = queue.submit_jobs(any_db, [_quantize(0)])
    said = []
    with pytest.raises(qrun.WaitTimeout):
        qrun.wait([job_id], timeout=0.3, poll_s=0.02, db=any_db, warn=said.append)
    assert said == [NO_RUNNER_LINE]
    _worker(any_db, "cpu0", None)
    said.clear()
    with pytest.raises(qrun.WaitTimeout):
        qrun.wait([job_id], timeout=0.1, poll_s=0.02, db=any_db, warn=said.append)
    assert said == []


def _stderr_line(process: subprocess.Popen, timeout: float = 120) -> str:
    """The next line of the process's stderr ('' at its end); the test fails if none comes in time."""
    ready, _, _ = select.select([process.stderr], [], [], timeout)
    assert ready, f"nothing said on stderr within {timeout:g} s"
    return process.stderr.readline()


def _read_until(process: subprocess.Popen, text: str) -> None:
    """Lines of the process's stderr until one is `text` (the test fails if the process ends first)."""
    while (line := _stderr_line(process)).strip() != text:
        assert line, f"the command ended without saying {text!r}"


def test_logs_follow_and_submit_wait_say_it_on_stderr_and_keep_waiting(qrun_home, db, tiny_qwen2):
    """The real commands: the line comes at once, once, on stderr; they go on until the job ends."""
    (job_id,) = queue.submit_jobs(db, [_quantize(0)])
    follower = subprocess.Popen([QRUN, "logs", "-f", str(job_id)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    waiter = subprocess.Popen([QRUN, "submit", "--model", str(tiny_qwen2), "--bits", "4", "--wait"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _stderr_line(follower, 30).strip() == NO_RUNNER_LINE  # the first thing it says
        _read_until(waiter, NO_RUNNER_LINE)
        wait_for(lambda: len(queue.list_jobs(db)) == 2, 60, "the submit")
        time.sleep(1)  # several polls later: still waiting, nothing said again
        assert follower.poll() is None and waiter.poll() is None
        for job in queue.list_jobs(db):
            queue.finish_job(db, queue.claim_job(db, "w", None).id, "w", {})
        out, err = follower.communicate(timeout=60)
        assert follower.returncode == 0 and NO_RUNNER_LINE not in err
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0 and NO_RUNNER_LINE not in err, err
    finally:
        for process in (follower, waiter):
            if process.poll() is None:
                process.kill()
