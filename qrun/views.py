"""What the queue looks like to a person or a script: the texts of a job (its parameters, an eval's
variant as compare names it, why it waits, progress, ETA), the rows of `qrun status --json` and `qrun
workers --json`, which jobs a view selects, and what to say when it selects none.

The CLI lays these texts out in tables (cli/table.py); `qrun.status()` and `qrun.worker_status()`
return the rows. Times of the job table are naive UTC; `local_time` shows them to people, `iso_utc`
to scripts. Why a queued job waits is qrun/waiting.py's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

from qrun.db.errors import BadInput
from qrun.db.queue import utcnow
from qrun.db.states import Kind, Status, progress_unit

ACTIVE = (Status.QUEUED.value, Status.RUNNING.value)
DEFAULT_WINDOW = timedelta(hours=1)  # finished jobs shown without --all / --since
# Metrics that count things: stored as floats like every metric, given to scripts as integers.
COUNT_METRICS = frozenset({"bits", "group_size", "calib_samples", "calib_tokens", "model_size_bytes",
                           "eval_samples", "eval_over_context", "ppl_tokens", "tp", "fp", "tn", "fn", "invalid"})
# A worker reports at least every 10 s (runner.worker.WORKER_REPORT_S); three missed reports and
# it is taken for lost (its process or node died without a word).
LOST_AFTER_S = 30.0
MIN_UNITS_FOR_ETA = 2  # layers (or batches) done before an ETA is shown: the first one includes the load


# ---------------------------------------------------------------- times


def local_time(utc: datetime | None) -> str:
    """A time of the job table (naive UTC) as local ISO 8601 with its offset: 2026-11-25T14:02:11+01:00."""
    if utc is None:
        return ""
    return utc.replace(tzinfo=timezone.utc).astimezone().isoformat(timespec="seconds")


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


def clock(seconds: float) -> str:
    """0:31, 12:04, 1:02:03."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _fmt_elapsed(seconds: float | None) -> str:
    """Seconds with a decimal under a minute (a fast eval), else a clock."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    return clock(seconds)


# ---------------------------------------------------------------- one job, as text


def short_params(job) -> str:
    """The job's variant in a few words: `w4g128` for a quantize job, `w4g128 score+ppl` for an eval."""
    from qrun.workers.params import params_of

    return params_of(job.kind, job.params or {}).status_label()


def model_name(job) -> str:
    """The model directory's name: the part of the path that tells models apart."""
    return job.model.rstrip("/").rsplit("/", 1)[-1] if job.model else ""


def elapsed_s(job, now: datetime | None = None) -> float | None:
    """Seconds the job has run (until now while running); None before it started."""
    if job.started_at is None:
        return None
    running = job.status == Status.RUNNING.value
    end = job.finished_at or ((now or utcnow()) if running else job.started_at)
    return (end - job.started_at).total_seconds()


def progress_text(job) -> str:
    """`layer 12/28` and the module being quantized: changes only when the job moves on (`qrun run`'s
    line-per-change output relies on that)."""
    if not job.progress_total:
        return ""
    text = f"{progress_unit(job.kind)} {job.progress_done}/{job.progress_total}"
    running = job.status == Status.RUNNING.value
    return f"{text} {job.progress_module}" if job.progress_module and running else text


def eta_s(job, now: datetime | None = None) -> float | None:
    """Seconds left at the rate measured so far (elapsed since start / units done). None until a rate can
    be measured: the first unit's time is mostly loading the model, so not before MIN_UNITS_FOR_ETA are
    done; nor once all are (what is left, saving, has no rate), nor for a job that is not running."""
    elapsed = elapsed_s(job, now)
    if (job.status != Status.RUNNING.value or elapsed is None or not job.progress_total
            or not MIN_UNITS_FOR_ETA <= job.progress_done < job.progress_total):
        return None
    return (job.progress_total - job.progress_done) * elapsed / job.progress_done


def progress_cell(job, now: datetime | None = None, preparing: tuple[str, str] | None = None) -> str:
    """`layer 12/28 · 43% · ETA 0:31` while running; `layer 28/28` once finished; nothing while queued
    (the REASON column says why: reason_cell); `preparing on gpu0: GPTQModel kernel gptq_cuda` while a
    worker readies it (see preparing_now)."""
    if preparing is not None:
        return f"preparing on {preparing[0]}: {preparing[1]}"
    if job.status == Status.QUEUED.value or not job.progress_total:
        return ""
    text = f"{progress_unit(job.kind)} {job.progress_done}/{job.progress_total}"
    if job.status != Status.RUNNING.value:
        return text
    text += f" · {100 * job.progress_done // job.progress_total}%"
    eta = eta_s(job, now)
    return text + (f" · ETA {clock(eta)}" if eta is not None else "")


def preparing_now(db, jobs) -> dict[int, tuple[str, str]]:
    """The jobs of `jobs`, active and before their first layer, that a live worker readies (a kernel
    build takes minutes on a fresh machine, and the job would look stuck): job id -> (worker slot,
    what it does). The one place that decides it: the views show what is here, as it is."""
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


def reason_cell(job, waiting=None, preparing: tuple[str, str] | None = None) -> str:
    """Why a queued job waits: `#3 · other users' turn` (waiting: qrun.waiting.waiting_now's entry). Without
    it (a view that does not read the line), what the job itself says: `after 12 · needs 2 GPUs of one
    node`, or what a worker readies for it. Nothing for a job that is not queued."""
    if job.status != Status.QUEUED.value:
        return ""
    if waiting is not None:
        return waiting.text()
    if preparing is not None:
        return f"preparing on {preparing[0]}: {preparing[1]}"
    waits = [f"after job {job.depends_on}"] if job.depends_on else []
    needs = needs_text(job.params or {})
    return " · ".join(waits + [needs] if needs else waits)


def params_cell(job, variants: dict[int, str] | None = None) -> str:
    """The PARAMS column: short_params for a quantize job; for an eval, `eval ` and the variant it
    evaluates as `qrun compare` names it (eval_variants: `eval w4g128·d0.05 score`), so that an eval
    reads apart from its quantize job and from the evals of its sweep's other variants."""
    if job.kind != Kind.EVAL.value:
        return short_params(job)
    from dataclasses import replace

    from qrun.workers.params import EvalParams

    params = EvalParams.from_dict(job.params or {})
    return "eval " + replace(params, variant=(variants or {}).get(job.id) or params.variant).status_label().strip()


def _eval_group(model: str, params: dict) -> tuple:
    """The comparison an eval belongs to, as `qrun compare` groups them: source model, data, mode."""
    return model, params.get("data"), params.get("mode", "score") if params.get("data") else None


def eval_variants(db, jobs) -> dict[int, str]:
    """The variant each eval job of `jobs` that follows a quantize job evaluates, named as `qrun compare`
    names it: the quantize job's label among the variants of the same method that the evals of its
    comparison (source model, data, mode) evaluate (`w4g128·d0.05` beside `w4g128·d0.01`)."""
    from qrun.db import queue
    from qrun.variants import variant_label

    evals = [j for j in jobs if j.kind == Kind.EVAL.value and j.depends_on]
    if not evals:
        return {}
    rows = queue.evals_of_variants(db, {j.model for j in evals})
    variants: dict[tuple, list[dict]] = {}
    for row in rows:
        variants.setdefault(_eval_group(row.model, row.params or {}), []).append(row.upstream_params or {})
    upstream_of = {row.id: row.upstream_params or {} for row in rows}
    found = {}
    for job in evals:
        if job.id in upstream_of:
            mine = upstream_of[job.id]
            among = [p for p in variants[_eval_group(job.model, job.params or {})]
                     if p.get("method") == mine.get("method")]
            found[job.id] = variant_label(mine, among)
    return found


def first_line(text: str | None) -> str:
    """The first line of a (multi-line) error, for a one-line cell."""
    return text.strip().splitlines()[0] if text and text.strip() else ""


def _sweep_of(job) -> str:
    """The sweep's name, else its id (jobs of a table from before sweeps have neither)."""
    return getattr(job, "sweep_name", None) or getattr(job, "sweep", None) or ""


def job_cells(job, now: datetime | None = None, preparing: dict[int, tuple[str, str]] | None = None,
              waiting: dict | None = None, variants: dict[int, str] | None = None) -> list[str]:
    """One job's row of the status table, as plain text, in the order of its columns: ID USER MODEL KIND
    PARAMS STATUS REASON PROGRESS GPU ELAPSED SWEEP PRIO SUBMITTED ERROR. `preparing`: preparing_now's
    answer; `waiting`: qrun.waiting.waiting_now's; `variants`: eval_variants'."""
    readied = (preparing or {}).get(job.id)
    queued = job.status == Status.QUEUED.value
    return [str(job.id), job.submitted_by or "", model_name(job), job.kind, params_cell(job, variants), job.status,
            reason_cell(job, (waiting or {}).get(job.id), readied),
            progress_cell(job, now, None if queued else readied), job.gpu or ("cpu" if job.worker else ""),
            _fmt_elapsed(elapsed_s(job, now)),
            _sweep_of(job), str(job.priority), _local_stamp(job.created_at), first_line(job.error)]


# ---------------------------------------------------------------- JSON (the documented schema)


def _number(name: str, value: float):
    if name in COUNT_METRICS and math.isfinite(value) and value.is_integer():
        return int(value)
    return value if math.isfinite(value) else None  # JSON has no Infinity (perplexity can overflow)


def iso_utc(utc: datetime | None) -> str | None:
    """A time of the job table as JSON gives it: ISO 8601 in UTC with the Z designator."""
    return None if utc is None else utc.isoformat() + "Z"


def job_row(job, metrics: dict | None = None, artifacts: list | None = None,
            preparing: tuple[str, str] | None = None, waiting=None, variant: str | None = None) -> dict:
    """One job for `status --json`, as JSON gives it (times as ISO strings): `qrun.status()` returns
    these very dicts. Keys are stable: new ones are only ever added (docs/OUTPUT.md lists them).
    `preparing`: preparing_now's entry for this job; `waiting`: qrun.waiting.waiting_now's; `variant`:
    eval_variants'; each if any."""
    return {
        "id": job.id, "kind": job.kind, "status": job.status, "model": job.model, "model_name": model_name(job),
        "params": job.params, "label": params_cell(job, {job.id: variant} if variant else None),
        "sweep": getattr(job, "sweep", None),
        "sweep_name": getattr(job, "sweep_name", None),
        "depends_on": job.depends_on, "priority": job.priority, "attempts": job.attempts,
        "max_attempts": job.max_attempts, "worker": job.worker, "gpu": job.gpu,
        "progress": {"done": job.progress_done, "total": job.progress_total, "module": job.progress_module,
                     "unit": progress_unit(job.kind),
                     "percent": 100 * job.progress_done // job.progress_total if job.progress_total else None,
                     "eta_s": eta_s(job)},
        "preparing": {"worker": preparing[0], "doing": preparing[1]} if preparing is not None else None,
        "reason": waiting.reason if waiting is not None else None,
        "position": waiting.position if waiting is not None else None,
        "submitted_by": job.submitted_by, "created_at": iso_utc(job.created_at),
        "started_at": iso_utc(job.started_at), "finished_at": iso_utc(job.finished_at),
        "elapsed_s": elapsed_s(job), "error": job.error,
        "log": job.log_path, "metrics": {k: _number(k, v) for k, v in (metrics or {}).items()},
        "artifacts": [{"kind": a.kind, "path": a.path, "bytes": a.bytes, "sha256": a.sha256, "node": a.node}
                      for a in (artifacts or [])],
    }


