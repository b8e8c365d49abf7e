"""Faults, done for real: SIGKILL of `qrun run`, a full file system, an allocation that fails,
a cancel mid-quantization, two runners on one table. Each test fails if the guarantee breaks.

Every test drives the real console script (real Ray, real GPTQModel on tiny models) and reads the
job table straight from its SQLite file. The SIGKILLed *worker* case lives in test_end_to_end.py
(test_killed_worker_does_not_lose_the_job). The record is docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from qrun.db.queue import current_user
from qrun.db.states import FINISHED as FINISHED_STATES
from helpers import QRUN, run_qrun, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


# ---------------------------------------------------------------- helpers


def submit(*args: str) -> list[int]:
    return json.loads(run_qrun("submit", *args, "--json", check=True).stdout)


def start_runner(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`qrun run` in its own process group, its output in `log` (read while it runs)."""
    return subprocess.Popen([QRUN, "run", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """Kill what this test started (the runner's process group) if it is still there."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def run_to_end(*args: str, log: Path, timeout: float, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`qrun run ARGS` until it exits (killed after `timeout` s); returns the process and its output."""
    runner = start_runner(*args, log=log, env=env)
    try:
        runner.wait(timeout=timeout)
    finally:
        stop(runner)
    return runner, log.read_text()


def table(home: Path, sql: str, *args) -> list[sqlite3.Row]:
    with sqlite3.connect(home / "qrun.db", timeout=60) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, args).fetchall()


def job(home: Path, job_id: int) -> sqlite3.Row:
    return table(home, "SELECT * FROM jobs WHERE id = ?", job_id)[0]


def transitions(home: Path, job_id: int) -> list[str]:
    return [r["transition"] for r in table(home, "SELECT transition FROM events WHERE job_id = ? ORDER BY id", job_id)]


def artifact_rows(home: Path, job_id: int) -> list[sqlite3.Row]:
    return table(home, "SELECT * FROM artifacts WHERE job_id = ?", job_id)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def worker_pid(row) -> int:
    return int(row["worker"].split(":")[1])  # host:pid:slot


def leftovers(artifacts: Path) -> list[str]:
    """Staging and offload directories: what a crashed or failed attempt could leave behind."""
    return sorted(p.name for p in artifacts.glob(".staging*")) if artifacts.exists() else []


def gptqmodel_temp_dirs_named_in(log: Path) -> list[str]:
    """Temporary directories GPTQModel says it created (it does so when not given one)."""
    return re.findall(r"temporary dir `([^`]+)`", log.read_text(errors="replace"))


# ---------------------------------------------------------------- SIGKILL of `qrun run`


def test_killed_runner_job_is_taken_by_the_next_runner(qrun_home, deep_qwen2, tmp_path):
    (job_id,) = submit("--model", str(deep_qwen2), "--bits", "4", "--group-size", "64", "--calib-samples", "16")
    first = start_runner("--until-empty", "--lease", "3", log=tmp_path / "run1.log")
    try:
        running = wait_for(lambda: (r := job(qrun_home, job_id))["progress_done"] >= 2 and r, 240,
                           "the job to quantize two layers")
        old_worker = worker_pid(running)
        os.kill(first.pid, signal.SIGKILL)  # `qrun run` itself, not its worker
        first.wait(timeout=30)
        # Ray's processes share the driver's fate: the worker must not go on holding the job.
        wait_for(lambda: not pid_alive(old_worker), 60, f"worker {old_worker} to die with its runner")
    finally:
        stop(first)
    assert job(qrun_home, job_id)["status"] == "running"  # nobody has noticed yet...

    second, output = run_to_end("--until-empty", "--lease", "3", log=tmp_path / "run2.log", timeout=400)
    assert second.returncode == 0, output
    done = job(qrun_home, job_id)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert transitions(qrun_home, job_id) == ["submit", "claim", "release", "claim", "succeed"]
    assert "lost (lease expired)" in run_qrun("logs", str(job_id), check=True).stdout
    assert not table(qrun_home, "SELECT id FROM jobs WHERE status = 'running'")  # none stuck
    (artifact,) = artifact_rows(qrun_home, job_id)
    assert [p.name for p in (qrun_home / "artifacts").iterdir()] == [Path(artifact["path"]).name]
    assert not [d for d in gptqmodel_temp_dirs_named_in(Path(done["log_path"])) if Path(d).exists()]


# ---------------------------------------------------------------- a full file system


@pytest.fixture
def small_artifact_disk(qrun_home):
    """$QRUN_HOME/artifacts on a 400 KiB tmpfs: a w2 tiny model's artifact fits (264 KiB), a w8 one's
    (487 KiB) does not -- and neither fits beside the other. (GPTQModel's offload files, which used to
    go there too, are not written where host memory is plentiful: workers.engine.)"""
    artifacts = qrun_home / "artifacts"
    artifacts.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k,mode=2775", "tmpfs", str(artifacts)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield artifacts
    finally:
        subprocess.run(["umount", "-l", str(artifacts)], check=False)


def test_full_disk_fails_the_job_cleanly_and_the_next_job_runs(qrun_home, tiny_qwen2, small_artifact_disk,
                                                                tmp_path):
    big, small = submit("--model", str(tiny_qwen2), "--bits", "8", "--bits", "2", "--group-size", "32")
    runner, output = run_to_end("--until-empty", log=tmp_path / "run.log", timeout=300)
    assert runner.returncode == 1, output  # one job failed
    failed = job(qrun_home, big)
    assert failed["status"] == "failed"
    assert failed["error"].startswith(f"no space left on device: {small_artifact_disk}"), failed["error"]
    assert "free space or move QRUN_HOME" in failed["error"]
    assert failed["attempts"] == 1  # a full disk is not retried: it would fail again
    assert artifact_rows(qrun_home, big) == []
    assert job(qrun_home, small)["status"] == "succeeded"  # fits only because the failed job cleaned up
    (artifact,) = artifact_rows(qrun_home, small)
    assert [p.name for p in small_artifact_disk.iterdir()] == [Path(artifact["path"]).name]
    assert leftovers(small_artifact_disk) == []


@pytest.fixture
def small_home_disk(tmp_path, monkeypatch) -> Path:
    """The whole QRUN_HOME -- job table, logs, artifacts, GPTQModel's offload files -- on a 1100 KiB
    tmpfs: a w2 tiny model's job fits, a w8 one's does not."""
    home = tmp_path / "small-home"
    home.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1100k,mode=2775", "tmpfs", str(home)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    monkeypatch.setenv("QRUN_HOME", str(home))
    monkeypatch.delenv("QRUN_DB", raising=False)
    try:
        yield home
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


class DiskFiller:
    """Another process's runaway output: keeps the file system full (grabs every block freed)."""

    def __init__(self, path: Path):
        self.file = path.open("ab")  # made while there is room for it
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        while not self.stop.is_set():
            try:
                self.file.write(b"\0" * 4096)
                self.file.flush()
            except OSError:
                time.sleep(0.02)

    def remove(self) -> None:
        self.stop.set()
        self.thread.join()
        try:
            self.file.close()
        except OSError:
            pass
        Path(self.file.name).unlink()


def test_a_full_disk_under_qrun_home_fails_the_job_and_the_runner_waits_for_its_table(small_home_disk, tiny_qwen2,
                                                                                       tmp_path):
    """The disk that holds QRUN_HOME fills up while a job runs (another process keeps it full). The
    worker cannot write the job table, says so, waits, and goes on once space returns; the runner
    never stops. Where the disk filled decides which job it fails: a file write of the big job while
    the filler holds fails it (its staging and offload directories removed, its failure recorded once
    space returns) and the small job then fits; a table write of the big job instead waits, the big
    job then succeeds, and its artifact leaves no room for the small one, which fails. Either way one
    job fails, saying "no space left on device", and the other succeeds."""
    big, small = submit("--model", str(tiny_qwen2), "--bits", "8", "--bits", "2", "--group-size", "32")
    log = tmp_path / "run.log"
    runner = start_runner("--serve", log=log)
    try:
        wait_for(lambda: job(small_home_disk, big)["status"] == "running", 120, "the big job to start")
        filler = DiskFiller(small_home_disk / "filler")
        try:
            wait_for(lambda: "database unavailable: database or disk is full; trying again" in log.read_text(),
                     120, "the worker to say that the job table cannot be written")
            assert runner.poll() is None, log.read_text()  # still up
            assert job(small_home_disk, big)["status"] == "running"  # its outcome waits, not lost
        finally:
            filler.remove()
        wait_for(lambda: job(small_home_disk, small)["status"] in {s.value for s in FINISHED_STATES}, 120,
                 "the small job to finish")
        os.kill(runner.pid, signal.SIGTERM)
        runner.wait(timeout=120)
    finally:
        stop(runner)
    output = log.read_text()
    outcomes = {job_id: job(small_home_disk, job_id) for job_id in (big, small)}
    failed = [row for row in outcomes.values() if row["status"] == "failed"]
    succeeded = [job_id for job_id, row in outcomes.items() if row["status"] == "succeeded"]
    assert len(failed) == 1 and len(succeeded) == 1, outcomes
    assert failed[0]["error"].startswith(f"no space left on device: {small_home_disk}"), failed[0]["error"]
    assert runner.returncode == 130, output  # stopped by SIGTERM, not by the full disk
    assert not table(small_home_disk, "SELECT id FROM jobs WHERE status = 'running'")
    assert leftovers(small_home_disk / "artifacts") == []
    (artifact,) = artifact_rows(small_home_disk, succeeded[0])
    assert [p.name for p in (small_home_disk / "artifacts").iterdir()] == [Path(artifact["path"]).name]


def test_a_full_disk_under_the_job_table_is_named_as_such(small_home_disk, tiny_qwen2):
    """With no process holding the table open, SQLite cannot open a WAL database on a full disk even
    to read it (it must make its -shm file) and says only "disk I/O error". `qrun status` and
    `qrun submit` say the disk is full, in one line, exit 2; once space returns the table is intact."""
    (queued,) = submit("--model", str(tiny_qwen2), "--bits", "4")
    with (small_home_disk / "filler").open("wb", buffering=0) as filler, pytest.raises(OSError):  # ENOSPC
        while True:
            filler.write(b"\0" * 4096)
    for args in (("status",), ("submit", "--model", str(tiny_qwen2), "--bits", "8")):
        result = run_qrun(*args)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        full = f"Error: database {small_home_disk / 'qrun.db'} cannot be opened: the disk it is on is full"
        assert line.startswith(full), line
    (small_home_disk / "filler").unlink()
    assert [j["id"] for j in json.loads(run_qrun("status", "--all", "--json", check=True).stdout)] == [queued]


# ---------------------------------------------------------------- out of memory


@pytest.fixture
def long_calibration(tmp_path) -> Path:
    rng = random.Random(0)
    words = ("您好 银行 客服 账户 风险 验证码 投资 快递 理赔 会议 软件 屏幕 Your parcel customs fee gift card "
             "lunch Friday office train late prize tax").split()
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(700))},
                                       ensure_ascii=False) + "\n" for _ in range(32)), encoding="utf-8")
    return path


