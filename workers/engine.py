"""How a quantize job drives GPTQModel: settings and two narrow replacements that change its speed, not its result.

Measured on an H200 (Qwen2-1.5B shape, 4-bit g128, 128 x 1024 calibration tokens; docs/BENCHMARKS.md,
"quantize() itself", bench/quantize_profile.py): GPTQModel's defaults took 46.5 s in quantize(), and a
CUDA-level profile put the time in three places, each of which a setting here removes:

- the Hessian X^T X in fp32 with TF32 off (41% of the GPU's time): `half_input_hessian`;
- every layer input and output copied between pageable host memory and the GPU, at each of a layer's
  five forward passes (19%, synchronous): `calibration_on_gpu`;
- finished modules written to disk and read back (`offload_to_disk`), and the forward hooks' per-sample
  loop, which waits for the GPU once per calibration sample and module: `merged_sample_hooks`.

The replacements are swapped in for one quantize() call and put back after it (one job runs in a
worker process at a time). They are written against GPTQModel 7.7 (pinned in pyproject.toml) and fall
back to GPTQModel's own code for any input they were not written for.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Engine:
    """qrun's choices beyond the job's own params. bench/quantize_profile.py turns them off one at a time."""

    # GPTQModel parks each finished module on disk (its default) so that host memory holds one layer at
    # a time. None: only where the model might not fit in host memory twice over.
    offload_to_disk: bool | None = None
    # GPTQModel keeps the calibration activations between layers in host memory. None: on the GPU
    # where they take at most a quarter of its free memory (a 7B model's: ~2 GB).
    calibration_on_gpu: bool | None = None
    # X^T X from the layer's bf16/fp16 inputs on tensor cores, summed in fp32 (GPTQModel upcasts X and
    # multiplies in fp32 with TF32 off). Products of 16-bit values are exact in fp32: only the order
    # of the sums differs.
    half_input_hessian: bool = True
    # One Hessian update per module and calibration batch (the batch's unpadded rows, found once per
    # batch) instead of one per sample, each of which waited for the GPU. The same rows, summed.
    merged_sample_hooks: bool = True


DEFAULT_ENGINE = Engine()


def gptqmodel_options(engine: Engine, model_dir: str, device: str, calibration: list[dict] | None,
                      offload_dir: Path | None) -> dict:
    """QuantizeConfig keywords for where GPTQModel keeps finished modules and calibration activations."""
    options: dict = {}
    if offload_wanted(engine, model_dir):
        if offload_dir is not None:
            options["offload_to_disk_path"] = str(offload_dir)
    else:
        options["offload_to_disk"] = False
    if calibration and calibration_fits_gpu(engine, model_dir, device, calibration):
        options["calibration_data_device"] = device
    return options


def offload_wanted(engine: Engine, model_dir: str) -> bool:
    if engine.offload_to_disk is not None:
        return engine.offload_to_disk
    from qrun.workers.evaluate import weights_bytes

    available = available_host_memory()
    return available is None or 2 * weights_bytes(Path(model_dir)) > available


def available_host_memory() -> int | None:
    """Bytes of host memory a job may still take: MemAvailable, or less under QRUN_JOB_MEMORY_MB."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    from qrun.workers.limits import job_memory_cap_mb

    cap_mb = job_memory_cap_mb()
    if cap_mb is not None:
        available = cap_mb << 20 if available is None else min(available, cap_mb << 20)
    return available


def calibration_fits_gpu(engine: Engine, model_dir: str, device: str, calibration: list[dict]) -> bool:
    if engine.calibration_on_gpu is not None:
        return engine.calibration_on_gpu and device.startswith("cuda")
    if not device.startswith("cuda"):
        return False
    hidden = _hidden_size(model_dir)
    if hidden is None:
        return False
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    lengths = [len(row["input_ids"]) for row in calibration]
    # A layer's inputs and outputs (16-bit), and each sample's attention mask.
    needed = 2 * sum(lengths) * hidden * 2 + sum(n * n for n in lengths) * 2
    return needed * 4 <= free


def _hidden_size(model_dir: str) -> int | None:
    """config.json's hidden size, read as the job's input checks read it (text_config too); None if absent."""
    from qrun.workers.inputs import read_sizes

    config_file = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    return read_sizes(config, config_file, required=()).get("hidden_size")


