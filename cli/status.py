"""`qrun status`: what the queue holds, for a team: who submitted what, on which model, how far it is.

By default the active jobs (queued, running) and those finished in the last hour, as squeue shows a
cluster; `--all` for the whole history, filters as sacct has them. The table fits the terminal
(cli/table.py); `--json` is the stable, documented form for scripts (README, "status --json").
The rows and texts come from qrun.views; `qrun logs` lives in cli/logs.py.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime

import click

from qrun import api
from qrun.cli.common import open_db, parse_job_ids, print_json
from qrun.cli.logs import logs
from qrun.cli.table import REQUIRED, Column, Output, output_settings, render, shorten, split_columns
from qrun.db.states import Status
from qrun.views import (ACTIVE, JobFilter, check_limit, eval_variants, job_cells, job_filter, local_time,
                        nothing_matched, preparing_now, select_jobs, utcnow, visible)


# ---------------------------------------------------------------- the table


# The status table; job_cells gives a job's cells in this order. On a narrow screen the columns with the
# lowest `keep` go first: KIND, GPU, ELAPSED and MODEL (PARAMS names the variant, `eval …` an eval), then
# ERROR; ID, USER, PARAMS, STATUS and REASON/PROGRESS stay, cut if they must.
COLUMNS = (
    Column("ID", keep=REQUIRED, right=True),
    Column("USER", keep=90, shrink=8, whole=True),
    Column("MODEL", keep=40, shrink=12),
    Column("KIND", keep=10),
    Column("PARAMS", keep=REQUIRED),
    Column("STATUS", keep=REQUIRED),
    Column("REASON", keep=85, shrink=12, whole=True),
    Column("PROGRESS", keep=80, shrink=12, whole=True),
    Column("GPU", keep=20),
    Column("ELAPSED", keep=30, right=True),
    Column("SWEEP", keep=5, wide=True),
    Column("PRIO", keep=5, right=True, wide=True),
    Column("SUBMITTED", keep=5, wide=True),
    Column("ERROR", keep=60, shrink=16, cap=100),
)
STATUS_COLOR = {Status.RUNNING.value: "cyan", Status.SUCCEEDED.value: "green", Status.FAILED.value: "red",
                Status.CANCELLED.value: "yellow"}
_STATUS_COLUMN = [c.name for c in COLUMNS].index("STATUS")


def table_lines(jobs, out: Output, *, wide: bool = False, columns: list[str] | None = None,
                now: datetime | None = None, header: bool = True,
                preparing: dict[int, tuple[str, str]] | None = None, waiting: dict | None = None,
                variants: dict[int, str] | None = None) -> list[str]:
    """The table's lines; `preparing`: preparing_now's answer, for the jobs being readied; `waiting`:
    qrun.waiting.waiting_now's, for the REASON of queued jobs; `variants`: eval_variants'."""
    now = now or utcnow()

    def style(row: int, column: int) -> str | None:
        return STATUS_COLOR.get(jobs[row].status) if column == _STATUS_COLUMN else None

    return render(COLUMNS, [job_cells(j, now, preparing, waiting, variants) for j in jobs], out, wide=wide,
                  names=columns, style=style, header=header)


def table_notes(db, jobs) -> dict:
    """What the table reads beside the jobs: table_lines' preparing, waiting and variants."""
    from qrun.waiting import waiting_now

    preparing = preparing_now(db, jobs)
    return {"preparing": preparing, "waiting": waiting_now(db, jobs, preparing), "variants": eval_variants(db, jobs)}


def jobs_table(jobs, width: int | None = None, preparing: dict[int, tuple[str, str]] | None = None):
    """The table fitted to the terminal, as a rich renderable, for `qrun run`'s live view."""
    import shutil

    from rich.text import Text

    out = Output(width=width or shutil.get_terminal_size().columns, color=True)
    return Text.from_ansi("\n".join(table_lines(jobs, out, preparing=preparing)))


# ---------------------------------------------------------------- --watch


def _finished(jobs) -> bool:
    return all(j.status not in ACTIVE for j in jobs)


class TerminalFrame:
    """A table redrawn in place on a terminal: only the lines that changed are rewritten."""

    def __init__(self, stream):
        self.stream = stream
        self.lines: list[str] = []

    def draw(self, lines: list[str]) -> None:
        out = [f"\x1b[{len(self.lines)}F"] if self.lines else []  # to the frame's first line
        for n, line in enumerate(lines):
            if n < len(self.lines) and self.lines[n] == line:
                out.append("\x1b[1E")  # unchanged: step over it
            else:
                out.append("\x1b[2K" + line + "\n")
        if len(lines) < len(self.lines):
            out.append("\x1b[J")  # the frame shrank: clear what it left below
        self.stream.write("".join(out))
        self.stream.flush()
        self.lines = lines


