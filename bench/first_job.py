"""Does the first job on a fresh machine pay a one-time cost?

On a fresh GPU machine (GPTQModel's kernel cache empty) one `qrun run --until-empty` runs three equal
4-bit quantize jobs (damp 0.01, 0.05, 0.1: the same work, another value) and a perplexity eval of each,
plus the baseline's. The worker builds GPTQModel's kernels and rehearses each kernel's first job on a
one-layer copy of the job's model before it claims the job that uses it (workers/warmup.py), so the
first quantize and the first GPTQ eval should take as long as the later ones: the table prints the
first's time, the later ones' median, their ratio, first / second, the later
ones' max / min (the machine's own noise) and, for the job's wall time, the CPU steal during each job
(cores the hypervisor gave to other guests: where it varies from job to job, so do the jobs' times, and
a first job that ran with less of it than the later ones looks faster than them). Then, in a fresh process,
bench/load_profile.py profiles a first and a second GPTQ load (what a first eval still pays), and
bench/first_quantize_profile.py a first and a second quantize().
Each job's row also says what the machine did meanwhile (bench/machine_activity.py: CPU cores busy and
by which processes, CPU steal and clock, MB read from disk and major page faults, dirty pages, GPU
clocks and use), and so does each gap between jobs (the worker's builds and rehearsals). The JSON
also says how much of torch's and CUDA's libraries was in the page cache before and after the run
(bench/page_cache.py). `--drop-caches` first empties the page cache (root), as on a fresh machine
but with the kernels already built; `--page-in` then reads those libraries back before the run: the
two, run in turn, tell what reading them from disk costs the first jobs. Writes
$OUT/first_job{tag}.json (after the run, also when it was cut short), $OUT/first_job_activity{tag}.json
(the whole timeline), $OUT/load_profile.txt and $OUT/first_quantize_profile.txt.

    source bench/device_env.sh && python3 bench/first_job.py --shape qwen2-0.5b
    python3 bench/first_job.py --shape qwen2-0.5b --no-profiles --drop-caches --tag=-cold
    python3 bench/first_job.py --shape tiny --samples 8 --max-len 128    # CPU smoke test
    python3 bench/first_job.py --summarize docs/results/2026-12-05-rehearsal-shape/first_job-*-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from common import REPO, build_bench_model, environment, fresh_home, out_dir, qrun_base, utc_time, write_calibration
from machine_activity import ActivitySampler
from page_cache import drop, library_files, read_whole, residency


def job_rows(env: dict) -> list[dict]:
    jobs = json.loads(subprocess.run([*qrun_base(), "status", "--all", "--json"], env=env, capture_output=True,
                                     text=True, check=True).stdout)
    return [{"id": j["id"], "kind": j["kind"], "label": j.get("label"),
             "of_artifact": bool(j["params"].get("from_upstream")), "status": j["status"],
             "started_at": j.get("started_at"), "job_wall_s": j["metrics"].get("job_wall_s"),
             "quantize_s": j["metrics"].get("quantize_s"), "load_s": j["metrics"].get("load_s"),
             "ppl_s": j["metrics"].get("ppl_s"), "error": j.get("error"),
             # GPTQModel's own account of quantize(): where a first job's extra time went
             **{k: v for k, v in j["metrics"].items() if k.startswith("stage_")},
             "artifact": next((a["path"] for a in j.get("artifacts") or [] if a["kind"] == "model"), None)}
            for j in jobs]


def add_activity(rows: list[dict], sampler: ActivitySampler) -> None:
    """Each job's `activity` (the machine during the job) and `activity_before` (during the gap since
    the job before it ended: the worker's builds and rehearsals, or the run's start-up)."""
    ended = sampler.samples[0]["t"] if sampler.samples else 0.0
    for row in sorted((r for r in rows if r["started_at"] and r["job_wall_s"]), key=lambda r: r["started_at"]):
        start = (utc_time(row["started_at"]) - datetime(1970, 1, 1)).total_seconds()
        row["activity_before"] = {"seconds": start - ended, **sampler.during(ended, start)}
        row["activity"] = sampler.during(start, start + row["job_wall_s"])
        ended = start + row["job_wall_s"]


def first_vs_later(rows: list[dict]) -> list[dict]:
    """The first quantize job against the later ones, and the first eval of a quantized model against
    the later ones, in the order the worker ran them: the first's time, the median of the later ones'
    (what a warm worker takes), first / that median, and max / min of the later ones (the machine's
    own run-to-run noise, against which the first job's ratio is to be read)."""
    ran = sorted((r for r in rows if r["status"] == "succeeded"), key=lambda r: r["started_at"])
    runs = {"quantize": [r for r in ran if r["kind"] == "quantize"],
            "GPTQ eval": [r for r in ran if r["kind"] == "eval" and r["of_artifact"]]}
    table = []
    for what, (first, *later) in ((k, v) for k, v in runs.items() if len(v) >= 2):
        stages = sorted(k for k in first if k.startswith("stage_"))
        for measure in ("job_wall_s", "quantize_s", "load_s", "ppl_s", *stages):
            values = [r.get(measure) for r in later]
            if first.get(measure) is None or None in values:
                continue
            median = statistics.median(values)
            table.append({"jobs": what, "time": measure, "first": first[measure], "later": values,
                          "later_median": median, "first/later": first[measure] / median if median else None,
                          "first/second": first[measure] / values[0] if values[0] else None,
                          "later_max/min": max(values) / min(values) if min(values) else None,
                          **({"steal_cores": [steal_during(r) for r in (first, *later)]}
                             if measure == "job_wall_s" else {})})
    return table


def steal_during(row: dict) -> float | None:
    """Cores the hypervisor gave to other guests while the job ran (see machine_activity.py)."""
    return (row.get("activity") or {}).get("cores_steal")


def print_first_vs_later(table: list[dict], stages: bool = True) -> None:
    for row in table:
        if not stages and row["time"].startswith("stage_"):
            continue
        print(f"{row['jobs']:10} {row['time']:34} first {row['first']:7.2f}  later {row['later_median']:7.2f}  "
              f"first/later {row['first/later']:.2f}  first/second {row['first/second']:.2f}  "
              f"(later max/min {row['later_max/min']:.2f})"
              + (f"  steal {[round(s or 0, 2) for s in row['steal_cores']]}" if "steal_cores" in row else ""))


def summarize(paths: list[Path]) -> None:
    """The first-vs-later table of earlier runs, from their JSON (steal where the sampler counted it)."""
    for path in paths:
        print(path)
        print_first_vs_later(first_vs_later(json.loads(path.read_text())["jobs"]), stages=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2-0.5b")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--damp", type=float, nargs="+", default=[0.01, 0.05, 0.1],
                        help="one equal 4-bit quantize job (and its eval) per value")
    parser.add_argument("--run-limit", type=float, default=420, help="seconds the `qrun run` may take")
    parser.add_argument("--no-profiles", action="store_true", help="only the queue run, not the profiles after it")
    parser.add_argument("--tag", default="", help="appended to the output files' names")
    parser.add_argument("--drop-caches", action="store_true",
                        help="empty the page cache first (root), keeping what a fresh machine has just written")
    parser.add_argument("--page-in", action="store_true", help="read torch's and CUDA's libraries into the page cache first")
    parser.add_argument("--rehearsal", choices=("job", "tiny", "full"), default="job",
                        help="the worker rehearses each kernel's first job on a one-layer copy of the job's model "
                             "(qrun's way), on a tiny model (qrun's way before 2026-12-05) or on the job's whole model")
    parser.add_argument("--summarize", nargs="+", type=Path, metavar="JSON",
                        help="only print the first-vs-later table of these earlier first_job*.json, with each job's steal")
    args = parser.parse_args()
    if args.summarize:
        return summarize(args.summarize)
    work = Path("/tmp/first-job")
    work.mkdir(parents=True, exist_ok=True)
    model = build_bench_model(work / f"model-{args.shape}", args.shape)
    calib = write_calibration(work / "calib.jsonl", args.samples, args.max_len * 6)
    env = {**os.environ, **fresh_home(work, "first-job"), "QRUN_REHEARSAL": args.rehearsal}
    dropped = None
    if args.drop_caches:  # the bundle, the repository, the model and the kernels were just written there
        site = [Path(p) for p in os.environ.get("PYTHONPATH", "").split(":") if p]
        dropped = drop([work, REPO, Path.home() / ".cache", *site])
        print(f"page cache emptied: {dropped}")
    if args.page_in:
        for path in library_files():
            read_whole(path)
    libraries_before = residency()
    sampler = ActivitySampler().start()
    subprocess.run([*qrun_base(), "submit", "--model", str(model), "--bits", "4", *(f"--damp={d}" for d in args.damp),
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
    sampler.stop()
    rows = job_rows(env)
    add_activity(rows, sampler)
    table = first_vs_later(rows)
    result = {"environment": environment(), "shape": args.shape, "run_wall_s": wall, "jobs": rows,
              "page_in": args.page_in, "caches_dropped": dropped, "rehearsal": args.rehearsal,
              "libraries_in_page_cache": {"before": libraries_before, "after": residency()},
              "first_vs_later": table, "run_output": run_output.splitlines()[-40:]}
    (out_dir() / f"first_job{args.tag}.json").write_text(json.dumps(result, indent=2))
    (out_dir() / f"first_job_activity{args.tag}.json").write_text(json.dumps({"cpu": sampler.samples, "gpu": sampler.gpu}))
    print(run_output[-3000:])
    for row in sorted(rows, key=lambda r: r["started_at"] or ""):
        print(f"{row['id']:2} {row['kind']:8} {row['label'] or '':18} {row['status']:9} wall {row['job_wall_s'] or 0:6.2f} s  "
              f"quantize {row['quantize_s'] or 0:6.2f}  load {row['load_s'] or 0:5.2f}  {row['error'] or ''}")
        for key in ("activity_before", "activity"):
            a = row.get(key)
            if a:
                print(f"    {key:15} {a.get('seconds', row['job_wall_s']):6.1f} s: read {a['read_mb']:7.1f} MB, "
                      f"{a['major_faults']:6} major faults, iowait {a['cores_iowait'] or 0:.2f}, busy {a['cores_busy'] or 0:.2f} "
                      f"cores; {a['busiest'][:3]}; minor faults {a['minor_faults_by'][:2]}")
    print(f"run wall {wall:.1f} s; libraries in the page cache (GB resident / in all): "
          + ", ".join(f"{k} {v['resident_gb']:.2f} / {v['total_gb']:.2f}" for k, v in result["libraries_in_page_cache"].items()))
    print_first_vs_later(table)
    if args.no_profiles:
        return
    # a first and second quantize() in a fresh process, profiled (what a first quantize job still pays)
    subprocess.run([sys.executable, str(REPO / "bench" / "first_quantize_profile.py"), str(model), str(calib),
                    "--samples", str(args.samples), "--max-len", str(args.max_len)], env=env, timeout=240)
    artifacts = [r["artifact"] for r in sorted(rows, key=lambda r: r["id"]) if r["artifact"]]
    if len(artifacts) >= 2:  # a fresh process each: as is, and with the worker's rehearsal first
        for warm in ([], ["--warm"]):
            subprocess.run([sys.executable, str(REPO / "bench" / "load_profile.py"), str(model), *artifacts[:2], *warm],
                           env=env, timeout=180)


if __name__ == "__main__":
    main()
