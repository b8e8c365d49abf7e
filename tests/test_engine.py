"""workers.engine: qrun's ways of driving GPTQModel faster change its speed, never its result.

Real GPTQModel on a tiny Qwen2 (CPU): the merged forward hooks feed GPTQ the same rows as GPTQModel's
per-sample hooks (one update per module and batch instead of one per sample) and the checkpoint comes
out the same; every replacement is put back after the job, also when it fails. The tensor-core Hessian
and the activations on the GPU only act on a GPU (bench/quantize_profile.py measures them there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qrun.workers import engine as eng
from qrun.workers.engine import Engine
from helpers import write_labeled


def quantize(model: Path, out: Path, calib: Path, engine: Engine, calls: list) -> dict:
    """One 4-bit job through qrun's quantize function, counting GPTQ's Hessian updates."""
    from gptqmodel.quantization.gptq import GPTQ

    from qrun.workers.params import QuantizeParams
    from qrun.workers.quantize import quantize_model

    original = GPTQ.add_batch

    def counting(self, inp, out_, batch_index=None):
        calls.append(inp.reshape(-1, inp.shape[-1]).shape[0])
        return original(self, inp, out_, batch_index=batch_index)

    GPTQ.add_batch = counting
    try:
        out.mkdir()
        # 8 dialogs of different lengths, 4 to a batch: every batch has padded rows to leave out.
        params = QuantizeParams(bits=4, group_size=32, calib=str(calib), calib_samples=8, calib_max_len=512,
                                batch_size=4)
        return quantize_model(params, str(model), out, "cpu", 2, lambda *_: None, engine=engine)
    finally:
        GPTQ.add_batch = original


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))


FIRST_MODULES = [f"model.layers.0.self_attn.{m}_proj" for m in "qkv"]  # quantized first, from the same inputs


@pytest.mark.slow
def test_merged_hooks_give_gptq_the_same_rows_and_the_same_checkpoint(tiny_qwen2, tmp_path):
    calib = write_labeled(tmp_path / "calib.jsonl")
    per_sample, merged = [], []
    before = quantize(tiny_qwen2, tmp_path / "per-sample", calib, Engine(merged_sample_hooks=False), per_sample)
    after = quantize(tiny_qwen2, tmp_path / "merged", calib, Engine(merged_sample_hooks=True), merged)

    # GPTQModel's hook: one update per sample; qrun's: one per batch (8 samples, 2 batches), same rows.
    assert len(merged) * 4 == len(per_sample)
    assert sum(merged) == sum(per_sample)
    # The same rows summed in another order: a few rounding decisions flip, and each flip changes the
    # inputs of the modules quantized after it (true sequential), whose scales then differ too. So the
    # checkpoints agree closely where the inputs are the same (the first modules, layer 0's q/k/v) and
    # by quality elsewhere: the mean layer loss within 1% (0.1-0.3% seen).
    assert before["loss_mean"] == pytest.approx(after["loss_mean"], rel=1e-2)
    a, b = tensors(tmp_path / "per-sample"), tensors(tmp_path / "merged")
    assert a.keys() == b.keys()
    for module in FIRST_MODULES:
        qweight, scales = f"{module}.qweight", f"{module}.scales"
        assert (a[qweight] == b[qweight]).float().mean() > 0.99, qweight  # packed int4 words
        assert (a[scales].float() - b[scales].float()).abs().max() <= 1e-3 * a[scales].float().abs().max() + 1e-6
    config = json.loads((tmp_path / "merged" / "quantize_config.json").read_text())
    assert (config["bits"], config["group_size"]) == (4, 32)  # GPTQ's format, as before


def test_the_replacements_are_put_back_even_when_the_job_fails():
    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from gptqmodel.quantization.gptq import GPTQ

    hessian, hook = GPTQ.compute_hessian_xtx, GPTQProcessor.pre_process_fwd_hook
    with pytest.raises(RuntimeError, match="a job's failure"):
        with eng.gptq_speedups(Engine()):
            assert GPTQ.compute_hessian_xtx is not hessian
            assert GPTQProcessor.pre_process_fwd_hook is not hook
            raise RuntimeError("a job's failure")
    assert GPTQ.compute_hessian_xtx is hessian and GPTQProcessor.pre_process_fwd_hook is hook
    with eng.gptq_speedups(Engine(half_input_hessian=False, merged_sample_hooks=False)):
        assert GPTQ.compute_hessian_xtx is hessian and GPTQProcessor.pre_process_fwd_hook is hook


def test_offload_only_where_host_memory_is_short(tiny_qwen2, monkeypatch):
    monkeypatch.delenv("QRUN_JOB_MEMORY_MB", raising=False)
    assert not eng.offload_wanted(Engine(), str(tiny_qwen2))  # a ~1 MB model: kept in memory
    monkeypatch.setenv("QRUN_JOB_MEMORY_MB", "1")  # a job capped at 1 MB of host memory: offloaded
    assert eng.available_host_memory() == 1 << 20
    assert eng.offload_wanted(Engine(), str(tiny_qwen2))
    assert eng.offload_wanted(Engine(offload_to_disk=True), str(tiny_qwen2))
    monkeypatch.delenv("QRUN_JOB_MEMORY_MB")
    assert not eng.offload_wanted(Engine(offload_to_disk=False), str(tiny_qwen2))


def test_options_for_gptqmodel(tiny_qwen2, tmp_path):
    rows = [{"input_ids": [1] * 64}] * 8
    options = eng.gptqmodel_options(Engine(offload_to_disk=True), str(tiny_qwen2), "cpu", rows, tmp_path)
    assert options == {"offload_to_disk_path": str(tmp_path)}
    # Activations stay in host memory on a CPU worker, whatever the engine asks.
    options = eng.gptqmodel_options(Engine(offload_to_disk=False, calibration_on_gpu=True), str(tiny_qwen2),
                                    "cpu", rows, tmp_path)
    assert options == {"offload_to_disk": False}
