"""`qrun cancel` and `qrun retry`."""

from __future__ import annotations

import click

from qrun.cli.common import open_db, parse_job_ids


@click.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Cancel jobs submitted by another user.")
@click.pass_context
def cancel(ctx, job_ids, force):
    """Cancel queued or running jobs; a running job stops at its next layer and its output is removed."""
    from qrun.db import queue

    ids = parse_job_ids(job_ids)
    queue.cancel_jobs(open_db(ctx), ids, force=force)
    click.echo(f"cancelled {', '.join(map(str, ids))}", err=True)


@click.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.pass_context
def retry(ctx, job_ids):
    """Put failed or cancelled jobs back in the queue with fresh attempts."""
    from qrun.db import queue

    ids = parse_job_ids(job_ids)
    queue.retry_jobs(open_db(ctx), ids)
    click.echo(f"queued {', '.join(map(str, ids))} again", err=True)


COMMANDS = [cancel, retry]
