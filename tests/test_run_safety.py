"""What keeps a run and its table honest around the jobs: a damaged table named with the way back,
a lease taken over said in the job's log (and the old holder's lines kept out of the new attempt's),
two runners of one machine told apart in `qrun workers`, and kernel builds: a GPU's refused where
there is none, stopped at once by Ctrl-C, built once per machine under QRUN_HOME."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from helpers import QRUN, drain_here, invoke_main, wait_for
from qrun.db import queue
from qrun.db.queue import JobSpec
from qrun.db.states import Kind

QUANTIZE = {"bits": 4, "group_size": 32, "calib_samples": 8, "calib_max_len": 64, "batch_size": 4}


# ---------------------------------------------------------------- a damaged table


def damage(db_file: Path, page: int, page_size: int = 4096) -> None:
    with db_file.open("r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(b"\xff" * (100 if page == 1 else page_size))


def test_a_damaged_table_is_named_as_such_with_the_way_back(db, qrun_home):
    """A damaged page of the jobs table (found by any command that reads it) and a damaged header
    (found at opening): one line naming the file as corrupt and the fix, exit 2; `qrun doctor` says
    what SQLite's integrity check finds, exit 2, and 0 for the sound table."""
    queue.submit_jobs(db, [JobSpec(Kind.QUANTIZE, f"/models/m{i}", QUANTIZE) for i in range(300)])
    with db.transaction() as s:
        jobs_root = s.connection().exec_driver_sql("SELECT rootpage FROM sqlite_master WHERE name = 'jobs'").scalar()
    db.dispose()
    db_file = qrun_home / "qrun.db"
    with sqlite3.connect(db_file) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    sound = shutil.copy(db_file, qrun_home / "sound.db")
    assert invoke_main("doctor").exit_code == 0

    for page, words in ((jobs_root, "database disk image is malformed"), (1, "file is not a database")):
        shutil.copy(sound, db_file)
        damage(db_file, page)
        result = invoke_main("status", "--all")
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (f"Error: database {db_file} is corrupt ({words}): restore it from a backup "
                                         "(`qrun doctor` runs SQLite's integrity check on a table), or point --db or "
                                         "QRUN_DB at another database")
        checked = invoke_main("doctor")
        assert checked.exit_code == 2, checked.output
        assert f"Error: job table {db_file} is damaged" in checked.output
        assert "restore it from a backup" in checked.output


# ---------------------------------------------------------------- a lease taken over


def test_a_lease_taken_over_is_said_and_the_old_workers_lines_stay_out_of_the_new_log(db, qrun_home, tiny_qwen2,
                                                                                       restore_umask):
    """A worker goes silent mid-job (stopped, cut off) with half a progress bar written; its lease runs
    out and another worker takes the job over. The new attempt's log says who took over from whom and
    starts on a line of its own; what the old worker writes when it wakes lands beside, not inside it."""
    from qrun.db.session import logs_root

    (job_id,) = queue.submit_jobs(db, [JobSpec(Kind.QUANTIZE, str(tiny_qwen2), QUANTIZE)])
    assert queue.claim_job(db, "elsewhere:7:cpu0", None, lease_s=1).id == job_id
    log_path = logs_root() / f"job-{job_id}.log"
    with log_path.open("a") as stale:  # the old worker's log, open as its job left it
        stale.write(f"=== job {job_id} (quantize) attempt 1/3 on elsewhere:7:cpu0\nlayers  40%|████")
        stale.flush()
        time.sleep(1.5)  # its lease runs out
        assert drain_here(db) == {job_id: "succeeded"}
        stale.write("█ 41%| the old worker wakes\n")
    lines = log_path.read_text().splitlines()
    assert lines[1] == "layers  40%|████"
    assert lines[2].startswith("=== worker elsewhere:7:cpu0 lost its lease on attempt 1; ") and "takes over" in lines[2]
    assert len(lines) > 3  # the new attempt's lines follow, each on its own: the bar ends where it stopped
    assert not any("the old worker wakes" in line for line in lines)
    assert "the old worker wakes" in (logs_root() / f"job-{job_id}.d" / "attempt-1.log").read_text()
    events = [(e.transition, e.detail) for e in queue.events_of(db, job_id)]
    assert ("release", "worker elsewhere:7:cpu0 lost (lease expired) on attempt 1/3") in events


# ---------------------------------------------------------------- qrun workers


def test_two_runners_of_one_machine_show_as_two_workers(db):
    """Two `qrun run` on one box each have a cpu0: their rows say which process each is."""
    host = socket.gethostname()
    for pid in (4101, 4202):
        queue.register_worker(db, f"{host}:{pid}:cpu0", host, "cpu0", "cpu", None)
    queue.register_worker(db, f"{host}:4202:cpu1", host, "cpu1", "cpu", None)
    result = invoke_main("workers")
    assert result.exit_code == 0, result.output
    shown = sorted(line.split("  ")[0] for line in result.output.splitlines()[1:])
    assert shown == ["cpu0 (pid 4101)", "cpu0 (pid 4202)", "cpu1"]


# ---------------------------------------------------------------- kernel builds


def test_warmup_for_a_gpu_on_a_machine_without_one_is_refused_in_one_line(qrun_home):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = invoke_main("warmup", "--device", "cuda")
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: --device cuda: torch sees no CUDA GPU on this machine") and "--device cpu" in line


def processes_working_in(directory: Path) -> list[int]:
    """Processes whose working directory or arguments lie under `directory` (a build's compilers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            args = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(directory)) or str(directory) in args:
            found.append(int(proc.name))
    return found


def test_ctrl_c_stops_a_kernel_build_and_its_compilers(tmp_path):
    """`qrun warmup` builds into the machine's kernel directory under QRUN_HOME (group-writable, one for
    every user); Ctrl-C while a compiler runs ends it (exit 130), compilers included, instead of
    waiting for every build to finish."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "GPTQMODEL_TORCH_EXTENSIONS_DIR"} | {"QRUN_HOME": str(home)}
    kernels = home / "kernels" / socket.gethostname()
    build = subprocess.Popen([QRUN, "warmup", "--device", "cpu"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: processes_working_in(kernels), 300, f"a compiler to work in {kernels}", interval=0.2)
        build.send_signal(signal.SIGINT)  # as Ctrl-C does, to qrun's process only
        _, stderr = build.communicate(timeout=60)
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    assert build.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "Aborted."
    wait_for(lambda: not processes_working_in(kernels), 30, "the build's compilers to be gone")
