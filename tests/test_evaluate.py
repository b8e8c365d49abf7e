"""Eval jobs on tiny models: the real job path (claim -> execute -> recorded metrics and artifacts),
on a random model and on one fine-tuned here in a few seconds to answer like the seed's classifier."""

import hashlib
import json
import math
from pathlib import Path

import pytest

from qrun.db import queue
from qrun.db.states import Kind
from helpers import SHARED_DATA, write_labeled
from qrun.workers.datasets import load_labeled

CLASSIFICATION_METRICS = ("tp", "fp", "tn", "fn", "precision", "recall", "f1", "accuracy", "invalid",
                          "eval_samples", "samples_per_s", "eval_s", "model_size_bytes")


def train_classifier(source: Path, out: Path, data: Path, steps: int = 60) -> Path:
    """Fine-tune a copy of a tiny model to answer {"is_fraud": ...} for the dialogs in `data`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrun.workers.datasets import answer_text
    from qrun.workers.evaluate import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    pairs = [(prompt_ids(tokenizer, s),
              tokenizer(answer_text(s.label) + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
             for s in load_labeled(data)]
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros_like(ids)
    for i, (prompt, answer) in enumerate(pairs):
        ids[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        mask[i, :len(prompt) + len(answer)] = 1
        labels[i, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    return write_labeled(tmp_path_factory.mktemp("data") / "dialogs.jsonl")


@pytest.fixture(scope="module")
def classifier(tiny_qwen2, eval_data, tmp_path_factory) -> Path:
    return train_classifier(tiny_qwen2, tmp_path_factory.mktemp("models") / "tiny-classifier", eval_data)


def run_job(db, kind: Kind, model: Path, params: dict, depends_on: int | None = None):
    """Submit one job, claim it as worker "w" and execute it on the CPU, as a worker would."""
    from qrun.workers.jobs import JobContext, execute

    (job_id,) = queue.submit_jobs(db, [queue.JobSpec(kind=kind, model=str(model), params=params,
                                                     depends_on=depends_on)])
    job = queue.claim_job(db, "w", None)
    assert job is not None and job.id == job_id
    execute(JobContext(db=db, job=job, worker="w", device="cpu", lease_s=60))
    return (queue.get_job(db, job_id), queue.metrics_of(db, [job_id])[job_id],
            queue.artifacts_of(db, [job_id])[job_id])


def eval_params(data, mode="score", **extra) -> dict:
    return {"data": str(data) if data else None, "mode": mode, "max_new_tokens": 32, "ppl_data": None, "batch_size": 3,
            "variant": "baseline", "trust_remote_code": False} | extra


def read_predictions(artifacts) -> list[dict]:
    (record,) = [a for a in artifacts if a.kind == "predictions"]
    path = Path(record.path)
    assert record.bytes == path.stat().st_size
    assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_mode_records_metrics_predictions_and_perplexity(db, qrun_home, classifier, eval_data):
    job, metrics, artifacts = run_job(db, Kind.EVAL, classifier, eval_params(eval_data, ppl_data=str(eval_data)))
    assert job.status == "succeeded", job.error
    for name in CLASSIFICATION_METRICS + ("auc", "perplexity", "ppl_tokens"):
        assert name in metrics, name
    assert "peak_gpu_mem_gb" not in metrics  # CPU run
    # The fine-tuned classifier knows its eight dialogs: 4 fraud, 4 not.
    assert (metrics["tp"], metrics["tn"], metrics["fp"], metrics["fn"], metrics["invalid"]) == (4, 4, 0, 0, 0)
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == metrics["accuracy"] == 1.0
    assert metrics["auc"] == 1.0
    assert metrics["eval_samples"] == 8 and metrics["samples_per_s"] > 0
    assert metrics["model_size_bytes"] == sum(p.stat().st_size for p in classifier.glob("*.safetensors"))
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1
    assert metrics["ppl_tokens"] > 100

    rows = read_predictions(artifacts)
    assert Path(artifacts[0].path).parent == qrun_home / "artifacts"
    assert not list((qrun_home / "artifacts").glob(".staging*"))
    assert [r["id"] for r in rows] == [f"d{i}" for i in range(8)]  # the file's order, not the batches'
    for row in rows:
        assert row["prediction"] == row["label"]
        assert (row["score"] > 0) == row["prediction"]  # score = logp(true) - logp(false)


def test_score_mode_is_deterministic_and_independent_of_batching(classifier, eval_data):
    """Left padding with position ids: a dialog scores the same alone or beside longer ones."""
    from qrun.workers.evaluate import load_model, prompt_ids, score_batch

    model, tokenizer = load_model(classifier, "cpu", trust_remote_code=False)
    prompts = [prompt_ids(tokenizer, s) for s in load_labeled(eval_data)]
    assert len({len(p) for p in prompts}) > 1  # the batch really needs padding
    together = score_batch(model, tokenizer, prompts, "cpu")
    alone = [score_batch(model, tokenizer, [p], "cpu")[0] for p in prompts]
    assert [t[0] for t in together] == [a[0] for a in alone]
    assert [t[1] for t in together] == pytest.approx([a[1] for a in alone], abs=1e-4)
    assert score_batch(model, tokenizer, prompts, "cpu") == together


def test_generate_mode_parses_answers(db, classifier, eval_data):
    job, metrics, artifacts = run_job(db, Kind.EVAL, classifier, eval_params(eval_data, mode="generate"))
    assert job.status == "succeeded", job.error
    for name in CLASSIFICATION_METRICS:
        assert name in metrics, name
    assert "auc" not in metrics  # greedy answers carry no score
    assert metrics["invalid"] == 0 and metrics["accuracy"] == 1.0
    rows = read_predictions(artifacts)
    assert all('"is_fraud"' in r["output"] and r["score"] is None for r in rows)


def test_generate_on_random_model_reports_invalid_answers(db, tiny_qwen2, eval_data):
    job, metrics, artifacts = run_job(db, Kind.EVAL, tiny_qwen2,
                                      eval_params(eval_data, mode="generate", max_new_tokens=8))
    assert job.status == "succeeded", job.error
    assert metrics["invalid"] == 8
    assert metrics["tp"] == metrics["fp"] == metrics["tn"] == metrics["fn"] == 0  # never mapped to a class
    assert metrics["accuracy"] == metrics["precision"] == metrics["recall"] == 0.0
    assert {r["prediction"] for r in read_predictions(artifacts)} == {"invalid"}


def test_perplexity_only_eval(db, tiny_qwen2, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(["Bob: The train was late again, I will be there in ten minutes."] * 40))
    job, metrics, artifacts = run_job(db, Kind.EVAL, tiny_qwen2,
                                      eval_params(None, ppl_data=str(text)))
    assert job.status == "succeeded", job.error
    assert artifacts == [] and "accuracy" not in metrics
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1
    assert metrics["ppl_tokens"] > 512  # long enough to need several windows


@pytest.mark.parametrize("n_tokens, window", [(2, 512), (100, 512), (512, 512), (513, 512), (2000, 512),
                                              (7, 4), (9, 2)])
def test_perplexity_windows_score_each_token_once(n_tokens, window):
    from qrun.workers.evaluate import ppl_windows

    scored = []
    for begin, end, first in ppl_windows(n_tokens, window):
        assert end - begin <= window and begin < first < end + 1
        assert first - begin >= min(window // 2, first) or begin == 0  # enough context once there is
        scored.extend(range(first, end))
    assert scored == list(range(1, n_tokens))  # every token but the first, once, in order


def test_upstream_without_model_artifact_fails_with_a_clear_error(db, tiny_qwen2, eval_data):
    (quantize_id,) = queue.submit_jobs(db, [queue.JobSpec(kind=Kind.QUANTIZE, model=str(tiny_qwen2),
                                                          params={"bits": 4})])
    queue.claim_job(db, "w", None)
    queue.finish_job(db, quantize_id, "w", {})  # succeeded, yet published nothing
    job, _, _ = run_job(db, Kind.EVAL, tiny_qwen2, eval_params(eval_data, from_upstream=True),
                        depends_on=quantize_id)
    assert job.status == "failed"
    assert job.error == f"upstream job {quantize_id} recorded no model artifact: retry job {quantize_id}"


@pytest.mark.parametrize("config, device, expected", [
    ({"bits": 4, "group_size": 128, "sym": True}, "cuda:0", "marlin"),
    ({"bits": 8, "group_size": -1, "sym": True, "desc_act": True}, "cuda:0", "marlin"),
    ({"bits": 3, "group_size": 128, "sym": True}, "cuda:0", "auto"),
    ({"bits": 4, "group_size": 128, "sym": False}, "cuda:0", "auto"),
    ({"bits": 4, "group_size": 128, "sym": True}, "cpu", "auto"),
])
def test_gptq_kernel_needs_no_download_on_gpu(tmp_path, monkeypatch, config, device, expected):
    """GPTQModel's own choice on Hopper (Machete) fetches CUTLASS from GitHub: fails offline."""
    from qrun.workers.evaluate import gptq_backend

    monkeypatch.delenv("GPTQMODEL_CUTLASS_DIR", raising=False)
    (tmp_path / "quantize_config.json").write_text(json.dumps(config))
    assert gptq_backend(tmp_path, device) == expected
    monkeypatch.setenv("GPTQMODEL_CUTLASS_DIR", str(tmp_path))  # a local CUTLASS: GPTQModel may choose
    assert gptq_backend(tmp_path, device) == "auto"


