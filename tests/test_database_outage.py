"""The job table's server goes away mid-run (Postgres stopped and started again, as a restart or a
failover does): `qrun run` keeps serving, says so, and no job is lost or run twice.

A real runner (`qrun run --serve`, two CPU workers, real Ray, real GPTQModel) on a real PostgreSQL
server that the test stops with `pg_ctl stop -m fast` (connections cut) while one worker is inside a
24-layer quantization and the other polls the queue, and starts again 10 s later.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from helpers import QRUN, run_qrun, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.postgres]


def statuses(env: dict) -> dict[int, dict]:
    result = run_qrun("status", "--json", env=env)
    return {j["id"]: j for j in json.loads(result.stdout)} if result.returncode == 0 else {}


def test_a_postgres_restart_mid_job_loses_nothing_and_the_runner_says_so(postgres_server, postgres_url, qrun_home,
                                                                          deep_qwen2, tiny_qwen2, tmp_path):
    if postgres_server.cluster is None:
        pytest.skip("needs the test session's own PostgreSQL cluster, to stop and start it")
    env = {"QRUN_DB": postgres_url, "QRUN_HOME": str(qrun_home)}
    (long_job,) = json.loads(run_qrun("submit", "--model", str(deep_qwen2), "--bits", "4", "--group-size", "64",
                                      "--calib-samples", "16", "--json", env=env, check=True).stdout)
    log = tmp_path / "run.log"
    runner = subprocess.Popen([QRUN, "run", "--serve", "--cpu-workers", "2"], stdout=log.open("w"),
                              stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)
    try:
        wait_for(lambda: statuses(env).get(long_job, {}).get("progress", {}).get("done", 0) >= 2, 240,
                 "the long job to quantize two layers")
        postgres_server.cluster.pause()
        try:
            wait_for(lambda: "database unavailable" in log.read_text(), 60, "a worker to say the table is gone")
            time.sleep(10)
            assert runner.poll() is None, log.read_text()
        finally:
            postgres_server.cluster.resume()
        wait_for(lambda: "working again" in log.read_text(), 60, "the idle worker to come back")
        (short_job,) = json.loads(run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "8", "--group-size", "32",
                                           "--json", env=env, check=True).stdout)
        wait_for(lambda: all(statuses(env).get(j, {}).get("status") == "succeeded" for j in (long_job, short_job)),
                 300, "both jobs to succeed")
        os.kill(runner.pid, signal.SIGTERM)  # the runner only: its group holds Ray's own processes
        runner.wait(timeout=120)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait(timeout=30)
    output = log.read_text()
    assert runner.returncode == 130, output  # stopped by us, not by the outage
    assert "cpu1: database unavailable" in output or "cpu0: database unavailable" in output, output
    assert "qrun: cannot read the job table" in output and "the job table can be read again" in output, output
    job = statuses(env)[long_job]
    assert job["attempts"] == 1, job  # not run twice
    history = run_qrun("logs", str(long_job), env=env, check=True).stdout
    assert re.findall(r"^# .*? (\w+): \S+ -> ", history, re.M) == ["submit", "claim", "succeed"], history
