"""`qrun status`: what the queue holds, for a team: who submitted what, on which model, how far it is.

By default the active jobs (queued, running) and those finished in the last hour, as squeue shows a
cluster; `--all` for the whole history, filters as sacct has them. The table fits the terminal
(cli/table.py); `--json` is the stable, documented form for scripts (README, "status --json").
`qrun logs` lives in cli/logs.py.
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click

from qrun.cli.common import open_db, parse_job_ids, print_json
from qrun.cli.logs import logs
from qrun.cli.table import REQUIRED, Column, Output, output_settings, render, shorten, split_columns
from qrun.db.errors import BadInput
from qrun.db.queue import utcnow
from qrun.db.states import Status, progress_unit

ACTIVE = (Status.QUEUED.value, Status.RUNNING.value)
DEFAULT_WINDOW = timedelta(hours=1)  # finished jobs shown without --all / --since
# Metrics that count things: stored as floats like every metric, given to scripts as integers.
COUNT_METRICS = frozenset({"bits", "group_size", "calib_samples", "calib_tokens", "model_size_bytes",
                           "eval_samples", "eval_over_context", "ppl_tokens", "tp", "fp", "tn", "fn", "invalid"})


# ---------------------------------------------------------------- one job, as text


def short_params(job) -> str:
    from qrun.workers.methods import label

    p = job.params or {}
    if job.kind == "quantize":
        text = label(p)
        return text if p.get("damp_percent", 0.01) == 0.01 else f"{text} damp={p['damp_percent']}"
    target = p.get("variant", "?")
    what = [p.get("mode", "score")] if p.get("data") else []
    what += ["ppl"] if p.get("ppl_data") else []
    return f"{target} {'+'.join(what)}"


def model_name(job) -> str:
    """The model directory's name: the part of the path that tells models apart."""
    return job.model.rstrip("/").rsplit("/", 1)[-1] if job.model else ""


def elapsed_s(job, now: datetime | None = None) -> float | None:
    if job.started_at is None:
        return None
    end = job.finished_at or ((now or utcnow()) if job.status == "running" else job.started_at)
    return (end - job.started_at).total_seconds()


def progress_text(job) -> str:
    """`layer 12/28` and the module being quantized: changes only when the job moves on (`qrun run`'s
    line-per-change output relies on that)."""
    if not job.progress_total:
        return ""
    text = f"{progress_unit(job.kind)} {job.progress_done}/{job.progress_total}"
    return f"{text} {job.progress_module}" if job.progress_module and job.status == "running" else text


def eta_s(job, now: datetime | None = None) -> float | None:
    """Seconds left at the rate measured so far (elapsed since start / units done); None before the first."""
    elapsed = elapsed_s(job, now)
    if job.status != "running" or not job.progress_done or not job.progress_total or elapsed is None:
        return None
    return max(job.progress_total - job.progress_done, 0) * elapsed / job.progress_done


