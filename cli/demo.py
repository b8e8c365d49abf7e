"""`qrun demo`: the whole loop on this machine, offline -- build a tiny demo model, queue its 4- and
8-bit GPTQ variants with evals, drain the queue, and print the comparison with the baseline.

Running it again reuses the model and skips variants already queued or done, so a second run only
reprints the comparison (or finishes what an interrupted run left).
"""

from __future__ import annotations

import click

from qrun.cli.common import open_db, stderr_line
from qrun.db.states import Kind

DEMO_BITS = (4, 8)
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


@click.command()
@click.pass_context
def demo(ctx):
    """Show qrun end to end on this machine, offline: train a tiny demo model on synthetic dialogs
    (once; kept under $QRUN_HOME/demo), quantize it to 4 and 8 bits, evaluate every variant and the
    baseline, and print `qrun compare`. The model is a toy, not a fraud detector."""
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

        ok = not drain(db, "qrun demo", note=" (the first GPTQModel use compiles its CPU kernels: a minute or "
                                              "two, once)")
    rows = comparison_rows(db, model=info.path, data=eval_file)
    if rows:
        print_table(rows)
    else:
        stderr_line("qrun demo: no eval of the demo model succeeded: see `qrun status` and the job logs")
    stderr_line(f"\n{DISCLAIMER}\nSee `qrun status` for the jobs, `qrun compare --model {info.path}` for this "
                "table again (--format json/csv/markdown, --plot FILE.png).")
    if not ok:
        ctx.exit(1)


COMMANDS = [demo]
