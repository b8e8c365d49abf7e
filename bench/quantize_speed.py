"""Quantize speed: GPTQModel called directly vs. the same job through qrun, on one model and one GPU.

Three paths, rotated per bit width: "direct" (bench/direct_quantize.py in a fresh process: load, quantize,
save), "qrun" (`qrun submit` + `qrun run --until-empty`, which starts and stops Ray), and "serve" (`qrun
submit` to a `qrun run --serve` already running, as on a shared server: submit to finished_at). Reports
wall time, load / quantize() / save time, peak GPU memory and each path's ratio to direct. Writes
quantize_speed.json under $OUT (after every run, so a call cut short still returns what it measured).

    python bench/quantize_speed.py                 # on the device: Qwen2-1.5B shape, 128 x 1024 tokens
    python bench/quantize_speed.py --shape tiny --samples 16 --max-len 256   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from common import (REPO, build_bench_model, environment, fresh_home, prepare, print_table, qrun_base,
                    timed_run, utc_time)


def run_direct(model: Path, calib: Path, bits: int, args, work: Path, log: Path) -> dict:
    target = work / f"direct-w{bits}"
    shutil.rmtree(target, ignore_errors=True)
    wall, stdout = timed_run([sys.executable, str(REPO / "bench" / "direct_quantize.py"), str(model), str(calib),
                              str(bits), str(args.group_size), str(target), str(args.samples), str(args.max_len),
                              str(args.batch_size)],
                             log=log, cwd=work)  # GPTQModel writes logs/ into its working directory
    metrics = json.loads(stdout.strip().splitlines()[-1])
    return {"path": "direct", "bits": bits, "wall_s": wall, **metrics}


def submit(model: Path, calib: Path, bits: int | list[int], args, env: dict, log: Path) -> float:
    """`qrun submit` of one quantize job per bit width; returns the command's wall time."""
    bit_flags = [flag for b in ([bits] if isinstance(bits, int) else bits) for flag in ("--bits", str(b))]
    wall, _ = timed_run(qrun_base() + ["submit", "--model", str(model), *bit_flags, "--group-size",
                                       str(args.group_size), "--calib", str(calib), "--calib-samples",
                                       str(args.samples), "--calib-max-len", str(args.max_len),
                                       "--batch-size", str(args.batch_size)], env=env, log=log)
    return wall


def jobs_of(env: dict) -> list[dict]:
    _, status = timed_run(qrun_base() + ["status", "--json"], env=env)
    return json.loads(status)


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def job_row(path: str, bits: int, job: dict) -> dict:
    assert job["status"] == "succeeded", job["error"]
    m = job["metrics"]
    return {"path": path, "bits": bits, "quantize_s": m["quantize_s"], "load_s": m.get("load_s"),
            "save_s": m.get("save_s"), "peak_gpu_mem_gb": m.get("peak_gpu_mem_gb"),
            "process_peak_rss_gb": m.get("process_peak_rss_gb"),
            "calib_tokens": m["calib_tokens"], "job_wall_s": m["job_wall_s"], "loss_mean": m.get("loss_mean")}


def run_qrun(model: Path, calib: Path, bits: int, args, work: Path, log: Path) -> dict:
    """One-shot: `qrun submit` then `qrun run --until-empty`, which starts Ray and stops it."""
    env = fresh_home(work, f"qrun-home-w{bits}")
    submit_s = submit(model, calib, bits, args, env, log)
    run_started = now_utc()
    run_s, _ = timed_run(qrun_base() + ["run", "--until-empty"], env=env, log=log)
    run_ended = now_utc()
    (job,) = jobs_of(env)
    return {**job_row("qrun", bits, job), "wall_s": submit_s + run_s, "submit_s": submit_s, "run_s": run_s,
            # Where qrun's own time goes: before the worker claims the job, and after it finished.
            "startup_s": (utc_time(job["started_at"]) - run_started).total_seconds(),
            "teardown_s": (run_ended - utc_time(job["finished_at"])).total_seconds()}


def run_sweep(model: Path, calib: Path, bits: list[int], args, work: Path, log: Path) -> dict:
    """The usual workflow: one `qrun submit --bits 4 --bits 8` and one `qrun run --until-empty` for all."""
    env = fresh_home(work, "qrun-home-sweep")
    submit_s = submit(model, calib, bits, args, env, log)
    run_s, _ = timed_run(qrun_base() + ["run", "--until-empty"], env=env, log=log)
    jobs = [job_row("sweep", b, j) for b, j in zip(bits, jobs_of(env))]
    return {"path": "sweep", "bits": "+".join(map(str, bits)), "wall_s": submit_s + run_s,
            "quantize_s": sum(j["quantize_s"] for j in jobs), "job_wall_s": sum(j["job_wall_s"] for j in jobs)}


@contextmanager
def serving(work: Path, tiny: Path, calib: Path, tiny_args, log: Path):
    """A `qrun run --serve` left running, as on a shared server; yields its environment once its worker
    has run one tiny job (so it is up, and has imported GPTQModel). Stopped with Ctrl-C (SIGINT) after."""
    env = fresh_home(work, "qrun-home-serve")
    with log.open("a") as out:
        server = subprocess.Popen(qrun_base() + ["run", "--serve"], env={**os.environ, **env}, stdout=out,
                                  stderr=out)
    try:
        submit(tiny, calib, 4, tiny_args, env, log)
        wait_finished(env, 1, server)
        yield env, server
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def wait_finished(env: dict, count: int, server: subprocess.Popen) -> list[dict]:
    while True:
        jobs = jobs_of(env)
        if sum(j["status"] in ("succeeded", "failed") for j in jobs) >= count:
            return jobs
        if server.poll() is not None:
            raise RuntimeError(f"qrun run --serve exited {server.returncode}")
        time.sleep(0.5)


