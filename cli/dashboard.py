"""`qrun dashboard`: the queue, workers, sweeps, comparisons and jobs as a read-only web page, served by
the web layer (qrun.web) from this machine."""

from __future__ import annotations

import click

from qrun.cli.common import stderr_line


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 shows the pages to every machine that reaches this one.")
@click.option("--port", default="8470", show_default=True, metavar="N", help="TCP port to listen on.")
@click.pass_context
def dashboard(ctx, host, port):
    """Serve a read-only web dashboard of the job table: the queue (live), workers and GPUs, sweeps, each
    comparison with its size/quality chart, and each job's history, metrics and log. Its JSON under
    /api/ is that of `status --json`, `compare --format json` and `workers --json`."""
    from qrun.web.server import serve  # starlette and uvicorn load only for this command

    serve(host, port, db=ctx.obj.get("db_url"), say=stderr_line)


COMMANDS = [dashboard]
