"""qrun's Python API: what the commands do, as functions that return plain data. The CLI parses
options, calls these and prints what they return.

    import qrun
    sweep = qrun.submit("./qwen2-1.5b", bits=[4, 8], eval="test.jsonl", name="first-try")
    qrun.wait(sweep.ids)                     # needs a `qrun run` (or `qrun run --serve`) somewhere
    qrun.compare(sweep=sweep.sweep, as_frame=True)

`db`: None for the CLI's default ($QRUN_DB, else $QRUN_HOME/qrun.db), a SQLAlchemy URL or SQLite
path, or an opened `qrun.db.session.Database`. Errors are qrun's own (`qrun.db.errors`): BadInput
for input that can never work, with one line naming it and the fix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from qrun.db.errors import BadInput, QrunError
from qrun.workers.params import EvalParams

DEFAULT_POLL_S = 2.0


class WaitTimeout(QrunError, TimeoutError):
    """Jobs did not finish in time."""


@contextmanager
def database(db=None, create: bool = True) -> Iterator:
    """An opened job table: `db` itself when it is one, else opened here from a URL or the default
    and closed again on leaving. create=False for calls that only look: a SQLite file that is not
    there is refused (a mistyped path), not made."""
    from qrun.db.session import Database, open_database, pin_qrun_home

    if isinstance(db, Database):
        yield db
        return
    pin_qrun_home()  # a relative QRUN_HOME would name another place inside a worker's job directory
    opened = open_database(db, create)
    try:
        yield opened
    finally:
        opened.dispose()


# ---------------------------------------------------------------- submit


@dataclass
class Submission:
    """What a submit added. ids: the new jobs, in order (none on a dry run); sweep: their sweep's id
    (None when nothing was added); planned: the jobs (added, or that a dry run would add); existing:
    equal jobs already in the table, used instead of adding them again."""

    ids: list[int]
    sweep: str | None
    name: str | None
    planned: list = field(default_factory=list)
    existing: list = field(default_factory=list)
    dry_run: bool = False

    @property
    def all_ids(self) -> list[int]:
        """Every job this submit's results come from: the new ones and the existing ones it reuses."""
        return sorted(set(self.ids) | {job.id for job in self.existing})

    def plan_rows(self) -> list[dict]:
        """The planned jobs as plain dicts: n (1-based), kind, variant, model, params, after (the n of
        the job it waits for) or depends_on (an existing job's id)."""
        return [{"n": n, "kind": job.kind, "variant": job.label, "model": job.spec.model, "params": job.spec.params,
                 "after": job.spec.after + 1 if job.spec.after is not None else None,
                 "depends_on": job.spec.depends_on}
                for n, job in enumerate(self.planned, 1)]


def submit(model, bits=None, *, db=None, **options) -> Submission:
    """Add one quantize job per combination of method, bits, group_size and damp (each one value or a
    list), and with `eval` (a labeled data file) an eval job after each plus one of the unquantized
    baseline. Each method takes the part of the sweep that applies to it: method="awq" only 4 bits,
    "gguf" its quant types (gguf_type, e.g. "q4_k_m"; default: one per width of bits), "fp8" and
    "bnb-nf4" one variant each; group_size None is 128 where a method has groups.

    The keywords are `qrun submit`'s options (qrun.sweeps.SubmitOptions, with their defaults): method,
    gguf_type, group_size, desc_act, sym, damp, calib, calib_samples, calib_max_len, batch_size, eval,
    eval_mode, eval_ppl, max_new_tokens, eval_batch_size, priority, max_attempts, trust_remote_code,
    allow_pickle, gpus_per_job, name, rerun, dry_run.

    A job equal to one already queued, running or succeeded is not added again: the Submission's
    `existing` names it (rerun=True adds it anyway). All new jobs share one sweep id; `name` names the
    sweep (a name already used adds to that sweep). gpus_per_job: GPUs of one node each job holds (a
    model too big for one card). Everything is checked before the database is opened; dry_run checks
    and plans without adding."""
    from qrun.db import queue
    from qrun.sweeps import SubmitOptions, check_submission, plan_jobs

    given = SubmitOptions(model, bits, **options)
    request = check_submission(given)
    name = request.name
    with database(db) as opened:
        plan = plan_jobs(opened, request, rerun=given.rerun)
        sweep = (queue.sweep_named(opened, name) if name else None) or queue.new_sweep_id()
        if given.dry_run or not plan.jobs:
            return Submission([], None if not plan.jobs else sweep, name, plan.jobs, plan.existing, given.dry_run)
        ids = queue.submit_jobs(opened, plan.specs, sweep=sweep, sweep_name=name, labels=[j.label for j in plan.jobs],
                                existing=[(job.id, job.label) for job in plan.existing])
    return Submission(ids, sweep, name, plan.jobs, plan.existing)


# ---------------------------------------------------------------- evaluate (qrun eval)


def evaluate(model, *, data=None, ppl=None, mode=EvalParams.mode, max_new_tokens=EvalParams.max_new_tokens,
             batch_size=EvalParams.batch_size, priority=0, trust_remote_code=False, gpus_per_job=EvalParams.gpus,
             rerun=False, answer_template=None, db=None) -> int:
    """Add an eval job for an existing model or artifact directory (any method's, a directory holding a
    .gguf file too; its variant is read from its files): `data` (labeled dialogs, classified in `mode`
    score or generate) and/or `ppl` (text for perplexity). Everything is checked before the database is
    opened. Returns the new job's id; where an equal job (same model, data and settings) is already
    queued, running or succeeded, that job's id instead, its `existing` naming it (rerun=True adds anyway).
    answer_template: the answer to each label, like '{"is_fraud": {label}}' (docs/TASKS.md; a task file
    beside the data is read too)."""
    from qrun.sweeps import add_evaluation, check_evaluation

    spec = check_evaluation(model, data=data, ppl=ppl, mode=mode, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            priority=priority, trust_remote_code=trust_remote_code, gpus_per_job=gpus_per_job,
                            answer_template=answer_template)
    with database(db) as opened:
        return add_evaluation(opened, spec, rerun)


# ---------------------------------------------------------------- reading


def _select_jobs(db, ids: Iterable[int] | None, sweep: str | None) -> list:
    """The jobs of `ids` (all when none), within the sweep given by id or name if any (BadInput if it has none)."""
    from qrun.db import queue

    ids = list(ids or [])
    if sweep is None:
        return queue.list_jobs(db, ids or None)
    jobs = queue.jobs_of_sweep(db, sweep)
    return [j for j in jobs if j.id in set(ids)] if ids else jobs


def status(ids: Iterable[int] | None = None, sweep: str | None = None, db=None, *, users: Iterable[str] = (),
           mine: bool = False, states: Iterable[str] = (), models: Iterable[str] = (), sweeps: Iterable[str] = (),
           since: str | None = None, show_all: bool = True, limit: int | None = None,
           user: str | Iterable[str] = (), state: str | Iterable[str] = (), model: str | Iterable[str] = ()
           ) -> list[dict]:
    """The jobs (all; those of `ids`; those of a sweep, by id or name) as `qrun status --json` rows, the
    very dicts the command prints (times as ISO strings in UTC): id, kind, status, params, progress,
    reason and position (why a queued job waits, its place in line), metrics, artifacts, sweep, ...

    The other keywords are `qrun status`'s filters, each one value or several: users or user
    (submitted by), mine (by you), states or state, models or model (a directory or its name), sweeps
    (ids or names), since (a span like 2h, 1d or an ISO time: jobs active at any time since then),
    limit (the newest N). show_all=False: only active jobs and those finished in the last hour unless
    ids or since say otherwise (the command's default)."""
    from qrun.views import filter_values, job_filter, job_rows, select_jobs

    ids = list(ids or [])
    flt = job_filter(ids, users=filter_values(users) + filter_values(user), mine=mine,
                     states=filter_values(states) + filter_values(state),
                     models=filter_values(models) + filter_values(model), sweeps=sweeps, since=since,
                     show_all=show_all, limit=limit)  # bad input is refused before the table is opened
    with database(db, create=False) as opened:
        jobs = select_jobs(opened, flt) if sweep is None else flt.apply(_select_jobs(opened, ids, sweep))
        return job_rows(opened, jobs)


class Rows(list):
    """A list of plain dicts that also turns into a pandas DataFrame."""

    def to_frame(self):
        return to_frame(self)


def to_frame(rows: list[dict]):
    """rows as a pandas DataFrame (pandas is not among qrun's dependencies)."""
    try:
        import pandas
    except ImportError as exc:
        raise QrunError("a DataFrame needs pandas, which is not installed: pip install pandas "
                        "(or use the rows, plain dicts, as they are)") from exc
    return pandas.DataFrame(list(rows))


def compare(model: str | None = None, data: str | None = None, sweep: str | None = None, *, metric: str = "f1",
            max_drop: float | None = None, warn: Callable[[str], None] | None = None, as_frame: bool = False,
            db=None):
    """`qrun compare`'s rows (plain dicts: variant, bits, size, precision, recall, ... and their deltas
    from the baseline), for one source model, data file or sweep if given. With max_drop, each row also
    says whether its `metric` is within max_drop of the baseline's and which is the smallest that is.
    warn(line): told of unreadable predictions files (default: standard error). as_frame: a DataFrame."""
    from qrun.comparison import check_max_drop, comparison_rows, stderr_line

    check_max_drop(max_drop)
    with database(db, create=False) as opened:
        rows = comparison_rows(opened, model, data, sweep, metric=metric, max_drop=max_drop, warn=warn or stderr_line)
    return to_frame(rows) if as_frame else Rows(rows)


# ---------------------------------------------------------------- logs and workers (qrun logs, qrun workers)


def logs(job_id: int, *, tail: int | None = None, raw: bool = False, db=None):
    """`qrun logs`: the job's history and log as a `qrun.joblogs.JobLogs` (job_id, status; history: one
    comment line per transition; log: its lines with progress bars collapsed, the last `tail` of them,
    or with raw the file's bytes, or None before the job started; error: its error as comment lines)."""
    from qrun.joblogs import check_tail, read_logs

    check_tail(tail)
    with database(db, create=False) as opened:
        return read_logs(opened, job_id, tail, raw)


def follow_logs(job_id: int, *, raw: bool = False, db=None, poll_s: float = 0.5, tail: int | None = None,
                warn: Callable[[str], None] | None = None) -> Iterator[str | int]:
    """`qrun logs --follow`: a generator of text to write, the history and log as they grow (raw: the log
    as written; tail: of the log already there, only the last `tail` lines), every poll_s seconds until
    the job finishes; its last item is the exit code, an int: 0 if the job succeeded, 1 if it failed or
    was cancelled. warn(line): told once when no `qrun run` serves the table (default: standard error)."""
    from qrun.comparison import stderr_line
    from qrun.joblogs import check_tail, follow

    check_tail(tail)
    with database(db, create=False) as opened:
        yield from follow(opened, job_id, raw, poll_s, tail, warn or stderr_line)


def worker_status(*, all: bool = False, db=None) -> list[dict]:
    """`qrun workers --json`: one dict per worker (name, node, slot, device, gpu, state, current_job,
    activity, jobs_done, started_at, heartbeat_at, last_seen_s), the last day's less those stopped
    over an hour ago; all=True: every worker ever recorded."""
    from qrun.views import worker_rows

    with database(db, create=False) as opened:
        return worker_rows(opened, all)


def sweep_status(*, db=None) -> list[dict]:
    """`qrun dashboard`'s sweeps: one dict per sweep, the newest first (sweep, name, users, models, jobs,
    created_at and last_finished_at as ISO strings in UTC, and `counts`: how many of its jobs are in each
    state). A sweep's jobs here are those its submits added (`qrun status --sweep` adds the equal jobs
    they reused)."""
    from qrun.db import queue

    with database(db, create=False) as opened:
        jobs = queue.list_jobs(opened, plain=True)
    by_sweep: dict[str, list] = {}
    for job in jobs:
        if getattr(job, "sweep", None):
            by_sweep.setdefault(job.sweep, []).append(job)
    rows = [_sweep_row(sweep, members) for sweep, members in by_sweep.items()]
    return sorted(rows, key=lambda row: row["created_at"] or "", reverse=True)


