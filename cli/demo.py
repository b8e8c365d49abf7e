"""`qrun demo`: the whole loop on this machine, offline -- build a tiny demo model, queue its 8-, 4-
and 2-bit GPTQ variants with evals, drain the queue, print the comparison with the baseline and one
sentence read from it (the smallest variant within a point of the baseline's F1).

Running it again reuses the model and skips variants already queued or done, so a second run only
reprints the comparison (or finishes what an interrupted run left). The terminal shows qrun's lines
only: Ray's, torch's and GPTQModel's notices go to $QRUN_HOME/logs/run-*.log.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Iterator, TextIO

import click

from qrun.cli.common import open_db, stderr_line
from qrun.db.states import Kind

DEMO_BITS = (8, 4, 2)  # from near-lossless down to where GPTQ is expected to hurt
F1_TOLERANCE = 0.01  # "within a point"
GROUP_SIZES = (128, 32)  # the first that divides the model's widths
EVAL_DEFAULTS = dict(mode="score", max_new_tokens=32, ppl=None, batch_size=8, trust_remote_code=False)


def pick_group_size(info) -> int:
    return next(g for g in GROUP_SIZES if info.hidden_size % g == 0 and info.intermediate_size % g == 0)


def sweep_point(bits: int, group_size: int, calib: str) -> dict:
    """A quantize job's params, with the keys `qrun submit` gives them (so equal jobs compare equal)."""
    return {"bits": bits, "group_size": group_size, "desc_act": False, "sym": True, "damp_percent": 0.01,
            "calib": calib, "calib_samples": 128, "calib_max_len": 1024, "batch_size": 1,
            "trust_remote_code": False, "allow_pickle": False}


def _live_eval_of(db, quantize_job_id: int) -> bool:
    from qrun.db import queue

    return any(j.depends_on == quantize_job_id and j.kind == Kind.EVAL.value
               and j.status in ("queued", "running", "succeeded") for j in queue.list_jobs(db))


def demo_specs(db, model: str, eval_file: str, calib_file: str, group_size: int) -> list:
    """Jobs still missing for the demo: variants not yet queued or done, evals whose earlier try failed."""
    from qrun.cli.submit import build_specs, eval_params
    from qrun.db.queue import JobSpec, find_equivalent_job

    eval_args = dict(data=eval_file, **EVAL_DEFAULTS)
    missing, specs = [], []
    for bits in DEMO_BITS:
        params = sweep_point(bits, group_size, calib_file)
        done = find_equivalent_job(db, Kind.QUANTIZE, model, params)
        if done is None:
            missing.append(params)
        elif not _live_eval_of(db, done):
            from qrun.workers.quantize import QuantizeParams

            label = QuantizeParams.from_dict(params).label()
            specs.append(JobSpec(kind=Kind.EVAL, model=model, depends_on=done,
                                 params=eval_params(variant=label, **eval_args) | {"from_upstream": True}))
    return build_specs(model, missing, priority=0, max_attempts=3, eval_args=eval_args, db=db) + specs


def build_cpu_kernels(log: TextIO) -> None:
    """Build GPTQModel's missing CPU kernels now, on their own line, so that no job's time includes it."""
    from qrun.workers.warmup import build_kernels, cpu_kernels_to_build

    missing = cpu_kernels_to_build()
    if not missing:
        return
    stderr_line("qrun demo: building GPTQModel's CPU kernels, once (~40 s)...")
    started = time.perf_counter()
    with redirect_stdout(log), redirect_stderr(log):  # its banner and compile progress
        for name, _, ok, why in build_kernels("cpu", missing):
            if not ok:  # a job falls back to another kernel; the log says why
                log.write(f"qrun demo: GPTQModel kernel {name} unavailable: {why}\n")
    stderr_line(f"qrun demo: building CPU kernels, once: {time.perf_counter() - started:.0f} s")


def _terminal_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """(logger, handler) for the handlers that libraries attached to their loggers and that write to
    the terminal: torch's (a stderr handler: the "W1125 ... _pytree.py" lines), transformers'."""
    terminal = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    loggers = [l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger)]
    return [(l, h) for l in loggers for h in l.handlers
            if getattr(h, "stream", None) in terminal]


@contextmanager
def library_notices_to(log: TextIO) -> Iterator[None]:
    """Python-level notices of the libraries this process loads (torch, transformers, GPTQModel and
    Python warnings) go to `log` while inside; qrun's own lines still reach the terminal."""
    to_log = logging.StreamHandler(log)
    to_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(to_log)  # records of loggers without a handler (no last resort)
    logging.captureWarnings(True)
    replaced: list[tuple[logging.Logger, logging.Handler]] = []

    def replace_terminal_handlers() -> None:
        for logger, handler in _terminal_handlers():
            logger.removeHandler(handler)
            logger.addHandler(to_log)
            replaced.append((logger, handler))

    import torch  # noqa: F401 -- torch's loggers get their terminal handler at import: replace it

    replace_terminal_handlers()
    import transformers.utils.logging as hf_logging  # imports torchao, which logs through torch's loggers

    hf_logging.get_logger("transformers")  # its library handler exists from here on
    replace_terminal_handlers()
    try:
        yield
    finally:
        for logger, handler in reversed(replaced):
            logger.removeHandler(to_log)
            logger.addHandler(handler)
        logging.captureWarnings(False)
        logging.getLogger().removeHandler(to_log)


