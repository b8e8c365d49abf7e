"""The foundation's acceptance, through the real console script, real Ray and real GPTQModel:
submit --bits 4 --bits 8 -> run --until-empty -> two succeeded jobs whose artifacts load and generate."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from helpers import QRUN, run_qrun, wait_for

pytestmark = pytest.mark.slow


def _status(*ids) -> list[dict]:
    return json.loads(run_qrun("status", "--json", *map(str, ids), check=True).stdout)


def test_submit_run_status_and_load_back(qrun_home, tiny_qwen2):
    ids = run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--bits", "8", "--group-size", "32",
               "--json", check=True)
    ids = json.loads(ids.stdout)
    assert len(ids) == 2
    run = run_qrun("run", "--until-empty", check=True)
    assert "ran 2 job(s), 0 failed" in run.stderr
    assert "Quantiz" not in run.stderr + run.stdout  # GPTQModel's output went to the job logs
    jobs = _status()
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]
    for job, bits in zip(jobs, (4, 8)):
        assert job["progress"]["done"] == job["progress"]["total"] == 2
        assert job["metrics"]["bits"] == bits
        for name in ("load_s", "quantize_s", "save_s", "wall_s", "size_bytes", "loss_mean", "loss_max",
                     "calib_samples", "calib_tokens"):
            assert job["metrics"][name] > 0, name
        (artifact,) = job["artifacts"]
        path = Path(artifact["path"])
        assert path.is_dir() and path.parent == qrun_home / "artifacts"
        # the model card is rewritten when an eval ends: the recorded size is the model's files'
        assert artifact["bytes"] == sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "README.md")
        assert not list(path.glob("*.bin")) and list(path.glob("*.safetensors"))
        assert json.loads((path / "quantize_config.json").read_text())["bits"] == bits
        assert "Quantiz" in Path(job["log"]).read_text()
    assert jobs[1]["metrics"]["size_bytes"] > jobs[0]["metrics"]["size_bytes"]
    assert not list((qrun_home / "artifacts").glob(".staging*"))

    from gptqmodel import GPTQModel
    from transformers import AutoTokenizer

    for job in jobs:
        path = job["artifacts"][0]["path"]
        model = GPTQModel.load(path, device="cpu")
        tokenizer = AutoTokenizer.from_pretrained(path)
        inputs = tokenizer("发言人1: 您好", return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_llama_architecture_quantizes(qrun_home, tiny_llama):
    run_qrun("submit", "--model", str(tiny_llama), "--bits", "4", "--group-size", "64", check=True)
    run_qrun("run", check=True)
    (job,) = _status()
    assert job["status"] == "succeeded" and job["metrics"]["bits"] == 4


def test_killed_worker_does_not_lose_the_job(qrun_home, deep_qwen2):
    """SIGKILL the worker process mid-quantization: the runner sees the worker die, gives its job back at
    once with that cause (not after the 60 s lease, as "lost"), and the restarted worker finishes it."""
    import subprocess

    (job_id,) = json.loads(run_qrun("submit", "--model", str(deep_qwen2), "--bits", "4", "--group-size", "64",
                                "--calib-samples", "16", "--json", check=True).stdout)
    runner = subprocess.Popen([QRUN, "run", "--until-empty", "--lease", "60"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        job = wait_for(lambda: next((j for j in _status(job_id) if j["progress"]["done"] >= 2), None),
                        240, "the job to quantize two layers")
        worker_pid = int(job["worker"].split(":")[1])
        os.kill(worker_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: _status(job_id)[0]["attempts"] == 2, 50, "the job to be claimed again")
        given_back_s = time.monotonic() - killed_at
        out, err = runner.communicate(timeout=400)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, err
    (job,) = _status(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert given_back_s < 30, given_back_s  # well inside the 60 s lease
    history = run_qrun("logs", str(job_id), check=True).stdout
    assert "worker cpu0 died while running it: its process ended unexpectedly" in history, history
    assert "lease expired" not in history
    assert "worker cpu0 died" in err
    artifacts = qrun_home / "artifacts"
    assert [p.name for p in artifacts.iterdir()] == [Path(job["artifacts"][0]["path"]).name]


def test_a_relative_qrun_home_is_one_place_for_the_whole_run(tmp_path, tiny_qwen2, monkeypatch):
    """QRUN_HOME=rel: the worker runs each job in a directory of its own, where `rel` would name another
    place (every job failed so); it is made absolute once, at start."""
    monkeypatch.delenv("QRUN_DB", raising=False)
    env = {"QRUN_HOME": "rel-home"}
    run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--group-size", "32", env=env, cwd=tmp_path,
             check=True)
    result = run_qrun("run", "--until-empty", env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    (job,) = json.loads(run_qrun("status", "--all", "--json", env=env, cwd=tmp_path, check=True).stdout)
    assert job["status"] == "succeeded", job["error"]
    (artifact,) = job["artifacts"]
    assert Path(artifact["path"]).parent == tmp_path / "rel-home" / "artifacts"
