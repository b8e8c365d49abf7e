"""`qrun export JOB DIR`: a quantize job's artifact, with its model card, copied to DIR and checked."""

from __future__ import annotations

import click

from qrun.cli.common import parse_job_ids, print_json, stderr_line


@click.command()
@click.argument("job")
@click.argument("target", metavar="DIR", type=click.Path(file_okay=True, dir_okay=True, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="What was copied, as JSON.")
@click.pass_context
def export(ctx, job, target, as_json):
    """Copy quantize job JOB's artifact (weights, config, tokenizer, model card) to the new or empty
    directory DIR, checking each file's sha256 against the job table and the artifact's manifest as it
    is read. DIR appears whole or not at all; a missing or changed file is refused (exit 2)."""
    import qrun

    (job_id,) = parse_job_ids((job,))
    result = qrun.export(job_id, target, db=ctx.obj.get("db_url"))
    if as_json:
        print_json(result)
        return
    stderr_line(f"exported job {result['job']}: {result['files']} files, {result['bytes']} bytes, sha256 checked")
    click.echo(result["target"])


COMMANDS = [export]
