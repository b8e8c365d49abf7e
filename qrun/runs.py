"""Working the queue (`qrun run`, and the demo's own run): start or join Ray, keep one worker per slot
draining the queue until it is empty (or until Ctrl-C when serving), stop the Ray it started, and
count from the table what ended.

What a run has to say goes to a `say(line)` callback, and a display follows it through
`on_tick(watch)` (a JobWatch): the caller decides where lines go and how the jobs are shown.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from qrun.db.errors import BadInput
from qrun.db.states import FINISHED, Status

MAX_CPU_WORKERS = 1024
MAX_LEASE_S = 86400  # a day: a worker silent for longer is gone
MAX_GRACE_S = 3600  # an hour: a stop that waits longer than that for workers is no stop
ACTIVE = (Status.QUEUED.value, Status.RUNNING.value)


@dataclass
class RunOutcome:
    """What a run did: the workers it started (their names), the jobs that ended (counted from the
    table: a job retried counts once), the failed ones, worker restarts, whether Ctrl-C stopped it,
    and how many queued jobs still wait for a GPU worker or for a node with several GPUs."""

    workers: list[str] = field(default_factory=list)
    ran: int = 0
    failed: list[int] = field(default_factory=list)
    restarts: int = 0
    interrupted: bool = False
    waiting_for_a_gpu: int = 0
    waiting_for_several_gpus: int = 0


class JobWatch:
    """The jobs a run's display shows: those from the first one pending when the workers started on,
    and any queued or running. `stopped` is set once the workers have stopped."""

    def __init__(self, db, since: int, say: Callable[[str], None]):
        self.db = db
        self.since = since
        self.say = say
        self.problem: str | None = None
        self.stopped = False

    def read(self) -> tuple[list, dict[int, tuple[str, str]]] | None:
        """(jobs, what each job is preparing), or None while the table is out of reach: that is said
        once, not raised, as workers wait it out too."""
        from qrun.db import queue
        from qrun.views import preparing_now
        from qrun.workers.jobs import describe_error

        try:
            jobs = [j for j in queue.list_jobs(self.db) if j.id >= self.since or j.status in ACTIVE]
            preparing = preparing_now(self.db, jobs)
        except Exception as exc:  # noqa: BLE001 -- the runner goes on; workers back off and retry
            problem = describe_error(exc)
            if problem != self.problem:
                self.say(f"qrun: cannot read the job table ({problem}); workers wait and retry")
            self.problem = problem
            return None
        if self.problem:
            self.say("qrun: the job table can be read again")
            self.problem = None
        return jobs, preparing


# ---------------------------------------------------------------- options


def parse_gpus(value: str | list[int] | None) -> list[int] | None:
    """--gpus as a list of distinct GPU indices ("0,1" or [0, 1]); None: every GPU Ray finds."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            gpus = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise BadInput(f"--gpus {value!r} must be a comma-separated list of GPU indices, like 0,1") from None
    else:
        gpus = list(value)
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise BadInput(f"--gpus {value!r} must list distinct GPU indices, like 0,1")
    return gpus


def check_run_options(*, gpus=None, cpu_workers: int | None = None, until_empty: bool = False, serve: bool = False,
                      ray_address: str | None = None, lease_s: float = 60.0, grace_s: float = 30.0) -> str | None:
    """Refuse options that can never work (BadInput) before Ray starts or the table is opened; return
    the warning to give where more CPU workers than cores are asked for, else None."""
    from qrun.workers.limits import job_memory_cap_mb

    if until_empty and serve:
        raise BadInput("--until-empty and --serve: give one (--serve keeps running until Ctrl-C)")
    parse_gpus(gpus)
    if cpu_workers is not None and not 0 < cpu_workers <= MAX_CPU_WORKERS:
        raise BadInput(f"--cpu-workers {cpu_workers} must be between 1 and {MAX_CPU_WORKERS}")
    if not 1 <= lease_s <= MAX_LEASE_S:  # also refuses nan and inf
        raise BadInput(f"--lease {lease_s} must be between 1 and {MAX_LEASE_S} seconds")
    if not 0 <= grace_s <= MAX_GRACE_S:
        raise BadInput(f"--grace {grace_s} must be between 0 and {MAX_GRACE_S} seconds")
    job_memory_cap_mb()  # a typo in QRUN_JOB_MEMORY_MB stops the run here, not every job it claims
    return _too_many_cpu_workers(cpu_workers, ray_address)


def _too_many_cpu_workers(cpu_workers: int | None, ray_address: str | None) -> str | None:
    """Allowed (a job may wait on I/O), but each worker then gets one thread and holds its own model."""
    if cpu_workers and not ray_address and cpu_workers > (os.cpu_count() or 1):
        return (f"qrun: --cpu-workers {cpu_workers} on {os.cpu_count()} cores: the workers share the cores "
                "(one thread each) and each holds its own model in memory; jobs will not finish sooner")
    return None


def run_log_path() -> Path:
    """A run's own log, beside the jobs' (it takes Ray's notices: they are not the user's business)."""
    from qrun.db.session import logs_root

    return logs_root() / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


# ---------------------------------------------------------------- running


def run_with_log(db, gpus: list[int] | None = None, cpu_workers: int | None = None, burst: bool = True,
                 ray_address: str | None = None, lease_s: float | None = None, say: Callable[[str], None] = print,
                 on_tick: Callable[[JobWatch], None] | None = None, grace_s: float | None = None) -> RunOutcome:
    """`qrun run`: drain() as "qrun", Ray's notices in a run log of their own (named on the first line).
    A run refused before Ray said anything leaves no empty log behind."""
    log_path = run_log_path()
    try:
        with log_path.open("a", encoding="utf-8") as notices:
            return drain(db, "qrun", gpus, cpu_workers, burst, ray_address, lease_s,
                         note=f" (Ray's own notices: {log_path})", ray_notices=notices, say=say, on_tick=on_tick,
                         grace_s=grace_s)
    except BadInput:  # refused before Ray said anything (a bad --ray-address, --gpus)
        if log_path.stat().st_size == 0:
            log_path.unlink()
        raise


def drain(db, who: str, gpus: list[int] | None = None, cpu_workers: int | None = None, burst: bool = True,
          ray_address: str | None = None, lease_s: float | None = None, note: str = "",
          ray_notices: TextIO | None = None, say: Callable[[str], None] = print,
          on_tick: Callable[[JobWatch], None] | None = None, grace_s: float | None = None) -> RunOutcome:
    """Start (or join) Ray, run workers until the queue is drained (or Ctrl-C with burst=False), stop
    the Ray it started, say one summary line (each line starts with `who`). ray_notices: a file for
    Ray's own notices. on_tick(watch): called as the workers start, about once a second while they
    run, and once more after they stopped (watch.stopped), before the summary. grace_s: how long a
    stop (Ctrl-C, SIGTERM) waits for workers to give their jobs back before it kills them.
    BadInput where the job table was deleted, replaced or damaged under the run (said in one line;
    the workers said already what they could not record)."""
    from qrun.runner.run import ray_notices_to
    from qrun.runner.worker import TableWatch

    table = TableWatch(db)
    with ray_notices_to(ray_notices) if ray_notices is not None else nullcontext():
        return _drain(db, who, gpus, cpu_workers, burst, ray_address, lease_s, note, say, on_tick, grace_s, table)


def _drain(db, who, gpus, cpu_workers, burst, ray_address, lease_s, note, say, on_tick, grace_s,
           table) -> RunOutcome:
    from qrun.runner.run import start_ray, stop_ray

    owns_ray = start_ray(ray_address, gpus, cpu_workers or 1)
    try:
        workers, summary = _work_the_queue(db, who, gpus, cpu_workers, burst, ray_address, lease_s, note, say,
                                           on_tick, grace_s)
    finally:
        if owns_ray:
            stop_ray()
    gone = table.problem()
    if gone:
        raise BadInput(f"{gone}; this run stopped taking jobs")
    return _what_ended(db, who, workers, summary, burst, say)


def _work_the_queue(db, who, gpus, cpu_workers, burst, ray_address, lease_s, note, say, on_tick, grace_s):
    """The workers' names and run_queue's summary, once the queue is drained (or the run stopped)."""
    from qrun.db import queue
    from qrun.db.session import qrun_home
    from qrun.runner.run import STOP_GRACE_S, alive_nodes, cpu_shortfalls, plan_slots, refuse_sqlite_on_a_cluster
    from qrun.runner.run import run_queue
    from qrun.workers.artifacts import runner_marked

    refuse_sqlite_on_a_cluster(db, len(alive_nodes()))
    on_cluster = bool(ray_address)
    slots = plan_slots(gpus, cpu_workers, on_cluster)
    if not any(s.use_gpu for s in slots):  # CPU workers: each holds a CPU of its node, which must have one
        for line in cpu_shortfalls(cpu_workers):
            say(f"{who}: {line}")
    say(f"{who}: {len(slots)} worker(s): {', '.join(s.name for s in slots)}{note}")
    watch = JobWatch(db, _first_pending(db), say)
    if on_tick:
        on_tick(watch)
    try:
        with runner_marked(qrun_home()) as token:
            summary = run_queue(db, lambda: plan_slots(gpus, cpu_workers, on_cluster), burst=burst,
                                lease_s=lease_s or queue.DEFAULT_LEASE_S,
                                on_tick=(lambda: on_tick(watch)) if on_tick else None, say=say, home_token=token,
                                grace_s=STOP_GRACE_S if grace_s is None else grace_s)
    finally:
        watch.stopped = True
        if on_tick:
            on_tick(watch)
    return [s.name for s in slots], summary


def _first_pending(db) -> int:
    from qrun.db import queue

    return min((j.id for j in queue.list_jobs(db) if j.status in ACTIVE), default=0)


def _what_ended(db, who: str, workers: list[str], summary, burst: bool, say: Callable[[str], None]) -> RunOutcome:
    """Counted from the table: a job retried counts once, and one that a lease or the runner ended after
    its worker died counts too."""
    from qrun.db import queue

    touched = sorted(set(summary.jobs_touched()) | set(queue.jobs_ended_by(db, summary.workers)))
    ended = [j for j in queue.list_jobs(db, touched, plain=True) if Status(j.status) in FINISHED] if touched else []
    outcome = RunOutcome(workers, len(ended), [j.id for j in ended if j.status == Status.FAILED.value],
                         summary.restarts, summary.interrupted)
    say(f"{who}: ran {outcome.ran} job(s), {len(outcome.failed)} failed"
        + (f", {outcome.restarts} worker restart(s)" if outcome.restarts else "")
        + (" (interrupted: running jobs were given back)" if outcome.interrupted else ""))
    if burst and not outcome.interrupted:
        _say_who_waits(db, who, outcome, say)
    return outcome


def _say_who_waits(db, who: str, outcome: RunOutcome, say: Callable[[str], None]) -> None:
    """Queued jobs that no worker of this machine could take: the next run must be elsewhere."""
    from qrun.db import queue

    outcome.waiting_for_a_gpu = queue.queued_for_a_gpu(db)
    if outcome.waiting_for_a_gpu:
        say(f"{who}: {outcome.waiting_for_a_gpu} job(s) wait for a GPU worker (their method needs a GPU); "
            "run qrun where there is one")
    outcome.waiting_for_several_gpus = queue.queued_for_several_gpus(db)
    if outcome.waiting_for_several_gpus:
        say(f"{who}: {outcome.waiting_for_several_gpus} job(s) wait for a node with as many GPUs as their "
            "--gpus-per-job; run qrun where there is one")
