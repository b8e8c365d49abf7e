"""`qrun submit` and `qrun eval`: parse the options, call the library (qrun.api, qrun.sweeps), print
what it returns."""

from __future__ import annotations

import click

from qrun.cli.common import open_db, print_json, stderr_line
from qrun.cli.table import REQUIRED, Column, output_settings, render
from qrun.db.errors import BadInput
from qrun.db.states import Kind
from qrun.sweeps import EVAL_MODES, check_file, eval_params, validate_eval_inputs


def _params_that_matter(kind: str, params: dict) -> str:
    """A planned job's settings in a few words: what tells the jobs of a sweep apart."""
    from pathlib import Path

    if kind == Kind.QUANTIZE.value:
        method = params.get("method", "gptq")
        if method != "gptq" and "group_size" not in params:  # fp8, gguf, bnb-nf4
            return f"method={method} " + (f"type={params['gguf_type']}" if "gguf_type" in params else f"bits={params['bits']}")
        text = f"method={method} bits={params['bits']} group={params['group_size']}"
        if "damp_percent" in params:
            text += f" damp={params['damp_percent']:g}"
        text += (" desc_act" if params.get("desc_act") else "") + ("" if params.get("sym", True) else " asym")
        if "calib_samples" in params:
            calib = Path(params["calib"]).name if params.get("calib") else "built-in text"
            text += f" calib={calib}×{params['calib_samples']}"
        return text
    what = [f"data={Path(params['data']).name} ({params.get('mode', 'score')})"] if params.get("data") else []
    what += [f"ppl={Path(params['ppl_data']).name}"] if params.get("ppl_data") else []
    return " ".join(what)


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
    cells = [[str(row["n"]), row["kind"], row["variant"], _params_that_matter(row["kind"], row["params"]),
              _after_text(row)] for row in rows]
    click.echo("\n".join(render(PLAN_COLUMNS, cells, output_settings())))


def report_existing(submission, rerun_hint: bool = True) -> None:
    """One line per job that already has a planned result, on stderr (stdout carries the new ids)."""
    for job in submission.existing:
        what = "baseline eval" if job.label == "baseline" else f"{job.kind} {job.label}"
        stderr_line(f"{what} already in job {job.id} ({job.status})"
                    + (": pass --rerun to run it again" if rerun_hint else ""))


def finished_line(row: dict) -> str:
    """`submit --wait`'s line for a finished job."""
    from types import SimpleNamespace

    from qrun.cli.status import short_params

    job = SimpleNamespace(kind=row["kind"], params=row["params"])  # short_params reads a job's attributes
    line = f"job {row['id']} {row['kind']} {short_params(job)} {row['status']}"
    if row.get("elapsed_s") is not None:
        line += f" in {row['elapsed_s']:.1f}s"
    if row["status"] != "succeeded" and row.get("error"):
        line += f": {row['error'].splitlines()[0][:200]}"
    return line


@click.command()
@click.option("--model", "model_dir", required=True, metavar="DIR", help="Local model directory (safetensors).")
@click.option("--method", multiple=True, default=("gptq",), show_default=True, metavar="NAME",
              help="Quantization method: gptq, awq, rtn (round-to-nearest), fp8, gguf, bnb-nf4; repeat to sweep "
                   "(each takes the --bits that apply to it).")
@click.option("--bits", type=int, multiple=True, help="Bits per weight (gptq/rtn: 2, 3, 4, 8; awq: 4; gguf: 4, 5, 6, 8); "
                                                      "repeat to sweep. fp8 and bnb-nf4 need none.")
@click.option("--gguf-type", multiple=True, metavar="TYPE",
              help="GGUF quant type (q4_0, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, q8_0); repeat to sweep. "
                   "Default: q4_k_m for --bits 4, q8_0 for --bits 8.")
@click.option("--group-size", type=int, multiple=True,
              help="Columns sharing one scale (gptq, awq, rtn): 16, 32, 64, 128, 256, 512 or 1024 (dividing the "
                   "layer widths), or -1 for one group per column; repeat to sweep.  [default: 128]")
@click.option("--desc-act/--no-desc-act", default=False, show_default=True, help="Quantize columns by activation order.")
@click.option("--sym/--no-sym", default=True, show_default=True, help="Symmetric quantization.")
@click.option("--damp", type=float, multiple=True, default=(0.01,), show_default=True,
              help="Hessian dampening (damp_percent); repeat to sweep.")
@click.option("--calib", type=str, default=None, metavar="FILE",
              help="Calibration data (JSONL/JSON/text). Default: the --eval file, else built-in text.")
@click.option("--calib-samples", type=int, default=128, show_default=True, help="Calibration samples to use.")
@click.option("--calib-max-len", type=int, default=1024, show_default=True, help="Tokens per calibration sample.")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Calibration samples per forward pass (16 halved quantize time on an H100, same loss).")
@click.option("--eval", "eval_data", type=str, default=None, metavar="FILE",
              help="Labeled dialogs: also evaluate each variant and the unquantized baseline.")
@click.option("--eval-mode", type=click.Choice(EVAL_MODES), default="score", show_default=True,
              help="score: compare answer likelihoods (fast, deterministic); generate: greedy decoding.")
