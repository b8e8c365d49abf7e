"""The method as a sweep dimension: `--method` crosses with the options that apply to each
method, every method's own options are checked at submit (exit 2, one line naming it), and a job whose
method needs a GPU is never claimed by a CPU worker: it waits, `qrun status` says what for, and a
CPU-only `qrun run --until-empty` ends and says how many wait (every method runs on a CPU today, so
RTN plays a GPU-only one there). Real console script, real SQLite and Postgres tables, a real Ray run;
what each method's job does is tests/test_methods.py's business."""

from __future__ import annotations

import json

import pytest

from helpers import run_qrun, write_labeled
from qrun.db import queue
from qrun.db.queue import JobSpec
from qrun.db.states import Kind


def planned(tiny_qwen2, *args: str, env=None) -> list[dict]:
    result = run_qrun("submit", "--model", str(tiny_qwen2), *args, "--dry-run", "--json", env=env, check=True)
    return json.loads(result.stdout)


def test_methods_cross_with_the_bits_that_apply_to_each(qrun_home, tiny_qwen2):
    rows = planned(tiny_qwen2, "--method", "gptq", "--method", "awq", "--method", "rtn", "--method", "fp8",
                   "--method", "bnb-nf4", "--method", "gguf", "--bits", "8", "--bits", "4", "--gguf-type", "q8_0")
    assert [r["variant"] for r in rows] == ["w8g128", "w4g128", "awq-w4g128", "rtn-w8g128", "rtn-w4g128", "fp8",
                                            "bnb-nf4", "gguf-q8_0"]
    params = {r["variant"]: r["params"] for r in rows}
    assert "method" not in params["w4g128"]  # GPTQ's jobs read as they always did
    assert params["rtn-w4g128"] == {"bits": 4, "group_size": 128, "sym": True, "method": "rtn",
                                    "trust_remote_code": False, "allow_pickle": False}  # no calibration, no damp
    assert params["awq-w4g128"]["calib_samples"] == 128 and "damp_percent" not in params["awq-w4g128"]
    assert params["fp8"] == {"bits": 8, "method": "fp8", "trust_remote_code": False, "allow_pickle": False}
    assert params["gguf-q8_0"]["gguf_type"] == "q8_0"
    assert not any("needs_gpu" in p for p in params.values())  # every method runs on a CPU worker today


def test_gguf_types_and_fixed_width_methods_need_no_bits(qrun_home, tiny_qwen2):
    rows = planned(tiny_qwen2, "--method", "gguf", "--gguf-type", "q8_0", "--gguf-type", "q4_0", "--method", "fp8")
    assert [r["variant"] for r in rows] == ["gguf-q8_0", "gguf-q4_0", "fp8"]
    assert [r["params"]["bits"] for r in rows] == [8, 4, 8]
    # Without --gguf-type each width of --bits takes its usual type.
    assert [r["variant"] for r in planned(tiny_qwen2, "--method", "gguf", "--bits", "8")] == ["gguf-q8_0"]


@pytest.fixture
def gpu_only_rtn(monkeypatch):
    """A method that needs a GPU: none does with GPTQModel 7.7 and bitsandbytes 0.50, so RTN plays one."""
    from dataclasses import replace

    from qrun.workers import methods

    monkeypatch.setitem(methods.METHODS, "rtn", replace(methods.METHODS["rtn"], needs_gpu=True,
                                                        min_compute_capability=8.9))


def test_a_method_that_needs_a_gpu_puts_it_in_its_jobs_and_their_evals(qrun_home, tiny_qwen2, tmp_path, gpu_only_rtn):
    import qrun

    data = write_labeled(tmp_path / "eval.jsonl")
    plan = qrun.submit(str(tiny_qwen2), bits=4, method=["rtn", "gptq"], eval=str(data), dry_run=True)
    params = {(job.kind, job.label): job.spec.params for job in plan.planned}
    assert params[("quantize", "rtn-w4g128")]["needs_gpu"] is True
    assert params[("quantize", "rtn-w4g128")]["min_compute_capability"] == 8.9
    assert params[("eval", "rtn-w4g128")]["needs_gpu"] is True  # loading it needs the GPU too
    assert "needs_gpu" not in params[("quantize", "w4g128")] and "needs_gpu" not in params[("eval", "baseline")]