def run_serve(model: Path, calib: Path, bits: int, args, work: Path, log: Path, serve) -> dict:
    """The job submitted to a running `qrun run --serve`: from the submit command's start to the moment
    the worker recorded the job finished (its finished_at; polling only notices it)."""
    env, server = serve
    done_before = len(jobs_of(env))
    started = now_utc()
    submit_s = submit(model, calib, bits, args, env, log)
    job = wait_finished(env, done_before + 1, server)[-1]
    return {**job_row("serve", bits, job), "wall_s": (utc_time(job["finished_at"]) - started).total_seconds(),
            "submit_s": submit_s, "startup_s": (utc_time(job["started_at"]) - started).total_seconds() - submit_s}


PATHS = {"direct": run_direct, "qrun": run_qrun, "serve": run_serve}


def summarise(rows: list[dict], bits: int) -> list[dict]:
    """Medians per path, each path's wall time over direct's."""
    med = lambda xs, k: sorted(x[k] for x in xs)[len(xs) // 2] if xs and xs[0].get(k) is not None else None  # noqa: E731
    direct = [r for r in rows if r["bits"] == bits and r["path"] == "direct"]
    summary = []
    for path in PATHS:
        runs = [r for r in rows if r["bits"] == bits and r["path"] == path]
        if not runs:
            continue
        summary.append({"bits": bits, "path": path, "runs": len(runs), "wall_s": med(runs, "wall_s"),
                        "load_s": med(runs, "load_s"), "quantize_s": med(runs, "quantize_s"),
                        "save_s": med(runs, "save_s"), "startup_s": med(runs, "startup_s"),
                        "loss_mean": med(runs, "loss_mean"),
                        "peak_gb": runs[0]["peak_gpu_mem_gb"], "peak_rss_gb": runs[0].get("process_peak_rss_gb"),
                        "ratio": med(runs, "wall_s") / med(direct, "wall_s") if direct else None})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2-1.5b")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16, help="calibration batch size, every path")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=["direct", "qrun", "serve"],
                        help="direct: GPTQModel in a fresh process; qrun: submit + run --until-empty "
                             "(starts Ray); serve: submit to a running `qrun run --serve`")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each path per bit width")
    parser.add_argument("--sweep", action="store_true",
                        help="also all --bits in one submit and one `qrun run` (vs. direct once per width)")
    parser.add_argument("--work", default="/tmp/qrun-bench")
    args = parser.parse_args()

    work, log, model, calib = prepare(args, "quantize_speed")
    out = log.parent
    # GPTQModel compiles its GPTQ block-update extension on first use (~30 s on an H100) and caches it
    # per machine: build it once here so it is in no path's numbers. qrun's first start also pays for
    # cold files (Ray's binaries, .pyc writes): a tiny qrun job takes that.
    tiny, tiny_args = build_bench_model(work / "model-tiny", "tiny"), argparse.Namespace(
        **{**vars(args), "group_size": 32, "samples": 8, "max_len": 128})
    warm_up_s = run_direct(tiny, calib, 4, tiny_args, work, log)["wall_s"]
    if set(args.paths) - {"direct"}:
        warm_up_s += run_qrun(tiny, calib, 4, tiny_args, work, log)["wall_s"]
    print(f"warm-up (kernel builds, first starts): {warm_up_s:.1f}s", flush=True)
    rows = []
    partial = out / "quantize_speed.json"
    with ExitStack() as stack:
        serve = stack.enter_context(serving(work, tiny, calib, tiny_args, log)) if "serve" in args.paths else None
        for bits in args.bits:
            for round_ in range(args.rounds):
                # Rotate the order, so drift (clocks, caches) does not favour one path.
                order = args.paths[round_ % len(args.paths):] + args.paths[:round_ % len(args.paths)]
                for path in order:
                    extra = (serve,) if path == "serve" else ()
                    rows.append(PATHS[path](model, calib, bits, args, work, log, *extra) | {"round": round_})
                    print(json.dumps(rows[-1]), flush=True)
                    # Kept as it goes: a run cut short still returns what it measured.
                    partial.write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2))
    summary = [row for bits in args.bits for row in summarise(rows, bits)]
    if args.sweep:
        rows.append(run_sweep(model, calib, args.bits, args, work, log))
        print(json.dumps(rows[-1]), flush=True)
        direct = {r["bits"]: r["wall_s"] for r in summary if r["path"] == "direct"}
        summary.append({"bits": rows[-1]["bits"], "path": "sweep", "runs": 1, "wall_s": rows[-1]["wall_s"],
                        "quantize_s": rows[-1]["quantize_s"],
                        # against running GPTQModel direct once per bit width
                        "ratio": rows[-1]["wall_s"] / sum(direct.values()) if len(direct) == len(args.bits)
                        else None})
    result = {"environment": environment(), "args": vars(args), "warm_up_s": warm_up_s, "runs": rows,
              "summary": summary}
    partial.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["environment"]))
    print_table(summary, list(summary[0]))


if __name__ == "__main__":
    main()
