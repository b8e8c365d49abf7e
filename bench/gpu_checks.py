"""GPU correctness checks, one PASS/FAIL/SKIP/INFO line each; writes gpu_checks.json under $OUT.

(a) the 4- and 8-bit artifacts (work/direct-w4, direct-w8; quantized first where missing) load through
    transformers' GPTQ integration straight onto the GPU and generate 8 tokens, with the Marlin kernel
    named (GPTQConfig(backend="marlin")) and with GPTQModel's own choice;
(b) the seed's failure mode, loading the 4-bit one on the CPU then `.to("cuda")`, is recorded (INFO, never a
    failure), and qrun's own path (workers.evaluate.load_model on "cuda:0") loads and generates;
(c) Ray pins exactly one GPU per worker: one QueueWorker actor per GPU, each seeing cuda:0 and a distinct
    CUDA_VISIBLE_DEVICES.

    python bench/gpu_checks.py                    # on the device
    python bench/gpu_checks.py --shape tiny       # CPU smoke test: GPU-only parts print SKIP
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

from common import build_bench_model, environment, out_dir
from eval_speed import add_quantize_options, ensure_quantized, fill_quantize_defaults

RESULTS: list[dict] = []
PROMPT = "发言人1: 您好，我是银行客服，您的账户存在风险"


def record(name: str, status: str, detail: str = "") -> None:
    RESULTS.append({"check": name, "status": status, "detail": detail})
    print(f"{status:4}  {name}" + (f": {detail}" if detail else ""), flush=True)
    # Kept as it goes: a run cut short still returns the checks made.
    (out_dir() / "gpu_checks.json").write_text(json.dumps({"checks": RESULTS}, indent=2, ensure_ascii=False))


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_8(model, tokenizer) -> str:
    """Greedy, exactly 8 new tokens; returns a short description (new tokens, device, a linear's class)."""
    import torch

    device = next(model.parameters()).device
    ids = tokenizer(PROMPT, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=pad)
    new = out.shape[1] - ids["input_ids"].shape[1]
    if new != 8:
        raise AssertionError(f"generated {new} tokens, expected 8")
    linear = type(model.model.layers[0].self_attn.q_proj).__name__
    return f"8 tokens on {device}, q_proj is {linear}"


def check_hf_load(name: str, path: Path, backend: str | None) -> None:
    """(a) transformers' GPTQ integration, weights straight onto the GPU. backend=None leaves the kernel
    to GPTQModel (on Hopper it picks Machete, which fetches CUTLASS on first use: INFO where that fails
    for want of a network); "marlin" is what works offline and must pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    bits = json.loads((path / "quantize_config.json").read_text())["bits"]
    how = f"backend={backend}" if backend else "default backend"
    extra = {"quantization_config": GPTQConfig(bits=bits, backend=backend)} if backend else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cuda:0", **extra)
        record(f"transformers load {name} onto cuda:0 ({how}) + generate", "PASS",
               generate_8(model, AutoTokenizer.from_pretrained(str(path))))
        del model
    except Exception as exc:  # noqa: BLE001 - a check reports, it does not stop the others
        offline = backend is None and any(word in str(exc) for word in ("resolution", "CUTLASS", "connect"))
        record(f"transformers load {name} onto cuda:0 ({how}) + generate", "INFO" if offline else "FAIL",
               ("needs the network (Machete fetches CUTLASS): " if offline else "") + error_text(exc))
    free_memory()


def check_cpu_then_cuda(path: Path) -> None:
    """(b) the seed's way: load on the CPU, move to the GPU. Recorded, whatever happens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step = "load on cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path))
        step = '.to("cuda")'
        model = model.to("cuda")
        step = "generate"
        detail = "succeeded: " + generate_8(model, AutoTokenizer.from_pretrained(str(path)))
        del model
    except Exception as exc:  # noqa: BLE001
        detail = f"failed at {step}: {error_text(exc)}"
    record("seed path: w4 loaded on cpu then .to(\"cuda\")", "INFO", detail)
    free_memory()


def check_qrun_load(name: str, path: Path, device: str) -> None:
    """(b) qrun's own path: workers.evaluate.load_model."""
    from qrun.workers.evaluate import load_model

    try:
        model, tokenizer = load_model(path, device, trust_remote_code=False)
        record(f"qrun load_model {name} on {device} + generate", "PASS", generate_8(model, tokenizer))
        del model
    except Exception as exc:  # noqa: BLE001
        record(f"qrun load_model {name} on {device} + generate", "FAIL", error_text(exc))
    free_memory()


def check_ray_pinning(on_gpu: bool) -> None:
    """(c) One QueueWorker per GPU, each seeing exactly one: cuda:0, and CUDA_VISIBLE_DEVICES unlike the others'."""
    home = Path(tempfile.mkdtemp(prefix="qrun-gpu-checks-"))
    os.environ["QRUN_HOME"] = str(home)  # the actors inherit it (runner.run.worker_env)
    import ray

    from qrun.db.session import database_url, open_database
    from qrun.runner.run import create_worker, plan_slots, start_ray

    try:
        url = database_url()
        open_database(url)  # the schema, before the actors open it
        start_ray(None, None, cpu_workers=1)
        slots = plan_slots(None, None)
        actors = [create_worker(slot, url, lease_s=60.0) for slot in slots]
        identities = ray.get([a.identity.remote() for a in actors], timeout=300)
        detail = "; ".join(f"{s.name}: device {i['device']}, CUDA_VISIBLE_DEVICES={i['cuda_visible_devices']}"
                           for s, i in zip(slots, identities))
        if not on_gpu:
            ok = all(i["device"] == "cpu" for i in identities)
            record("ray CPU worker starts (identity)", "PASS" if ok else "FAIL", detail)
            record("ray pins one GPU per worker", "SKIP", "no GPU")
            return
        visible = [i["cuda_visible_devices"] for i in identities]
        import torch

        ok = (len(identities) == torch.cuda.device_count() and all(i["device"] == "cuda:0" for i in identities)
              and all(v is not None and "," not in v for v in visible) and len(set(visible)) == len(visible))
        record(f"ray pins one GPU per worker ({len(identities)} workers)", "PASS" if ok else "FAIL", detail)
    except Exception as exc:  # noqa: BLE001
        record("ray pins one GPU per worker", "FAIL", error_text(exc))
    finally:
        if ray.is_initialized():
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2-1.5b")
    add_quantize_options(parser)
    parser.add_argument("--default-backend", action="store_true",
                        help="also load through transformers with GPTQModel's own kernel choice (on an "
                             "offline Hopper machine this waits on CUTLASS downloads that cannot succeed)")
    parser.add_argument("--work", default="/tmp/qrun-bench")
    args = parser.parse_args()
    fill_quantize_defaults(args)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch

    on_gpu = torch.cuda.is_available()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = out_dir()
    model = build_bench_model(work / f"model-{args.shape}", args.shape)
    quantized = {f"w{bits}": ensure_quantized(model, bits, args, work, out / "gpu_checks.log") for bits in (4, 8)}

    for name, path in quantized.items():
        if on_gpu:
            check_hf_load(name, path, backend="marlin")
            if args.default_backend:
                check_hf_load(name, path, backend=None)
        else:
            record(f"transformers load {name} onto cuda:0 + generate", "SKIP", "no GPU")
    if on_gpu:
        check_cpu_then_cuda(quantized["w4"])
    else:
        record("seed path: w4 loaded on cpu then .to(\"cuda\")", "SKIP", "no GPU")
    for name, path in quantized.items():
        check_qrun_load(name, path, "cuda:0" if on_gpu else "cpu")
    check_ray_pinning(on_gpu)

    failed = [r for r in RESULTS if r["status"] == "FAIL"]
    result = {"environment": environment(), "args": vars(args), "checks": RESULTS, "failed": len(failed)}
    (out / "gpu_checks.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks without failure; wrote {out / 'gpu_checks.json'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