def test_out_of_memory_fails_with_the_layer_and_a_hint(qrun_home, wide_mlp_qwen2, long_calibration, tmp_path):
    common = ("--model", str(wide_mlp_qwen2), "--bits", "4", "--group-size", "32", "--calib",
              str(long_calibration), "--max-attempts", "2")
    (greedy,) = submit(*common, "--calib-samples", "32", "--calib-max-len", "1024", "--batch-size", "32")
    (modest,) = submit(*common, "--calib-samples", "4", "--calib-max-len", "256", "--batch-size", "1")
    # A real allocation failure: the worker caps its address space 512 MiB above what it maps
    # at job start (RLIMIT_AS); the batch of 32 needs more, the batch of 1 does not.
    runner, output = run_to_end("--until-empty", "--lease", "5", log=tmp_path / "run.log", timeout=400,
                                env={"QRUN_JOB_MEMORY_MB": "512"})
    assert runner.returncode == 1, output
    failed = job(qrun_home, greedy)
    assert failed["status"] == "failed"
    assert re.fullmatch(r"out of memory at layer \d/2 \(layer \d: [a-z_., ]+\) under the worker's cap "
                        r"QRUN_JOB_MEMORY_MB=512: use a smaller calibration batch "
                        r"\(--batch-size, --calib-max-len, --calib-samples\) or raise the cap", failed["error"]), \
        failed["error"]
    assert "ran 2 job(s), 1 failed" in output  # the greedy job's two attempts count as one job
    assert failed["attempts"] == 2  # retried, but only within --max-attempts
    assert transitions(qrun_home, greedy) == ["submit", "claim", "release", "claim", "fail"]
    log = Path(failed["log_path"]).read_text(errors="replace")
    assert log.count("host memory cap: 512 MiB") == 2 and "Cannot allocate memory" in log
    assert artifact_rows(qrun_home, greedy) == []
    assert job(qrun_home, modest)["status"] == "succeeded"  # the hint works, under the same cap
    assert leftovers(qrun_home / "artifacts") == []