def job_rows(db, jobs, explain: bool = True) -> list[dict]:
    """`status --json` (and qrun.status()): job_row for each of `jobs`, with what it needs from the table.
    explain=False: without the queued jobs' reason and position (the line costs a read of the queue)."""
    from qrun.db import queue
    from qrun.waiting import waiting_now

    ids = [j.id for j in jobs]
    metrics, artifacts = queue.metrics_of(db, ids), queue.artifacts_of(db, ids)
    preparing = preparing_now(db, jobs)
    waiting = waiting_now(db, jobs, preparing) if explain else {}
    variants = eval_variants(db, jobs)
    return [job_row(j, metrics[j.id], artifacts[j.id], preparing.get(j.id), waiting.get(j.id), variants.get(j.id))
            for j in jobs]


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
    since_given: str | None = None  # --since as given (None: the default window, or none)
    members: set[int] = field(default_factory=set)  # the jobs of `sweeps`, reused ones too (select_jobs)

    def matches(self, job) -> bool:
        """Whether the job passes every filter (ids and limit aside)."""
        return ((not self.users or job.submitted_by in self.users)
                and (not self.states or job.status in self.states)
                and (not self.models or any(_same_model(m, job.model) for m in self.models))
                and (not self.sweeps or job.id in self.members
                     or bool({getattr(job, "sweep", None), getattr(job, "sweep_name", None)} & self.sweeps))
                and (self.since is None or job.status in ACTIVE or (job.finished_at or job.created_at) >= self.since))

    def apply(self, jobs: list) -> list:
        """Those of `jobs` (in id order) that match; with a limit, the newest that many."""
        chosen = [j for j in jobs if self.matches(j)]
        return chosen[-self.limit:] if self.limit else chosen


def _same_model(given: str, stored: str | None) -> bool:
    """--model names the directory (any path to it) or just its name."""
    if not stored:
        return False
    return given == Path(stored).name or str(Path(given).expanduser().resolve()) == stored


def select_jobs(db, flt: JobFilter) -> list:
    """The jobs the filter selects, by id; with a limit, the newest that many."""
    from qrun.db import queue

    if flt.sweeps:  # a sweep's jobs include the equal ones its submit used instead of adding them again
        flt.members = set(queue.sweep_members(db, flt.sweeps))
    return flt.apply(queue.list_jobs(db, flt.ids or None, plain=True))


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


def check_limit(limit: int | None) -> None:
    """--limit N: BadInput unless N is positive."""
    if limit is not None and limit <= 0:
        raise BadInput(f"--limit {limit} must be positive")


def _check_states(states: Iterable[str]) -> None:
    known = [s.value for s in Status]
    for state in states:
        if state not in known:
            raise BadInput(f"--state {state!r} is not one of {', '.join(known)}")


def filter_values(given: str | Iterable[str] | None) -> list[str]:
    """A filter's values: one given as a plain string is one value, not its characters."""
    if given is None:
        return []
    return [given] if isinstance(given, str) else list(given)


def job_filter(ids: Iterable[int] = (), *, users: str | Iterable[str] = (), mine: bool = False,
               states: str | Iterable[str] = (), models: str | Iterable[str] = (), sweeps: str | Iterable[str] = (),
               since: str | None = None, show_all: bool = True, limit: int | None = None) -> JobFilter:
    """The filter `qrun status`'s options describe (see qrun.status); each of users, states, models and
    sweeps one value or several. BadInput for a limit, state or --since that can never work. Without
    show_all, since or ids: active jobs and the last hour's."""
    from qrun.db.queue import current_user

    check_limit(limit)
    states = filter_values(states)
    _check_states(states)
    ids = list(ids)
    flt = JobFilter(ids=ids, users=set(filter_values(users)) | ({current_user()} if mine else set()),
                    states=set(states), models=filter_values(models), sweeps=set(filter_values(sweeps)), limit=limit)
    if since:
        flt.since = parse_since(since)
        flt.since_given = since
    elif not show_all and not ids:
        flt.since = utcnow() - DEFAULT_WINDOW
    return flt


