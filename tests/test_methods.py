"""Every quantization method beyond GPTQ, through the real job path on a CPU worker: a quantize job
writes its artifact (safetensors only; GGUF: one llama.cpp .gguf file), the artifact loads back with
the loader its users use, and an eval job after it (as `qrun submit --eval` plans one) yields metrics.

GPTQModel 7.7 runs every method here on a CPU: rtn, awq, fp8 and gguf through GPTQModel, bnb-nf4
through transformers' BitsAndBytesConfig (bitsandbytes' CPU kernels), so the method table marks none
GPU-only. The model is 2 layers of width 256 (GGUF's K-quants pack rows in blocks of 256); each method takes a few seconds, after GPTQModel's
import (~10 s, once per process).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qrun.db import queue
from qrun.db.states import Kind
from qrun.workers import methods
from qrun.workers.artifacts import UNSAFE_SUFFIXES
from qrun.workers.inputs import inspect_model, quantized_variant
from helpers import drain_here, write_labeled


def run_pair(db, model: Path, point: dict, data: Path) -> tuple[dict, dict, Path]:
    """Submit a quantize job and the eval after it (as qrun.sweeps.plan_jobs makes them), drain them on
    a CPU worker; (quantize metrics, eval metrics, artifact directory)."""
    method = methods.method_of(point)
    params = dict(point) | methods.requirements(method)
    if method.calibrated:
        params |= {"calib": str(data), "calib_samples": 8, "calib_max_len": 64, "batch_size": 4}
    evaluation = {"data": str(data), "ppl_data": str(data), "mode": "score", "batch_size": 8,
                  "variant": methods.label(point), "from_upstream": True} | methods.requirements(method)
    quantize_id, eval_id = queue.submit_jobs(db, [queue.JobSpec(Kind.QUANTIZE, str(model), params),
                                                  queue.JobSpec(Kind.EVAL, str(model), evaluation, after=0)])
    outcomes = drain_here(db)
    failed = {i: queue.get_job(db, i).error for i, status in outcomes.items() if status != "succeeded"}
    assert not failed and set(outcomes) == {quantize_id, eval_id}, (failed, outcomes)
    (artifact,) = queue.artifacts_of(db, [quantize_id])[quantize_id]
    metrics = queue.metrics_of(db, [quantize_id, eval_id])
    path = Path(artifact.path)
    assert path.name.endswith(f"-{methods.label(point)}-job{quantize_id}")
    # The recorded size leaves out the model card, which the eval's finish rewrote.
    assert artifact.bytes == sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "README.md")
    # `qrun eval --model ARTIFACT` reads the same variant back from the artifact's own files.
    inspect_model(path, allow_gguf=True)
    assert quantized_variant(path) == methods.label(point)
    return metrics[quantize_id], metrics[eval_id], path


def assert_no_pickle(path: Path, weights: str) -> list[Path]:
    files = [p for p in path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in UNSAFE_SUFFIXES], files
    found = [p for p in files if p.suffix == weights]
    assert found, f"no {weights} file in {sorted(p.name for p in files)}"
    return found


def assert_evaluated(eval_metrics: dict, baseline_bytes: int) -> None:
    assert eval_metrics["eval_samples"] == 8  # every dialog scored
    assert 0 <= eval_metrics["f1"] <= 1 and 0 <= eval_metrics["accuracy"] <= 1
    assert math.isfinite(eval_metrics["perplexity"]) and eval_metrics["ppl_tokens"] > 0
    assert 0 < eval_metrics["model_size_bytes"] < baseline_bytes


def baseline_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("point, weight_dtype", [
    ({"method": "rtn", "bits": 4, "group_size": 128}, "I32"),
    ({"method": "rtn", "bits": 8, "group_size": 64}, "I32"),
    ({"method": "awq", "bits": 4, "group_size": 128}, "I32"),
    ({"method": "fp8", "bits": 8}, "F8_E4M3"),
])
def test_gptqmodel_methods_quantize_load_back_and_evaluate(db, qrun_home, wide_qwen2, tmp_path, restore_umask,
                                                             point, weight_dtype):
    """rtn, awq, fp8: GPTQModel writes safetensors and a quantize_config.json naming the method (fp8's is
    rewritten in compressed-tensors' form); the eval job loads the artifact (GPTQModel's CPU kernels;
    fp8: transformers) and classifies every dialog."""
    from safetensors import safe_open

    from qrun.workers.evaluate import artifact_format

    data = write_labeled(tmp_path / "dialogs.jsonl")
    quantized, evaluated, path = run_pair(db, wide_qwen2, point, data)
    (weights,) = assert_no_pickle(path, ".safetensors")
    if point["method"] == "fp8":  # rewritten as compressed-tensors' FP8, which transformers and vLLM read
        quant = json.loads((path / "config.json").read_text())["quantization_config"]
        assert (quant["quant_method"], quant["format"]) == ("compressed-tensors", "float-quantized")
        assert not (path / "quantize_config.json").exists() and artifact_format(path) == "transformers"
    else:
        config = json.loads((path / "quantize_config.json").read_text())
        expected_method = {"rtn": "gptq", "awq": "awq"}[point["method"]]  # rtn: GPTQ's format
        assert (config["quant_method"], config["bits"]) == (expected_method, point["bits"])
        assert artifact_format(path) == "gptqmodel"
    if "group_size" in point:
        assert config["group_size"] == point["group_size"]
    with safe_open(str(weights), "pt") as f:
        key = next(k for k in f.keys() if k.startswith("model.layers.0.mlp.up_proj.") and
                   k.rsplit(".", 1)[1] in ("qweight", "weight"))
        assert f.get_slice(key).get_dtype() == weight_dtype
    assert quantized["bits"] == point["bits"] and quantized["loss_mean"] is not None
    assert ("calib_samples" in quantized) == methods.method_of(point).calibrated
    assert_evaluated(evaluated, baseline_bytes(wide_qwen2))


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type, tensor_type", [("q4_k_m", "Q4_K"), ("q8_0", "Q8_0")])
def test_gguf_writes_a_llama_cpp_file_that_transformers_loads(db, qrun_home, wide_qwen2, tmp_path, restore_umask,
                                                             gguf_type, tensor_type):
    """GPTQModel's GGUF blocks in one .gguf file: gguf.GGUFReader (llama.cpp's reader) names the quant
    type asked for on every linear layer, the file carries the model's shape and tokenizer, and
    transformers' GGUF loader (the eval job's) dequantizes exactly what GPTQModel's kernel computes with."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_labeled(tmp_path / "dialogs.jsonl")
    point = {"method": "gguf", "bits": methods.GGUF_TYPES[gguf_type], "gguf_type": gguf_type}
    quantized, evaluated, path = run_pair(db, wide_qwen2, point, data)
    (gguf_path,) = assert_no_pickle(path, ".gguf")
    assert not list(path.glob("*.safetensors"))  # the weights are the .gguf file, once
    reader = gguf.GGUFReader(str(gguf_path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    linear = [n for n in types if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n]
    assert len(linear) == 2 * 7  # q, k, v, output, gate, up, down in each of the 2 layers
    assert {types[n] for n in linear} == {tensor_type}
    assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "qwen2"
    assert (field("qwen2.block_count"), field("qwen2.embedding_length")) == (2, 256)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert len(field("tokenizer.ggml.tokens")) == len(tokenizer)
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id

    model = AutoModelForCausalLM.from_pretrained(str(path), gguf_file=gguf_path.name, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(wide_qwen2), dtype=torch.float32)
    ids = torch.tensor([tokenizer("Caller: pay the fee by gift card today.")["input_ids"]])
    with torch.inference_mode():
        drift = (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().mean().item()
    assert 0 < drift < (0.5 if gguf_type == "q4_k_m" else 0.05)  # quantized, yet the same model
    assert quantized["loss_mean"] is not None  # GPTQModel's mean absolute weight error
    assert_evaluated(evaluated, baseline_bytes(wide_qwen2))


@pytest.mark.slow
def test_bnb_nf4_is_what_transformers_loads_as_4_bit(db, qrun_home, wide_qwen2, tmp_path, restore_umask):
    """bnb-nf4: transformers' BitsAndBytesConfig (NF4, double quantization) quantizes while loading;
    the saved safetensors load back as bitsandbytes' Linear4bit with no quantization config given."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    data = write_labeled(tmp_path / "dialogs.jsonl")
    quantized, evaluated, path = run_pair(db, wide_qwen2, {"method": "bnb-nf4", "bits": 4}, data)
    assert_no_pickle(path, ".safetensors")
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["bnb_4bit_quant_type"], quant["bnb_4bit_use_double_quant"]) == (
        "bitsandbytes", "nf4", True)
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map={"": "cpu"})
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.nested  # double quantization
    assert quantized["bits"] == 4
    assert_evaluated(evaluated, baseline_bytes(wide_qwen2))


def test_a_method_that_needs_a_gpu_fails_on_a_cpu_in_one_line(monkeypatch):
    """The queue never gives a CPU worker a job whose method needs a GPU; run there anyway, it stops
    before loading anything, naming the method. (None needs one today: bnb-nf4 plays one here.)"""
    from dataclasses import replace

    from qrun.db.errors import BadInput
    from qrun.workers.params import QuantizeParams
    from qrun.workers.quantize import check_device

    monkeypatch.setitem(methods.METHODS, "bnb-nf4", replace(methods.METHODS["bnb-nf4"], needs_gpu=True))
    with pytest.raises(BadInput) as caught:
        check_device(QuantizeParams(bits=4, method="bnb-nf4"), "cpu")
    assert str(caught.value) == ("--method bnb-nf4 needs a CUDA GPU and this worker runs on cpu: "
                                 "run it on a GPU worker")
    check_device(QuantizeParams(bits=4, method="rtn"), "cpu")  # no requirement: nothing said


@pytest.mark.parametrize("point", [
    {"bits": 4}, {"bits": 4, "group_size": -1, "desc_act": True, "sym": False},
    {"method": "awq", "bits": 4, "group_size": 64}, {"method": "rtn", "bits": 8},
    {"method": "fp8", "bits": 8}, {"method": "gguf", "bits": 4}, {"method": "gguf", "bits": 8, "gguf_type": "q8_0"},
    {"method": "bnb-nf4", "bits": 4},
])
def test_the_job_names_its_variant_as_the_method_table_does(point):
    from qrun.workers.params import QuantizeParams

    params = QuantizeParams.from_dict(point)
    assert params.label() == methods.label(params.to_dict()) == methods.label(point)
