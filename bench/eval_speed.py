"""Eval speed: `qrun eval` of the bf16 baseline and its 8- and 4-bit GPTQ variants, score vs. generate mode.

On the Qwen2-1.5B-shaped model of quantize_speed.py (reused from --work), quantized with direct_quantize.py
where work/direct-w4 and direct-w8 are missing or belong to another model. The eval file has the seed's
test-set size and `{input, label, instruction}` form, its input lengths drawn from the real anti-fraud
dialogs (bench/anti_fraud_lengths.json). Each (model, mode) is one eval job of one queue; reports
samples/s, peak GPU memory, load and eval time, and the kernel GPTQModel picked (from the job's log).
GPTQModel's Marlin kernels are built in the background first, so no load time includes their one-time build.
Writes eval_speed.json under $OUT.

    python bench/eval_speed.py                                          # on the device
    python bench/eval_speed.py --shape tiny --samples 40 --generate-samples 8   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

from common import (REPO, build_bench_model, environment, fresh_home, out_dir, print_table, qrun_base,
                    start_marlin_builds, timed_run, wait_marlin_builds, write_calibration)

LENGTHS = Path(__file__).resolve().parent / "anti_fraud_lengths.json"
INSTRUCTION = "判断以下对话是否为诈骗。Answer with JSON: {\"is_fraud\": true} or {\"is_fraud\": false}."
# GPTQModel's log lines naming the kernel it chose, e.g. "INFO  Kernel: loaded -> `[MarlinLinear]`".
LOADED = re.compile(r"Kernel: loaded -> `\[?([^`\]]+)\]?`")
SELECTED = re.compile(r"Kernel: selected -> `([^`]+)`")
KERNEL_LINE = re.compile(r"\bkernel\b|backend", re.IGNORECASE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def write_eval_data(path: Path, n: int, seed: int = 0) -> Path:
    """n rows {input, label, instruction}: random dialog text cut to lengths drawn from the real test set."""
    from qrun.workers.tiny import sample_texts

    rng = random.Random(seed)
    lengths = json.loads(LENGTHS.read_text())["lengths"]
    lines = sample_texts()
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            length = rng.choice(lengths)
            text = ""
            while len(text) < length:
                text += rng.choice(lines) + "\n"
            row = {"input": text[:length], "label": i % 2 == 0, "instruction": INSTRUCTION}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def same_model(quantized: Path, model: Path) -> bool:
    """Whether a direct-wN directory was quantized from `model`'s shape (quantize_speed's warm-up writes a
    tiny one under the same name)."""
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    try:
        a, b = (json.loads((d / "config.json").read_text()) for d in (quantized, model))
    except (OSError, ValueError):
        return False
    return all(a.get(k) == b.get(k) for k in keys) and (quantized / "quantize_config.json").exists()


def add_quantize_options(parser: argparse.ArgumentParser) -> None:
    """How ensure_quantized makes the 4- and 8-bit copies (filled in by fill_quantize_defaults)."""
    parser.add_argument("--group-size", type=int, default=None, help="default 128 (tiny: 32)")
    parser.add_argument("--calib-samples", type=int, default=None, help="default 128 (tiny: 16)")
    parser.add_argument("--calib-max-len", type=int, default=None, help="default 1024 (tiny: 256)")


def fill_quantize_defaults(args: argparse.Namespace) -> None:
    tiny = args.shape == "tiny"
    args.group_size = args.group_size or (32 if tiny else 128)
    args.calib_samples = args.calib_samples or (16 if tiny else 128)
    args.calib_max_len = args.calib_max_len or (256 if tiny else 1024)


def ensure_quantized(model: Path, bits: int, args, work: Path, log: Path) -> Path:
    target = work / f"direct-w{bits}"
    if same_model(target, model):
        config = json.loads((target / "quantize_config.json").read_text())
        if config.get("bits") == bits and config.get("group_size") == args.group_size:
            return target
    shutil.rmtree(target, ignore_errors=True)
    calib = write_calibration(work / "calib-eval.jsonl", args.calib_samples, min_chars=args.calib_max_len * 3)
    wall, _ = timed_run([sys.executable, str(REPO / "bench" / "direct_quantize.py"), str(model), str(calib),
                         str(bits), str(args.group_size), str(target), str(args.calib_samples),
                         str(args.calib_max_len), "16"], log=log, cwd=work)
    print(f"quantized w{bits} in {wall:.1f}s", flush=True)
    return target


def kernel_from_log(log_path: str | None) -> str | None:
    """The kernel GPTQModel loaded, from its "Kernel: loaded -> `[...]`" line (else "selected", else the
    shortest line naming a kernel or backend); None for an unquantized model. Notes qrun's Marlin fallback."""
    if not log_path or not Path(log_path).exists():
        return None
    lines = [ANSI.sub("", line).strip() for line in Path(log_path).read_text(errors="replace").splitlines()]
    fell_back = any("letting GPTQModel choose" in line for line in lines)
    for pattern in (LOADED, SELECTED):
        found = [m.group(1) for m in map(pattern.search, lines) if m]
        if found:
            return ("marlin failed -> " if fell_back else "") + found[-1]
    hits = [line[-160:] for line in lines if KERNEL_LINE.search(line) and "_pytree" not in line]
    return min(hits, key=len) if hits else None