# ---------------------------------------------------------------- cancel while running


def test_cancel_while_running_stops_at_the_next_layer(qrun_home, deep_qwen2, tmp_path):
    (job_id,) = submit("--model", str(deep_qwen2), "--bits", "4", "--group-size", "64", "--calib-samples", "16")
    runner = start_runner("--until-empty", "--lease", "3", log=tmp_path / "run.log")
    try:
        wait_for(lambda: job(qrun_home, job_id)["progress_done"] >= 2, 240, "the job to quantize two layers")
        cancelled = run_qrun("cancel", str(job_id))
        assert cancelled.returncode == 0 and cancelled.stderr.strip() == f"cancelled {job_id}"
        at_cancel = job(qrun_home, job_id)["progress_done"]
        runner.wait(timeout=120)
    finally:
        stop(runner)
    output = (tmp_path / "run.log").read_text()
    assert runner.returncode == 0, output  # a cancelled job is not a failure of the runner
    row = job(qrun_home, job_id)
    assert row["status"] == "cancelled" and row["error"] == f"cancelled by {current_user()}"
    assert row["progress_done"] == at_cancel < row["progress_total"]  # no layer recorded after the cancel
    assert transitions(qrun_home, job_id) == ["submit", "claim", "cancel"]
    log = Path(row["log_path"]).read_text(errors="replace")
    assert f"=== stopped: job {job_id} is cancelled and no longer held" in log
    assert artifact_rows(qrun_home, job_id) == []
    assert list((qrun_home / "artifacts").iterdir()) == []  # partial output and offload files removed


