"""Does the first job on a fresh machine pay a one-time kernel build? (issue #15, item 1)

On a fresh GPU machine (GPTQModel's cache empty): submit w4 and w8 quantize jobs with a perplexity
eval of each, and `qrun run --until-empty`. The worker builds GPTQModel's kernels (gptq_cuda, Marlin
fp16/bf16) before it claims its first job (workers/warmup.py), so the first quantize and the first
GPTQ eval should take about as long as the second. Prints the jobs' own times and writes
$OUT/first_job.json.

    source bench/device_env.sh && python3 bench/first_job.py --shape qwen2-0.5b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from common import build_bench_model, environment, fresh_home, out_dir, qrun_base, write_calibration


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2-0.5b")
    args = parser.parse_args()
    work = Path("/tmp/first-job")
    work.mkdir(parents=True, exist_ok=True)
    model = build_bench_model(work / f"model-{args.shape}", args.shape)
    calib = write_calibration(work / "calib.jsonl", 64, 3000)
    env = {**os.environ, **fresh_home(work, "first-job")}
    qrun = qrun_base()
    subprocess.run([*qrun, "submit", "--model", str(model), "--bits", "4", "--bits", "8", "--calib", str(calib),
                    "--calib-samples", "64", "--calib-max-len", "512", "--eval-ppl", str(calib)],
                   env=env, check=True)
    started = time.perf_counter()
    run = subprocess.run([*qrun, "run", "--until-empty"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    jobs = json.loads(subprocess.run([*qrun, "status", "--all", "--json"], env=env, capture_output=True,
                                     text=True, check=True).stdout)
    rows = [{"id": j["id"], "kind": j["kind"], "label": j.get("label"), "status": j["status"],
             "elapsed_s": j["elapsed_s"], "job_wall_s": j["metrics"].get("job_wall_s"),
             "quantize_s": j["metrics"].get("quantize_s"), "load_s": j["metrics"].get("load_s"),
             "eval_s": j["metrics"].get("eval_s")} for j in jobs]
    result = {"environment": environment(), "shape": args.shape, "run_wall_s": wall, "jobs": rows,
              "run_output": [line for line in run.stderr.splitlines() if "running" not in line][-30:]}
    (out_dir() / "first_job.json").write_text(json.dumps(result, indent=2))
    print(run.stderr[-3000:])
    for row in rows:
        print(row)
    print(f"run wall {wall:.1f} s")


if __name__ == "__main__":
    main()