@pytest.mark.parametrize("args, message", [
    (("--method", "hqq", "--bits", "4"), "--method 'hqq' is not one of gptq, awq, rtn, fp8, gguf, bnb-nf4"),
    (("--method", "awq", "--bits", "8"), "--bits 8 is not supported by --method awq: use one of 4"),
    (("--method", "fp8", "--bits", "4"), "--bits 4 is not supported by --method fp8: use one of 8"),
    (("--method", "rtn",), "--method rtn needs --bits (2, 3, 4, 8)"),
    (("--method", "fp8", "--group-size", "64"), "--group-size does not apply to --method fp8"),
    (("--method", "rtn", "--bits", "4", "--desc-act"), "--desc-act is GPTQ's activation order"),
    (("--method", "rtn", "--bits", "4", "--damp", "0.1"), "--damp is GPTQ's Hessian dampening"),
    (("--method", "rtn", "--bits", "4", "--calib", "x.jsonl"), "--calib does not apply to --method rtn"),
    (("--bits", "4", "--gguf-type", "q8_0"), "--gguf-type applies to --method gguf only"),
    (("--method", "gguf", "--gguf-type", "q3_k"), "--gguf-type 'q3_k' is not one of q4_0,"),
    # The tiny model's hidden size is 128: K-quants pack rows in blocks of 256 (q4_k_m is 4 bits' default).
    (("--method", "gguf", "--gguf-type", "q4_k_m"), "--gguf-type q4_k_m packs rows in blocks of 256: the model's"),
    (("--method", "gguf", "--bits", "4"), "--gguf-type q4_k_m packs rows in blocks of 256: the model's"),
])
def test_each_methods_options_are_checked_at_submit(qrun_home, tiny_qwen2, args, message):
    result = run_qrun("submit", "--model", str(tiny_qwen2), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"Error: {result.stderr.strip()[7:]}"]  # one line
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (qrun_home / "qrun.db").exists() or queue.list_jobs(queue_db(qrun_home)) == []


def queue_db(qrun_home):
    from qrun.db.session import open_database

    return open_database(f"sqlite:///{qrun_home / 'qrun.db'}")


def test_gguf_is_refused_at_submit_for_a_model_class_it_cannot_write(qrun_home, tmp_path):
    from qrun.workers.tiny import build_tiny_model

    llama = build_tiny_model(tmp_path / "tiny-llama", arch="llama", hidden=256, intermediate=512, layers=1)
    result = run_qrun("submit", "--model", str(llama), "--method", "gguf", "--gguf-type", "q8_0")
    assert result.returncode == 2
    assert result.stderr.strip() == ("Error: --method gguf writes llama.cpp files for Qwen2ForCausalLM models; "
                                     "this model is LlamaForCausalLM")


def test_only_a_worker_whose_device_can_run_a_method_claims_its_job(any_db):
    # As a GPU-only method's submit would make them (none is GPU-only today: see gpu_only_rtn).
    fp8, nf4, rtn = queue.submit_jobs(any_db, [
        JobSpec(Kind.QUANTIZE, "/m", {"method": "fp8", "bits": 8, "needs_gpu": True, "min_compute_capability": 8.9}),
        JobSpec(Kind.QUANTIZE, "/m", {"method": "bnb-nf4", "bits": 4, "needs_gpu": True}),
        JobSpec(Kind.QUANTIZE, "/m", {"method": "rtn", "bits": 4}),
    ])
    assert queue.claim_job(any_db, "cpu0", None).id == rtn  # a CPU worker passes both GPU-only jobs
    assert queue.claim_job(any_db, "cpu1", None) is None
    assert queue.pending_count(any_db, cpu_worker=True) == 1  # only its own running job: its drain may end
    assert queue.queued_for_a_gpu(any_db) == 2
    assert queue.claim_job(any_db, "a100", "0", compute_capability=8.0).id == nf4  # FP8 needs 8.9
    assert queue.claim_job(any_db, "a100b", "1", compute_capability=8.0) is None
    assert queue.claim_job(any_db, "h100", "2", compute_capability=9.0).id == fp8


def test_a_cpu_run_leaves_gpu_only_jobs_queued_and_says_so(qrun_home, tiny_qwen2, db):
    """A job whose method needs a GPU (params as a GPU-only method's submit makes them) beside one that
    does not: `status` says what the first waits for, a CPU-only `qrun run --until-empty` runs the
    other, ends, and says how many wait."""
    rtn = {"method": "rtn", "bits": 8, "group_size": 32, "sym": True}
    gpu_only, plain = queue.submit_jobs(db, [
        JobSpec(Kind.QUANTIZE, str(tiny_qwen2), rtn | {"needs_gpu": True, "min_compute_capability": 8.9}),
        JobSpec(Kind.QUANTIZE, str(tiny_qwen2), rtn | {"group_size": 64})])
    assert run_qrun("status", check=True).stdout.count("needs a GPU, cc ≥ 8.9") == 1
    result = run_qrun("run", "--until-empty", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "1 job(s) wait for a GPU worker" in result.stderr
    rows = {row["id"]: row for row in json.loads(run_qrun("status", "--json", check=True).stdout)}
    assert rows[plain]["status"] == "succeeded", rows[plain]
    assert rows[gpu_only]["status"] == "queued"


def test_jobs_waiting_for_a_node_with_several_gpus_are_counted(any_db):
    """What `qrun run --until-empty` says at its end when a --gpus-per-job job found no node for it."""
    two, one = queue.submit_jobs(any_db, [JobSpec(Kind.QUANTIZE, "/m", {"bits": 4, "gpus": 2}),
                                          JobSpec(Kind.QUANTIZE, "/m", {"bits": 8})])
    assert queue.queued_for_several_gpus(any_db) == 1
    assert queue.claim_job(any_db, "big", "0,1", gpus=2).id == two
    assert queue.queued_for_several_gpus(any_db) == 0
