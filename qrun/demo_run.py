"""`qrun demo`: the whole loop on this machine, offline -- build a tiny demo model (with the outlier
channels of real LLMs: demo/build.py), queue its GPTQ and round-to-nearest variants at 8, 4 and 2 bits
with evals, drain the queue, and return the comparison with the baseline and one sentence read from it
(the smallest variant within a point of the baseline's F1, and what the next one down costs).

Running it again reuses the model and skips variants already queued or done, so a second run only
returns the comparison again (or finishes what an interrupted run left). Ray's, torch's and
GPTQModel's notices go to $QRUN_HOME/logs/run-*.log; qrun's own lines go to `say`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

from qrun.workers.methods import METHODS, title_of
from qrun.workers.params import BASELINE

DEMO_BITS = (8, 4, 2)  # from near-lossless down to where calibration decides whether answers survive
DEMO_METHODS = ("gptq", "rtn")  # GPTQ (calibrated) beside round-to-nearest: what calibration buys
F1_TOLERANCE = 0.01  # "within a point"


@dataclass
class DemoResult:
    """What the demo leaves to show: the comparison rows (for `qrun compare`'s table; empty when no
    eval of the demo model succeeded), the sentence read from them (or None), the lines to give after
    the table, ok (no demo job failed in this run) and interrupted (Ctrl-C stopped the run: nothing
    else to show)."""

    model: str
    rows: list[dict] = field(default_factory=list)
    sentence: str | None = None
    closing: list[str] = field(default_factory=list)
    ok: bool = True
    interrupted: bool = False


def demo_request(model: Path, eval_file: Path, calib_file: Path):
    """The demo's sweep, checked as `qrun submit --method gptq --method rtn --bits 8 --bits 4 --bits 2
    --calib CALIB --batch-size 1 --eval EVAL` checks it."""
    from qrun.sweeps import check_submission

    return check_submission(str(model), bits=list(DEMO_BITS), method=list(DEMO_METHODS), calib=str(calib_file),
                            batch_size=1, eval=str(eval_file))


def build_cpu_kernels(log: TextIO, say: Callable[[str], None] = print) -> None:
    """Build GPTQModel's missing CPU kernels now, on their own line, so that no job's time includes it."""
    from qrun.workers.warmup import build_kernels, cpu_kernels_to_build

    missing = cpu_kernels_to_build()
    if not missing:
        return
    say("qrun demo: building GPTQModel's CPU kernels, once (~80 s on 2 cores)...")
    started = time.perf_counter()
    with redirect_stdout(log), redirect_stderr(log):  # its banner and compile progress
        for name, _, ok, why in build_kernels("cpu", missing):
            if not ok:  # a job falls back to another kernel; the log says why
                log.write(f"qrun demo: GPTQModel kernel {name} unavailable: {why}\n")
    say(f"qrun demo: building CPU kernels, once: {time.perf_counter() - started:.0f} s")


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


# ---------------------------------------------------------------- the sentence


def trade_off_sentence(rows: list[dict]) -> str | None:
    """One sentence read from the comparison (the rows of one group): the smallest variant within a
    point of the baseline's F1, and what the next one down costs -- or, where none is smaller, what
    another method at the same size costs. None without a baseline or quantized variants with an F1."""
    from qrun.comparison import smallest_within, within_drop

    found = smallest_within(rows, metric="f1", max_drop=F1_TOLERANCE)
    if found is None or (found["pick"] is None and found["next_smaller"] is None):
        return None
    by_variant = {r["variant"]: r for r in rows}
    base = next(r for r in rows if r["variant"] == BASELINE)
    if found["pick"] is None:
        largest = by_variant[found["next_smaller"]["variant"]]
        return f"Every variant costs more than a point of F1: {largest['variant']} already {_points(largest, base)}."
    pick = by_variant[found["pick"]["variant"]]
    kept = f"{pick['variant']} is the smallest variant within a point of the baseline's F1 " \
           f"({pick['f1']:.3f} vs {base['f1']:.3f}{_size(pick)})"
    if found["next_smaller"] is not None:
        below = by_variant[found["next_smaller"]["variant"]]
        return f"{kept}; the next one down, {below['variant']}{_size(below)}, {_points(below, base)}."
    out = [r for r in rows if r["variant"] != BASELINE and r.get("f1") is not None
           and not within_drop(r, base, "f1", F1_TOLERANCE)]
    return f"{kept}{_none_smaller(pick, out, base)}"


def _none_smaller(pick: dict, out: list[dict], base: dict) -> str:
    """The end of the sentence when no variant is smaller than `pick`: what a variant of the same size
    that is not within costs (round-to-nearest beside GPTQ), else the worst larger one, else none."""
    same_size = [r for r in out if (r.get("bits"), r.get("group_size")) == (pick.get("bits"), pick.get("group_size"))]
    if same_size:
        other = min(same_size, key=lambda r: r["f1"])
        buys = f": that is what {title_of(pick.get('method'))}'s calibration buys" if _calibrated_against(pick, other) \
            else ""
        return f"; {title_of(other.get('method'))} at that size, {other['variant']}, {_points(other, base)}{buys}."
    if out:
        worst = min(out, key=lambda r: r["f1"])
        return f", and the smallest in this sweep; {worst['variant']} {_points(worst, base)}."
    return ", and the smallest in this sweep: no variant here loses more than a point."


def _calibrated_against(pick: dict, other: dict) -> bool:
    """Whether `pick` is of a calibrated method and `other` of one that is not: the gap is calibration's."""
    return all(row.get("method") in METHODS for row in (pick, other)) and \
        METHODS[pick["method"]].calibrated and not METHODS[other["method"]].calibrated


def _size(row: dict) -> str:
    return f", {row['size_pct']:.0f}% of the baseline's size" if row.get("size_pct") is not None else ""


def _points(row: dict, base: dict) -> str:
    cost = (base["f1"] - row["f1"]) * 100
    flips = [row.get("flips_fraud_to_not"), row.get("flips_not_to_fraud")]
    flipped = f", {sum(flips)} answers flipped" if None not in flips and sum(flips) else ""
    return f"costs {max(cost, 0):.1f} points of F1 ({row['f1']:.3f}{flipped})"


def first_line(log: Path) -> str:
    """The demo's first line: what it does, how long it takes, where the libraries' notices go."""
    bits = ", ".join(map(str, DEMO_BITS[:-1])) + f" and {DEMO_BITS[-1]}"
    methods = " and ".join(title_of(m) for m in DEMO_METHODS)
    return (f"qrun demo: trains a tiny model on this machine (once), quantizes it with {methods} at {bits} bits, "
            f"scores every variant against the baseline: about 70 s on 2 idle cores, +80 s the first time "
            f"GPTQModel builds its CPU kernels. Library notices: {log}")


# ---------------------------------------------------------------- the run


def run_demo(open_db: Callable[[], object], say: Callable[[str], None] = print,
             on_tick: Callable | None = None) -> DemoResult:
    """The whole demo: its first line, the model (built once), its jobs (those missing), a run that
    drains the queue, and what to show after it. open_db(): the job table, opened once the model is
    there. on_tick: the run's display (qrun.runs.drain)."""
    from qrun.runs import run_log_path

    log_path = run_log_path()
    say(first_line(log_path))
    with open(log_path, "a", encoding="utf-8", buffering=1) as log, library_notices_to(log):
        return _run_demo(open_db, log, say, on_tick)


def _run_demo(open_db: Callable[[], object], log: TextIO, say: Callable[[str], None], on_tick) -> DemoResult:
    from qrun.db import queue
    from qrun.db.session import qrun_home
    from qrun.demo.build import build_demo
    from qrun.runs import drain

    paths = build_demo(qrun_home())
    request = demo_request(paths.model, paths.eval, paths.calib)
    say(f"qrun demo: model {request.model} (held-out accuracy {paths.info()['eval_accuracy']:.3f} when built)")
    db = open_db()
    _submit_what_is_missing(db, request, say)
    result = DemoResult(request.model)
    if queue.pending_count(db):
        build_cpu_kernels(log, say)
        outcome = drain(db, "qrun demo", ray_notices=log, say=say, on_tick=on_tick)
        result.ok, result.interrupted = not outcome.failed, outcome.interrupted
        if outcome.interrupted:
            return result
    _read_the_comparison(db, result, request.evaluation.data, say)
    return result


def _submit_what_is_missing(db, request, say: Callable[[str], None]) -> None:
    """plan_jobs leaves out jobs already queued, running or done, and plans again an eval that failed."""
    from qrun.db import queue
    from qrun.sweeps import plan_jobs

    specs = plan_jobs(db, request).specs
    if specs:
        ids = queue.submit_jobs(db, specs)
        say(f"qrun demo: submitted job(s) {', '.join(map(str, ids))}")
    else:
        say("qrun demo: every demo job is already queued or done")


def _read_the_comparison(db, result: DemoResult, eval_file: str, say: Callable[[str], None]) -> None:
    """The demo model's comparison, the sentence read from its score group, and the closing lines."""
    from qrun.comparison import comparison_rows, groups
    from qrun.demo.build import DISCLAIMER

    result.rows = comparison_rows(db, model=result.model, data=eval_file, warn=say)
    if result.rows:
        scored = [g for g in groups(result.rows) if g[0].get("mode") == "score"]  # the demo's, not a user's others
        result.sentence = trade_off_sentence(scored[0]) if scored else None
        if result.sentence:
            result.closing.append(f"\nqrun demo: {result.sentence}")
    else:
        result.closing.append("qrun demo: no eval of the demo model succeeded: see `qrun status` and the job logs")
    result.closing.append(f"\n{DISCLAIMER}\nSee `qrun status` for the jobs, `qrun compare --model {result.model}` "
                          "for this table again (--format json/csv/markdown, --plot FILE.png).")