@contextlib.contextmanager
def gptq_speedups(engine: Engine):
    """GPTQModel's GPTQ with this engine's replacements, for the duration of one quantize()."""
    with contextlib.ExitStack() as stack:
        if engine.half_input_hessian:
            stack.enter_context(_half_input_hessian())
        if engine.merged_sample_hooks:
            stack.enter_context(_merged_sample_hooks())
        yield


def _swapped(owner, name: str, replacement):
    """Within: owner.name is replacement (which may call the original, passed as its first argument)."""

    @contextlib.contextmanager
    def swap():
        original = getattr(owner, name)

        def method(*args, **kwargs):
            return replacement(original, *args, **kwargs)

        setattr(owner, name, method)
        try:
            yield
        finally:
            setattr(owner, name, original)

    return swap()


def _half_input_hessian():
    import torch
    from gptqmodel.quantization.gptq import GPTQ

    def compute_hessian_xtx(original, self, matrix):
        hessian = self.qcfg.hessian
        if (matrix.is_cuda and matrix.dtype in (torch.bfloat16, torch.float16) and matrix.dim() == 2
                and matrix.shape[0] > 0 and hessian.chunk_size is None and hessian.chunk_bytes is None):
            try:
                return torch.mm(matrix.T, matrix, out_dtype=torch.float32)
            except (TypeError, NotImplementedError):  # a torch without mm's out_dtype: GPTQModel's way
                pass
        return original(self, matrix)

    return _swapped(GPTQ, "compute_hessian_xtx", compute_hessian_xtx)


def _merged_sample_hooks():
    """GPTQModel's forward hook feeds GPTQ one calibration sample at a time: per module and sample a
    boolean index (which waits for the GPU) and a small matmul. Here a module's hook takes the whole
    batch's unpadded rows at once, by indices found once per batch (kept on the batch's thread-local
    mask record). GPTQ's Hessian is a sum over rows divided by their count, so this is the same sum.
    Hooks of other kinds (GPTAQ, FOEM, embeddings, NVFP4 activation capture, shared-input followers)
    stay GPTQModel's."""
    import torch
    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from gptqmodel.quantization.gptq import GPTQ

    def pre_process_fwd_hook(original, self, name):
        hook = original(self, name)
        if (self.shared_input_leader(name) is not None
                or getattr(getattr(self, "qcfg", None), "activation_mode", None) == "w4a_nvfp4"):
            return hook

        def merged(module, inp, out):
            task = self.tasks[name]
            x = inp[0] if inp else None
            tls = getattr(self, "_mask_tls", None)
            keep = getattr(tls, "value", None)
            if not (type(task) is GPTQ and isinstance(task.module, torch.nn.Linear) and torch.is_tensor(x)
                    and x.dim() == 3 and torch.is_tensor(keep) and keep.shape == x.shape[:2]):
                return hook(module, inp, out)
            rows = _kept_rows(tls, keep, x.device)
            flat = x.reshape(-1, x.shape[-1])
            if rows is not None:
                if rows.numel() == 0:
                    return None
                flat = flat.index_select(0, rows)
            task.add_batch(flat, out, batch_index=self.current_batch_index())
            return None

        return merged

    return _swapped(GPTQProcessor, "pre_process_fwd_hook", pre_process_fwd_hook)


def _kept_rows(tls, keep, device):
    """The flat indices of the batch's unpadded rows on `device` (None: every row), found once per mask."""
    import torch

    cached = getattr(tls, "qrun_kept_rows", None)
    if cached is None or cached[0] is not keep or cached[1] != device:
        flat = keep.reshape(-1).to(device=device, dtype=torch.bool)
        rows = flat.nonzero().squeeze(1)
        cached = (keep, device, None if rows.numel() == flat.numel() else rows)
        tls.qrun_kept_rows = cached
    return cached[2]


def stage_times(model) -> dict[str, float]:
    """GPTQModel's own account of where quantize() went (its region timer), as job metrics:
    stage_pre_quant_forward_s, stage_process_quant_s, stage_submodule_finalize_s, ..."""
    timer = getattr(model, "quant_region_timer", None)
    stats = getattr(timer, "_stats", None) or {}
    return {f"stage_{region}_s": float(stat.get("total", 0.0))
            for region, stat in stats.items() if stat.get("count")}
