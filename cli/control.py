"""`qrun cancel` and `qrun retry`: by job id, or every job of a sweep that the command applies to."""

from __future__ import annotations

import click

from qrun.cli.common import parse_job_ids, stderr_line

SWEEP_HELP = "Every {what} job of this sweep (its id, or its --name), instead of job ids."


def _ids_or_sweep(job_ids: tuple[str, ...], sweep: str | None) -> list[int]:
    """The job ids given; none at all is refused before anything is opened."""
    if not job_ids and sweep is None:
        raise click.UsageError("Missing argument 'JOB_IDS...' or option --sweep ID|NAME",
                               ctx=click.get_current_context())
    return parse_job_ids(job_ids)


def _done(verb: str, ids: list[int], sweep: str | None, none_left: str) -> None:
    if ids:
        stderr_line(f"{verb} {', '.join(map(str, ids))}")
    else:
        stderr_line(f"sweep {sweep} has no {none_left} job")


@click.command()
@click.argument("job_ids", nargs=-1)
@click.option("--sweep", default=None, metavar="ID|NAME", help=SWEEP_HELP.format(what="queued or running"))
@click.option("--force", is_flag=True, help="Cancel jobs submitted by another user.")
@click.pass_context
def cancel(ctx, job_ids, sweep, force):
    """Cancel queued or running jobs; a running job stops at its next layer and its output is removed."""
    import qrun

    ids = _ids_or_sweep(job_ids, sweep)
    cancelled = qrun.cancel(ids, sweep=sweep, force=force, db=ctx.obj.get("db_url"))
    _done("cancelled", cancelled, sweep, "queued or running")


@click.command()
@click.argument("job_ids", nargs=-1)
@click.option("--sweep", default=None, metavar="ID|NAME", help=SWEEP_HELP.format(what="failed or cancelled"))
@click.option("--force", is_flag=True, help="Retry jobs submitted by another user.")
@click.pass_context
def retry(ctx, job_ids, sweep, force):
    """Put failed or cancelled jobs back in the queue with fresh attempts."""
    import qrun

    ids = _ids_or_sweep(job_ids, sweep)
    queued = qrun.retry(ids, sweep=sweep, force=force, db=ctx.obj.get("db_url"))
    _done("queued again:", queued, sweep, "failed or cancelled")


COMMANDS = [cancel, retry]