class ChangedRows:
    """Piped or NO_COLOR --watch: the first table whole, then only the rows whose state changed
    (elapsed time and ETA alone do not count), under a header with the local time."""

    def __init__(self, out: Output):
        self.out = out
        self.seen: dict[int, tuple] = {}

    @staticmethod
    def state(job, notes: dict) -> tuple:
        """What counts as a change: not the place in line (it moves with every claim), but the reason."""
        waiting = notes["waiting"].get(job.id)
        return (job.status, job.progress_done, job.progress_total, job.gpu, job.error, notes["preparing"].get(job.id),
                waiting.reason if waiting is not None else None)

    def draw(self, jobs, wide, columns, notes: dict) -> None:
        changed = [j for j in jobs if self.seen.get(j.id) != self.state(j, notes)]
        if not changed:
            return
        if self.seen:
            click.echo(f"-- {local_time(utcnow())}")
        click.echo("\n".join(table_lines(changed, self.out, wide=wide, columns=columns, **notes)))
        sys.stdout.flush()
        self.seen.update({j.id: self.state(j, notes) for j in changed})


def watch_jobs(db, flt: JobFilter, out: Output, wide: bool, columns, interval_s: float = 2.0) -> None:
    """Redraw every interval until every shown job has finished (or Ctrl-C)."""
    import shutil

    in_place = out.color  # a terminal without NO_COLOR: cursor movement is allowed
    frame = TerminalFrame(sys.stdout) if in_place else ChangedRows(out)
    while True:
        jobs = select_jobs(db, flt)
        notes = table_notes(db, jobs)
        if in_place:
            height = shutil.get_terminal_size().lines - 2
            shown = visible(jobs, max(height - 1, 1))
            lines = table_lines(shown, out, wide=wide, columns=columns, **notes)
            if len(shown) < len(jobs):
                lines.append(shorten(f"… {len(jobs) - len(shown)} more (qrun status --all without --watch)",
                                     out.width or 80))
            frame.draw(lines)
        else:
            frame.draw(jobs, wide, columns, notes)
        if _finished(jobs):
            return
        time.sleep(interval_s)


# ---------------------------------------------------------------- the command


@click.command()
@click.argument("job_ids", nargs=-1)
@click.option("--all", "show_all", is_flag=True, help="The whole history, not only active jobs and the last hour's.")
@click.option("--user", "users", multiple=True, metavar="U", help="Only jobs submitted by U (repeatable).")
@click.option("--mine", is_flag=True, help="Only your jobs.")
@click.option("--state", "states", multiple=True, type=click.Choice([s.value for s in Status]),
              help="Only jobs in this state (repeatable).")
@click.option("--model", "models", multiple=True, metavar="M", help="Only jobs on this model (directory or its name).")
@click.option("--sweep", "sweeps", multiple=True, metavar="S", help="Only the jobs of this sweep (id or name).")
@click.option("--since", metavar="2h|1d|ISO", help="Jobs active at any time since then (default 1h; --all: ever).")
@click.option("--limit", type=int, metavar="N", help="Only the newest N of the jobs selected.")
@click.option("--wide", is_flag=True, help="Every column, whole, however wide the terminal.")
@click.option("--columns", "columns", metavar="a,b,c", help="These columns, in this order (id,user,model,...).")
@click.option("--watch", is_flag=True, help="Refresh every 2 s until the jobs shown finish.")
@click.option("--json", "as_json", is_flag=True, help="A JSON array with metrics and artifacts (schema: README).")
@click.pass_context
def status(ctx, job_ids, show_all, users, mine, states, models, sweeps, since, limit, wide, columns, watch,
           as_json):
    """Show the queue: active jobs and those finished in the last hour, with their user, model,
    parameters, status, why a queued job waits and its place in line (#3), progress (layer i/N, %,
    ETA), GPU, elapsed time and error."""
    check_limit(limit)  # bad input is reported in this order: --limit, job ids, --since, --columns
    ids = parse_job_ids(job_ids)
    filters = dict(users=users, mine=mine, states=states, models=models, sweeps=sweeps, since=since,
                   show_all=show_all, limit=limit)
    flt = job_filter(ids, **filters)
    names = split_columns(columns)
    out = output_settings()
    if wide:
        out = Output(width=None, color=out.color)  # everything, whole: the terminal may scroll sideways
    if names:
        render(COLUMNS, [], out, names=names)  # an unknown column is bad input before the table is opened
    db = open_db(ctx, create=False)  # it only looks: a place without a qrun table is named, not made
    if as_json:
        print_json(api.status(ids, db=db, **filters))
        return
    if watch:
        watch_jobs(db, flt, out, wide, names)
        return
    jobs = select_jobs(db, flt)
    if jobs:
        click.echo("\n".join(table_lines(jobs, out, wide=wide, columns=names, **table_notes(db, jobs))))
    else:
        click.echo(nothing_matched(db, flt), err=True)


COMMANDS = [status, logs]