@pytest.mark.slow
def test_eval_of_a_gptq_artifact_from_its_quantize_job(db, qrun_home, classifier, eval_data):
    quantize, q_metrics, (model_artifact,) = run_job(
        db, Kind.QUANTIZE, classifier,
        {"bits": 4, "group_size": 32, "calib": str(eval_data), "calib_samples": 8})
    assert quantize.status == "succeeded", quantize.error
    job, metrics, artifacts = run_job(db, Kind.EVAL, classifier,
                                      eval_params(eval_data, variant="w4g32", from_upstream=True,
                                                  ppl_data=str(eval_data)),
                                      depends_on=quantize.id)
    assert job.status == "succeeded", job.error
    quantized = Path(model_artifact.path)
    assert metrics["model_size_bytes"] == sum(p.stat().st_size for p in quantized.glob("*.safetensors"))
    assert metrics["model_size_bytes"] < sum(p.stat().st_size for p in classifier.glob("*.safetensors"))
    assert metrics["eval_samples"] == 8 and metrics["invalid"] == 0 and 0 <= metrics["auc"] <= 1
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1
    assert len(read_predictions(artifacts)) == 8
    assert "w4g32-eval-job" in Path(artifacts[0].path).name


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/anti_fraud is not here")
def test_real_anti_fraud_files_load():
    rows = load_labeled(SHARED_DATA / "eval0819-sample400.jsonl")
    alpaca = load_labeled(SHARED_DATA / "eval0819_alpaca-sample100.json")  # one pretty-printed JSON array
    assert len(rows) == 400 and len(alpaca) == 100
    assert {r.label for r in rows} == {True, False} and {r.label for r in alpaca} == {True, False}
    # The alpaca file is the first 100 rows of the same evaluation set, in another form.
    assert [(r.messages, r.label) for r in rows[:100]] == [(r.messages, r.label) for r in alpaca]
    assert all(r.messages[-1]["role"] == "user" and "is_fraud" in r.messages[-1]["content"] for r in rows)


