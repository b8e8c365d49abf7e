"""`qrun logs`: a job's history (every transition, local time with its offset) and its log, as a
person reads it: progress bars collapsed to their last state (qrun.joblogs), or with `--raw` the file
as written. `--follow` prints the same lines as a later `qrun logs`, as the job goes on.
"""

from __future__ import annotations

import sys

import click

from qrun import api
from qrun.cli.common import parse_job_ids, stderr_line
from qrun.joblogs import check_tail, lines_text


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@click.command()
@click.argument("job_id")
@click.option("--tail", "tail_lines", type=int, default=None,
              help="Only the last N lines of the log (with --follow: of the log so far, then all that follows).")
@click.option("-f", "--follow", "follow_", is_flag=True,
              help="Keep printing as the job goes on; exit when it finishes (1 if it failed or was cancelled).")
@click.option("--raw", is_flag=True, help="The log as written, progress-bar redraws and escape codes included.")
@click.pass_context
def logs(ctx, job_id, tail_lines, follow_, raw):
    """Print a job's history and its log (GPTQModel's output, tracebacks), progress bars collapsed
    to their last state."""
    (jid,) = parse_job_ids((job_id,))
    check_tail(tail_lines)  # refused with --follow too, before the table is opened
    db = ctx.obj.get("db_url")
    if follow_:
        for chunk in api.follow_logs(jid, raw=raw, db=db, tail=tail_lines, warn=stderr_line):
            if isinstance(chunk, int):
                ctx.exit(chunk)
            _write(chunk)
    shown = api.logs(jid, tail=tail_lines, raw=raw, db=db)
    _write(lines_text(shown.history))
    if shown.log is None:
        click.echo(f"# job {jid} has no log yet (it has not started)", err=True)
    elif isinstance(shown.log, bytes):
        sys.stdout.buffer.write(shown.log)
        sys.stdout.flush()
    else:
        _write(lines_text(shown.log))
    _write(lines_text(shown.error))