def clock(seconds: float) -> str:
    """0:31, 12:04, 1:02:03."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_cell(job, now: datetime | None = None, preparing: tuple[str, str] | None = None) -> str:
    """`layer 12/28 · 43% · ETA 0:31` while running; `layer 28/28` once finished; `after 12` while waiting;
    `preparing on gpu0: GPTQModel kernel gptq_cuda` while a worker readies it (see preparing_now)."""
    if preparing is not None:
        return f"preparing on {preparing[0]}: {preparing[1]}"
    if job.status == "queued":
        waits = [f"after {job.depends_on}"] if job.depends_on else []
        needs = needs_text(job.params or {})
        return " · ".join(waits + [needs] if needs else waits)
    if not job.progress_total:
        return ""
    text = f"{progress_unit(job.kind)} {job.progress_done}/{job.progress_total}"
    if job.status != "running":
        return text
    text += f" · {100 * job.progress_done // job.progress_total}%"
    eta = eta_s(job, now)
    return text + (f" · ETA {clock(eta)}" if eta is not None else "")


def preparing_now(db, jobs) -> dict[int, tuple[str, str]]:
    """The jobs of `jobs`, active and before their first layer, that a live worker readies (a kernel
    build takes minutes on a fresh machine, and the job would look stuck): job id -> (worker slot,
    what it does). The one place that decides it: the views show what is here, as it is."""
    from qrun.cli.workers import LOST_AFTER_S
    from qrun.db.queue import jobs_being_prepared

    waiting = {j.id for j in jobs if j.status in ACTIVE and not j.progress_done}
    if not waiting:
        return {}
    readied = jobs_being_prepared(db, utcnow() - timedelta(seconds=LOST_AFTER_S))
    return {job_id: what for job_id, what in readied.items() if job_id in waiting}


def needs_text(params: dict) -> str:
    """What a queued job waits for beyond its turn: `needs a GPU`, `needs a GPU, cc ≥ 8.9` (its method),
    `needs 2 GPUs of one node` (--gpus-per-job); '' for a job any worker can take."""
    cc = params.get("min_compute_capability")
    if (params.get("gpus") or 1) > 1:
        return f"needs {params['gpus']} GPUs of one node" + (f", cc ≥ {cc:g}" if cc else "")
    if params.get("needs_gpu"):
        return "needs a GPU" + (f", cc ≥ {cc:g}" if cc else "")
    return ""


def _fmt_elapsed(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    return clock(seconds)


def first_line(text: str | None) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""


COLUMNS = (
    Column("ID", keep=REQUIRED, right=True),
    Column("USER", keep=50),
    Column("MODEL", keep=60, shrink=12),
    Column("KIND", keep=10),
    Column("PARAMS", keep=REQUIRED),
    Column("STATUS", keep=REQUIRED),
    Column("PROGRESS", keep=80),
    Column("GPU", keep=20),
    Column("ELAPSED", keep=40, right=True),
    Column("SWEEP", keep=5, wide=True),
    Column("PRIO", keep=5, right=True, wide=True),
    Column("SUBMITTED", keep=5, wide=True),
    Column("ERROR", keep=90, shrink=16, cap=100),
)
STATUS_COLOR = {"running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "yellow"}
_STATUS_COLUMN = [c.name for c in COLUMNS].index("STATUS")


def job_cells(job, now: datetime | None = None, preparing: dict[int, tuple[str, str]] | None = None) -> list[str]:
    """One job's row of the status table, as plain text, in COLUMNS' order."""
    return [str(job.id), job.submitted_by or "", model_name(job), job.kind, short_params(job), job.status,
            progress_cell(job, now, (preparing or {}).get(job.id)), job.gpu or ("cpu" if job.worker else ""),
            _fmt_elapsed(elapsed_s(job, now)),
            _sweep_of(job), str(job.priority), _local_stamp(job.created_at), first_line(job.error)]


@lru_cache(maxsize=256)
def _offset_at(hour: datetime) -> timedelta:
    return hour.replace(tzinfo=timezone.utc).astimezone().utcoffset()


def _local_stamp(utc: datetime | None) -> str:
    """local_time, fast over 10,000 rows: the local offset is looked up once per hour of the day."""
    if utc is None:
        return ""
    offset = _offset_at(utc.replace(minute=0, second=0, microsecond=0))
    minutes = int(offset.total_seconds()) // 60
    sign, minutes = ("+" if minutes >= 0 else "-"), abs(minutes)
    return f"{(utc + offset):%Y-%m-%dT%H:%M:%S}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _sweep_of(job) -> str:
    """The sweep's name, else its id (jobs of a table from before sweeps have neither)."""
    return getattr(job, "sweep_name", None) or getattr(job, "sweep", None) or ""


def table_lines(jobs, out: Output, *, wide: bool = False, columns: list[str] | None = None,
                now: datetime | None = None, header: bool = True,
                preparing: dict[int, tuple[str, str]] | None = None) -> list[str]:
    """The table's lines; `preparing`: preparing_now's answer, for the jobs being readied."""
    now = now or utcnow()

    def style(row: int, column: int) -> str | None:
        return STATUS_COLOR.get(jobs[row].status) if column == _STATUS_COLUMN else None

    return render(COLUMNS, [job_cells(j, now, preparing) for j in jobs], out, wide=wide, names=columns,
                  style=style, header=header)


def plain_table(jobs, color: bool = False) -> str:
    """The table, whole (no width limit): kept for callers that print one."""
    return "\n".join(table_lines(jobs, Output(width=None, color=color)))


def jobs_table(jobs, width: int | None = None, preparing: dict[int, tuple[str, str]] | None = None):
    """The table fitted to the terminal, as a rich renderable, for `qrun run`'s live view."""
    import shutil

    from rich.text import Text

    out = Output(width=width or shutil.get_terminal_size().columns, color=True)
    return Text.from_ansi("\n".join(table_lines(jobs, out, preparing=preparing)))


