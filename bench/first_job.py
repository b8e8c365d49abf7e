"""Does the first job on a fresh machine pay a one-time cost? (issue #15, item 1)

On a fresh GPU machine (GPTQModel's kernel cache empty) one `qrun run --until-empty` runs two equal
4-bit quantize jobs (damp 0.01 and 0.05: the same work, another value) and a perplexity eval of each,
plus the baseline's. The worker builds GPTQModel's kernels in the background and holds each job back
only for the kernels it uses (workers/warmup.py), so the first quantize and the first GPTQ eval should
take as long as the second: the table prints each pair and its ratio. Then, in a fresh process,
bench/load_profile.py profiles a first and a second GPTQ load (what a first eval still pays).
Writes $OUT/first_job.json (after the run, also when it was cut short) and $OUT/load_profile.txt.

    source bench/device_env.sh && python3 bench/first_job.py --shape qwen2-0.5b
    python3 bench/first_job.py --shape tiny --samples 8 --max-len 128    # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, build_bench_model, environment, fresh_home, out_dir, qrun_base, write_calibration


def job_rows(env: dict) -> list[dict]:
    jobs = json.loads(subprocess.run([*qrun_base(), "status", "--all", "--json"], env=env, capture_output=True,
                                     text=True, check=True).stdout)
    return [{"id": j["id"], "kind": j["kind"], "label": j.get("label"),
             "of_artifact": bool(j["params"].get("from_upstream")), "status": j["status"],
             "started_at": j.get("started_at"), "job_wall_s": j["metrics"].get("job_wall_s"),
             "quantize_s": j["metrics"].get("quantize_s"), "load_s": j["metrics"].get("load_s"),
             "ppl_s": j["metrics"].get("ppl_s"), "error": j.get("error"),
             "artifact": next((a["path"] for a in j.get("artifacts") or [] if a["kind"] == "model"), None)}
            for j in jobs]


def first_vs_second(rows: list[dict]) -> list[dict]:
    """The first and second quantize job, and the first and second eval of a quantized model, in the
    order the worker ran them: their times and second / first."""
    ran = sorted((r for r in rows if r["status"] == "succeeded"), key=lambda r: r["started_at"])
    pairs = {"quantize": [r for r in ran if r["kind"] == "quantize"],
             "GPTQ eval": [r for r in ran if r["kind"] == "eval" and r["of_artifact"]]}
    table = []
    for what, (first, second, *_) in ((k, v) for k, v in pairs.items() if len(v) >= 2):
        for measure in ("job_wall_s", "quantize_s", "load_s", "ppl_s"):
            if first.get(measure) is not None and second.get(measure) is not None:
                table.append({"jobs": what, "time": measure, "first": first[measure], "second": second[measure],
                              "first/second": first[measure] / second[measure]})
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2-0.5b")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--run-limit", type=float, default=420, help="seconds the `qrun run` may take")
    args = parser.parse_args()
    work = Path("/tmp/first-job")
    work.mkdir(parents=True, exist_ok=True)
    model = build_bench_model(work / f"model-{args.shape}", args.shape)
    calib = write_calibration(work / "calib.jsonl", args.samples, args.max_len * 6)
    env = {**os.environ, **fresh_home(work, "first-job")}
    subprocess.run([*qrun_base(), "submit", "--model", str(model), "--bits", "4", "--damp", "0.01", "--damp", "0.05",
                    "--calib", str(calib), "--calib-samples", str(args.samples), "--calib-max-len", str(args.max_len),
                    "--eval-ppl", str(calib)], env=env, check=True)
    started = time.perf_counter()
    try:
        run = subprocess.run([*qrun_base(), "run", "--until-empty"], env=env, capture_output=True, text=True,
                             timeout=args.run_limit)
        run_output = run.stdout + run.stderr
    except subprocess.TimeoutExpired as cut:  # what was measured still comes back
        text = lambda out: out.decode(errors="replace") if isinstance(out, bytes) else (out or "")  # noqa: E731
        run_output = f"{text(cut.stdout)}{text(cut.stderr)}\n(cut after {args.run_limit:.0f} s)"
    wall = time.perf_counter() - started
    rows = job_rows(env)
    table = first_vs_second(rows)
    result = {"environment": environment(), "shape": args.shape, "run_wall_s": wall, "jobs": rows,
              "first_vs_second": table, "run_output": run_output.splitlines()[-40:]}
    (out_dir() / "first_job.json").write_text(json.dumps(result, indent=2))
    print(run_output[-3000:])
    for row in rows:
        print({k: v for k, v in row.items() if k != "artifact"})
    print(f"run wall {wall:.1f} s")
    for row in table:
        print(f"{row['jobs']:10} {row['time']:11} first {row['first']:7.2f}  second {row['second']:7.2f}  "
              f"first/second {row['first/second']:.2f}")
    artifacts = [r["artifact"] for r in sorted(rows, key=lambda r: r["id"]) if r["artifact"]]
    if len(artifacts) >= 2:  # a fresh process each: as is, and with the worker's warm-up imports first
        for warm in ([], ["--warm"]):
            subprocess.run([sys.executable, str(REPO / "bench" / "load_profile.py"), str(model), *artifacts[:2], *warm],
                           env=env, timeout=180)


if __name__ == "__main__":
    main()
