"""`qrun status` and `qrun logs`: what the queue holds, and what one job printed."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from qrun.cli.common import open_db, parse_job_ids, print_json
from qrun.db.queue import utcnow
from qrun.db.states import progress_unit

SHORT_PARAMS = ("variant", "bits", "group_size", "desc_act", "sym", "damp_percent", "mode")


def short_params(job) -> str:
    p = job.params or {}
    if job.kind == "quantize":
        from qrun.workers.quantize import QuantizeParams

        text = QuantizeParams.from_dict(p).label()
        return text if p.get("damp_percent", 0.01) == 0.01 else f"{text} damp={p['damp_percent']}"
    target = p.get("variant", "?")
    what = [p.get("mode", "score")] if p.get("data") else []
    what += ["ppl"] if p.get("ppl_data") else []
    return f"{target} {'+'.join(what)}"


def elapsed_s(job) -> float | None:
    if job.started_at is None:
        return None
    end = job.finished_at or (utcnow() if job.status == "running" else job.started_at)
    return (end - job.started_at).total_seconds()


def progress_text(job) -> str:
    if not job.progress_total:
        return ""
    text = f"{progress_unit(job.kind)} {job.progress_done}/{job.progress_total}"
    return f"{text} {job.progress_module}" if job.progress_module and job.status == "running" else text


def job_row(job, metrics: dict | None = None, artifacts: list | None = None) -> dict:
    return {
        "id": job.id, "kind": job.kind, "status": job.status, "model": job.model, "params": job.params,
        "depends_on": job.depends_on, "priority": job.priority, "attempts": job.attempts,
        "max_attempts": job.max_attempts, "worker": job.worker, "gpu": job.gpu,
        "progress": {"done": job.progress_done, "total": job.progress_total, "module": job.progress_module},
        "submitted_by": job.submitted_by, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "elapsed_s": elapsed_s(job), "error": job.error,
        "log": job.log_path, "metrics": metrics or {},
        "artifacts": [{"kind": a.kind, "path": a.path, "bytes": a.bytes, "sha256": a.sha256, "node": a.node}
                      for a in (artifacts or [])],
    }


def _fmt_elapsed(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


STATUS_STYLE = {"queued": "dim", "running": "bold cyan", "succeeded": "green", "failed": "bold red",
                "cancelled": "yellow"}
STATUS_COLOR = {"running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "yellow"}


COLUMNS = ("ID", "KIND", "PARAMS", "STATUS", "PROGRESS", "GPU", "ELAPSED", "ERROR")


def job_cells(job) -> list[str]:
    """One job's row of the status table, as plain text (STATUS is the fourth cell)."""
    error = (job.error or "").splitlines()[0][:80] if job.error else ""
    after = f" (after {job.depends_on})" if job.depends_on and job.status == "queued" else ""
    return [str(job.id), job.kind, short_params(job), f"{job.status}{after}", progress_text(job),
            job.gpu or ("cpu" if job.worker else ""), _fmt_elapsed(elapsed_s(job)), error]


def jobs_table(jobs):
    """A rich table, for the live views (`status --watch`, `run` on a terminal)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for job in jobs:
        cells = [escape(c) for c in job_cells(job)]
        cells[3] = f"[{STATUS_STYLE.get(job.status, '')}]{cells[3]}[/]"
        table.add_row(*cells)
    return table


def plain_table(jobs, color: bool = False) -> str:
    """The same table as padded text: rich takes seconds to lay out thousands of rows, this milliseconds."""
    rows = [list(COLUMNS)] + [job_cells(job) for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        if color and n:
            cells[3] = click.style(cells[3], fg=STATUS_COLOR.get(jobs[n - 1].status))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def load_rows(db, ids):
    from qrun.db import queue

    jobs = queue.list_jobs(db, ids or None)
    ids_ = [j.id for j in jobs]
    return jobs, queue.metrics_of(db, ids_), queue.artifacts_of(db, ids_)


@click.command()
@click.argument("job_ids", nargs=-1)
@click.option("--watch", is_flag=True, help="Refresh every 2 s until the listed (or all) jobs finish.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array with metrics and artifacts.")
@click.pass_context
def status(ctx, job_ids, watch, as_json):
    """Show the queue: id, kind, parameters, status, progress (layer i/N), GPU, elapsed, error."""
    from rich.console import Console

    ids = parse_job_ids(job_ids)
    db = open_db(ctx)
    if as_json:
        jobs, metrics, arts = load_rows(db, ids)
        print_json([job_row(j, metrics[j.id], arts[j.id]) for j in jobs])
        return
    if not watch:
        from qrun.db import queue

        jobs = queue.list_jobs(db, ids or None, plain=True)
        if jobs:
            click.echo(plain_table(jobs, color=sys.stdout.isatty()))
        else:
            click.echo("No jobs. Add some with `qrun submit --model DIR --bits 4`.", err=True)
        return
    from rich.live import Live

    with Live(console=Console(), auto_refresh=False) as live:
        while True:
            jobs, _, _ = load_rows(db, ids)
            live.update(jobs_table(jobs), refresh=True)
            if all(j.status in ("succeeded", "failed", "cancelled") for j in jobs):
                break
            time.sleep(2)


@click.command()
@click.argument("job_id")
@click.option("--tail", "tail_lines", type=int, default=None, help="Only the last N lines.")
@click.pass_context
def logs(ctx, job_id, tail_lines):
    """Print a job's history and its log (GPTQModel's output, tracebacks)."""
    from qrun.db import queue

    (jid,) = parse_job_ids((job_id,))
    db = open_db(ctx)
    job = queue.get_job(db, jid)
    for ev in queue.events_of(db, jid):
        click.echo(f"# {ev.at:%Y-%m-%d %H:%M:%S} {ev.transition}: {ev.from_status or '-'} -> {ev.to_status}"
                   + (f" ({ev.detail})" if ev.detail else ""))
    if not job.log_path or not Path(job.log_path).exists():
        click.echo(f"# job {jid} has no log yet (it has not started)", err=True)
        return
    lines = Path(job.log_path).read_text(errors="replace").splitlines()
    click.echo("\n".join(lines[-tail_lines:] if tail_lines else lines))


COMMANDS = [status, logs]
