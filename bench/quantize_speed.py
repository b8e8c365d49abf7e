"""Quantize speed: GPTQModel called directly vs. the same job through `qrun submit` + `qrun run`.

Alternates the two, per bit width, on one model and one GPU, and reports wall time, time inside
quantize(), peak GPU memory and the ratio qrun / direct. Writes quantize_speed.json under $OUT.

    python bench/quantize_speed.py                 # on the device: Qwen2-1.5B shape, 128 x 1024 tokens
    python bench/quantize_speed.py --shape tiny --samples 16 --max-len 256   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from common import (REPO, build_bench_model, environment, out_dir, print_table, timed_run,
                    write_calibration)


def run_direct(model: Path, calib: Path, bits: int, args, work: Path, log: Path) -> dict:
    target = work / f"direct-w{bits}"
    shutil.rmtree(target, ignore_errors=True)
    wall, stdout = timed_run([sys.executable, str(REPO / "bench" / "direct_quantize.py"), str(model), str(calib),
                              str(bits), str(args.group_size), str(target), str(args.samples), str(args.max_len),
                              str(args.batch_size)],
                             log=log)
    metrics = json.loads(stdout.strip().splitlines()[-1])
    return {"path": "direct", "bits": bits, "wall_s": wall, **metrics}


def run_qrun(model: Path, calib: Path, bits: int, args, work: Path, log: Path) -> dict:
    home = work / f"qrun-home-w{bits}"
    shutil.rmtree(home, ignore_errors=True)
    env = {"QRUN_HOME": str(home)}
    qrun = str(Path(sys.executable).parent / "qrun") if (Path(sys.executable).parent / "qrun").exists() else None
    base = [qrun] if qrun else [sys.executable, "-m", "cli.main"]
    submit_s, _ = timed_run(base + ["submit", "--model", str(model), "--bits", str(bits), "--group-size",
                                    str(args.group_size), "--calib", str(calib), "--calib-samples",
                                    str(args.samples), "--calib-max-len", str(args.max_len),
                                    "--batch-size", str(args.batch_size)], env=env, log=log)
    run_started = datetime.now(timezone.utc).replace(tzinfo=None)
    run_s, _ = timed_run(base + ["run", "--until-empty"], env=env, log=log)
    run_ended = datetime.now(timezone.utc).replace(tzinfo=None)
    _, status = timed_run(base + ["status", "--json"], env=env)
    (job,) = json.loads(status)
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    return {"path": "qrun", "bits": bits, "wall_s": submit_s + run_s, "submit_s": submit_s, "run_s": run_s,
            "quantize_s": m["quantize_s"], "peak_gpu_mem_gb": m.get("peak_gpu_mem_gb"),
            "calib_tokens": m["calib_tokens"], "job_wall_s": m["job_wall_s"], "loss_mean": m.get("loss_mean"),
            # Where qrun's own time goes: before the worker claims the job, and after it finished.
            "startup_s": (datetime.fromisoformat(job["started_at"][:-1]) - run_started).total_seconds(),
            "teardown_s": (run_ended - datetime.fromisoformat(job["finished_at"][:-1])).total_seconds()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2-1.5b")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1, help="calibration batch size, both paths")
    parser.add_argument("--direct-only", action="store_true", help="only GPTQModel direct (batch-size sweeps)")
    parser.add_argument("--rounds", type=int, default=1, help="direct/qrun pairs per bit width")
    parser.add_argument("--work", default="/tmp/qrun-bench")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = out_dir()
    log = out / "quantize_speed.log"
    model = build_bench_model(work / f"model-{args.shape}", args.shape)
    calib = write_calibration(work / "calib.jsonl", args.samples, min_chars=args.max_len * 3)
    # GPTQModel compiles its GPTQ block-update extension on first use (~30 s on an H100) and caches it
    # per machine: build it once here so it is in neither path's numbers.
    warm_up_s = run_direct(build_bench_model(work / "model-tiny", "tiny"), calib, args.bits[0],
                           argparse.Namespace(**{**vars(args), "group_size": 32, "samples": 8, "max_len": 128}),
                           work, log)["wall_s"]
    print(f"warm-up (kernel builds): {warm_up_s:.1f}s", flush=True)
    rows = []
    for bits in args.bits:
        for round_ in range(args.rounds):
            # Alternate, so drift (clocks, caches, kernel builds) does not favour one path.
            order = (run_direct, run_qrun) if round_ % 2 == 0 else (run_qrun, run_direct)
            for fn in order if not args.direct_only else (run_direct,):
                rows.append(fn(model, calib, bits, args, work, log) | {"round": round_})
                print(json.dumps(rows[-1]), flush=True)
    summary = []
    for bits in ([] if args.direct_only else args.bits):
        direct = [r for r in rows if r["bits"] == bits and r["path"] == "direct"]
        via = [r for r in rows if r["bits"] == bits and r["path"] == "qrun"]
        med = lambda xs, k: sorted(x[k] for x in xs)[len(xs) // 2]  # noqa: E731
        summary.append({"bits": bits, "direct_wall_s": med(direct, "wall_s"), "qrun_wall_s": med(via, "wall_s"),
                        "direct_quantize_s": med(direct, "quantize_s"), "qrun_quantize_s": med(via, "quantize_s"),
                        "direct_peak_gb": direct[0]["peak_gpu_mem_gb"], "qrun_peak_gb": via[0]["peak_gpu_mem_gb"],
                        "qrun_startup_s": med(via, "startup_s"), "qrun_teardown_s": med(via, "teardown_s"),
                        "ratio_wall": med(via, "wall_s") / med(direct, "wall_s")})
    result = {"environment": environment(), "args": vars(args), "warm_up_s": warm_up_s, "runs": rows,
              "summary": summary}
    (out / "quantize_speed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["environment"]))
    if summary:
        print_table(summary, list(summary[0]))


if __name__ == "__main__":
    main()
