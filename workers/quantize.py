"""The quantize job: GPTQ through GPTQModel, layer by layer, with progress reported between layers."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from qrun.workers.calibration import calibration_texts, tokenize_calibration

log = logging.getLogger("qrun.quantize")

# progress(layers_done, layers_total, module_now) -- raises to stop the job between layers.
Progress = Callable[[int, int, str | None], None]


@dataclass
class QuantizeParams:
    bits: int
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    static_groups: bool = False
    calib: str | None = None
    calib_samples: int = 128
    calib_max_len: int = 1024
    batch_size: int = 16  # bench: 82 s at 1 vs 41 s at 16 on an H100, same layer loss
    trust_remote_code: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizeParams":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """Short name of the variant, as in tables and artifact names: w4g128, w8g128-act-asym."""
        group = "gall" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{group}" + ("-act" if self.desc_act else "") + ("" if self.sym else "-asym")


class _LayerProgress:
    """GPTQModel's layer and subset callbacks, turned into progress(done, total, module)."""

    def __init__(self, total: int, progress: Progress):
        self.total = total
        self.progress = progress
        self.module: str | None = None

    def subset_event(self, *, stage, layer_idx, module_names, **_):
        if stage == "quant_start":
            self.module = f"layer {layer_idx}: {', '.join(module_names)}"
            self.progress(layer_idx, self.total, self.module)

    def layer_complete(self, *, layer_idx, submodule_finalized):
        if submodule_finalized:
            self.progress(layer_idx + 1, self.total, None)


def _layer_losses(quant_log: Path, in_memory: list | None) -> list[float]:
    rows = in_memory or []
    if not rows and quant_log.exists():
        with quant_log.open() as f:
            rows = list(csv.DictReader(f))
    losses = []
    for row in rows:
        try:
            losses.append(float(row.get("loss", "nan")))
        except (TypeError, ValueError):
            pass
    return [x for x in losses if x == x]  # drop NaN


def act_group_aware_option(params: QuantizeParams) -> dict:
    """GPTQModel's act_group_aware setting for these params, where its default cannot work.

    GPTQModel 7.7 turns act_group_aware on by default for GPTQ, and that ordering needs groups:
    with group_size -1 (one group per column) every job failed at its first module ("act_group_aware=True
    requires group_size > 0"). With desc_act it is switched off anyway (with a warning); say so
    explicitly. Otherwise GPTQModel's default stands.
    """
    if params.group_size == -1 or params.desc_act:
        return {"act_group_aware": False}
    return {}


def quantize_model(params: QuantizeParams, model_dir: str, out_dir: Path, device: str, num_layers: int,
                   progress: Progress, offload_dir: Path | None = None) -> dict[str, float]:
    """Quantize model_dir into out_dir (which must exist); return the job's metrics.

    offload_dir: where GPTQModel parks finished modules (default: a temporary directory of its own).
    """
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    started = time.perf_counter()
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=params.trust_remote_code)
    if tokenizer.pad_token is None:  # GPTQModel pads batches; a missing pad token breaks batch_size > 1
        tokenizer.pad_token = tokenizer.eos_token
    samples, fallback = calibration_texts(params.calib, params.calib_samples)
    if fallback:
        log.warning("no calibration file given: using qrun's built-in generic text; in-domain data is better")
    calibration = tokenize_calibration(samples, tokenizer, params.calib_max_len)
    if not calibration:
        raise ValueError(f"calibration data {params.calib or '(built-in)'} has no sample of 10 tokens or more")
    config = QuantizeConfig(bits=params.bits, group_size=params.group_size, desc_act=params.desc_act,
                            sym=params.sym, damp_percent=params.damp_percent,
                            true_sequential=params.true_sequential, static_groups=params.static_groups,
                            **act_group_aware_option(params),
                            **({"offload_to_disk_path": str(offload_dir)} if offload_dir else {}))
    progress(0, num_layers, "loading model")
    load_start = time.perf_counter()
    model = GPTQModel.load(model_dir, config, device=device, trust_remote_code=params.trust_remote_code)
    load_s = time.perf_counter() - load_start
    callbacks = _LayerProgress(num_layers, progress)
    model.layer_callback = callbacks
    model.subset_callback = callbacks
    quant_start = time.perf_counter()
    model.quantize(calibration, batch_size=params.batch_size, tokenizer=tokenizer)
    quantize_s = time.perf_counter() - quant_start
    progress(num_layers, num_layers, "saving")
    save_start = time.perf_counter()
    model.save(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    save_s = time.perf_counter() - save_start
    losses = _layer_losses(out_dir / "quant_log.csv", getattr(model, "quant_log", None))
    metrics = {
        "load_s": load_s,
        "quantize_s": quantize_s,
        "save_s": save_s,
        "wall_s": time.perf_counter() - started,
        "calib_samples": len(calibration),
        "calib_tokens": sum(len(r["input_ids"]) for r in calibration),
        "loss_mean": sum(losses) / len(losses) if losses else None,
        "loss_max": max(losses) if losses else None,
        "bits": params.bits,
        "group_size": params.group_size,
    }
    if on_gpu:
        metrics["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics
