"""Every quantization method at 4 and 8 bits on the Qwen2-1.5B-shaped model: what each costs and keeps.

For each variant (gptq and rtn at 4 and 8 bits, awq at 4, fp8, gguf q4_k_m and q8_0, bnb-nf4) it runs
qrun's own quantize function (workers.quantize.quantize_model: what a quantize job runs) and its eval
loader (workers.evaluate.load_model: the loader each format's users use: GPTQModel, transformers'
GGUF loader, transformers with bitsandbytes), then records quantize time, size on disk, peak GPU
memory while quantizing and while evaluating, load time, perplexity on a fixed text and its
tokens/s, and which module class the loaded model computes with. The bf16 baseline is measured the
same way. A variant that fails is recorded with its error and the sweep goes on. Writes
methods_sweep.json under $OUT after every variant (a call cut short still returns what it measured).

    python bench/methods_sweep.py                      # on the device: Qwen2-1.5B shape, 128 x 1024 tokens
    python bench/methods_sweep.py --methods gguf bnb-nf4   # a subset
    python bench/methods_sweep.py --tiny               # CPU smoke test: tiny shape, short calibration

On the device, gguf and bnb-nf4 need the gguf and bitsandbytes wheels in .device/whl (the bundle has
neither): `pip download --no-deps -d .device/whl gguf bitsandbytes` on this machine first. A missing
package is recorded as that variant's error.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, run from anywhere
from common import REPO, build_bench_model, environment, out_dir, print_table, write_calibration  # noqa: E402

sys.path.insert(0, str(REPO))  # qrun from the checkout (qrun/__init__ maps its role folders)

# (method, bits): every method at the widths of --bits where it applies; fp8 and bnb-nf4 have one width.
VARIANTS = [("gptq", 4), ("gptq", 8), ("awq", 4), ("rtn", 4), ("rtn", 8), ("fp8", 8), ("gguf", 4), ("gguf", 8),
            ("bnb-nf4", 4)]


def variant_params(method: str, bits: int, args) -> dict:
    """A quantize job's params, as `qrun submit --method M --bits B` makes them."""
    from qrun.workers.params import QuantizeParams

    return QuantizeParams.for_method(method, bits, group_size=args.group_size, calib=str(args.calib),
                                     calib_samples=args.samples, calib_max_len=args.max_len,
                                     batch_size=args.batch_size).to_dict()


