"""The queue's operations. Each status change is one guarded UPDATE through `_transition`.

A worker proves it still holds a job on every write (`worker = :me AND status = 'running'`):
a job that was cancelled, or whose lease expired and was handed to another worker, can no
longer be progressed or finished by the old holder, so finishing is idempotent under retries.

Housekeeping that any claimer does on the side (requeueing expired leases, failing orphans) reads
rows and then changes them. On SQLite every transaction holds the write lock from its start
(BEGIN IMMEDIATE), so claimers take turns. On Postgres they run at once: the rows are read with
`FOR UPDATE SKIP LOCKED`, so each is settled by one claimer while the others pass it by, and a
row that changed anyway is skipped rather than reported as an error.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import secrets
import threading
import weakref
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import Select, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from qrun.db import audit
from qrun.db.errors import BadInput, JobLost, JobNotFound, TransitionError
from qrun.db.schema import INT64_MAX, INT64_MIN, Artifact, Event, Job, Metric, SweepJob, Worker
from qrun.db.session import Database
from qrun.db.states import FINISHED, Kind, Status, allowed_from, target_of

DEFAULT_LEASE_S = 60.0


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def current_user() -> str:
    """The login name of the real uid. Not getpass.getuser(): it believes $USER and $LOGNAME, so anyone
    could submit under, or cancel as, another user's name."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        return f"uid{os.getuid()}"


@dataclass
class JobSpec:
    """A job to submit. `after` is the index of another spec in the same batch it depends on."""

    kind: Kind
    model: str
    params: dict = field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 3
    after: int | None = None
    depends_on: int | None = None


# ---------------------------------------------------------------- transitions


def _transition(
    session: Session,
    job_id: int,
    name: str,
    *,
    values: dict | None = None,
    worker: str | None = None,
    detail: str | None = None,
    guard=None,
    lost_race_ok: bool = False,
) -> bool:
    """Move one job along `name`, or raise naming the job and the state it is really in.

    guard: one more condition the row must still meet. lost_race_ok: housekeeping that found the
    job in a state another process has since changed returns False instead of raising (the other
    process settled it)."""
    allowed = allowed_from(name)
    target = target_of(name)
    conditions = [Job.id == job_id, Job.status.in_([s.value for s in allowed])]
    if worker is not None:
        conditions.append(Job.worker == worker)
    if guard is not None:
        conditions.append(guard)
    before = session.execute(select(Job.status).where(Job.id == job_id)).scalar()
    result = session.execute(
        update(Job).where(*conditions).values(status=target.value, **(values or {}))
    )
    if result.rowcount == 1:
        session.add(Event(job_id=job_id, transition=name, from_status=before, to_status=target.value,
                          at=utcnow(), detail=detail))
        return True
    if lost_race_ok:
        return False
    # Read again: on Postgres the UPDATE may have waited for another transaction that changed the
    # job after `before` was read, and the message must name the state that refused the change.
    now_status = session.execute(select(Job.status).where(Job.id == job_id)).scalar()
    if now_status is None:
        raise JobNotFound(f"job {job_id} does not exist: see `qrun status` for job ids")
    if worker is not None:  # the job moved on without this worker: cancelled, reaped or finished
        raise JobLost(f"job {job_id} is {now_status} and no longer held by {worker}")
    raise TransitionError(f"job {job_id} is {now_status}: cannot {name} it")


# ---------------------------------------------------------------- submitting