def _sweep_row(sweep: str, jobs: list) -> dict:
    from qrun.db.states import Status
    from qrun.views import iso_utc, model_name

    finished = [j.finished_at for j in jobs if j.finished_at is not None]
    return {"sweep": sweep, "name": next((j.sweep_name for j in jobs if j.sweep_name), None),
            "users": sorted({j.submitted_by for j in jobs}), "models": sorted({model_name(j) for j in jobs}),
            "jobs": len(jobs), "created_at": iso_utc(min(j.created_at for j in jobs)),
            "last_finished_at": iso_utc(max(finished)) if finished else None,
            "counts": {state.value: sum(j.status == state.value for j in jobs) for state in Status}}


# ---------------------------------------------------------------- housekeeping (qrun prune, du, cap-priority)


def prune(older_than: str, *, failed_only: bool = False, user: str | None = None, yes: bool = False,
          force: bool = False, db=None) -> dict:
    """Old finished jobs (finished before `older_than`: a span like 30d, 12h, 2w, or an ISO time), only
    failed and cancelled ones with failed_only, only `user`'s with user; with yes, their rows and files
    removed (another user's only with force, by an admin; audit-logged). Never queued or running jobs,
    nor one a kept job depends on. Returns `qrun prune --json`: {removed, bytes, jobs: [{id, kind, status,
    user, model, finished_at, bytes, paths}], others (how many are other users' jobs)}."""
    from qrun.housekeeping import prune_jobs
    from qrun.views import parse_since

    before = parse_since(older_than, option="--older-than")
    with database(db, create=False) as opened:
        return prune_jobs(opened, before, failed_only=failed_only, user=user, yes=yes, force=force)


def export(job: int, target: str, *, db=None) -> dict:
    """Copy quantize job `job`'s artifact, with its model card, to the new (or empty) directory `target`,
    checking every file's sha256 against the table and the artifact's manifest as it is read; the copy
    appears whole or not at all. Returns {job, source, target, files, bytes, sha256, card}."""
    from pathlib import Path

    from qrun.exporting import export_artifact

    with database(db, create=False) as opened:
        return export_artifact(opened, job, Path(target))


def du(*, db=None) -> dict:
    """Space per user and per model, as `qrun du --json`: {users, models}, each a list of {name, jobs,
    artifact_bytes, log_bytes, bytes}, the largest first."""
    from qrun.housekeeping import usage

    with database(db, create=False) as opened:
        return usage(opened)


def priority_caps(*, db=None) -> dict[str, int]:
    """Every user's priority cap (the highest --priority they may submit with): {user: cap}."""
    from qrun.db import queue

    with database(db, create=False) as opened:
        return queue.priority_caps(opened)


def set_priority_cap(user: str, cap: int | None, *, db=None) -> bool:
    """Cap the priority `user` (a login name on this machine) may submit with (cap None: remove the cap);
    whether a cap was there. Only qrun's admins may (BadInput otherwise); audit-logged."""
    from qrun.db import queue
    from qrun.housekeeping import check_user_exists, set_cap

    queue.check_user_name(user)  # all before the table is opened
    if cap is not None:  # a cap may be cleared for a name gone from this machine, not set
        queue.check_priority(cap)
        check_user_exists(user)
    with database(db) as opened:
        return set_cap(opened, user, cap)


def admins(*, db=None) -> list[str]:
    """`qrun admin list`: the login names of qrun's admins (who may set caps and prune for others)."""
    from qrun.db.admins import admin_names

    with database(db, create=False) as opened:
        return admin_names(opened)


def add_admin(user: str, *, db=None) -> bool:
    """`qrun admin add USER`: make a login name of this machine an admin (admins only; audit-logged);
    whether it was not one already."""
    from qrun.housekeeping import change_admins, check_user_exists

    check_user_exists(user)
    with database(db) as opened:
        return change_admins(opened, add=user)


def remove_admin(user: str, *, db=None) -> bool:
    """`qrun admin remove USER`: take an admin off the list (admins only, never the last; audit-logged);
    whether it was one."""
    from qrun.housekeeping import change_admins

    with database(db) as opened:
        return change_admins(opened, remove=user)


def audit(*, since: str | None = None, db=None) -> list[dict]:
    """`qrun audit --json`: who pruned, changed caps or admins, or cancelled or retried another user's
    jobs (and every forced act), oldest first: {id, at, user, action, target, detail}; since: a span
    like 7d or an ISO time."""
    from qrun.housekeeping import audit_rows
    from qrun.views import parse_since

    after = parse_since(since) if since else None
    with database(db, create=False) as opened:
        return audit_rows(opened, after)


# ---------------------------------------------------------------- running (qrun run, qrun warmup, qrun demo)


def run(*, gpus: list[int] | str | None = None, cpu_workers: int | None = None, serve: bool = False,
        until_empty: bool = False, ray_address: str | None = None, lease_s: float = 60.0, db=None,
        say: Callable[[str], None] | None = None, on_tick: Callable | None = None, grace_s: float = 30.0):
    """Work the queue here: start Ray (or join the cluster at ray_address), one worker per GPU (or
    cpu_workers CPU workers), until the queue is empty, or with serve until Ctrl-C. gpus: this
    machine's GPUs to use ([0, 1] or "0,1"; None: all). lease_s: seconds a worker may go silent before
    its job returns to the queue. grace_s: seconds a stop (Ctrl-C, SIGTERM) waits for workers to give
    their jobs back before it kills them. say(line): each line the run gives (default: standard error); Ray's
    own notices go to a run log under $QRUN_HOME/logs, named on the first line. on_tick(watch): a
    display's hook (qrun.runs.JobWatch: watch.read() gives the jobs). Returns a qrun.runs.RunOutcome:
    workers, ran, failed (ids), restarts, interrupted, and the jobs still waiting for a GPU."""
    from qrun.db.session import home_directory
    from qrun.runs import check_run_options, parse_gpus, run_with_log

    from qrun.comparison import stderr_line

    say = say or stderr_line
    warning = check_run_options(gpus=gpus, cpu_workers=cpu_workers, until_empty=until_empty, serve=serve,
                                ray_address=ray_address, lease_s=lease_s, grace_s=grace_s)  # before the table opens
    if warning:
        say(warning)
    home_directory()  # Ray keeps ~/.ray: a HOME that is a file is one line, not a NotADirectoryError
    with database(db) as opened:
        return run_with_log(opened, parse_gpus(gpus), cpu_workers, not serve, ray_address, lease_s, say, on_tick,
                            grace_s=grace_s)


def doctor(*, db=None) -> tuple[str, list[str]]:
    """`qrun doctor`: (the job table, what is damaged in it). A SQLite file gets SQLite's integrity
    check, read-only and without qrun's own opening (which a damaged file fails); a server database
    checks its own pages, so only a connection is tried there. No findings: it is sound."""
    from qrun.db.session import check_integrity, database_url, masked_url

    url = database_url(db)
    found = check_integrity(url)
    return (url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else masked_url(url)), found


def warmup(device: str = "auto") -> list[tuple[str, float, bool, str]]:
    """Build (or load from the cache) GPTQModel's kernels for device "cuda", "cpu" or "auto" (this
    machine's), so that no job pays for it. Returns (name, seconds, usable, why not) per kernel: an
    unusable kernel is reported there, not raised."""
    from qrun.workers.warmup import build_kernels

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_kernels(device)


def run_demo(*, db=None, say: Callable[[str], None] | None = None, on_tick: Callable | None = None):
    """`qrun demo`: build the tiny demo model (once), queue its GPTQ and round-to-nearest variants at 8,
    4 and 2 bits with evals (those missing), run them here, and read the comparison. say(line): the
    demo's progress lines (default: standard error). Returns a qrun.demo_run.DemoResult: rows (the
    comparison), sentence, closing (the lines after the table), ok, interrupted."""
    from contextlib import ExitStack

    from qrun.comparison import stderr_line
    from qrun.demo_run import run_demo as demo

    with ExitStack() as opened:  # the table is opened once the model is there, and closed at the end
        return demo(lambda: opened.enter_context(database(db)), say=say or stderr_line, on_tick=on_tick)