def ppl_text(path: Path, min_chars: int) -> Path:
    """A fixed text for perplexity: the demo's dialog lines, repeated to the length asked."""
    from qrun.workers.tiny import sample_texts

    lines, text = sample_texts(), ""
    while len(text) < min_chars:
        text += "\n".join(lines) + "\n"
    path.write_text(json.dumps({"text": text[:min_chars]}, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def peak_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def free() -> None:
    from qrun.workers.jobs import free_memory

    gc.collect()
    free_memory()


def quantize(model: Path, params: dict, target: Path, work: Path) -> dict:
    from qrun.workers.evaluate import weights_bytes
    from qrun.workers.inputs import inspect_model
    from qrun.workers.params import QuantizeParams
    from qrun.workers.quantize import quantize_model

    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    offload = work / "offload"
    shutil.rmtree(offload, ignore_errors=True)
    layers = inspect_model(str(model)).num_layers
    reset_peak()
    started = time.perf_counter()
    metrics = quantize_model(QuantizeParams.from_dict(params), str(model), target, device(), layers,
                             lambda *_: None, offload_dir=offload)
    shutil.rmtree(offload, ignore_errors=True)
    return {"quantize_wall_s": time.perf_counter() - started, "quantize_s": metrics.get("quantize_s"),
            "quantize_load_s": metrics.get("load_s"), "save_s": metrics.get("save_s"),
            "quantize_peak_gpu_gb": peak_gb(), "loss_mean": metrics.get("loss_mean"),
            "size_bytes": weights_bytes(target),
            "dir_bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file()),
            "files": sorted(p.name for p in target.iterdir())}


def evaluate(model_dir: Path, ppl_file: Path, batch_size: int) -> dict:
    """Load the artifact as qrun's eval job does, and measure perplexity (and its speed) on the text."""
    from qrun.workers.evaluate import artifact_format, load_model, perplexity, plan_eval
    from qrun.workers.params import EvalParams

    reset_peak()
    started = time.perf_counter()
    model, tokenizer = load_model(model_dir, device(), trust_remote_code=False)
    load_s = time.perf_counter() - started
    layer = model.model.layers[0].mlp.up_proj
    plan = plan_eval(EvalParams(ppl_data=str(ppl_file), batch_size=batch_size), model, tokenizer)
    started = time.perf_counter()
    result = perplexity(plan, model, tokenizer, device(), lambda *_: None)
    if device().startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    ppl_s = time.perf_counter() - started
    out = {"loader": artifact_format(model_dir), "linear_class": type(layer).__name__, "load_s": load_s,
           "perplexity": result["perplexity"], "ppl_tokens": result["ppl_tokens"], "ppl_s": ppl_s,
           "ppl_tokens_per_s": result["ppl_tokens"] / ppl_s, "eval_peak_gpu_gb": peak_gb(),
           "dtype": str(next(model.parameters()).dtype)}
    del model, layer
    free()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2-1.5b")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: --shape tiny-256 (2 layers of width 256), 8 x 128 calibration tokens")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (gptq awq rtn fp8 gguf bnb-nf4)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16, help="calibration batch size")
    parser.add_argument("--ppl-chars", type=int, default=60000, help="length of the perplexity text")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--any-device", action="store_true",
                        help="run methods the table sends to GPUs only (fp8, bnb-nf4) on this device too; "
                             "--tiny implies it (both run on a CPU)")
    parser.add_argument("--keep", action="store_true", help="keep the artifacts under --work")
    parser.add_argument("--work", default="/tmp/qrun-bench")
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.samples, args.max_len, args.ppl_chars = "tiny-256", 8, 128, 4000
        args.any_device = True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 8)))

    import common

    # K-quants need rows of 256: the tiny shape of the other benches (width 128) has none.
    common.SHAPES.setdefault("tiny-256", dict(common.SHAPES["tiny"], hidden=256, intermediate=512, layers=2))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_bench_model(work / f"model-{args.shape}", args.shape)
    args.calib = write_calibration(work / "calib.jsonl", args.samples, min_chars=args.max_len * 3)
    ppl_file = ppl_text(work / "ppl.jsonl", args.ppl_chars)
    result_path = out_dir() / "methods_sweep.json"
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "environment": environment(),
              "device": device(), "runs": []}

    def save() -> None:
        result_path.write_text(json.dumps(result, indent=2))

    if not args.no_baseline:
        row = {"variant": "baseline", "method": None, "bits": 16, "size_bytes": sum(
            p.stat().st_size for p in model.glob("*.safetensors"))}
        try:
            row |= evaluate(model, ppl_file, args.eval_batch_size)
        except Exception as exc:  # noqa: BLE001 -- a bench records failures and goes on
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        save()

    from qrun.workers import methods

    if args.any_device:
        from dataclasses import replace

        for name, spec in list(methods.METHODS.items()):
            methods.METHODS[name] = replace(spec, needs_gpu=False, min_compute_capability=None)
    for method, bits in VARIANTS:
        if (args.methods and method not in args.methods) or (bits not in args.bits and len(methods.METHODS[method].bits) > 1):
            continue
        params = variant_params(method, bits, args)
        label = methods.label(params)
        row = {"variant": label, "method": method, "bits": bits, "params": params}
        target = work / f"variant-{label}"
        try:
            row |= quantize(model, params, target, work)
            free()
            row |= evaluate(target, ppl_file, args.eval_batch_size)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            (out_dir() / f"methods_sweep-{label}.err").write_text(traceback.format_exc())
            free()
        if not args.keep:
            shutil.rmtree(target, ignore_errors=True)
        result["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "params"}), flush=True)
        save()

    base = next((r for r in result["runs"] if r["variant"] == "baseline" and "perplexity" in r), None)
    for row in result["runs"]:
        if base and row.get("perplexity") is not None and math.isfinite(row["perplexity"]):
            row["ppl_vs_baseline"] = row["perplexity"] / base["perplexity"]
        if base and row.get("size_bytes"):
            row["size_vs_baseline"] = row["size_bytes"] / base["size_bytes"]
    save()
    print_table(result["runs"], ["variant", "quantize_s", "size_bytes", "size_vs_baseline", "quantize_peak_gpu_gb",
                                 "load_s", "perplexity", "ppl_vs_baseline", "ppl_tokens_per_s", "eval_peak_gpu_gb",
                                 "linear_class", "error"])
    print(f"wrote {result_path}")


if __name__ == "__main__":
    main()