def check_priority(priority) -> int:
    """The priority if the job table can hold it (a signed 64-bit integer), else BadInput naming --priority.
    SQLite would raise OverflowError past 64 bits, Postgres 'bigint out of range'."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not INT64_MIN <= priority <= INT64_MAX:
        raise BadInput(f"--priority {priority} is out of range: give a whole number between {INT64_MIN} and "
                       f"{INT64_MAX} (higher runs first; 0 is the default)")
    return priority


def submit_jobs(db: Database, specs: Sequence[JobSpec], user: str | None = None, *,
                sweep: str | None = None, sweep_name: str | None = None, labels: Sequence[str | None] = (),
                existing: Sequence[tuple[int, str | None]] = ()) -> list[int]:
    """Insert a batch of jobs in one transaction: all of them, or none. sweep: the id they share
    (a fresh one when None); sweep_name: that sweep's optional name. labels: each spec's label in the
    sweep; existing: (job id, label) of equal jobs already there that the sweep uses instead of adding
    them again (possibly another user's): they join the sweep too, so its views show what was asked."""
    for spec in specs:
        check_priority(spec.priority)
    user = user or current_user()
    sweep = sweep or new_sweep_id()
    now = utcnow()
    ids: list[int] = []
    if specs:  # every way in (submit, eval, the API) meets the cap an admin set (`qrun cap-priority`)
        check_priority_cap(db, max(spec.priority for spec in specs), user)
    with db.transaction() as s:
        for spec in specs:
            depends_on = ids[spec.after] if spec.after is not None else spec.depends_on
            job = Job(kind=spec.kind.value, status=Status.QUEUED.value, params=spec.params, model=spec.model,
                      depends_on=depends_on, priority=spec.priority, max_attempts=spec.max_attempts,
                      submitted_by=user, created_at=now, sweep=sweep, sweep_name=sweep_name)
            s.add(job)
            s.flush()
            s.add(Event(job_id=job.id, transition="submit", from_status=None, to_status=Status.QUEUED.value,
                        at=now, detail=f"by {user}"))
            ids.append(job.id)
        _add_members(s, sweep, list(zip(ids, list(labels) + [None] * len(ids))) + list(existing))
    return ids


def _add_members(s: Session, sweep: str, members: list[tuple[int, str | None]]) -> None:
    """Record the sweep's jobs with their labels; an existing job deleted meanwhile (pruned) is left out,
    and one already a member (the name given again) keeps its first label."""
    wanted = dict(members)
    if not wanted:
        return
    there = set(s.execute(select(Job.id).where(Job.id.in_(list(wanted)))).scalars())
    there -= set(s.execute(select(SweepJob.job_id).where(SweepJob.sweep == sweep,
                                                         SweepJob.job_id.in_(list(there)))).scalars())
    s.add_all(SweepJob(sweep=sweep, job_id=job_id, label=wanted[job_id]) for job_id in sorted(there))


def equivalent_job(db: Database, kind: Kind, model: str, params: dict, upstream: int | None = None):
    """The first job of the same kind, model and parameters that is queued, running or succeeded (a
    plain row: id, status, ...), or None. upstream: only jobs that depend on that job (an eval of one
    quantized variant; its params name the variant only by a label)."""
    query = select(Job.id, Job.status, Job.params, Job.depends_on).where(
        Job.kind == kind.value, Job.model == model,
        Job.status.in_([Status.QUEUED.value, Status.RUNNING.value, Status.SUCCEEDED.value]),
    ).order_by(Job.id)
    if upstream is not None:
        query = query.where(Job.depends_on == upstream)
    with db.transaction() as s:
        rows = s.execute(query).all()
    return next((row for row in rows if row.params == params), None)


# ---------------------------------------------------------------- sweeps


def new_sweep_id() -> str:
    """A sweep's id: 8 hex characters, short enough to type, random so that no two submits share one."""
    return secrets.token_hex(4)


def sweep_filter(sweep: str):
    """The condition on jobs that `--sweep ID|NAME` means: the jobs of the sweep of that id, or of the
    sweeps of that name: those their submits added and the equal jobs they used instead (sweep_jobs)."""
    named = select(Job.sweep).where(Job.sweep_name == sweep, Job.sweep.is_not(None))
    return Job.id.in_(select(SweepJob.job_id).where(or_(SweepJob.sweep == sweep, SweepJob.sweep.in_(named))))


def sweep_members(db: Database, sweeps: Iterable[str]) -> dict[int, str | None]:
    """The jobs of these sweeps (ids or names): job id -> the label its sweep gave it (None if unknown)."""
    found: dict[int, str | None] = {}
    with db.transaction() as s:
        for sweep in sweeps:
            named = select(Job.sweep).where(Job.sweep_name == sweep, Job.sweep.is_not(None))
            rows = s.execute(select(SweepJob.job_id, SweepJob.label)
                             .where(or_(SweepJob.sweep == sweep, SweepJob.sweep.in_(named)))).all()
            for job_id, label in rows:
                found[job_id] = found.get(job_id) or label
    return found


def sweep_named(db: Database, name: str) -> str | None:
    """The id of the newest sweep called `name`, or None (a name given again adds to its sweep)."""
    with db.transaction() as s:
        return s.execute(select(Job.sweep).where(Job.sweep_name == name).order_by(Job.id.desc()).limit(1)).scalar()


def jobs_of_sweep(db: Database, sweep: str) -> list[Job]:
    """The jobs of a sweep, given by id or name, ordered by id; BadInput when it has none."""
    query = select(Job).where(sweep_filter(sweep)).order_by(Job.id)
    with db.transaction() as s:
        jobs = list(s.scalars(query))
    if not jobs:
        raise BadInput(f"--sweep {sweep!r} matches no job: give a sweep id or name from `qrun status --json`")
    return jobs


def evals_of_variants(db: Database, models: Collection[str]) -> list:
    """The eval jobs on these source models that evaluate a quantize job's output, each with that job's
    params: rows (id, model, params, upstream_params). `qrun status` names their variants from them."""
    if not models:
        return []
    upstream = aliased(Job)
    query = (select(Job.id, Job.model, Job.params, upstream.params.label("upstream_params"))
             .join(upstream, upstream.id == Job.depends_on)
             .where(Job.kind == Kind.EVAL.value, upstream.kind == Kind.QUANTIZE.value, Job.model.in_(list(models))))
    with db.transaction() as s:
        return s.execute(query).all()


# ---------------------------------------------------------------- the worker's side


def gpus_needed():
    """How many GPUs of one node a job holds (its params' `gpus`, default 1), as SQL."""
    return func.coalesce(Job.params["gpus"].as_integer(), 1)


def runnable_by(gpus: int, compute_capability: float | None):
    """SQL: the jobs a worker can run that holds `gpus` GPUs of this compute capability (None: a CPU
    worker). A method that needs a GPU says so in its params (`needs_gpu`, `min_compute_capability`:
    workers.methods): FP8 and bitsandbytes jobs are never claimed by a CPU worker."""
    fits = gpus_needed() <= gpus
    if compute_capability is None:
        return and_(fits, Job.params["needs_gpu"].as_boolean().is_not(True))
    return and_(fits, func.coalesce(Job.params["min_compute_capability"].as_float(), 0.0) <= compute_capability)


def _ready():
    """Queued jobs whose upstream job (if any) succeeded, most urgent first. Built once: a claim only
    adds its own conditions to it (building the statement cost a quarter of a claim)."""
    return _READY


def _build_ready() -> Select:
    upstream = aliased(Job)
    upstream_succeeded = (select(upstream.id)
                          .where(upstream.id == Job.depends_on, upstream.status == Status.SUCCEEDED.value)
                          .exists())
    return (select(Job.id)
            .where(Job.status == Status.QUEUED.value, or_(Job.depends_on.is_(None), upstream_succeeded))
            .order_by(Job.priority.desc(), Job.id))  # ix_jobs_claim holds exactly this order: no sort


_READY = _build_ready()


# ---------------------------------------------------------------- fair share: each user's recent usage

# A user's usage is the worker time of their recent runs: a running job counts its elapsed time, a run
# that ended counts its length halved every USAGE_HALF_LIFE_S since it ended, each run at least
# MIN_CHARGE_S (loading a model holds the worker too, and a stream of tiny jobs is not free). Usages
# within USAGE_STEP_S of each other are equal: then the oldest job goes first.
USAGE_HALF_LIFE_S = 3600.0
USAGE_HORIZON_S = 8 * USAGE_HALF_LIFE_S  # a run that ended longer ago counts under 0.4 %: forgotten
MIN_CHARGE_S = 60.0
USAGE_STEP_S = 1.0
# Postgres hands out event ids before commit, so a lower id may appear after a higher one was read:
# each read goes back this many ids (and skips what it counted). SQLite commits writers one at a time.
_LATE_EVENT_IDS = 1000
_BACKFILL_EVENT_IDS = 5000  # the first read goes back through the horizon this many events at a time


def run_charge(began: datetime | None, ended: datetime | None, now: datetime) -> float:
    """Usage seconds of one run from `began` to `ended` (None: running now), as counted at `now`."""
    if began is None:
        return 0.0
    end = ended or now
    length = max((end - began).total_seconds(), MIN_CHARGE_S)
    age = max((now - end).total_seconds(), 0.0)
    return length * 0.5 ** (age / USAGE_HALF_LIFE_S)


def usage_level(seconds: float) -> int:
    """The usage as the claim compares it: whole steps."""
    return round(seconds / USAGE_STEP_S)


@dataclass
class _Ledger:
    """What one process has read of the job history (`events`) for the claims: the decayed usage of the
    runs that ended (each ends with an event from `running`), per user, and who may have jobs queued
    (every user who has is among them: each submit, retry and release is an event too). Each claim
    reads only the events added since the last, so a claim costs the same with ten finished jobs or a
    hundred thousand, and asks the queue only about users who may be in it."""

    seconds: dict[str, float] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)
    at: datetime | None = None  # what `seconds` is decayed to; None: nothing read yet
    through: int = 0  # the highest event id read
    counted: set[int] = field(default_factory=set)  # ids read within _LATE_EVENT_IDS of `through`
    lock: threading.Lock = field(default_factory=threading.Lock)


_LEDGERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Database -> _Ledger


def _history_query(after: int, upto: int | None = None, runs_only: bool = False) -> Select:
    """The events in (after, upto] that end a run or (unless runs_only) put a job in the queue: (id,
    user, from_status, to_status, began: the run's claim, ended)."""
    claim = aliased(Event)
    began = (select(func.max(claim.at))
             .where(claim.job_id == Event.job_id, claim.transition == "claim", claim.id < Event.id)
             .scalar_subquery())
    query = (select(Event.id, Job.submitted_by, Event.from_status, Event.to_status, began.label("began"),
                    Event.at.label("ended"))
             .join(Job, Job.id == Event.job_id)
             .where(Event.id > after))
    ended = Event.from_status == Status.RUNNING.value
    query = query.where(ended if runs_only else or_(ended, Event.to_status == Status.QUEUED.value))
    return query if upto is None else query.where(Event.id <= upto)


def _note(ledger: _Ledger, rows, now: datetime, late_ids: int, horizon: datetime | None = None) -> None:
    """Count the runs these events end (those that ended after `horizon`) and who they queue jobs for."""
    for row in rows:
        if row.id in ledger.counted:
            continue
        ledger.counted.add(row.id)
        ledger.through = max(ledger.through, row.id)
        if row.to_status == Status.QUEUED.value:  # submitted, retried or given back
            ledger.waiting.add(row.submitted_by)
        if row.from_status == Status.RUNNING.value and (horizon is None or row.ended >= horizon):
            ledger.seconds[row.submitted_by] = (ledger.seconds.get(row.submitted_by, 0.0)
                                                + run_charge(row.began, row.ended, now))
    ledger.counted = {i for i in ledger.counted if i > ledger.through - late_ids}


def _catch_up(s: Session, ledger: _Ledger, now: datetime, late_ids: int) -> None:
    """Bring the ledger to `now`: decay what it holds, note the events added since it last read."""
    if ledger.at is None:
        _first_read(s, ledger, now, late_ids)
    else:
        factor = 0.5 ** (max((now - ledger.at).total_seconds(), 0.0) / USAGE_HALF_LIFE_S)
        ledger.seconds = {u: v * factor for u, v in ledger.seconds.items() if v * factor >= USAGE_STEP_S / 100}
        _note(ledger, s.execute(_history_query(ledger.through - late_ids)).all(), now, late_ids)
    ledger.at = max(now, ledger.at or now)


def _first_read(s: Session, ledger: _Ledger, now: datetime, late_ids: int) -> None:
    """Who has jobs queued now, and the runs that ended within the horizon: the newest events first,
    a range of ids at a time, until one range reaches before the horizon (the events that queued jobs
    are left out there: the queue itself says who waits now)."""
    newest = s.execute(select(func.max(Event.id))).scalar() or 0
    ledger.waiting = set(s.execute(select(Job.submitted_by).where(Job.status == Status.QUEUED.value)
                                   .distinct()).scalars())
    horizon = now - timedelta(seconds=USAGE_HORIZON_S)
    upto = newest
    while upto > 0:
        after = max(upto - _BACKFILL_EVENT_IDS, 0)
        _note(ledger, s.execute(_history_query(after, upto, runs_only=True)).all(), now, late_ids, horizon)
        oldest = s.execute(select(Event.at).where(Event.id > after).order_by(Event.id).limit(1)).scalar()
        if oldest is None or oldest < horizon:
            break
        upto = after
    ledger.through = max(ledger.through, newest)


def _ledger(s: Session, db: Database, now: datetime) -> _Ledger:
    """This process's ledger of `db`, caught up to now (the caller holds its lock)."""
    ledger = _LEDGERS.setdefault(db, _Ledger())
    _catch_up(s, ledger, now, 0 if db.is_sqlite else _LATE_EVENT_IDS)
    return ledger


def _usage(s: Session, db: Database, now: datetime) -> dict[str, float]:
    """Each user's usage now (users without any are left out)."""
    ledger = _LEDGERS.setdefault(db, _Ledger())
    with ledger.lock:
        usage = dict(_ledger(s, db, now).seconds)
    for user, began in s.execute(select(Job.submitted_by, Job.started_at).where(Job.status == Status.RUNNING.value)):
        usage[user] = usage.get(user, 0.0) + run_charge(began, None, now)
    return usage


def user_usage(db: Database, now: datetime | None = None) -> dict[str, float]:
    """Each user's usage as the claim weighs it: worker seconds of recent runs, decayed (fair share)."""
    with db.transaction() as s:
        return _usage(s, db, now or utcnow())