@click.option("--eval-ppl", type=str, default=None, metavar="FILE", help="Text for perplexity (with or without --eval).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Generate mode: answer length cap.")
@click.option("--eval-batch-size", type=int, default=8, show_default=True, help="Eval samples per forward pass.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--max-attempts", type=int, default=3, show_default=True, help="Attempts before a job fails for good.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the model (off by default).")
@click.option("--allow-pickle", is_flag=True, help="Accept .bin (pickle) weights, which can run code when loaded.")
@click.option("--gpus-per-job", type=int, default=1, show_default=True, metavar="N",
              help="GPUs of one node each job holds, its model spread over them (a model too big for one card).")
@click.option("--name", default=None, metavar="NAME",
              help="Name the sweep (`--sweep NAME` then selects its jobs); a name used before adds to that sweep.")
@click.option("--rerun", is_flag=True,
              help="Add jobs even where an equal job is already queued, running or succeeded (else that one is used).")
@click.option("--dry-run", is_flag=True, help="Validate and show the jobs as a table, without adding them.")
@click.option("--wait", "wait_", is_flag=True,
              help="Wait for the sweep's jobs (a `qrun run` must work the queue), one line per finished job; "
                   "exit 1 if one failed.")
@click.option("--json", "as_json", is_flag=True, help="Print the new job ids (with --dry-run: the planned jobs) as JSON.")
@click.pass_context
def submit(ctx, model_dir, method, bits, gguf_type, group_size, desc_act, sym, damp, calib, calib_samples, calib_max_len, batch_size,
           eval_data, eval_mode, eval_ppl, max_new_tokens, eval_batch_size, priority, max_attempts,
           trust_remote_code, allow_pickle, gpus_per_job, name, rerun, dry_run, wait_, as_json):
    """Add quantize jobs (one per combination of --method, --bits, --group-size, --damp), and with --eval an
    eval job for each plus one for the unquantized baseline: one sweep, with an id of its own.
    A job equal to one already queued, running or succeeded is not added (unless --rerun).
    Prints the new job ids."""
    import qrun

    result = qrun.submit(
        model_dir, list(bits), method=list(method), gguf_type=list(gguf_type), group_size=list(group_size), desc_act=desc_act, sym=sym, damp=list(damp),
        calib=calib, calib_samples=calib_samples, calib_max_len=calib_max_len, batch_size=batch_size,
        eval=eval_data, eval_mode=eval_mode, eval_ppl=eval_ppl, max_new_tokens=max_new_tokens,
        eval_batch_size=eval_batch_size, priority=priority, max_attempts=max_attempts,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, name=name, rerun=rerun,
        dry_run=dry_run, gpus_per_job=gpus_per_job, db=ctx.obj.get("db_url"))
    report_existing(result)
    if dry_run:
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

    rows = qrun.wait(ids, db=ctx.obj.get("db_url"), on_finish=lambda row: click.echo(finished_line(row)))
    return 0 if all(row["status"] == "succeeded" for row in rows) else 1


@click.command("eval")
@click.option("--model", "model_dir", required=True, metavar="DIR", help="Model or qrun artifact directory.")
@click.option("--data", type=str, default=None, metavar="FILE", help="Labeled dialogs for classification.")
@click.option("--ppl", type=str, default=None, metavar="FILE", help="Text for perplexity.")
@click.option("--mode", type=click.Choice(EVAL_MODES), default="score", show_default=True, help="Classification mode.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Generate mode: answer length cap.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Samples per forward pass.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the model (off by default).")
@click.option("--gpus-per-job", type=int, default=1, show_default=True, metavar="N",
              help="GPUs of one node each job holds, its model spread over them (a model too big for one card).")
@click.option("--json", "as_json", is_flag=True, help="Print the job id as JSON.")
@click.pass_context
def eval_command(ctx, model_dir, data, ppl, mode, max_new_tokens, batch_size, priority, trust_remote_code,
                 gpus_per_job, as_json):
    """Add an eval job for an existing model or artifact directory."""
    from qrun.db.queue import JobSpec, submit_jobs
    from qrun.workers.inputs import check_gpus_per_job, check_priority, gpus_param, inspect_model, quantized_variant

    if not data and not ppl:
        raise BadInput("qrun eval needs --data FILE (classification) or --ppl FILE (perplexity), or both")
    info = inspect_model(model_dir, trust_remote_code=trust_remote_code, allow_pickle=None, allow_gguf=True)
    data = check_file(data, "eval file")
    ppl = check_file(ppl, "perplexity file")
    validate_eval_inputs(data, ppl, max_new_tokens, batch_size, batch_option="batch_size")
    check_priority(priority)
    check_gpus_per_job(gpus_per_job)
    variant = quantized_variant(info.path)
    params = eval_params(data, mode, max_new_tokens, ppl, batch_size, variant, trust_remote_code) | gpus_param(gpus_per_job)
    ids = submit_jobs(open_db(ctx), [JobSpec(kind=Kind.EVAL, model=info.path, params=params, priority=priority)])
    print_json(ids) if as_json else click.echo(ids[0])


COMMANDS = [submit, eval_command]