# ---------------------------------------------------------------- two runners, one table


def test_one_sigterm_ends_the_run_within_its_grace_even_with_a_stuck_worker(qrun_home, tiny_qwen2, deep_qwen2,
                                                                             tmp_path):
    """One SIGTERM (qrun takes it as Ctrl-C) asks the workers to give their jobs back at their next
    layer; a worker that cannot reach it (stopped here, as while it loads a big model) is killed once
    --grace has passed and its job given back at once, its attempt not counted, instead of the run
    waiting forever (or, killed, leaving the job `running` until its lease ran out and came back as
    "lost"; with --max-attempts 1: failed). The summary counts the job that worker finished before."""
    (small,) = submit("--model", str(tiny_qwen2), "--bits", "8", "--group-size", "32")
    (job_id,) = submit("--model", str(deep_qwen2), "--bits", "4", "--group-size", "64", "--calib-samples", "16",
                       "--max-attempts", "1")
    runner = start_runner("--until-empty", "--lease", "600", "--grace", "2", log=tmp_path / "run.log")
    try:
        wait_for(lambda: job(qrun_home, job_id)["status"] == "running", 300, "the job to start")
        time.sleep(3)  # the runner has learnt its worker's name (the worker answers within a second or two)
        worker_pid = int(job(qrun_home, job_id)["worker"].split(":")[1])  # host:pid:slot
        os.kill(worker_pid, signal.SIGSTOP)  # it cannot reach its next layer
        os.kill(runner.pid, signal.SIGTERM)
        runner.wait(timeout=120)
    finally:
        stop(runner)
    output = (tmp_path / "run.log").read_text()
    assert runner.returncode == 130, output
    assert "workers did not give their jobs back within 2 s: stopping them now" in output
    assert "ran 1 job(s), 0 failed" in output, output  # the small job, which the killed worker ran
    assert job(qrun_home, small)["status"] == "succeeded"
    row = job(qrun_home, job_id)
    assert (row["status"], row["attempts"], row["worker"]) == ("queued", 0, None), dict(row)
    assert transitions(qrun_home, job_id)[-1] == "release"