def trade_off_sentence(rows: list[dict]) -> str | None:
    """One sentence read from the comparison: the smallest variant within a point of the baseline's
    F1, and what the next one down costs. None without a baseline or quantized variants with an F1."""
    base = next((r for r in rows if r["variant"] == "baseline" and r.get("f1") is not None), None)
    variants = sorted((r for r in rows if r["variant"] != "baseline" and r.get("f1") is not None and r["bits"]),
                      key=lambda r: (-r["bits"], -(r.get("group_size") or 0)))
    if base is None or not variants:
        return None
    within = [r for r in variants if r["f1"] >= base["f1"] - F1_TOLERANCE - 1e-9]
    if not within:
        return (f"Every variant costs more than a point of F1: {variants[0]['variant']} already "
                f"{_points(variants[0], base)}.")
    smallest = min(within, key=lambda r: (r["bits"], r.get("size_pct") or 0))
    lower = [r for r in variants if r["bits"] < smallest["bits"]]
    kept = f"{smallest['variant']} is the smallest variant within a point of the baseline's F1 " \
           f"({smallest['f1']:.3f} vs {base['f1']:.3f}{_size(smallest)})"
    if not lower:
        return f"{kept}, and the smallest in this sweep: no variant here loses more than a point."
    below = lower[0]
    return f"{kept}; the next one down, {below['variant']}{_size(below)}, {_points(below, base)}."


def _size(row: dict) -> str:
    return f", {row['size_pct']:.0f}% of the baseline's size" if row.get("size_pct") is not None else ""


def _points(row: dict, base: dict) -> str:
    cost = (base["f1"] - row["f1"]) * 100
    flips = [row.get("flips_fraud_to_not"), row.get("flips_not_to_fraud")]
    flipped = f", {sum(flips)} answers flipped" if None not in flips and sum(flips) else ""
    return f"costs {max(cost, 0):.1f} points of F1 ({row['f1']:.3f}{flipped})"


def first_line(log: Path) -> str:
    bits = ", ".join(map(str, DEMO_BITS[:-1])) + f" and {DEMO_BITS[-1]}"
    return (f"qrun demo: trains a tiny model on this machine (once), quantizes it to {bits} bits with GPTQ, scores "
            f"every variant against the baseline: about 2 minutes on 2 cores, +40 s the first time GPTQModel "
            f"builds its CPU kernels. Library notices: {log}")


@click.command()
@click.pass_context
def demo(ctx):
    """Show qrun end to end on this machine, offline: train a tiny demo model on synthetic dialogs
    (once; kept under $QRUN_HOME/demo), quantize it to 8, 4 and 2 bits, evaluate every variant and the
    baseline, and print `qrun compare` and what it says. The model is a toy, not a fraud detector."""
    from qrun.cli.run import run_log_path

    log_path = run_log_path()
    stderr_line(first_line(log_path))
    with open(log_path, "a", encoding="utf-8", buffering=1) as log, library_notices_to(log):
        ok = _run_demo(ctx, log)
    if not ok:
        ctx.exit(1)


def _run_demo(ctx, log: TextIO) -> bool:
    from qrun.cli.compare import comparison_rows, print_table
    from qrun.db import queue
    from qrun.db.session import qrun_home
    from qrun.demo.build import DISCLAIMER, build_demo
    from qrun.workers.inputs import check_quantize_settings, inspect_model

    paths = build_demo(qrun_home())
    info = inspect_model(paths.model)
    stderr_line(f"qrun demo: model {info.path} (held-out accuracy {paths.info()['eval_accuracy']:.3f} "
                f"when built)")
    group_size = pick_group_size(info)
    for bits in DEMO_BITS:
        check_quantize_settings(info, bits, group_size, 0.01)
    db = open_db(ctx)
    eval_file = str(paths.eval.resolve())
    specs = demo_specs(db, info.path, eval_file, str(paths.calib.resolve()), group_size)
    if specs:
        ids = queue.submit_jobs(db, specs)
        stderr_line(f"qrun demo: submitted job(s) {', '.join(map(str, ids))}")
    else:
        stderr_line("qrun demo: every demo job is already queued or done")
    ok = True
    if queue.pending_count(db):
        from qrun.cli.run import drain

        build_cpu_kernels(log)
        ok = not drain(db, "qrun demo", ray_notices=log)
    rows = comparison_rows(db, model=info.path, data=eval_file)
    if rows:
        print_table(rows)
        sentence = trade_off_sentence(rows)
        if sentence:
            stderr_line(f"\nqrun demo: {sentence}")
    else:
        stderr_line("qrun demo: no eval of the demo model succeeded: see `qrun status` and the job logs")
    stderr_line(f"\n{DISCLAIMER}\nSee `qrun status` for the jobs, `qrun compare --model {info.path}` for this "
                "table again (--format json/csv/markdown, --plot FILE.png).")
    return ok


COMMANDS = [demo]