def submit_eval(name: str, model: Path, data: Path, mode: str, args, env: dict, log: Path) -> int:
    _, out = timed_run(qrun_base() + ["eval", "--model", str(model), "--data", str(data), "--mode", mode,
                                      "--batch-size", str(args.batch_size), "--max-new-tokens",
                                      str(args.max_new_tokens), "--json"], env=env, log=log)
    return json.loads(out)[0]


def eval_row(name: str, mode: str, job: dict) -> dict:
    if job["status"] != "succeeded":
        raise RuntimeError(f"eval {name}/{mode} {job['status']}: {job['error']} (log {job['log']})")
    m = job["metrics"]
    return {"model": name, "mode": mode, "samples": int(m.get("eval_samples") or 0),
            "samples_per_s": m.get("samples_per_s"),
            "peak_gb": m.get("peak_gpu_mem_gb"), "load_s": m.get("load_s"), "eval_s": m.get("eval_s"),
            "accuracy": m.get("accuracy"), "invalid": m.get("invalid"),
            "kernel": kernel_from_log(job["log"]), "log": job["log"]}


def run_evals(models: dict[str, Path], data: dict[str, Path], args, work: Path, log: Path) -> list[dict]:
    """Every (model, mode) as one eval job in one queue, drained by one `qrun run` (one start-up for all;
    each job loads its model afresh and measures its own load and eval time)."""
    env = fresh_home(work, "qrun-home-eval")
    submitted = [(name, mode, submit_eval(name, path, data[mode], mode, args, env, log))
                 for name, path in models.items() for mode in ("score", "generate")]
    with log.open("a") as out:  # straight to the log, so a call cut short still shows how far it got
        subprocess.run(qrun_base() + ["run", "--until-empty"], env={**os.environ, **env}, stdout=out,
                       stderr=out, check=True)
    _, status = timed_run(qrun_base() + ["status", "--json"], env=env)
    jobs = {job["id"]: job for job in json.loads(status)}
    return [eval_row(name, mode, jobs[job_id]) for name, mode, job_id in submitted]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2-1.5b")
    parser.add_argument("--samples", type=int, default=2349, help="eval rows (the seed's test-set size)")
    parser.add_argument("--generate-samples", type=int, default=256,
                        help="rows for generate mode (a random model never stops before --max-new-tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="eval batch size")
    add_quantize_options(parser)
    parser.add_argument("--work", default="/tmp/qrun-bench")
    args = parser.parse_args()
    fill_quantize_defaults(args)
    tiny = args.shape == "tiny"

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = out_dir()
    log = out / "eval_speed.log"
    marlin = start_marlin_builds(log)  # meanwhile: build and quantize the model, write the data
    model = build_bench_model(work / f"model-{args.shape}", args.shape)
    models = {"bf16" if not tiny else "fp32": model}
    for bits in (8, 4):
        models[f"w{bits}"] = ensure_quantized(model, bits, args, work, log)
    data = {"score": write_eval_data(work / f"eval-{args.samples}.jsonl", args.samples),
            "generate": write_eval_data(work / f"eval-{args.generate_samples}.jsonl", args.generate_samples)}
    built = wait_marlin_builds(marlin)
    print(f"Marlin kernels built in {built['marlin_build_s']:.0f}s (ok: {built['marlin_build_ok']})", flush=True)
    rows = run_evals(models, data, args, work, log)
    for row in rows:
        print(json.dumps(row), flush=True)
    ratios = {}
    for name in models:
        by_mode = {r["mode"]: r["samples_per_s"] for r in rows if r["model"] == name}
        ratios[name] = by_mode["score"] / by_mode["generate"] if by_mode.get("generate") else None
    result = {"environment": environment(), "args": vars(args), **built, "runs": rows,
              "score_over_generate_samples_per_s": ratios}
    (out / "eval_speed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["environment"]))
    print_table(rows, ["model", "mode", "samples", "samples_per_s", "peak_gb", "load_s", "eval_s", "kernel"])
    print("score/generate samples/s: " + ", ".join(f"{k} {fmt_ratio(v)}" for k, v in ratios.items()))


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}x"


if __name__ == "__main__":
    main()
