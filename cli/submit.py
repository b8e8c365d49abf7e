"""`qrun submit` and `qrun eval`: validate everything, then add jobs to the table in one transaction."""

from __future__ import annotations

import itertools

import click

from qrun.cli.common import open_db, print_json
from qrun.db.errors import BadInput
from qrun.db.states import Kind

EVAL_MODES = ("score", "generate")


def _check_file(path: str | None, what: str) -> str | None:
    """The absolute path of an optional input file, checked now so that no job gets a missing one."""
    from qrun.workers.datasets import require_file

    return None if path is None else str(require_file(path, what).resolve())


def eval_params(data: str | None, mode: str, max_new_tokens: int, ppl: str | None, batch_size: int,
                variant: str, trust_remote_code: bool) -> dict:
    return {"data": data, "mode": mode, "max_new_tokens": max_new_tokens, "ppl_data": ppl,
            "batch_size": batch_size, "variant": variant, "trust_remote_code": trust_remote_code}


def validate_eval_inputs(data: str | None, ppl: str | None, max_new_tokens: int, batch_size: int,
                         batch_option: str = "eval_batch_size") -> None:
    """Every eval input, checked by the library functions that the job itself reads them with.
    batch_option: the batch size's option as this command spells it (underscores for dashes)."""
    from qrun.workers.datasets import check_eval_file, check_perplexity_file
    from qrun.workers.inputs import check_job_counts

    if data:
        check_eval_file(data)
    if ppl:
        check_perplexity_file(ppl)
    check_job_counts(max_new_tokens=max_new_tokens, **{batch_option: batch_size})


def build_specs(model: str, sweep: list[dict], priority: int, max_attempts: int, eval_args: dict | None,
                db) -> list:
    """Quantize specs (one per sweep point), each followed by its eval; plus the baseline eval once."""
    from qrun.db.queue import JobSpec, find_equivalent_job

    specs: list[JobSpec] = []
    if eval_args is not None:
        baseline = eval_params(variant="baseline", **eval_args)
        if find_equivalent_job(db, Kind.EVAL, model, baseline) is None:
            specs.append(JobSpec(kind=Kind.EVAL, model=model, params=baseline, priority=priority,
                                 max_attempts=max_attempts))
    for params in sweep:
        specs.append(JobSpec(kind=Kind.QUANTIZE, model=model, params=params, priority=priority,
                             max_attempts=max_attempts))
        if eval_args is not None:
            from qrun.workers.quantize import QuantizeParams

            label = QuantizeParams.from_dict(params).label()
            specs.append(JobSpec(kind=Kind.EVAL, model=model, after=len(specs) - 1, priority=priority,
                                 max_attempts=max_attempts,
                                 params=eval_params(variant=label, **eval_args) | {"from_upstream": True}))
    return specs