def test_two_runners_never_take_a_job_twice(qrun_home, tiny_qwen2, tmp_path):
    # Two serving runners, both polling before any job exists, so that they compete for every job.
    runners = [start_runner("--serve", "--lease", "10", log=tmp_path / f"run{i}.log") for i in range(2)]
    try:
        for i in range(2):
            wait_for(lambda: "worker(s)" in (tmp_path / f"run{i}.log").read_text(), 120, f"runner {i} to start")
        ids = submit("--model", str(tiny_qwen2), "--group-size", "32",
                     *[a for b in ("2", "3", "4", "8") for a in ("--bits", b)], "--damp", "0.01", "--damp", "0.02")
        assert len(ids) == 8
        wait_for(lambda: all(job(qrun_home, i)["status"] == "succeeded" for i in ids), 480, "all jobs to succeed")
        for runner in runners:
            os.kill(runner.pid, signal.SIGTERM)  # warm stop, as `kill` would send it
        for runner in runners:
            runner.wait(timeout=120)
    finally:
        for runner in runners:
            stop(runner)
    for i, runner in enumerate(runners):
        assert runner.returncode == 130, (tmp_path / f"run{i}.log").read_text()  # interrupted, nothing lost
    claims = table(qrun_home, "SELECT job_id, detail FROM events WHERE transition = 'claim' ORDER BY job_id")
    assert [c["job_id"] for c in claims] == ids  # each job claimed exactly once
    assert {job(qrun_home, i)["attempts"] for i in ids} == {1}
    workers = {c["detail"].split()[0] for c in claims}
    assert len(workers) == 2, workers  # both runners took jobs: they really competed
    names = [Path(a["path"]).name for a in table(qrun_home, "SELECT path FROM artifacts")]
    assert len(names) == len(set(names)) == 8


# ---------------------------------------------------------------- leftovers of jobs that are over


def test_a_job_that_will_not_run_again_keeps_no_staging_directory(qrun_home, db, tiny_qwen2, tmp_path):
    """A worker that dies on a job's last attempt leaves the job's staging directory, which only a
    next attempt would remove. A worker elsewhere holds two jobs and goes silent on the first, on
    its last attempt; it still holds the second. A runner must fail the first and remove its
    staging directory, and leave the second's alone, and one of a job it does not know (a
    different queue's). Then the same runner, serving, has its table replaced under it."""
    from qrun.db import queue
    from qrun.db.session import artifacts_root
    from qrun.workers.artifacts import new_staging_dir

    silent, held = submit("--model", str(tiny_qwen2), "--bits", "4", "--bits", "8", "--max-attempts", "1")
    assert queue.claim_job(db, "elsewhere:1:gpu0", None, lease_s=1).id == silent
    assert queue.claim_job(db, "elsewhere:1:gpu1", None, lease_s=600).id == held
    dirs = {name: new_staging_dir(artifacts_root(), job_id, 1) for name, job_id in
            (("silent", silent), ("held", held), ("unknown", 999))}
    time.sleep(1.5)  # the silent worker's lease runs out
    runner = start_runner("--serve", "--cpu-workers", "1", log=tmp_path / "run.log")
    try:
        wait_for(lambda: not dirs["silent"].exists(), 120, "the failed job's staging directory to go")
        assert job(qrun_home, silent)["status"] == "failed"
        assert "no attempts left" in job(qrun_home, silent)["error"]
        assert dirs["held"].is_dir() and dirs["unknown"].is_dir()
        assert job(qrun_home, held)["status"] == "running"
        # The table is replaced under the serving runner (a backup put back): it stops taking jobs, says
        # so, and ends in one line naming what happened (not a raw DatabaseError), exit 2.
        with sqlite3.connect(qrun_home / "qrun.db") as live, sqlite3.connect(tmp_path / "backup.db") as backup:
            live.backup(backup)
        (tmp_path / "backup.db").replace(qrun_home / "qrun.db")
        runner.wait(timeout=120)
    finally:
        stop(runner)
    output = (tmp_path / "run.log").read_text()
    assert runner.returncode == 2, output
    replaced = f"the job table {qrun_home / 'qrun.db'} was replaced by another file since it was opened"
    assert f"cpu0: {replaced}" in output and "this worker takes no more jobs" in output, output
    assert output.strip().splitlines()[-1].startswith(f"Error: {replaced}: start qrun run again"), output