def test_out_of_memory_in_an_eval_names_the_batch_and_the_eval_batch_size(db):
    """The hint for an eval job's OOM is about its eval batch, not about calibration settings."""
    from qrun.workers.jobs import JobContext, describe_failure

    (job_id,) = queue.submit_jobs(db, [queue.JobSpec(kind=Kind.EVAL, model="/m", params={"variant": "w4g128"})])
    job = queue.claim_job(db, "w", None)
    queue.record_progress(db, job_id, "w", 3, 10, "score batch 3/10", 60)
    ctx = JobContext(db=db, job=job, worker="w", device="cuda:0", lease_s=60)
    reason, retryable = describe_failure(MemoryError(), ctx)
    assert reason == ("out of memory at batch 3/10 (score batch 3/10): use a smaller eval batch "
                      "(--eval-batch-size, or qrun eval --batch-size) or free the GPU")
    assert retryable


def test_a_stopping_runner_releases_an_eval_at_its_batch(db):
    from qrun.workers.jobs import JobContext, StopRequested

    queue.submit_jobs(db, [queue.JobSpec(kind=Kind.EVAL, model="/m", params={"variant": "baseline"})])
    ctx = JobContext(db=db, job=queue.claim_job(db, "w", None), worker="w", device="cpu", lease_s=60,
                     should_stop=lambda: True)
    with pytest.raises(StopRequested, match=r"^runner stopping at batch 4/9$"):
        ctx.progress(4, 9, "score batch 4/9")


