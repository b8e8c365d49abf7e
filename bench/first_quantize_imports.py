"""What does a process's first GPTQ quantize() import that the next ones do not? (issue #15, item 1)

Three equal 4-bit quantize() calls on a tiny Qwen2 through qrun's own quantize function in one process
(as a worker runs its jobs): each one's time and the modules it imported. With --warm, the imports a
GPU worker's build thread does with gptq_cuda (workers.warmup.WARM_IMPORTS) come first. Runs on a CPU
(~1 min); on the device it runs on the GPU's device.

    python bench/first_quantize_imports.py [--warm]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warm", action="store_true", help="WARM_IMPORTS of gptq_cuda first")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qrun-first-quantize-"))
    from qrun.demo.tiny import build_tiny_model, sample_texts

    model = build_tiny_model(work / "tiny", arch="qwen2", hidden=128, intermediate=256, layers=2)
    calib = work / "calib.jsonl"
    with calib.open("w", encoding="utf-8") as f:
        for i, line in enumerate(sample_texts()[:8]):
            f.write(json.dumps({"input": line, "label": i % 2 == 0}, ensure_ascii=False) + "\n")
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    import gptqmodel  # noqa: F401 -- a worker's build thread imports it before any job

    from qrun.workers.quantize import QuantizeParams, quantize_model
    from qrun.workers.warmup import import_what_first_jobs_import

    if args.warm:
        import_what_first_jobs_import("gptq_cuda")
    print(f"imports before the first job: {time.perf_counter() - started:.2f} s", flush=True)
    for i, damp in enumerate((0.01, 0.05, 0.01)):
        out = work / f"out{i}"
        out.mkdir()
        before = set(sys.modules)
        started = time.perf_counter()
        params = QuantizeParams(bits=4, group_size=32, calib=str(calib), calib_samples=8, calib_max_len=256,
                                batch_size=4, damp_percent=damp)
        quantize_model(params, str(model), out, device, 2, lambda *_: None)
        seconds = time.perf_counter() - started
        new = sorted(set(sys.modules) - before)
        packages = sorted({name.split(".")[0] for name in new})
        print(f"quantize {i + 1}: {seconds:.2f} s, {len(new)} modules imported: {' '.join(packages)}", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
