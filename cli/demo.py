"""`qrun demo`: the whole loop on this machine, offline (qrun/demo_run.py). The terminal shows qrun's
lines only: Ray's, torch's and GPTQModel's notices go to $QRUN_HOME/logs/run-*.log."""

from __future__ import annotations

import click

from qrun.cli.common import stderr_line


@click.command()
@click.pass_context
def demo(ctx):
    """Show qrun end to end on this machine, offline: train a tiny demo model on synthetic dialogs
    (once; kept under $QRUN_HOME/demo), quantize it with GPTQ and round-to-nearest at 8, 4 and 2
    bits, evaluate every variant and the baseline, and print `qrun compare` and what it says. The
    model is a toy, not a fraud detector."""
    import qrun
    from qrun.cli.compare import print_table
    from qrun.cli.run import Display

    display = Display()
    result = qrun.run_demo(db=ctx.obj.get("db_url"), say=display.say, on_tick=display.tick)
    if result.interrupted:
        ctx.exit(130)
    if result.rows:
        print_table(result.rows)
    for line in result.closing:
        stderr_line(line)
    if not result.ok:
        ctx.exit(1)


COMMANDS = [demo]
