"""Shared pieces of the GPU benchmarks: the Qwen2-1.5B-shaped model, calibration text, timing, tables.

Run on the device machine (see docs/BENCHMARKS.md); `--shape tiny` runs the same code on a CPU for a smoke test.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Qwen2-1.5B-Instruct's published shape.
SHAPES = {
    "qwen2-1.5b": dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936,
                       max_positions=32768),
    # Qwen2-0.5B's published shape.
    "qwen2-0.5b": dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936,
                       max_positions=32768),
    # Qwen2-7B's published shape (untied lm_head), for how time and memory grow with the model.
    "qwen2-7b": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064,
                     max_positions=32768, tie=False),
    "tiny": dict(hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2, vocab=None, max_positions=2048),
}


def build_bench_model(out_dir: Path, shape: str, seed: int = 0) -> Path:
    """Random weights in the given shape (bf16 on GPU, fp32 on CPU), with a tokenizer trained on the spot."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qrun.workers.tiny import sample_texts, train_tokenizer

    s = SHAPES[shape]
    tokenizer = train_tokenizer(sample_texts(), vocab_size=2048)
    config = Qwen2Config(vocab_size=s["vocab"] or len(tokenizer), hidden_size=s["hidden"],
                         intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         max_position_embeddings=s["max_positions"], tie_word_embeddings=s.get("tie", True))
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(seed)
    with torch.device("cuda" if on_gpu else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    del model
    return out_dir


def write_calibration(path: Path, n: int, min_chars: int, seed: int = 0) -> Path:
    """n long dialog texts (JSONL {"text"}), each long enough to fill the token budget."""
    from qrun.workers.tiny import sample_texts

    rng = random.Random(seed)
    lines = sample_texts()
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            text = ""
            while len(text) < min_chars:
                text += rng.choice(lines) + "\n"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def prepare(args, name: str) -> tuple[Path, Path, Path, Path]:
    """The work folder, $OUT/<name>.log, the bench model of --shape and its calibration file."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_bench_model(work / f"model-{args.shape}", args.shape)
    calib = write_calibration(work / "calib.jsonl", args.samples, min_chars=args.max_len * 3)
    return work, out_dir() / f"{name}.log", model, calib


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for name in ("transformers", "gptqmodel", "ray", "sqlalchemy"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            info[name] = "missing"
    return info


def fresh_home(work: Path, name: str) -> dict[str, str]:
    """An empty QRUN_HOME under work (a queue of its own), as the environment that selects it."""
    home = work / name
    shutil.rmtree(home, ignore_errors=True)
    return {"QRUN_HOME": str(home)}


def utc_time(text: str) -> datetime:
    """A timestamp of `qrun status --json` (UTC, ISO with a trailing Z) as a naive UTC datetime."""
    return datetime.fromisoformat(text.rstrip("Z"))


def qrun_base() -> list[str]:
    """The qrun command of this Python environment (its console script, else `python -m qrun.cli.main`)."""
    qrun = Path(sys.executable).parent / "qrun"
    return [str(qrun)] if qrun.exists() else [sys.executable, "-m", "qrun.cli.main"]


def timed_run(cmd: list[str], env: dict | None = None, log: Path | None = None,
              cwd: Path | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    wall = time.perf_counter() - start
    if log:
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr}\n")
    if result.returncode != 0:
        raise RuntimeError(f"{cmd} exited {result.returncode}: {result.stderr[-3000:]}")
    return wall, result.stdout


# Builds one of GPTQModel's Marlin kernels (a JIT extension, cached under ~/.cache/gptqmodel) where a GPU is.
PREWARM_MARLIN = """
import sys, torch
if torch.cuda.is_available():
    from gptqmodel.utils.marlin import prewarm_marlin_extension
    prewarm_marlin_extension(getattr(torch, sys.argv[1]))
"""


def start_marlin_builds(log: Path) -> tuple[float, list[subprocess.Popen]]:
    """Build the fp16 and bf16 Marlin kernels in the background. On a fresh machine the first GPTQ load
    otherwise compiles them inside the timed load (~2 min each on an H100 machine's 16 cores)."""
    out = log.open("a")
    procs = [subprocess.Popen([sys.executable, "-c", PREWARM_MARLIN, dtype], stdout=out, stderr=out)
             for dtype in ("float16", "bfloat16")]
    return time.perf_counter(), procs


def wait_marlin_builds(started: tuple[float, list[subprocess.Popen]]) -> dict:
    """Wait for start_marlin_builds; how long the builds took and whether both succeeded."""
    start, procs = started
    codes = [p.wait() for p in procs]
    return {"marlin_build_s": time.perf_counter() - start, "marlin_build_ok": all(c == 0 for c in codes)}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(widths[c]) for c in columns))


def fmt(value) -> str:
    if isinstance(value, float):
        if value and abs(value) < 0.01:
            return f"{value:.3e}"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return "" if value is None else str(value)


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or REPO / "bench-out")
    path.mkdir(parents=True, exist_ok=True)
    return path