# ---------------------------------------------------------------- JSON (the documented schema)


def _number(name: str, value: float):
    if name in COUNT_METRICS and math.isfinite(value) and value.is_integer():
        return int(value)
    return value if math.isfinite(value) else None  # JSON has no Infinity (perplexity can overflow)


def job_row(job, metrics: dict | None = None, artifacts: list | None = None,
            preparing: tuple[str, str] | None = None) -> dict:
    """One job for `status --json`. Keys are stable: new ones are only ever added (README lists them).
    `preparing`: preparing_now's entry for this job, if any."""
    return {
        "id": job.id, "kind": job.kind, "status": job.status, "model": job.model, "model_name": model_name(job),
        "params": job.params, "label": short_params(job), "sweep": getattr(job, "sweep", None),
        "sweep_name": getattr(job, "sweep_name", None),
        "depends_on": job.depends_on, "priority": job.priority, "attempts": job.attempts,
        "max_attempts": job.max_attempts, "worker": job.worker, "gpu": job.gpu,
        "progress": {"done": job.progress_done, "total": job.progress_total, "module": job.progress_module,
                     "unit": progress_unit(job.kind),
                     "percent": 100 * job.progress_done // job.progress_total if job.progress_total else None,
                     "eta_s": eta_s(job)},
        "preparing": {"worker": preparing[0], "doing": preparing[1]} if preparing is not None else None,
        "submitted_by": job.submitted_by, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "elapsed_s": elapsed_s(job), "error": job.error,
        "log": job.log_path, "metrics": {k: _number(k, v) for k, v in (metrics or {}).items()},
        "artifacts": [{"kind": a.kind, "path": a.path, "bytes": a.bytes, "sha256": a.sha256, "node": a.node}
                      for a in (artifacts or [])],
    }


def job_rows(db, jobs) -> list[dict]:
    """`status --json` (and qrun.status()): job_row for each of `jobs`, with what it needs from the table."""
    from qrun.db import queue

    ids = [j.id for j in jobs]
    metrics, artifacts = queue.metrics_of(db, ids), queue.artifacts_of(db, ids)
    preparing = preparing_now(db, jobs)
    return [job_row(j, metrics[j.id], artifacts[j.id], preparing.get(j.id)) for j in jobs]


# ---------------------------------------------------------------- which jobs


@dataclass
class JobFilter:
    """What `qrun status` shows. Job ids name jobs whatever their state or age."""

    ids: list[int] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    states: set[str] = field(default_factory=set)
    models: list[str] = field(default_factory=list)
    sweeps: set[str] = field(default_factory=set)
    since: datetime | None = None  # naive UTC: jobs not finished before it
    limit: int | None = None

    def matches(self, job) -> bool:
        return ((not self.users or job.submitted_by in self.users)
                and (not self.states or job.status in self.states)
                and (not self.models or any(_same_model(m, job.model) for m in self.models))
                and (not self.sweeps or bool({getattr(job, "sweep", None), getattr(job, "sweep_name", None)}
                                             & self.sweeps))
                and (self.since is None or job.status in ACTIVE or (job.finished_at or job.created_at) >= self.since))


def _same_model(given: str, stored: str | None) -> bool:
    """--model names the directory (any path to it) or just its name."""
    if not stored:
        return False
    return given == Path(stored).name or str(Path(given).expanduser().resolve()) == stored


def select_jobs(db, flt: JobFilter) -> list:
    """The jobs the filter selects, by id; with a limit, the newest that many."""
    from qrun.db import queue

    jobs = [j for j in queue.list_jobs(db, flt.ids or None, plain=True) if flt.matches(j)]
    return jobs[-flt.limit:] if flt.limit else jobs


_SPAN = re.compile(r"^(\d+)\s*([smhdw])$")
_SPAN_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None, option: str = "--since") -> datetime:
    """`--since 2h`, `30m`, `1d`, `1w`, or an ISO date/time (local unless it names an offset); naive UTC."""
    span = _SPAN.match(text.strip().lower())
    try:
        if span:
            return (now or utcnow()) - timedelta(**{_SPAN_UNITS[span[2]]: int(span[1])})
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadInput(f"{option} {text!r}: give a span like 2h, 30m, 1d or an ISO time like "
                       "2026-11-25T14:00") from None
    except OverflowError:  # 99999999999d: further back than datetime reaches
        raise BadInput(f"{option} {text!r} reaches before the year 1: give a shorter span") from None
    try:
        if when.tzinfo is None:
            when = when.astimezone()  # a time without an offset is the user's local time
        return when.astimezone(timezone.utc).replace(tzinfo=None)
    except (OverflowError, ValueError):  # 0001-01-01 in a zone east of UTC falls into the year 0
        raise BadInput(f"{option} {text!r} is too close to the year 1: give a later time") from None