@dataclass
class _Turns:
    """What a claim weighs: each user's usage_level (none: 0), and the users who may have jobs queued."""

    levels: dict[str, int]
    ledger: _Ledger

    def lighter_than(self, level: int) -> list[list[str]]:
        """The users who may have jobs queued and used less than `level`, by usage, the least first."""
        by_level: dict[int, list[str]] = {}
        with self.ledger.lock:
            waiting = list(self.ledger.waiting)
        for user in waiting:
            if (mine := self.levels.get(user, 0)) < level:
                by_level.setdefault(mine, []).append(user)
        return [sorted(by_level[n]) for n in sorted(by_level)]


def _turns(s: Session, db: Database, now: datetime) -> _Turns:
    usage = _usage(s, db, now)
    return _Turns({u: n for u, seconds in usage.items() if (n := usage_level(seconds)) > 0},
                  _LEDGERS[db])


def _fair_pick(s: Session, ready: Select, turns: _Turns) -> int | None:
    """The job to claim among `ready` (in priority, id order): the claim policy (docs/ARCHITECTURE.md).

    Highest priority first; among ready jobs of that priority, one of the submitter who used the
    least worker time lately (fair share); then the lowest id. So a lone job of one user starts at
    the next free worker, however long another's sweep. Each probe reads ix_jobs_claim in order and
    stops at its first match, so a claim never sorts the queue: the first probe is the oldest ready
    job; more follow only when its submitter used more than others who may have jobs queued, one per
    distinct usage below theirs. Users found without any queued job are struck off the ledger's list."""
    top = s.execute(ready.add_columns(Job.priority, Job.submitted_by).limit(1)).first()
    if top is None:
        return None
    for users in turns.lighter_than(turns.levels.get(top.submitted_by, 0)):
        found = s.execute(ready.where(Job.priority == top.priority, Job.submitted_by.in_(users)).limit(1)).scalar()
        if found is not None:
            return found
        queued = set(s.execute(select(Job.submitted_by).where(Job.status == Status.QUEUED.value,
                                                              Job.submitted_by.in_(users)).distinct()).scalars())
        with turns.ledger.lock:
            turns.ledger.waiting -= set(users) - queued
    return top.id


def most_urgent_ready_job(db: Database) -> tuple[int, int] | None:
    """(id, GPUs it needs) of the job the next free worker should take; None when none is ready.
    The runner makes room on one node when that job needs several GPUs (runner.run)."""
    with db.transaction() as s:
        return _most_urgent(s, _turns(s, db, utcnow()))


def _most_urgent(s: Session, turns: _Turns) -> tuple[int, int] | None:
    picked = _fair_pick(s, _ready(), turns)
    return None if picked is None else (picked, s.execute(select(gpus_needed()).where(Job.id == picked)).scalar())


def queued_line(db: Database, now: datetime | None = None) -> tuple[list, dict[str, float]]:
    """What predicting the claims needs, read in one transaction: every queued job (id, submitted_by,
    priority, depends_on, upstream_status, and of its params what it needs of a device: gpus,
    needs_gpu, min_compute_capability) in (priority, id) order, and each user's usage."""
    upstream = aliased(Job)
    query = (select(Job.id, Job.submitted_by, Job.priority, Job.depends_on, upstream.status.label("upstream_status"),
                    Job.params["gpus"].as_integer().label("gpus"),
                    Job.params["needs_gpu"].as_boolean().label("needs_gpu"),
                    Job.params["min_compute_capability"].as_float().label("min_compute_capability"))
             .outerjoin(upstream, upstream.id == Job.depends_on)
             .where(Job.status == Status.QUEUED.value).order_by(Job.priority.desc(), Job.id))
    with db.transaction() as s:
        return s.execute(query).all(), _usage(s, db, now or utcnow())


def claim_order(queued: Sequence, usage: dict[str, float]) -> list[int]:
    """The ids of the ready jobs among `queued` (queued_line's rows) in the order the claims would take
    them: priority first; within one priority the users take turns, the one whose usage is least first
    (equal usages: the one with the oldest job), each user's jobs oldest first. The first is
    _fair_pick's pick; the turns after it are how the policy plays out over jobs of similar length."""
    by_priority: dict[int, dict[str, list[int]]] = {}
    for row in sorted(queued, key=lambda r: (-r.priority, r.id)):
        if row.depends_on is None or row.upstream_status == Status.SUCCEEDED.value:
            by_priority.setdefault(row.priority, {}).setdefault(row.submitted_by, []).append(row.id)
    order: list[int] = []
    for priority in sorted(by_priority, reverse=True):
        users = by_priority[priority]
        turns = sorted(users, key=lambda u: (usage_level(usage.get(u, 0.0)), users[u][0]))
        for round_ in range(max(len(ids) for ids in users.values())):
            order += [users[u][round_] for u in turns if round_ < len(users[u])]
    return order


def claim_job(db: Database, worker: str, gpu: str | None, lease_s: float = DEFAULT_LEASE_S, *,
              gpus: int = 1, only_multi_gpu: bool = False, passable: Collection[int] | None = None,
              compute_capability: float | None = None, skip: Collection[int] = ()) -> Job | None:
    """Take the most urgent ready job for `worker`, in one atomic statement; None when none is ready.

    Ready: queued, and its upstream job (if any) succeeded. A worker holding `gpus` GPUs takes only
    jobs that need no more (a CPU worker counts as one: it never takes a job that needs several), and
    only jobs its device can run (`runnable_by`: compute_capability None is a CPU worker, which never
    takes a job whose method needs a GPU); `only_multi_gpu` limits it to jobs that need more than one.
    Expired leases are settled first, in the same transaction, so any running qrun keeps the table honest.
    Orphans of failed upstream jobs are never ready; they are failed only when nothing is, as finding them scans
    the queue.

    `passable` is given by a worker that the runner may lend to a job needing more GPUs than it
    holds: when the most urgent ready job is such a job and not among these ids (the runner has not
    decided yet where it runs), the worker takes nothing, so that no later job overtakes it meanwhile.
    `skip`: jobs this worker left for others (its node cannot read their model).
    """
    ready = _claimable(gpus, compute_capability, only_multi_gpu)
    if skip:
        ready = ready.where(Job.id.notin_(list(skip)))
    if not db.is_sqlite:
        ready = ready.with_for_update(skip_locked=True, of=Job)
    now = utcnow()
    with db.transaction() as s:
        _reap_expired_leases(s, now)
        turns = _turns(s, db, now)
        if passable is not None:
            head = _most_urgent(s, turns)
            if head is not None and head[1] > gpus and head[0] not in passable:
                return None  # it waits to be placed: no later job may take its place meanwhile
        # SQLite: the transaction holds the write lock from its start (BEGIN IMMEDIATE), so the pick
        # and the update below are one atomic step. Postgres: the pick locks its row (SKIP LOCKED:
        # concurrent claimers pass it by) until this transaction ends.
        picked = _fair_pick(s, ready, turns)
        row = None if picked is None else s.execute(
            update(Job)
            .where(Job.id == picked, Job.status == Status.QUEUED.value)
            .values(status=Status.RUNNING.value, worker=worker, gpu=gpu, attempts=Job.attempts + 1,
                    started_at=now, finished_at=None, lease_expires_at=now + timedelta(seconds=lease_s),
                    progress_done=0, progress_module=None, error=None)
            .returning(Job.id)
        ).first()
        if row is not None:
            s.add(Event(job_id=row.id, transition="claim", from_status=Status.QUEUED.value,
                        to_status=Status.RUNNING.value, at=now, detail=f"{worker} gpu={gpu}"))
            return s.get(Job, row.id)
    fail_orphans(db)
    return None