# ---------------------------------------------------------------- waiting and changing


def wait(ids: Iterable[int], timeout: float | None = None, poll_s: float = DEFAULT_POLL_S, db=None,
         on_finish: Callable[[dict], None] | None = None, warn: Callable[[str], None] | None = None) -> list[dict]:
    """Wait until every job of `ids` has finished (succeeded, failed or cancelled) and return their
    final `status` rows. Jobs run only while some `qrun run` works the queue: warn(line) is told once,
    at once, while none serves the table (default: standard error), and the wait goes on. on_finish(row)
    is called once per job as it finishes; WaitTimeout after `timeout` seconds."""
    from qrun.comparison import stderr_line
    from qrun.db.states import FINISHED
    from qrun.views import job_rows
    from qrun.waiting import no_runner_line

    warn = warn or stderr_line

    ids = sorted(set(ids))
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: set[int] = set()
    with database(db, create=False) as opened:
        while True:
            rows = job_rows(opened, _select_jobs(opened, ids, None), explain=False)  # it returns finished jobs
            for row in rows:
                if row["status"] in FINISHED and row["id"] not in seen:
                    seen.add(row["id"])
                    if on_finish is not None:
                        on_finish(row)
            if len(seen) == len(rows):
                return rows
            if warn is not None and (line := no_runner_line(opened)) is not None:
                warn(line)
                warn = None  # said once
            if deadline is not None and time.monotonic() >= deadline:
                pending = [r["id"] for r in rows if r["id"] not in seen]
                raise WaitTimeout(f"jobs {', '.join(map(str, pending))} did not finish within {timeout:g} s: "
                                  "is a `qrun run` working the queue?")
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))


def _check_ids_or_sweep(ids: list[int], sweep: str | None, verb: str) -> None:
    if ids and sweep is not None:
        raise BadInput(f"give job ids or --sweep to {verb}, not both")
    if not ids and sweep is None:
        raise BadInput(f"give the job ids to {verb}, or --sweep ID|NAME")


def _targets(db, ids: list[int], sweep: str | None, statuses: tuple[str, ...], force: bool = False) -> list[int]:
    """The job ids a cancel or retry acts on: `ids` as given, or the jobs of a sweep in `statuses` (other
    users' jobs that the sweep reused only with force)."""
    from qrun.db.queue import current_user

    if sweep is None:
        return ids
    me = current_user()
    return [j.id for j in _select_jobs(db, None, sweep) if j.status in statuses and (force or j.submitted_by == me)]


def cancel(ids: Iterable[int] | None = None, sweep: str | None = None, force: bool = False, db=None) -> list[int]:
    """Cancel jobs (a running one stops at its next layer); with `sweep`, its queued and running jobs.
    Another user's jobs only with force. Returns the ids cancelled."""
    from qrun.db import queue
    from qrun.db.states import Status

    ids = list(ids or [])
    _check_ids_or_sweep(ids, sweep, "cancel")  # before the table is opened
    with database(db, create=False) as opened:
        targets = _targets(opened, ids, sweep, (Status.QUEUED.value, Status.RUNNING.value), force)
        queue.cancel_jobs(opened, targets, force=force)
    return targets


def retry(ids: Iterable[int] | None = None, sweep: str | None = None, force: bool = False, db=None) -> list[int]:
    """Queue failed or cancelled jobs again with fresh attempts; with `sweep`, its failed and cancelled
    jobs. Another user's jobs only with force. Returns the ids queued again."""
    from qrun.db import queue
    from qrun.db.states import Status

    ids = list(ids or [])
    _check_ids_or_sweep(ids, sweep, "retry")  # before the table is opened
    with database(db, create=False) as opened:
        targets = _targets(opened, ids, sweep, (Status.FAILED.value, Status.CANCELLED.value), force)
        queue.retry_jobs(opened, targets, force=force)
    return targets
