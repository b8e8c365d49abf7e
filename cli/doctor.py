"""`qrun doctor`: check the job table's file (SQLite's integrity check) or reach its server."""

from __future__ import annotations

import click

from qrun.cli.common import stderr_line


@click.command()
@click.pass_context
def doctor(ctx):
    """Check the job table: SQLite's integrity check of its file, read-only (also of a file qrun
    cannot open any more), or a connection to its server. Prints what is damaged and exits 2 when
    something is: restore the table from a backup then."""
    import qrun

    where, found = qrun.doctor(db=ctx.obj.get("db_url"))
    if not found:
        stderr_line(f"job table {where}: ok")
        return
    for line in found:
        click.echo(line)
    stderr_line(f"Error: job table {where} is damaged ({len(found)} finding(s) above): restore it from a backup")
    ctx.exit(2)


COMMANDS = [doctor]
