"""`qrun workers`: the workers of every `qrun run` on this job table, as they last reported."""

from __future__ import annotations

from datetime import timedelta

import click

from qrun.cli.common import open_db, print_json

# A worker reports at least every 10 s (runner.worker.WORKER_REPORT_S); three missed reports and
# it is taken for lost (its process or node died without a word).
LOST_AFTER_S = 30.0
COLUMNS = ("WORKER", "NODE", "DEVICE", "STATE", "LAST SEEN", "JOBS DONE")


def worker_state(row, now) -> str:
    if row.stopped_at is not None:
        return "stopped"
    if (now - row.heartbeat_at).total_seconds() > LOST_AFTER_S:
        return "lost"
    if row.current_job:
        return f"running job {row.current_job}"
    return row.activity or "idle"


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds}s ago"
    if seconds < 5400:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def worker_rows(db, show_all: bool) -> list[dict]:
    from qrun.db.queue import list_workers, utcnow

    now = utcnow()
    rows = list_workers(db, None if show_all else now - timedelta(days=1))
    return [{"name": w.name, "node": w.node, "slot": w.slot, "device": w.device, "gpu": w.gpu,
             "state": worker_state(w, now), "current_job": w.current_job, "activity": w.activity,
             "jobs_done": w.jobs_done,
             "started_at": w.started_at, "heartbeat_at": w.heartbeat_at,
             "last_seen_s": (now - w.heartbeat_at).total_seconds()}
            for w in rows if show_all or w.stopped_at is None or (now - w.stopped_at).total_seconds() < 3600]


@click.command("workers")
@click.option("--all", "show_all", is_flag=True, help="Every worker ever recorded (default: the last day's, "
              "less those that stopped over an hour ago).")
@click.option("--json", "as_json", is_flag=True, help="Print the workers as JSON.")
@click.pass_context
def workers(ctx, show_all, as_json):
    """The workers of every `qrun run` on this job table: node, device, current job, last heartbeat,
    jobs done. A worker that stopped reporting for 30 s shows as lost."""
    rows = worker_rows(open_db(ctx, create=False), show_all)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no workers have reported: start some with `qrun run`", err=True)
        return
    table = [list(COLUMNS)] + [[r["slot"], r["node"], r["gpu"] and f"gpu {r['gpu']}" or r["device"], r["state"],
                                _ago(r["last_seen_s"]), str(r["jobs_done"])] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


COMMANDS = [workers]
