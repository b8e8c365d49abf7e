"""`qrun submit` and `qrun eval`: parse the options, call the library (qrun.submit, qrun.evaluate), print
what it returns. The options' defaults are the job params' own (qrun.sweeps.SubmitOptions, workers.params)."""

from __future__ import annotations

import click

from qrun.cli.common import print_json, stderr_line
from qrun.cli.table import REQUIRED, Column, output_settings, render
from qrun.db.states import Status
from qrun.sweeps import SubmitOptions
from qrun.workers.params import BASELINE, EVAL_MODES, EvalParams, QuantizeParams


def _after_text(row: dict) -> str:
    if row["after"] is not None:
        return f"#{row['after']}"
    return f"job {row['depends_on']}" if row["depends_on"] is not None else ""


PLAN_COLUMNS = [Column("#", keep=REQUIRED, right=True), Column("KIND", keep=90), Column("VARIANT", keep=REQUIRED),
                Column("PARAMS", keep=50, shrink=20), Column("AFTER", keep=60)]


def print_plan(submission) -> None:
    """The jobs a dry run would add, as a table: #, kind, variant, the params that matter, what it waits for."""
    rows = submission.plan_rows()
    if not rows:
        return
    cells = [[str(row["n"]), row["kind"], row["variant"], job.params_text, _after_text(row)]
             for row, job in zip(rows, submission.planned)]
    click.echo("\n".join(render(PLAN_COLUMNS, cells, output_settings())))


def report_existing(existing: list, rerun_hint: bool = True) -> None:
    """One line per job already in the table that stands for a planned one (qrun.sweeps.ExistingJob), on stderr
    (stdout carries the ids)."""
    for job in existing:
        what = "baseline eval" if job.label == BASELINE else f"{job.kind} {job.label}"
        stderr_line(f"{what} already in job {job.id} ({job.status})"
                    + (": pass --rerun to run it again" if rerun_hint else ""))


def finished_line(row: dict) -> str:
    """`submit --wait`'s line for a finished job."""
    from types import SimpleNamespace

    from qrun.views import short_params

    job = SimpleNamespace(kind=row["kind"], params=row["params"])  # short_params reads a job's attributes
    line = f"job {row['id']} {row['kind']} {short_params(job)} {row['status']}"
    if row.get("elapsed_s") is not None:
        line += f" in {row['elapsed_s']:.1f}s"
    if row["status"] != Status.SUCCEEDED.value and row.get("error"):
        line += f": {row['error'].splitlines()[0][:200]}"
    return line


@click.command()
@click.option("--model", "model", required=True, metavar="DIR", help="Local model directory (safetensors).")
@click.option("--method", multiple=True, default=(SubmitOptions.method,), show_default=True, metavar="NAME",
              help="Quantization method: gptq, awq, rtn (round-to-nearest), fp8, gguf, bnb-nf4; repeat to sweep "
                   "(each takes the --bits that apply to it).")
@click.option("--bits", type=int, multiple=True,
              help="Bits per weight (gptq/rtn: 2, 3, 4, 8; awq: 4; gguf: 4, 5, 6, 8); repeat to sweep. fp8 and bnb-nf4 "
                   "need none.")
@click.option("--gguf-type", multiple=True, metavar="TYPE",
              help="GGUF quant type (q4_0, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, q8_0); repeat to sweep. "
                   "Default: q4_k_m for --bits 4, q8_0 for --bits 8.")
@click.option("--group-size", type=int, multiple=True,
              help="Columns sharing one scale (gptq, awq, rtn): 16, 32, 64, 128, 256, 512 or 1024 (dividing the "
                   "layer widths), or -1 for one group per column; repeat to sweep.  "
                   f"[default: {QuantizeParams.group_size}]")
@click.option("--desc-act/--no-desc-act", default=SubmitOptions.desc_act, show_default=True,
              help="Quantize columns by activation order.")
@click.option("--sym/--no-sym", default=SubmitOptions.sym, show_default=True, help="Symmetric quantization.")
@click.option("--damp", type=float, multiple=True, default=(SubmitOptions.damp,), show_default=True,
              help="Hessian dampening (damp_percent); repeat to sweep.")
@click.option("--calib", type=str, default=SubmitOptions.calib, metavar="FILE",
              help="Calibration data (JSONL/JSON/text). Default: the --eval file, else built-in text.")
@click.option("--calib-samples", type=int, default=SubmitOptions.calib_samples, show_default=True,
              help="Calibration samples to use.")
@click.option("--calib-max-len", type=int, default=SubmitOptions.calib_max_len, show_default=True,
              help="Tokens per calibration sample.")
@click.option("--batch-size", type=int, default=SubmitOptions.batch_size, show_default=True,
              help="Calibration samples per forward pass (16 halved quantize time on an H100, same loss).")
@click.option("--eval", "eval", type=str, default=SubmitOptions.eval, metavar="FILE",
              help="Labeled dialogs: also evaluate each variant and the unquantized baseline.")
@click.option("--eval-mode", type=click.Choice(EVAL_MODES), default=SubmitOptions.eval_mode, show_default=True,
              help="score: compare answer likelihoods (fast, deterministic); generate: greedy decoding.")
@click.option("--answer-template", default=SubmitOptions.answer_template, metavar="TEXT",
              help="The answer to each label of --eval FILE, {label} where the label goes (default: "
                   "'{\"is_fraud\": {label}}' for true/false labels, the label itself for others; docs/TASKS.md).")
