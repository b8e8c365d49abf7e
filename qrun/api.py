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

FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
DEFAULT_POLL_S = 2.0


class WaitTimeout(QrunError, TimeoutError):
    """Jobs did not finish in time."""


@contextmanager
def database(db=None) -> Iterator:
    """An opened job table: `db` itself when it is one, else opened here from a URL or the default
    and closed again on leaving."""
    from qrun.db.session import Database, open_database, pin_qrun_home

    if isinstance(db, Database):
        yield db
        return
    pin_qrun_home()  # a relative QRUN_HOME would name another place inside a worker's job directory
    opened = open_database(db)
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


def submit(model, bits=None, *, method="gptq", gguf_type=None, group_size=None, desc_act=False, sym=True, damp=0.01, calib=None, calib_samples=128,
           calib_max_len=1024, batch_size=16, eval=None, eval_mode="score", eval_ppl=None, max_new_tokens=32,
           eval_batch_size=8, priority=0, max_attempts=3, trust_remote_code=False, allow_pickle=False,
           name=None, rerun=False, dry_run=False, gpus_per_job=1, db=None) -> Submission:
    """Add one quantize job per combination of method, bits, group_size and damp (each one value or a
    list), and with `eval` (a labeled data file) an eval job after each plus one of the unquantized
    baseline. Each method takes the part of the sweep that applies to it: method="awq" only 4 bits,
    "gguf" its quant types (gguf_type, e.g. "q4_k_m"; default: one per width of bits), "fp8" and
    "bnb-nf4" one variant each; group_size None is 128 where a method has groups.

    A job equal to one already queued, running or succeeded is not added again: the Submission's
    `existing` names it (rerun=True adds it anyway). All new jobs share one sweep id; `name` names the
    sweep (a name already used adds to that sweep). gpus_per_job: GPUs of one node each job holds (a
    model too big for one card). Everything is checked before the database is opened; dry_run checks
    and plans without adding."""
    from qrun.sweeps import check_submission, check_sweep_name, plan_jobs

    request = check_submission(
        model, bits, method=method, gguf_type=gguf_type, group_size=group_size, desc_act=desc_act, sym=sym, damp=damp, calib=calib,
        calib_samples=calib_samples, calib_max_len=calib_max_len, batch_size=batch_size, eval=eval,
        eval_mode=eval_mode, eval_ppl=eval_ppl, max_new_tokens=max_new_tokens, eval_batch_size=eval_batch_size,
        priority=priority, max_attempts=max_attempts, trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle, gpus_per_job=gpus_per_job)
    name = check_sweep_name(name)
    from qrun.db import queue

    with database(db) as opened:
        plan = plan_jobs(opened, request, rerun=rerun)
        sweep = (queue.sweep_named(opened, name) if name else None) or queue.new_sweep_id()
        if dry_run or not plan.jobs:
            return Submission([], None if not plan.jobs else sweep, name, plan.jobs, plan.existing, dry_run)
        ids = queue.submit_jobs(opened, plan.specs, sweep=sweep, sweep_name=name)
    return Submission(ids, sweep, name, plan.jobs, plan.existing)


# ---------------------------------------------------------------- evaluate (qrun eval)


# ---------------------------------------------------------------- reading


def _select_jobs(db, ids: Iterable[int] | None, sweep: str | None) -> list:
    from qrun.db import queue

    ids = list(ids or [])
    if sweep is None:
        return queue.list_jobs(db, ids or None)
    jobs = queue.jobs_of_sweep(db, sweep)
    return [j for j in jobs if j.id in set(ids)] if ids else jobs


def status(ids: Iterable[int] | None = None, sweep: str | None = None, db=None) -> list[dict]:
    """The jobs (all; those of `ids`; those of a sweep, by id or name) as `qrun status --json` rows:
    id, kind, status, params, progress, metrics, artifacts, sweep, ..."""
    from qrun.cli.status import job_rows  # the `status --json` rows, defined once, beside their command

    with database(db) as opened:
        return job_rows(opened, _select_jobs(opened, ids, sweep))


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


def compare(model: str | None = None, data: str | None = None, sweep: str | None = None, *,
            as_frame: bool = False, db=None):
    """`qrun compare`'s rows (plain dicts: variant, bits, size, precision, recall, ... and their deltas
    from the baseline), for one source model, data file or sweep if given. as_frame: a DataFrame."""
    from qrun.cli.compare import comparison_rows  # assembled beside its command, as job_row is

    with database(db) as opened:
        rows = comparison_rows(opened, model, data, sweep)
    return to_frame(rows) if as_frame else Rows(rows)


# ---------------------------------------------------------------- logs and workers (qrun logs, qrun workers)


# ---------------------------------------------------------------- housekeeping (qrun prune, du, cap-priority)


# ---------------------------------------------------------------- running (qrun run, qrun warmup, qrun demo)


# ---------------------------------------------------------------- waiting and changing


def wait(ids: Iterable[int], timeout: float | None = None, poll_s: float = DEFAULT_POLL_S, db=None,
         on_finish: Callable[[dict], None] | None = None) -> list[dict]:
    """Wait until every job of `ids` has finished (succeeded, failed or cancelled) and return their
    final `status` rows. Jobs run only while some `qrun run` works the queue. on_finish(row) is
    called once per job as it finishes; WaitTimeout after `timeout` seconds."""
    from qrun.cli.status import job_rows

    ids = sorted(set(ids))
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: set[int] = set()
    with database(db) as opened:
        while True:
            rows = job_rows(opened, _select_jobs(opened, ids, None))
            for row in rows:
                if row["status"] in FINISHED_STATUSES and row["id"] not in seen:
                    seen.add(row["id"])
                    if on_finish is not None:
                        on_finish(row)
            if len(seen) == len(rows):
                return rows
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


def _targets(db, ids: list[int], sweep: str | None, statuses: tuple[str, ...]) -> list[int]:
    """The job ids a cancel or retry acts on: `ids` as given, or the jobs of a sweep in `statuses`."""
    if sweep is None:
        return ids
    return [j.id for j in _select_jobs(db, None, sweep) if j.status in statuses]


def cancel(ids: Iterable[int] | None = None, sweep: str | None = None, force: bool = False, db=None) -> list[int]:
    """Cancel jobs (a running one stops at its next layer); with `sweep`, its queued and running jobs.
    Another user's jobs only with force. Returns the ids cancelled."""
    from qrun.db import queue

    ids = list(ids or [])
    _check_ids_or_sweep(ids, sweep, "cancel")  # before the table is opened
    with database(db) as opened:
        targets = _targets(opened, ids, sweep, ("queued", "running"))
        queue.cancel_jobs(opened, targets, force=force)
    return targets


def retry(ids: Iterable[int] | None = None, sweep: str | None = None, force: bool = False, db=None) -> list[int]:
    """Queue failed or cancelled jobs again with fresh attempts; with `sweep`, its failed and cancelled
    jobs. Another user's jobs only with force. Returns the ids queued again."""
    from qrun.db import queue

    ids = list(ids or [])
    _check_ids_or_sweep(ids, sweep, "retry")  # before the table is opened
    with database(db) as opened:
        targets = _targets(opened, ids, sweep, ("failed", "cancelled"))
        queue.retry_jobs(opened, targets, force=force)
    return targets