@click.command()
@click.option("--model", "model_dir", required=True, metavar="DIR", help="Local model directory (safetensors).")
@click.option("--bits", type=int, multiple=True, required=True, help="Bits per weight (2, 3, 4, 8); repeat to sweep.")
@click.option("--group-size", type=int, multiple=True, default=(128,), show_default=True,
              help="Columns sharing one scale: 16, 32, 64, 128, 256, 512 or 1024 (dividing the layer widths), "
                   "or -1 for one group per column; repeat to sweep.")
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
@click.option("--dry-run", is_flag=True, help="Validate and show the jobs without adding them.")
@click.option("--json", "as_json", is_flag=True, help="Print the job ids as JSON.")
@click.pass_context
def submit(ctx, model_dir, bits, group_size, desc_act, sym, damp, calib, calib_samples, calib_max_len, batch_size,
           eval_data, eval_mode, eval_ppl, max_new_tokens, eval_batch_size, priority, max_attempts,
           trust_remote_code, allow_pickle, dry_run, as_json):
    """Add quantize jobs (one per combination of --bits, --group-size, --damp), and with --eval an
    eval job for each plus one for the unquantized baseline. Prints the new job ids."""
    from qrun.workers.datasets import check_calibration_file
    from qrun.workers.inputs import (check_calibration_settings, check_job_counts, check_priority, check_quantizable,
                                     check_quantize_settings, inspect_model)

    info = inspect_model(model_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    check_quantizable(info)
    for b, g, d in itertools.product(bits, group_size, damp):
        check_quantize_settings(info, b, g, d)
    check_calibration_settings(calib_samples, calib_max_len)
    check_job_counts(batch_size=batch_size, max_attempts=max_attempts)
    check_priority(priority)
    calib = _check_file(calib, "calibration file")
    eval_data = _check_file(eval_data, "eval file")
    eval_ppl = _check_file(eval_ppl, "perplexity file")
    if calib:
        check_calibration_file(calib, min_samples=min(calib_samples, 4))
    validate_eval_inputs(eval_data, eval_ppl, max_new_tokens, eval_batch_size)
    sweep = [
        {"bits": b, "group_size": g, "desc_act": desc_act, "sym": sym, "damp_percent": d,
         "calib": calib or eval_data, "calib_samples": calib_samples, "calib_max_len": calib_max_len,
         "batch_size": batch_size, "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
        for b, g, d in dict.fromkeys(itertools.product(bits, group_size, damp))
    ]
    eval_args = None
    if eval_data or eval_ppl:
        eval_args = dict(data=eval_data, mode=eval_mode, max_new_tokens=max_new_tokens, ppl=eval_ppl,
                         batch_size=eval_batch_size, trust_remote_code=trust_remote_code)
    db = open_db(ctx)
    specs = build_specs(info.path, sweep, priority, max_attempts, eval_args, db)
    if dry_run:
        rows = [{"kind": s.kind.value, "model": s.model, "params": s.params} for s in specs]
        print_json(rows) if as_json else [click.echo(f"would add {r['kind']} {r['params']}") for r in rows]
        return
    from qrun.db.queue import submit_jobs

    ids = submit_jobs(db, specs)
    if as_json:
        print_json(ids)
    else:
        click.echo("\n".join(map(str, ids)))


@click.command("eval")
@click.option("--model", "model_dir", required=True, metavar="DIR", help="Model or qrun artifact directory.")
@click.option("--data", type=str, default=None, metavar="FILE", help="Labeled dialogs for classification.")
@click.option("--ppl", type=str, default=None, metavar="FILE", help="Text for perplexity.")
@click.option("--mode", type=click.Choice(EVAL_MODES), default="score", show_default=True, help="Classification mode.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Generate mode: answer length cap.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Samples per forward pass.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the model (off by default).")
@click.option("--json", "as_json", is_flag=True, help="Print the job id as JSON.")
@click.pass_context
def eval_command(ctx, model_dir, data, ppl, mode, max_new_tokens, batch_size, priority, trust_remote_code, as_json):
    """Add an eval job for an existing model or artifact directory."""
    from qrun.db.queue import JobSpec, submit_jobs
    from qrun.workers.inputs import check_priority, inspect_model, read_quantize_config

    if not data and not ppl:
        raise BadInput("qrun eval needs --data FILE (classification) or --ppl FILE (perplexity), or both")
    info = inspect_model(model_dir, trust_remote_code=trust_remote_code)
    data = _check_file(data, "eval file")
    ppl = _check_file(ppl, "perplexity file")
    validate_eval_inputs(data, ppl, max_new_tokens, batch_size, batch_option="batch_size")
    check_priority(priority)
    variant = "baseline"
    quant_config = read_quantize_config(info.path)
    if quant_config is not None:
        from qrun.workers.quantize import QuantizeParams

        variant = QuantizeParams.from_dict(quant_config).label()
    params = eval_params(data, mode, max_new_tokens, ppl, batch_size, variant, trust_remote_code)
    ids = submit_jobs(open_db(ctx), [JobSpec(kind=Kind.EVAL, model=info.path, params=params, priority=priority)])
    print_json(ids) if as_json else click.echo(ids[0])


COMMANDS = [submit, eval_command]