@functools.lru_cache(maxsize=64)
def _claimable(gpus: int, compute_capability: float | None, only_multi_gpu: bool) -> Select:
    """The ready jobs a worker of this kind can take (built once per kind of worker)."""
    ready = _ready().where(runnable_by(gpus, compute_capability))
    return ready.where(gpus_needed() > 1) if only_multi_gpu else ready


def _held(worker: str, job_id: int):
    return and_(Job.id == job_id, Job.worker == worker, Job.status == Status.RUNNING.value)


def _ensure_held(s: Session, result, job_id: int, worker: str) -> None:
    if result.rowcount == 1:
        return
    status = s.execute(select(Job.status).where(Job.id == job_id)).scalar()
    raise JobLost(f"job {job_id} is {status} and no longer held by {worker}")


def heartbeat(db: Database, job_id: int, worker: str, lease_s: float = DEFAULT_LEASE_S) -> None:
    """Extend the lease; raises JobLost when the job was cancelled or taken away."""
    with db.transaction() as s:
        result = s.execute(update(Job).where(_held(worker, job_id))
                           .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s)))
        _ensure_held(s, result, job_id, worker)


def record_progress(db: Database, job_id: int, worker: str, done: int, total: int, module: str | None,
                    lease_s: float = DEFAULT_LEASE_S) -> None:
    """Record 'layer done of total, now at module' and extend the lease; raises JobLost if not held."""
    with db.transaction() as s:
        result = s.execute(
            update(Job).where(_held(worker, job_id))
            .values(progress_done=done, progress_total=total, progress_module=module,
                    lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        )
        _ensure_held(s, result, job_id, worker)


def set_log_path(db: Database, job_id: int, path: str) -> None:
    with db.transaction() as s:
        s.execute(update(Job).where(Job.id == job_id).values(log_path=path))


@dataclass
class ArtifactRecord:
    kind: str
    path: str
    bytes: int
    sha256: str
    node: str | None = None  # the host that wrote it


def finish_job(db: Database, job_id: int, worker: str, metrics: dict[str, float],
               artifacts: Iterable[ArtifactRecord] = ()) -> None:
    """Mark the job succeeded and store its metrics and artifacts, all in one transaction."""
    with db.transaction() as s:
        _transition(s, job_id, "succeed", worker=worker,
                    values={"finished_at": utcnow(), "lease_expires_at": None, "error": None,
                            "progress_module": None})
        s.execute(delete(Metric).where(Metric.job_id == job_id))
        s.execute(delete(Artifact).where(Artifact.job_id == job_id))
        s.add_all(Metric(job_id=job_id, name=k, value=float(v)) for k, v in metrics.items() if v is not None)
        s.add_all(Artifact(job_id=job_id, kind=a.kind, path=a.path, bytes=a.bytes, sha256=a.sha256, node=a.node)
                  for a in artifacts)


def fail_job(db: Database, job_id: int, worker: str, error: str, retryable: bool = False) -> Status:
    """Record a failure. A retryable one goes back to the queue while attempts remain."""
    with db.transaction() as s:
        job = s.get(Job, job_id)
        if retryable and job is not None and job.attempts < job.max_attempts:
            _transition(s, job_id, "release", worker=worker,
                        values={"worker": None, "lease_expires_at": None, "error": error}, detail=error)
            return Status.QUEUED
        _transition(s, job_id, "fail", worker=worker,
                    values={"finished_at": utcnow(), "lease_expires_at": None, "error": error}, detail=error)
        return Status.FAILED


def release_job(db: Database, job_id: int, worker: str, reason: str) -> None:
    """Give a running job back to the queue without counting the attempt (Ctrl-C, shutdown)."""
    with db.transaction() as s:
        _transition(s, job_id, "release", worker=worker, detail=reason,
                    values={"worker": None, "gpu": None, "lease_expires_at": None,
                            "attempts": func.max(Job.attempts - 1, 0) if db.is_sqlite
                            else func.greatest(Job.attempts - 1, 0)})


# ---------------------------------------------------------------- keeping the table honest


def _locking_unclaimed(s: Session, query: Select) -> Select:
    """On Postgres, lock the jobs rows the query returns and pass over rows another transaction has
    locked (it is settling them). SQLite needs nothing: the transaction already holds the write lock."""
    if s.get_bind().dialect.name == "sqlite":
        return query
    return query.with_for_update(skip_locked=True, of=Job)


def reap_expired_leases(db: Database, now: datetime | None = None) -> list[int]:
    """Requeue running jobs whose worker stopped heartbeating; fail those out of attempts."""
    with db.transaction() as s:
        return _reap_expired_leases(s, now or utcnow())


def _reap_expired_leases(s: Session, now: datetime) -> list[int]:
    """Requeue (or fail, out of attempts) the running jobs whose lease expired; the ids this call settled."""
    expired = s.execute(_locking_unclaimed(s, (
        select(Job.id, Job.worker, Job.attempts, Job.max_attempts)
        .where(Job.status == Status.RUNNING.value, Job.lease_expires_at < now)
    ))).all()
    settled = []
    # Still expired when updated: a job that another claimer requeued and a worker took up again
    # meanwhile is running too, but under a fresh lease, and must not be taken from its new holder.
    still_expired = Job.lease_expires_at < now
    for job in expired:
        reason = f"worker {job.worker} lost (lease expired) on attempt {job.attempts}/{job.max_attempts}"
        if job.attempts < job.max_attempts:
            done = _transition(s, job.id, "release", detail=reason, guard=still_expired, lost_race_ok=True,
                               values={"worker": None, "lease_expires_at": None, "error": reason})
        else:
            done = _transition(s, job.id, "fail", detail=reason, guard=still_expired, lost_race_ok=True,
                               values={"finished_at": now, "lease_expires_at": None,
                                       "error": f"{reason}; no attempts left"})
        if done:
            settled.append(job.id)
    return settled


def fail_orphans(db: Database) -> list[int]:
    """Fail queued jobs whose upstream job failed or was cancelled: they can never run."""
    upstream = aliased(Job)
    failed = []
    with db.transaction() as s:
        orphans = s.execute(_locking_unclaimed(s, (
            select(Job.id, upstream.id.label("up"), upstream.status.label("up_status"))
            .join(upstream, Job.depends_on == upstream.id)
            .where(Job.status == Status.QUEUED.value,
                   upstream.status.in_([Status.FAILED.value, Status.CANCELLED.value]))
        ))).all()
        for o in orphans:
            reason = f"upstream job {o.up} {o.up_status}"
            if _transition(s, o.id, "fail", detail=reason, lost_race_ok=True,
                           values={"finished_at": utcnow(), "error": reason}):
                failed.append(o.id)
    return failed


# ---------------------------------------------------------------- the user's side


def cancel_jobs(db: Database, job_ids: Sequence[int], user: str | None = None, force: bool = False) -> None:
    """Cancel queued or running jobs. A running job's worker notices at its next layer. Another user's
    job only with force; that, and every forced cancel, goes to the audit log."""
    user = user or current_user()
    with db.transaction() as s:
        for job_id in job_ids:
            _check_owner(s, job_id, user, force, "cancel")
            _transition(s, job_id, "cancel", detail=f"by {user}",
                        values={"finished_at": utcnow(), "lease_expires_at": None, "error": f"cancelled by {user}"})


def _check_owner(s: Session, job_id: int, user: str, force: bool, verb: str) -> None:
    """Only the job's submitter may change it, unless forced: a shared queue holds other people's work.
    A change to another user's job, or any forced one, is audit-logged in the same transaction."""
    owner = s.execute(select(Job.submitted_by).where(Job.id == job_id)).scalar()
    if owner is None:
        raise JobNotFound(f"job {job_id} does not exist: see `qrun status` for job ids")
    if owner != user and not force:
        raise TransitionError(f"job {job_id} belongs to {owner}: add --force to {verb} another user's job")
    if owner != user or force:
        audit.record(s, user, verb, f"job {job_id}", f"of {owner}" + (", --force" if force else ""))


def retry_jobs(db: Database, job_ids: Sequence[int], user: str | None = None, force: bool = False) -> None:
    """Put failed or cancelled jobs back in the queue with fresh attempts (another user's only if forced)."""
    user = user or current_user()
    with db.transaction() as s:
        for job_id in job_ids:
            _check_owner(s, job_id, user, force, "retry")
            _transition(s, job_id, "retry", detail=f"by {user}",
                        values={"attempts": 0, "error": None, "worker": None, "gpu": None,
                                "finished_at": None, "started_at": None, "progress_done": 0,
                                "progress_module": None})


def get_job(db: Database, job_id: int) -> Job:
    with db.transaction() as s:
        job = s.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} does not exist: see `qrun status` for job ids")
    return job


