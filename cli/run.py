"""`qrun run`: drain the queue with one Ray worker per GPU (CPU workers where there is none)."""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TextIO

import click

from qrun.cli.common import is_tty, open_db, parse_gpu_list, stderr_line
from qrun.db.errors import BadInput
from qrun.db.states import FINISHED, Status


class _Display:
    """Live job table on a terminal; one line per status change otherwise (logs, CI)."""

    def __init__(self, db, watched_from: int):
        from rich.console import Console

        self.db = db
        self.since = watched_from
        self.seen: dict[int, str] = {}
        self.problem: str | None = None
        self.console = Console(stderr=True)
        self.live = None
        if is_tty():
            from rich.live import Live

            self.live = Live(console=self.console, auto_refresh=False)
            self.live.start()

    def say(self, line: str) -> None:
        """A line from the runner or a worker (a database outage, a worker that died), above the table."""
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def tick(self) -> None:
        """Redraw. The table being out of reach is said once, not raised: workers wait it out too."""
        from qrun.cli.status import preparing_now
        from qrun.db import queue
        from qrun.workers.jobs import describe_error

        try:
            jobs = [j for j in queue.list_jobs(self.db) if j.id >= self.since or j.status in ("queued", "running")]
            preparing = preparing_now(self.db, jobs)
        except Exception as exc:  # noqa: BLE001 -- the runner goes on; workers back off and retry
            problem = describe_error(exc)
            if problem != self.problem:
                self.say(f"qrun: cannot read the job table ({problem}); workers wait and retry")
            self.problem = problem
            return
        if self.problem:
            self.say("qrun: the job table can be read again")
            self.problem = None
        self._show(jobs, preparing)

    def _show(self, jobs, preparing: dict[int, tuple[str, str]]) -> None:
        from qrun.cli.status import jobs_table, progress_cell, progress_text

        if self.live is not None:
            self.live.update(jobs_table(jobs, preparing=preparing), refresh=True)
            return
        for job in jobs:
            state = f"{job.status} {progress_text(job)}".strip()
            if job.id in preparing:
                state = f"{job.status}, {progress_cell(job, preparing=preparing[job.id])}"
            if self.seen.get(job.id) != state and (job.id in self.seen or job.status != "queued"
                                                   or job.id in preparing):
                stderr_line(f"job {job.id} {job.kind}: {state}" + (f" -- {job.error}" if job.error else ""))
            self.seen[job.id] = state

    def close(self) -> None:
        if self.live is not None:
            self.tick()
            self.live.stop()


def drain(db, who: str, gpus: list[int] | None = None, cpu_workers: int | None = None, burst: bool = True,
          ray_address: str | None = None, lease_s: float | None = None, note: str = "",
          ray_notices: TextIO | None = None) -> list[int]:
    """Start (or join) Ray, run workers until the queue is drained (or Ctrl-C with burst=False), stop
    the Ray it started, print one summary line; returns the ids of failed jobs. Ctrl-C exits 130.
    ray_notices: a file for Ray's own notices (`qrun demo` keeps the terminal to qrun's lines)."""
    from qrun.runner.run import ray_notices_to

    with ray_notices_to(ray_notices) if ray_notices is not None else nullcontext():
        return _drain(db, who, gpus, cpu_workers, burst, ray_address, lease_s, note)


def _drain(db, who, gpus, cpu_workers, burst, ray_address, lease_s, note) -> list[int]:
    from qrun.db import queue
    from qrun.db.session import qrun_home
    from qrun.runner.run import alive_nodes, plan_slots, run_queue, start_ray, stop_ray
    from qrun.workers.artifacts import runner_marked

    owns_ray = start_ray(ray_address, gpus, cpu_workers or 1)
    try:
        refuse_sqlite_on_a_cluster(db, len(alive_nodes()))
        on_cluster = bool(ray_address)
        slots = plan_slots(gpus, cpu_workers, on_cluster)
        stderr_line(f"{who}: {len(slots)} worker(s): {', '.join(s.name for s in slots)}{note}")
        first_pending = min((j.id for j in queue.list_jobs(db) if j.status in ("queued", "running")), default=0)
        display = _Display(db, first_pending)
        try:
            with runner_marked(qrun_home()) as token:
                summary = run_queue(db, lambda: plan_slots(gpus, cpu_workers, on_cluster), burst=burst,
                                    lease_s=lease_s or queue.DEFAULT_LEASE_S, on_tick=display.tick,
                                    say=display.say, home_token=token)
        finally:
            display.close()
    finally:
        if owns_ray:
            stop_ray()
    # Counted from the table: a job retried counts once, and one that a lease or the runner ended after
    # its worker died counts too.
    touched = summary.jobs_touched()
    ended = [j for j in queue.list_jobs(db, touched, plain=True) if Status(j.status) in FINISHED] if touched else []
    failed = [j.id for j in ended if j.status == "failed"]
    stderr_line(f"{who}: ran {len(ended)} job(s), {len(failed)} failed"
                + (f", {summary.restarts} worker restart(s)" if summary.restarts else "")
                + (" (interrupted: running jobs were given back)" if summary.interrupted else ""))
    if burst and not summary.interrupted:
        waiting = queue.queued_for_a_gpu(db)
        if waiting:
            stderr_line(f"{who}: {waiting} job(s) wait for a GPU worker (their method needs a GPU); "
                        "run qrun where there is one")
        waiting = queue.queued_for_several_gpus(db)
        if waiting:
            stderr_line(f"{who}: {waiting} job(s) wait for a node with as many GPUs as their --gpus-per-job; "
                        "run qrun where there is one")
    if summary.interrupted:
        click.get_current_context().exit(130)
    return failed


