"""Is a job right after a kernel build slower because of the build itself?

On a fresh machine the first quantize and first GPTQ eval of a `qrun run` come right after GPTQModel
compiled a kernel on every core (bench/first_job.py), and ran ~1.2-1.5x slower than the later ones,
in every stage, while on a machine whose kernels were cached the first jobs took as long as the later
ones. This separates the two causes without a build: in one process (the worker's order: kernels
loaded, the first job rehearsed), equal 4-bit quantize() calls, one of them right after every core
was kept busy for --burn seconds at nice 19 (as a build does), one after --rest seconds of rest.

    source bench/device_env.sh && python3 bench/after_build.py --shape qwen2-0.5b
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_bench_model, environment, out_dir, write_calibration  # noqa: E402


def _spin(seconds: float) -> None:
    os.nice(19)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def burn(seconds: float) -> None:
    """Every core busy at nice 19 for `seconds`, as GPTQModel's compile of a kernel keeps them."""
    procs = [multiprocessing.Process(target=_spin, args=(seconds,)) for _ in range(os.cpu_count() or 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2-0.5b")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--burn", type=float, default=60)
    parser.add_argument("--rest", type=float, default=20)
    args = parser.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="qrun-after-build-"))
    model = build_bench_model(work / f"model-{args.shape}", args.shape)
    calib = write_calibration(work / "calib.jsonl", args.samples, args.max_len * 6)
    from qrun.workers.inputs import inspect_model
    from qrun.workers.params import QuantizeParams
    from qrun.workers.quantize import quantize_model
    from qrun.workers.warmup import build_kernel, rehearse

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    build_kernel("gptq_cuda")
    rehearsal_s, _ = rehearse("gptq_cuda", device)
    layers = inspect_model(str(model)).num_layers
    rows = []
    for i, before in enumerate(("rehearsed", "rest", "burn", "rest", "burn")):
        if before == "burn":
            burn(args.burn)
        elif before == "rest":
            time.sleep(args.rest)
        params = QuantizeParams(bits=4, damp_percent=0.01 + 0.01 * i, calib=str(calib),
                                calib_samples=args.samples, calib_max_len=args.max_len)
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            metrics = quantize_model(params, str(model), Path(out), device, layers, lambda *a: None)
            seconds = time.perf_counter() - started
        rows.append({"run": i + 1, "after": before, "seconds": seconds, "quantize_s": metrics["quantize_s"],
                     "pre_quant_forward_s": metrics.get("stage_pre_quant_forward_s")})
        print(json.dumps(rows[-1]), flush=True)
        (out_dir() / "after_build.json").write_text(json.dumps(
            {"environment": environment(), "args": vars(args), "rehearsal_s": rehearsal_s, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