def _filters_given(flt: JobFilter) -> list[tuple[str, JobFilter]]:
    """Each filter given, as its option reads and as a filter of its own."""
    given = [(f"--user {','.join(sorted(flt.users))}", JobFilter(users=flt.users)) if flt.users else None,
             (f"--state {','.join(sorted(flt.states))}", JobFilter(states=flt.states)) if flt.states else None,
             (f"--model {','.join(flt.models)}", JobFilter(models=flt.models)) if flt.models else None,
             (f"--sweep {','.join(sorted(flt.sweeps))}", JobFilter(sweeps=flt.sweeps, members=flt.members))
             if flt.sweeps else None,
             (f"--since {flt.since_given}", JobFilter(since=flt.since)) if flt.since_given else None]
    return [g for g in given if g is not None]


def nothing_matched(db, flt: JobFilter) -> str:
    """What `qrun status` says when its filters select no job: which filter matched nothing (each one
    alone first, then the last hour that the view shows by default), else that they match nothing together."""
    from qrun.db import queue

    jobs = queue.list_jobs(db, flt.ids or None, plain=True)
    if not jobs:
        return "No jobs yet. Add some with `qrun submit --model DIR --bits 4`."
    given = _filters_given(flt)
    for text, alone in given:
        if not any(alone.matches(j) for j in jobs):
            return f"No job matches {text}."
    default_window = flt.since is not None and not flt.since_given
    if default_window and not any(JobFilter(since=flt.since).matches(j) for j in jobs):
        return "No active jobs, and none finished in the last hour: `qrun status --all` shows every job."
    together = " ".join(text for text, _ in given)
    if not together:
        return "No jobs match."
    if default_window:
        return (f"No job matches {together} among the active jobs and those finished in the last hour: "
                "add --all for older ones.")
    return f"No job matches {together} together."


def visible(jobs, rows: int) -> list:
    """At most `rows` jobs for a screen: the active ones first, then the latest finished; in id order."""
    if len(jobs) <= rows:
        return jobs
    active = [j for j in jobs if j.status in ACTIVE][-rows:]
    done = [j for j in jobs if j.status not in ACTIVE]
    rest = done[len(done) - (rows - len(active)):] if rows > len(active) else []
    return sorted(active + rest, key=lambda j: j.id)


# ---------------------------------------------------------------- workers (the Ray actors)


def worker_state(row, now: datetime) -> str:
    """`stopped`, `lost` (no report for LOST_AFTER_S), `running job N`, what it readies, or `idle`."""
    if row.stopped_at is not None:
        return "stopped"
    if (now - row.heartbeat_at).total_seconds() > LOST_AFTER_S:
        return "lost"
    if row.current_job:
        return f"running job {row.current_job}"
    return row.activity or "idle"


def worker_rows(db, show_all: bool) -> list[dict]:
    """`qrun workers --json`: the last day's workers less those stopped over an hour ago (show_all: every one),
    the newest report first."""
    from qrun.db.queue import list_workers

    now = utcnow()
    rows = list_workers(db, None if show_all else now - timedelta(days=1))
    return [{"name": w.name, "node": w.node, "slot": w.slot, "device": w.device, "gpu": w.gpu,
             "state": worker_state(w, now), "current_job": w.current_job, "activity": w.activity,
             "jobs_done": w.jobs_done,
             "started_at": w.started_at, "heartbeat_at": w.heartbeat_at,
             "last_seen_s": (now - w.heartbeat_at).total_seconds()}
            for w in rows if show_all or w.stopped_at is None or (now - w.stopped_at).total_seconds() < 3600]
