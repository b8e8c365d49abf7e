"""What does a process's first quantize() pay that its second does not?

In one fresh process, as a GPU worker does it: GPTQModel imported, the gptq_cuda kernel loaded and its
first job rehearsed on a tiny model (workers.warmup.rehearse; --cold: not rehearsed), then qrun's own
quantize_model twice on the same model and calibration (damp 0.01, then 0.05), each under cProfile
with the GPU synchronised at the end. Prints the rehearsal's time, each run's time, its minor page
faults (memory the process touched for the first time: a heap that grows in the first run and is
reused in the second shows here) and GPTQModel's stage times, and writes to $OUT/first_quantize_profile.txt the functions whose cumulative time
differs most between the first and the second run, and the modules the first one imported.
Without MODEL_DIR and CALIB, a tiny Qwen2 and its calibration are made on the spot (~1 min on a CPU).

    python3 bench/first_quantize_profile.py [MODEL_DIR CALIB.jsonl] [--samples 64] [--max-len 512] [--cold]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import out_dir  # noqa: E402
from load_profile import cumulative_by_function  # noqa: E402


def tiny_model_and_calibration(work: Path) -> tuple[str, str]:
    from qrun.demo.dataset import write_jsonl
    from qrun.workers.tiny import build_tiny_model, sample_texts

    model = build_tiny_model(work / "tiny", arch="qwen2", hidden=128, intermediate=256, layers=2)
    calib = write_jsonl([{"text": t} for t in sample_texts()[:64]], work / "calib.jsonl")
    return str(model), str(calib)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("calib", nargs="?")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--cold", action="store_true", help="no rehearsal before the first quantize()")
    args = parser.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="qrun-first-quantize-"))
    model, calib = (args.model, args.calib) if args.model else tiny_model_and_calibration(work)
    from qrun.workers.inputs import inspect_model
    from qrun.workers.params import QuantizeParams
    from qrun.workers.quantize import quantize_model
    from qrun.workers.warmup import build_kernel, kernels_a_job_uses, rehearse

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    import gptqmodel  # noqa: F401 -- the worker's background thread imports it before any job

    import qrun.workers.evaluate  # noqa: F401 -- and a worker has its database modules imported (sqlalchemy)

    kernels = kernels_a_job_uses("quantize", {"bits": 4}, model, device)
    for name in kernels:
        build_kernel(name)
    print(f"gptqmodel import + kernels {kernels}: {time.perf_counter() - started:.2f} s", flush=True)
    if not args.cold:
        print(f"rehearsal of gptq_cuda's first job on {device}: {rehearse('gptq_cuda', device)[0]:.2f} s", flush=True)
    layers = inspect_model(model).num_layers
    report = io.StringIO()
    profiles = []
    for label, damp in (("first quantize", 0.01), ("second quantize", 0.05)):
        params = QuantizeParams(bits=4, damp_percent=damp, calib=calib, calib_samples=args.samples,
                                calib_max_len=args.max_len)
        modules_before = set(sys.modules)
        profile = cProfile.Profile()
        with tempfile.TemporaryDirectory() as out:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.perf_counter()
            profile.enable()
            metrics = quantize_model(params, model, Path(out), device, layers, lambda *a: None)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            profile.disable()
            seconds = time.perf_counter() - started
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        profiles.append(profile)
        imported = sorted(set(sys.modules) - modules_before)
        stages = {k: round(v, 2) for k, v in metrics.items() if k.startswith("stage_") or k.endswith("load_s")
                  or k == "quantize_s"}
        print(f"{label}{' (cold)' if args.cold else ''}: {seconds:.2f} s, {faults} minor faults "
              f"({faults * resource.getpagesize() / 1e6:.0f} MB first touched), {len(imported)} modules imported; {stages}",
              flush=True)
        report.write(f"===== {label}: {seconds:.2f} s; {faults} minor faults; {stages}; imported: {' '.join(imported)}\n")
        pstats.Stats(profile, stream=report).sort_stats("cumulative").print_stats(45)
    one, two = (cumulative_by_function(p) for p in profiles)
    gaps = sorted(((one.get(k, 0.0) - two.get(k, 0.0), k) for k in set(one) | set(two)), reverse=True)
    report.write("===== cumulative seconds, first quantize minus second\n")
    for gap, name in gaps[:80]:
        report.write(f"{gap:8.3f}  {name}\n")
    print("".join(f"{gap:8.3f}  {name}\n" for gap, name in gaps[:25]))
    (out_dir() / f"first_quantize_profile{'-cold' if args.cold else ''}.txt").write_text(report.getvalue())


if __name__ == "__main__":
    main()
