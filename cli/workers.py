"""`qrun workers`: the workers of every `qrun run` on this job table, as they last reported."""

from __future__ import annotations

import click

from qrun import api
from qrun.cli.common import print_json

COLUMNS = ("WORKER", "NODE", "DEVICE", "STATE", "LAST SEEN", "JOBS DONE")


def _ago(seconds: float) -> str:
    """How long ago, in the unit a person reads at a glance: 42s ago, 12m ago, 3h ago."""
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds}s ago"
    if seconds < 5400:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _worker_cell(row: dict, rows: list[dict]) -> str:
    """The worker's slot, and its process id where another row shows the same slot of the same node
    (two runs on one machine each have a cpu0)."""
    twins = sum(r["slot"] == row["slot"] and r["node"] == row["node"] for r in rows)
    return row["slot"] if twins == 1 else f"{row['slot']} (pid {row['name'].split(':')[1]})"


@click.command("workers")
@click.option("--all", "show_all", is_flag=True, help="Every worker ever recorded (default: the last day's, "
              "less those that stopped over an hour ago).")
@click.option("--json", "as_json", is_flag=True, help="Print the workers as JSON.")
@click.pass_context
def workers(ctx, show_all, as_json):
    """The workers of every `qrun run` on this job table: node, device, current job, last heartbeat,
    jobs done. A worker that stopped reporting for 30 s shows as lost."""
    rows = api.worker_status(all=show_all, db=ctx.obj.get("db_url"))
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no workers have reported: start some with `qrun run`", err=True)
        return
    table = [list(COLUMNS)] + [[_worker_cell(r, rows), r["node"], r["gpu"] and f"gpu {r['gpu']}" or r["device"],
                                r["state"], _ago(r["last_seen_s"]), str(r["jobs_done"])] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


COMMANDS = [workers]
