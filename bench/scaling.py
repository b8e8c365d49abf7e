"""Scaling: one sweep of quantize jobs drained by 1, 2, 4 or 8 GPUs of one host (one qrun worker each).

For each GPU count: a fresh QRUN_HOME, one `qrun submit` of the sweep (bits x damp x group size on the
Qwen2-1.5B-shaped model, 128 x 1024 calibration tokens), one `qrun run --until-empty --gpus 0,..,g-1`.
From the job table: makespan (first start to last finish, so Ray's start-up is not in it; the command's
wall time is reported beside it), speed-up and efficiency against 1 GPU, and each GPU's timeline and busy
share. Writes scaling.json under $OUT after every GPU count.

    python bench/scaling.py --gpus 1 2                      # two GPUs: 4 jobs
    python bench/scaling.py --gpus 1 2 4 8 --jobs 8         # eight GPUs
    python bench/scaling.py --shape tiny --cpu --gpus 1 2 --samples 16 --max-len 256   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import environment, fresh_home, prepare, print_table, qrun_base, timed_run, utc_time

# Distinct jobs of about equal size: 4 = bits {4, 8} x damp {0.01, 0.02}; 8 adds group size 64.
SWEEP_AXES = (("--bits", ("4", "8")), ("--damp", ("0.01", "0.02")), ("--group-size", ("128", "64")))


def sweep_flags(jobs: int) -> list[str]:
    """The submit flags that make `jobs` quantize jobs (a power of two up to 8)."""
    axes, count = [], 1
    for flag, values in SWEEP_AXES:
        if count >= jobs:
            break
        axes.append((flag, values))
        count *= len(values)
    if count != jobs:
        raise SystemExit(f"--jobs {jobs}: use 2, 4 or 8")
    fixed = [] if any(flag == "--group-size" for flag, _ in axes) else ["--group-size", "128"]
    return fixed + [part for flag, values in axes for value in values for part in (flag, value)]


def timeline(jobs: list[dict]) -> dict:
    """Makespan and, per GPU (or CPU worker), its jobs as offsets from the first start and its busy share."""
    start = min(utc_time(j["started_at"]) for j in jobs)
    end = max(utc_time(j["finished_at"]) for j in jobs)
    makespan = (end - start).total_seconds()
    per_device: dict[str, dict] = {}
    for job in sorted(jobs, key=lambda j: j["started_at"]):
        device = job["gpu"] if job["gpu"] is not None else job["worker"].rsplit(":", 1)[-1]
        began = (utc_time(job["started_at"]) - start).total_seconds()
        ended = (utc_time(job["finished_at"]) - start).total_seconds()
        entry = per_device.setdefault(str(device), {"jobs": [], "busy_s": 0.0})
        entry["jobs"].append({"id": job["id"], "start_s": round(began, 1), "end_s": round(ended, 1)})
        entry["busy_s"] += ended - began
    for entry in per_device.values():
        entry["busy_share"] = entry["busy_s"] / makespan if makespan else None
    return {"makespan_s": makespan, "devices": per_device}


def run_with(count: int, model: Path, calib: Path, args, work: Path, log: Path) -> dict:
    env = fresh_home(work, f"qrun-home-scaling-{count}")
    timed_run(qrun_base() + ["submit", "--model", str(model), *sweep_flags(args.jobs), "--calib", str(calib),
                             "--calib-samples", str(args.samples), "--calib-max-len", str(args.max_len),
                             "--batch-size", str(args.batch_size)], env=env, log=log)
    workers = ["--cpu-workers", str(count)] if args.cpu else ["--gpus", ",".join(map(str, range(count)))]
    wall, _ = timed_run(qrun_base() + ["run", "--until-empty", *workers], env=env, log=log)
    _, status = timed_run(qrun_base() + ["status", "--json"], env=env)
    jobs = json.loads(status)
    failed = [j for j in jobs if j["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) did not succeed with {count} worker(s): {failed[0]['error']}")
    return {"workers": count, "jobs": len(jobs), "run_wall_s": wall, **timeline(jobs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2-1.5b")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts to compare; 1 first")
    parser.add_argument("--jobs", type=int, default=4, help="quantize jobs in the sweep: 2, 4 or 8")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpu", action="store_true", help="CPU workers instead of GPUs (smoke test)")
    parser.add_argument("--work", default="/tmp/qrun-bench")
    args = parser.parse_args()

    work, log, model, calib = prepare(args, "scaling")
    out = log.parent
    runs = []
    for count in args.gpus:
        runs.append(run_with(count, model, calib, args, work, log))
        base = runs[0]["makespan_s"] * runs[0]["workers"]  # one worker's time for the whole sweep
        for run in runs:
            run["speedup"] = base / run["makespan_s"]
            run["efficiency"] = run["speedup"] / run["workers"]
        print(json.dumps(runs[-1]), flush=True)
        (out / "scaling.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    result = {"environment": environment(), "args": vars(args), "runs": runs}
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["environment"]))
    rows = [{"workers": r["workers"], "jobs": r["jobs"], "makespan_s": r["makespan_s"], "run_wall_s": r["run_wall_s"],
             "speedup": r["speedup"], "efficiency": r["efficiency"],
             "busy": " ".join(f"{d}:{v['busy_share']:.2f}" for d, v in sorted(r["devices"].items()))}
            for r in runs]
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