def build_filter(job_ids, users, mine, states, models, sweeps, since, show_all, limit) -> JobFilter:
    from qrun.db.queue import current_user

    if limit is not None and limit <= 0:
        raise BadInput(f"--limit {limit} must be positive")
    ids = parse_job_ids(job_ids)
    flt = JobFilter(ids=ids, users=set(users) | ({current_user()} if mine else set()), states=set(states),
                    models=list(models), sweeps=set(sweeps), limit=limit)
    if since:
        flt.since = parse_since(since)
    elif not show_all and not ids:
        flt.since = utcnow() - DEFAULT_WINDOW
    return flt


# ---------------------------------------------------------------- --watch


def _finished(jobs) -> bool:
    return all(j.status not in ACTIVE for j in jobs)


def visible(jobs, rows: int) -> list:
    """At most `rows` jobs for a screen: the active ones first, then the latest finished; in id order."""
    if len(jobs) <= rows:
        return jobs
    active = [j for j in jobs if j.status in ACTIVE][-rows:]
    done = [j for j in jobs if j.status not in ACTIVE]
    rest = done[len(done) - (rows - len(active)):] if rows > len(active) else []
    return sorted(active + rest, key=lambda j: j.id)


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
    def state(job, preparing: dict) -> tuple:
        return job.status, job.progress_done, job.progress_total, job.gpu, job.error, preparing.get(job.id)

    def draw(self, jobs, wide, columns, preparing: dict) -> None:
        from qrun.cli.common import local_time

        changed = [j for j in jobs if self.seen.get(j.id) != self.state(j, preparing)]
        if not changed:
            return
        if self.seen:
            click.echo(f"-- {local_time(utcnow())}")
        click.echo("\n".join(table_lines(changed, self.out, wide=wide, columns=columns, preparing=preparing)))
        sys.stdout.flush()
        self.seen.update({j.id: self.state(j, preparing) for j in changed})


def watch_jobs(db, flt: JobFilter, out: Output, wide: bool, columns, interval_s: float = 2.0) -> None:
    """Redraw every interval until every shown job has finished (or Ctrl-C)."""
    import shutil

    in_place = out.color  # a terminal without NO_COLOR: cursor movement is allowed
    frame = TerminalFrame(sys.stdout) if in_place else ChangedRows(out)
    while True:
        jobs = select_jobs(db, flt)
        preparing = preparing_now(db, jobs)
        if in_place:
            height = shutil.get_terminal_size().lines - 2
            shown = visible(jobs, max(height - 1, 1))
            lines = table_lines(shown, out, wide=wide, columns=columns, preparing=preparing)
            if len(shown) < len(jobs):
                lines.append(shorten(f"… {len(jobs) - len(shown)} more (qrun status --all without --watch)",
                                     out.width or 80))
            frame.draw(lines)
        else:
            frame.draw(jobs, wide, columns, preparing)
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
    parameters, status, progress (layer i/N, %, ETA), GPU, elapsed time and error."""
    flt = build_filter(job_ids, users, mine, states, models, sweeps, since, show_all, limit)
    names = split_columns(columns)
    out = output_settings()
    if wide:
        out = Output(width=None, color=out.color)  # everything, whole: the terminal may scroll sideways
    if names:
        render(COLUMNS, [], out, names=names)  # an unknown column is bad input before the table is opened
    db = open_db(ctx, create=watch)  # --watch may wait for the first submit to a new home
    if as_json:
        print_json(job_rows(db, select_jobs(db, flt)))
        return
    if watch:
        watch_jobs(db, flt, out, wide, names)
        return
    jobs = select_jobs(db, flt)
    if jobs:
        click.echo("\n".join(table_lines(jobs, out, wide=wide, columns=names, preparing=preparing_now(db, jobs))))
    elif flt.since is not None and not since and not flt.ids:
        click.echo("No active jobs, and none finished in the last hour: `qrun status --all` shows every job.",
                   err=True)
    else:
        click.echo("No jobs match. Add some with `qrun submit --model DIR --bits 4`.", err=True)


COMMANDS = [status, logs]