def list_jobs(db: Database, job_ids: Sequence[int] | None = None, *, plain: bool = False) -> list[Job]:
    """Jobs by id. plain: read-only rows with the same attributes, a third of the cost of ORM
    objects, which counts over thousands of jobs (`qrun status`)."""
    query = (select(*Job.__table__.columns) if plain else select(Job)).order_by(Job.id)
    if job_ids:
        query = query.where(Job.id.in_(list(job_ids)))
    with db.transaction() as s:
        jobs = list(s.execute(query).all() if plain else s.scalars(query))
    if job_ids:
        missing = sorted(set(job_ids) - {j.id for j in jobs})
        if missing:
            raise JobNotFound(f"job {missing[0]} does not exist: see `qrun status` for job ids")
    return jobs


def metrics_of(db: Database, job_ids: Sequence[int]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {j: {} for j in job_ids}
    with db.transaction() as s:
        for m in s.scalars(select(Metric).where(Metric.job_id.in_(list(job_ids)))):
            out[m.job_id][m.name] = m.value
    return out


def artifacts_of(db: Database, job_ids: Sequence[int]) -> dict[int, list[Artifact]]:
    out: dict[int, list[Artifact]] = {j: [] for j in job_ids}
    with db.transaction() as s:
        for a in s.scalars(select(Artifact).where(Artifact.job_id.in_(list(job_ids)))):
            out[a.job_id].append(a)
    return out


def events_of(db: Database, job_id: int) -> list[Event]:
    with db.transaction() as s:
        return list(s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


def finished_among(db: Database, job_ids: Iterable[int]) -> set[int]:
    """Those of job_ids whose jobs are finished: they run again only if retried, from nothing."""
    with db.transaction() as s:
        return set(s.execute(select(Job.id).where(Job.id.in_(list(job_ids)),
                                                  Job.status.in_([st.value for st in FINISHED]))).scalars())


def pending_count(db: Database, cpu_worker: bool = False, skip: Collection[int] = ()) -> int:
    """Jobs not yet finished: queued (runnable or waiting on upstream) or running. cpu_worker: only
    those a CPU worker can run (its drain is over when nothing it could ever take is left); skip:
    jobs not to count (a worker's own `claim_job(skip=...)`)."""
    query = select(func.count()).select_from(Job).where(Job.status.notin_([st.value for st in FINISHED]))
    if cpu_worker:
        query = query.where(runnable_by(1, None))
    if skip:
        query = query.where(Job.id.notin_(list(skip)))
    with db.transaction() as s:
        return s.execute(query).scalar()


def queued_for_a_gpu(db: Database) -> int:
    """Queued jobs that only a GPU worker can take (their method needs one: workers.methods)."""
    with db.transaction() as s:
        return s.execute(select(func.count()).select_from(Job).where(
            Job.status == Status.QUEUED.value, Job.params["needs_gpu"].as_boolean().is_(True))).scalar()


def queued_for_several_gpus(db: Database) -> int:
    """Queued jobs that need more than one GPU of one node (--gpus-per-job)."""
    with db.transaction() as s:
        return s.execute(select(func.count()).select_from(Job).where(
            Job.status == Status.QUEUED.value, Job.params["gpus"].as_integer() > 1)).scalar()


def jobs_held_by(db: Database, worker: str) -> list[int]:
    """The running jobs that `worker` holds (to give them back when it is known to be dead)."""
    with db.transaction() as s:
        return list(s.execute(select(Job.id).where(Job.worker == worker,
                                                   Job.status == Status.RUNNING.value)).scalars())


def jobs_ended_by(db: Database, workers: Collection[str]) -> list[int]:
    """The finished jobs that one of `workers` ended (a run's summary counts those of a worker that
    died after them, whose own report of them died with it)."""
    if not workers:
        return []
    with db.transaction() as s:
        return list(s.execute(select(Job.id).where(Job.worker.in_(list(workers)),
                                                   Job.status.in_([st.value for st in FINISHED]))
                              .order_by(Job.id)).scalars())


# ---------------------------------------------------------------- the workers' own rows (`qrun workers`)


def register_worker(db: Database, name: str, node: str, slot: str, device: str, gpu: str | None) -> None:
    """A worker says it is up (a restarted process has a new pid, so a new row)."""
    now = utcnow()
    with db.transaction() as s:
        s.merge(Worker(name=name, node=node, slot=slot, device=device, gpu=gpu, started_at=now,
                       heartbeat_at=now, stopped_at=None, current_job=None, jobs_done=0))


def worker_heartbeat(db: Database, name: str, *, job: int | None, finished_one: bool = False,
                     activity: str | None = None) -> None:
    """A worker says it is alive, which job it holds (None: none), and what it does meanwhile
    without one (None: nothing, idle)."""
    values = {"heartbeat_at": utcnow(), "current_job": job, "stopped_at": None, "activity": activity}
    if finished_one:
        values["jobs_done"] = Worker.jobs_done + 1
    with db.transaction() as s:
        s.execute(update(Worker).where(Worker.name == name).values(**values))


def worker_stopped(db: Database, name: str) -> None:
    with db.transaction() as s:
        s.execute(update(Worker).where(Worker.name == name)
                  .values(stopped_at=utcnow(), heartbeat_at=utcnow(), current_job=None, activity=None))


def preparing_activity(job_id: int, what: str) -> str:
    """A worker's activity while it readies a job (a kernel build: minutes on a fresh machine).
    `qrun workers` shows it as it is; `qrun status` finds the job by it (jobs_being_prepared)."""
    return f"preparing job {job_id}: {what}"


_PREPARING = re.compile(r"preparing job (\d+): (.*)", re.DOTALL)


def jobs_being_prepared(db: Database, since: datetime) -> dict[int, tuple[str, str]]:
    """Jobs that a worker which reported since `since` is readying: job id -> (its slot, what it does)."""
    query = select(Worker.slot, Worker.activity).where(Worker.stopped_at.is_(None), Worker.heartbeat_at >= since,
                                                       Worker.activity.is_not(None))
    with db.transaction() as s:
        rows = s.execute(query).all()
    found = {}
    for slot, activity in rows:
        match = _PREPARING.fullmatch(activity)
        if match:
            found[int(match[1])] = (slot, match[2])
    return found


def list_workers(db: Database, since: datetime | None = None) -> list[Worker]:
    """Workers that reported since `since` (all when None), the newest first."""
    query = select(Worker).order_by(Worker.heartbeat_at.desc(), Worker.name)
    if since is not None:
        query = query.where(Worker.heartbeat_at >= since)
    with db.transaction() as s:
        return list(s.scalars(query))


# ---------------------------------------------------------------- priority caps (`qrun cap-priority`)

CAP_KEY = "max_priority:"  # qrun_meta key prefix: max_priority:USER -> the highest --priority USER may set


def check_user_name(user: str) -> str:
    """BadInput unless `user` reads as a login name that a priority cap can be kept for."""
    if not user.strip() or not user.isprintable() or user != user.strip():
        raise BadInput(f"user name {user!r} is not a user name: give the login name, as `qrun status` shows it")
    if len(CAP_KEY + user) > 64:
        raise BadInput(f"user name {user!r} is too long for a priority cap (at most {64 - len(CAP_KEY)} characters)")
    return user


def set_priority_cap(db: Database, user: str, cap: int | None, actor: str | None = None) -> bool:
    """Cap the priority `user` may submit with (None: remove the cap); whether a cap was there before.
    Audit-logged as done by `actor` (default: the caller). Who may call this is an admin
    (qrun.housekeeping.set_cap checks)."""
    from qrun.db.schema import Meta

    key = CAP_KEY + check_user_name(user)
    if cap is not None:
        check_priority(cap)
    with db.transaction() as s:
        had_cap = s.execute(delete(Meta).where(Meta.key == key)).rowcount > 0
        if cap is not None:
            s.add(Meta(key=key, value=str(cap)))
        change = f"cap {cap}" if cap is not None else ("cap removed" if had_cap else "had no cap")
        audit.record(s, actor or current_user(), "cap-priority", f"user {user}", change)
    return had_cap


def priority_caps(db: Database) -> dict[str, int]:
    """Every user's priority cap: {user: cap}."""
    from qrun.db.schema import Meta

    with db.transaction() as s:
        rows = s.execute(select(Meta.key, Meta.value).where(Meta.key.startswith(CAP_KEY, autoescape=True))).all()
    return {key[len(CAP_KEY):]: int(value) for key, value in rows}


def check_priority_cap(db: Database, priority: int, user: str | None = None) -> None:
    """BadInput when `priority` is above the cap an admin set for `user` (default: the caller)."""
    user = user or current_user()
    cap = priority_cap(db, user)
    if cap is not None and priority > cap:
        raise BadInput(f"--priority {priority} is above the cap of {cap} set for {user}: give --priority {cap} "
                       f"or less (an admin changes caps with `qrun cap-priority`)")


def priority_cap(db: Database, user: str) -> int | None:
    from qrun.db.schema import Meta

    with db.transaction() as s:
        value = s.execute(select(Meta.value).where(Meta.key == CAP_KEY + user)).scalar()
    return None if value is None else int(value)


# ---------------------------------------------------------------- housekeeping (`qrun prune`, `qrun du`)


@dataclass
class PruneCandidate:
    id: int
    kind: str
    status: str
    model: str
    submitted_by: str
    finished_at: datetime | None
    log_path: str | None
    artifacts: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes) from the artifacts table


def prune_candidates(db: Database, before: datetime, *, failed_only: bool = False,
                     user: str | None = None) -> list[PruneCandidate]:
    """Finished jobs that finished before `before` (only failed or cancelled ones with failed_only; only
    `user`'s with user), less every job that a kept job depends on (a quantize job whose eval stays):
    queued and running jobs are never among them."""
    statuses = [Status.FAILED.value, Status.CANCELLED.value] if failed_only else [st.value for st in FINISHED]
    query = select(Job.id, Job.kind, Job.status, Job.model, Job.submitted_by, Job.finished_at, Job.log_path).where(
        Job.status.in_(statuses), func.coalesce(Job.finished_at, Job.created_at) < before)
    if user is not None:
        query = query.where(Job.submitted_by == user)
    with db.transaction() as s:
        rows = {r.id: r for r in s.execute(query.order_by(Job.id)).all()}
        # (downstream, upstream) pairs whose upstream is a candidate: an upstream stays while any job
        # that depends on it stays, and keeping one may keep its own upstream in turn.
        links = s.execute(select(Job.id, Job.depends_on).where(Job.depends_on.is_not(None))).all()
        dependents: dict[int, list[int]] = {}
        for down, up in links:
            dependents.setdefault(up, []).append(down)
        changed = True
        while changed:
            changed = False
            for job_id in list(rows):
                if any(d not in rows for d in dependents.get(job_id, ())):
                    del rows[job_id]
                    changed = True
        arts: dict[int, list[tuple[str, int]]] = {}
        ids = list(rows)
        for chunk in range(0, len(ids), 500):
            for a in s.execute(select(Artifact.job_id, Artifact.path, Artifact.bytes)
                               .where(Artifact.job_id.in_(ids[chunk:chunk + 500]))):
                arts.setdefault(a.job_id, []).append((a.path, a.bytes))
    return [PruneCandidate(r.id, r.kind, r.status, r.model, r.submitted_by, r.finished_at, r.log_path,
                           arts.get(r.id, [])) for r in rows.values()]


def delete_finished_jobs(db: Database, job_ids: Sequence[int], actor: str | None = None,
                         forced: bool = False) -> list[int]:
    """Delete the rows (job, events, metrics, artifacts, sweep memberships) of those jobs that are still
    finished and that no job outside `job_ids` depends on, in one transaction; the ids deleted. The
    prune is audit-logged in that transaction, as done by `actor` (default: the caller)."""
    wanted = set(job_ids)
    with db.transaction() as s:
        ids = set(s.execute(select(Job.id).where(Job.id.in_(list(wanted)),
                                                 Job.status.in_([st.value for st in FINISHED]))).scalars())
        links = s.execute(select(Job.id, Job.depends_on).where(Job.depends_on.in_(list(ids)))).all()
        changed = True
        while changed:  # a job a kept job depends on stays (someone retried or added an eval meanwhile)
            kept = {up for down, up in links if down not in ids and up in ids}
            changed = bool(kept)
            ids -= kept
        ordered = sorted(ids)
        for chunk in range(0, len(ordered), 500):
            part = ordered[chunk:chunk + 500]
            for table in (Event, Metric, Artifact, SweepJob):
                s.execute(delete(table).where(table.job_id.in_(part)))
        # Downstream first (Postgres checks the depends_on key per statement anyway; one statement).
        for chunk in range(0, len(ordered), 500):
            s.execute(update(Job).where(Job.id.in_(ordered[chunk:chunk + 500])).values(depends_on=None))
        owners = _owners(s, ordered)
        for chunk in range(0, len(ordered), 500):
            s.execute(delete(Job).where(Job.id.in_(ordered[chunk:chunk + 500])))
        if ordered:
            whose = ", ".join(f"{u} ({n})" for u, n in sorted(owners.items()))
            detail = f"of {whose}" + (", --force" if forced else "")
            audit.record(s, actor or current_user(), "prune", f"jobs {audit.id_ranges(ordered)}", detail)
    return ordered


def _owners(s: Session, ids: list[int]) -> dict[str, int]:
    """How many of these jobs each user submitted."""
    counts: dict[str, int] = {}
    for chunk in range(0, len(ids), 500):
        for user, n in s.execute(select(Job.submitted_by, func.count()).where(Job.id.in_(ids[chunk:chunk + 500]))
                                 .group_by(Job.submitted_by)):
            counts[user] = counts.get(user, 0) + n
    return counts


def usage_rows(db: Database) -> list:
    """One row per job: id, submitted_by, model, artifact bytes (from the artifacts table), log_path."""
    with db.transaction() as s:
        return s.execute(
            select(Job.id, Job.submitted_by, Job.model, Job.log_path,
                   func.coalesce(func.sum(Artifact.bytes), 0).label("artifact_bytes"))
            .outerjoin(Artifact, Artifact.job_id == Job.id)
            .group_by(Job.id, Job.submitted_by, Job.model, Job.log_path).order_by(Job.id)).all()