def test_prompts_longer_than_the_context_are_counted_and_said(db, tiny_qwen2, tmp_path, capsys):
    """The tiny model reads 512 positions; a dialog longer than that is scored as given (as the seed's
    notebook did), but the job's metrics and log say how many there were: 19 of the real anti_fraud
    sample's 400 dialogs are longer than the demo model's context."""
    rows = [{"id": "short", "input": "你好", "label": False}, {"id": "long", "input": "转账 " * 600, "label": True}]
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    job, metrics, _ = run_job(db, Kind.EVAL, tiny_qwen2, eval_params(data))
    assert job.status == "succeeded", job.error
    assert metrics["eval_over_context"] == 1 and metrics["eval_samples"] == 2
    said = Path(job.log_path).read_text() + capsys.readouterr().out  # in pytest, print() goes to its capture
    assert "1 of 2 prompts are longer than the model's 512 positions" in said


def test_a_three_class_task_scores_every_answer_and_parses_generated_ones(db, tiny_qwen2, tmp_path):
    """Score mode predicts one of the task's labels for every row (its answers' likelihoods, no margin for
    three classes); generate mode on a random model reads no label back: invalid, never a class."""
    data = tmp_path / "reviews.jsonl"
    labels = ["positive", "neutral", "negative", "neutral", "positive", "negative"]
    data.write_text("".join(json.dumps({"id": f"r{i}", "input": f"review number {i}", "label": label}) + "\n"
                            for i, label in enumerate(labels)))
    task = {"labels": ["negative", "neutral", "positive"], "answer_template": '{"sentiment": "{label}"}'}
    job, metrics, artifacts = run_job(db, Kind.EVAL, tiny_qwen2, eval_params(data, task=task))
    assert job.status == "succeeded", job.error
    rows = read_predictions(artifacts)
    assert [r["label"] for r in rows] == labels
    assert {r["prediction"] for r in rows} <= set(task["labels"]) and all(r["score"] is None for r in rows)
    assert metrics["invalid"] == 0 and metrics["classes"] == 3 and "tp" not in metrics and "auc" not in metrics
    right = sum(r["prediction"] == r["label"] for r in rows)
    assert metrics["accuracy"] == right / 6
    assert sum(metrics[f"support[{label}]"] for label in task["labels"]) == 6

    job, metrics, artifacts = run_job(db, Kind.EVAL, tiny_qwen2,
                                      eval_params(data, mode="generate", max_new_tokens=6, task=task))
    assert job.status == "succeeded", job.error
    assert metrics["invalid"] == 6 and metrics["accuracy"] == 0.0 and metrics["macro_f1"] == 0.0
    assert {r["prediction"] for r in read_predictions(artifacts)} == {"invalid"}


def test_a_two_class_task_of_other_labels_scores_with_the_positive_margin(classifier, eval_data):
    """Labels no/yes with the seeds' answers: the same predictions and margins, logp(positive) - logp(negative)."""
    from qrun.workers.evaluate import load_model, prompt_ids, score_batch
    from qrun.workers.tasks import Task

    model, tokenizer = load_model(classifier, "cpu", trust_remote_code=False)
    prompts = [prompt_ids(tokenizer, s) for s in load_labeled(eval_data)]
    seeds = score_batch(model, tokenizer, prompts, "cpu")
    renamed = Task(labels=("no", "yes"), answers=('{"is_fraud": false}', '{"is_fraud": true}'), positive="yes")
    same = score_batch(model, tokenizer, prompts, "cpu", renamed)
    assert [p for p, _ in same] == ["yes" if p else "no" for p, _ in seeds]
    assert [m for _, m in same] == pytest.approx([m for _, m in seeds], abs=1e-5)