def refuse_sqlite_on_a_cluster(db, nodes: int) -> None:
    """SQLite's lock does not cross machines (and its WAL does not work on network file systems)."""
    if db.is_sqlite and nodes > 1:
        raise BadInput(
            f"the job table {db.url} is a SQLite file, which cannot serve a Ray cluster of {nodes} nodes (its "
            "lock does not cross machines): use a Postgres job table, --db postgresql+psycopg://USER@HOST/DB"
        )


MAX_CPU_WORKERS = 1024
MAX_LEASE_S = 86400  # a day: a worker silent for longer is gone


@click.command()
@click.option("--gpus", default=None, metavar="0,1",
              help="GPUs of this machine to use, numbered as CUDA numbers them: within CUDA_VISIBLE_DEVICES "
                   "where it is set (default: all Ray finds).")
@click.option("--cpu-workers", type=int, default=None, help="Run N CPU workers (default 1 where there is no GPU).")
@click.option("--until-empty", "until_empty", is_flag=True, help="Stop when the queue is drained (the default).")
@click.option("--serve", is_flag=True, help="Keep serving new jobs until Ctrl-C.")
@click.option("--ray-address", default=None, metavar="ADDR", help="Join this Ray cluster instead of starting one.")
@click.option("--lease", "lease_s", type=float, default=60.0, show_default=True,
              help="Seconds a worker may go silent before its job returns to the queue.")
@click.pass_context
def run(ctx, gpus, cpu_workers, until_empty, serve, ray_address, lease_s):
    """Start workers that take jobs from the table until it is empty (or until Ctrl-C with --serve).
    Ctrl-C once: finish the current layer and give running jobs back; twice: stop at once."""
    from qrun.workers.limits import job_memory_cap_mb

    if until_empty and serve:
        raise BadInput("--until-empty and --serve: give one (--serve keeps running until Ctrl-C)")
    burst = not serve
    gpu_list = parse_gpu_list(gpus)
    if cpu_workers is not None and not 0 < cpu_workers <= MAX_CPU_WORKERS:
        raise BadInput(f"--cpu-workers {cpu_workers} must be between 1 and {MAX_CPU_WORKERS}")
    if not 1 <= lease_s <= MAX_LEASE_S:  # also refuses nan and inf
        raise BadInput(f"--lease {lease_s} must be between 1 and {MAX_LEASE_S} seconds")
    job_memory_cap_mb()  # a typo in QRUN_JOB_MEMORY_MB stops the run here, not every job it claims
    if cpu_workers and not ray_address and cpu_workers > (os.cpu_count() or 1):
        # Allowed (a job may wait on I/O), but each worker then gets one thread and holds its own model.
        stderr_line(f"qrun: --cpu-workers {cpu_workers} on {os.cpu_count()} cores: the workers share the cores "
                    "(one thread each) and each holds its own model in memory; jobs will not finish sooner")
    db = open_db(ctx)
    log_path = run_log_path()
    try:
        with log_path.open("a", encoding="utf-8") as notices:
            failed = drain(db, "qrun", gpu_list, cpu_workers, burst, ray_address, lease_s,
                           note=f" (Ray's own notices: {log_path})", ray_notices=notices)
    except BadInput:  # refused before Ray said anything (a bad --ray-address, --gpus): leave no empty log
        if log_path.stat().st_size == 0:
            log_path.unlink()
        raise
    if failed:
        ctx.exit(1)


def run_log_path() -> Path:
    """A run's own log, beside the jobs' (it takes Ray's notices: they are not the user's business)."""
    from qrun.db.session import logs_root

    return logs_root() / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


COMMANDS = [run]