@click.option("--eval-ppl", type=str, default=SubmitOptions.eval_ppl, metavar="FILE",
              help="Text for perplexity (with or without --eval).")
@click.option("--max-new-tokens", type=int, default=SubmitOptions.max_new_tokens, show_default=True,
              help="Generate mode: answer length cap.")
@click.option("--eval-batch-size", type=int, default=SubmitOptions.eval_batch_size, show_default=True,
              help="Eval samples per forward pass.")
@click.option("--priority", type=int, default=SubmitOptions.priority, show_default=True, help="Higher runs first.")
@click.option("--max-attempts", type=int, default=SubmitOptions.max_attempts, show_default=True,
              help="Attempts before a job fails for good.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the model (off by default).")
@click.option("--allow-pickle", is_flag=True, help="Accept .bin (pickle) weights, which can run code when loaded.")
@click.option("--gpus-per-job", type=int, default=SubmitOptions.gpus_per_job, show_default=True, metavar="N",
              help="GPUs of one node each job holds, its model spread over them (a model too big for one card).")
@click.option("--name", default=SubmitOptions.name, metavar="NAME",
              help="Name the sweep (`--sweep NAME` then selects its jobs); a name used before adds to that sweep.")
@click.option("--rerun", is_flag=True,
              help="Add jobs even where an equal job is already queued, running or succeeded (else that one is used).")
@click.option("--dry-run", is_flag=True, help="Validate and show the jobs as a table, without adding them.")
@click.option("--wait", "wait_", is_flag=True,
              help="Wait for the sweep's jobs (a `qrun run` must work the queue), one line per finished job; "
                   "exit 1 if one failed.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the new job ids (with --dry-run: the planned jobs) as JSON.")
@click.pass_context
def submit(ctx, wait_, as_json, **options):
    """Add quantize jobs (one per combination of --method, --bits, --group-size, --damp), and with --eval an
    eval job for each plus one for the unquantized baseline: one sweep, with an id of its own.
    A job equal to one already queued, running or succeeded is not added (unless --rerun).
    Prints the new job ids."""
    import qrun

    result = qrun.submit(**options, db=ctx.obj.get("db_url"))
    report_existing(result.existing)
    if result.dry_run:
        print_json(result.plan_rows()) if as_json else print_plan(result)
        if not result.planned:
            stderr_line("nothing to add")
        return
    if as_json:  # JSON readers find the sweep in `qrun status --json`
        print_json(result.ids)
    elif result.ids:
        click.echo("\n".join(map(str, result.ids)))
        named = f" ({result.name})" if result.name else ""
        stderr_line(f"sweep {result.sweep}{named}: added {len(result.ids)} job(s)")
    if not result.ids:
        stderr_line("nothing new to add: every job of this sweep is already in the queue")
    if wait_:
        ctx.exit(wait_for_jobs(ctx, result.all_ids))


def wait_for_jobs(ctx, ids: list[int]) -> int:
    """Wait for `ids`, printing each as it finishes; the exit code: 0 if all succeeded, else 1."""
    import qrun

    rows = qrun.wait(ids, db=ctx.obj.get("db_url"), on_finish=lambda row: click.echo(finished_line(row)),
                     warn=stderr_line)
    return 0 if all(row["status"] == Status.SUCCEEDED.value for row in rows) else 1


@click.command("eval")
@click.option("--model", "model", required=True, metavar="DIR", help="Model or qrun artifact directory.")
@click.option("--data", type=str, default=None, metavar="FILE", help="Labeled dialogs for classification.")
@click.option("--ppl", type=str, default=None, metavar="FILE", help="Text for perplexity.")
@click.option("--mode", type=click.Choice(EVAL_MODES), default=EvalParams.mode, show_default=True,
              help="Classification mode.")
@click.option("--answer-template", default=EvalParams.answer_template, metavar="TEXT",
              help="The answer to each label of --data FILE, {label} where the label goes (docs/TASKS.md).")
@click.option("--max-new-tokens", type=int, default=EvalParams.max_new_tokens, show_default=True,
              help="Generate mode: answer length cap.")
@click.option("--batch-size", type=int, default=EvalParams.batch_size, show_default=True,
              help="Samples per forward pass.")
@click.option("--priority", type=int, default=SubmitOptions.priority, show_default=True, help="Higher runs first.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the model (off by default).")
@click.option("--gpus-per-job", type=int, default=EvalParams.gpus, show_default=True, metavar="N",
              help="GPUs of one node each job holds, its model spread over them (a model too big for one card).")
@click.option("--rerun", is_flag=True,
              help="Add the job even where an equal one is already queued, running or succeeded (else that one is used).")
@click.option("--json", "as_json", is_flag=True, help="Print the job id as JSON.")
@click.pass_context
def eval_command(ctx, as_json, **options):
    """Add an eval job for an existing model or artifact directory. Where an equal eval (same model, data
    and settings) is already queued, running or succeeded, its id is printed and said on stderr instead."""
    import qrun

    job_id = qrun.evaluate(**options, db=ctx.obj.get("db_url"))
    if job_id.existing is not None:
        report_existing([job_id.existing])
    print_json([job_id]) if as_json else click.echo(job_id)


COMMANDS = [submit, eval_command]
