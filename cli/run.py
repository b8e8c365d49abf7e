"""`qrun run`: drain the queue with one Ray worker per GPU (CPU workers where there is none)."""

from __future__ import annotations

import click

from qrun.cli.common import is_tty, stderr_line
from qrun.db.states import Status


class Display:
    """Live job table on a terminal; one line per status change otherwise (logs, CI). Lines said while
    the workers run are printed above the table; lines before and after, as every command's."""

    def __init__(self):
        self.console = None
        self.live = None
        self.showing = False
        self.seen: dict[int, str] = {}

    def say(self, line: str) -> None:
        """A line of the run (a database outage, a worker that died, the summary)."""
        if self.showing:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            stderr_line(line)

    def tick(self, watch) -> None:
        """The run's on_tick: its first call starts the display, the one after the workers stopped ends it."""
        if not self.showing:
            self._start()
        elif watch.stopped:
            self._stop(watch)
        else:
            self._draw(watch)

    def _start(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.showing = True
        if is_tty():
            from rich.live import Live

            self.live = Live(console=self.console, auto_refresh=False)
            self.live.start()

    def _stop(self, watch) -> None:
        if self.live is not None:
            self._draw(watch)
            self.live.stop()
        self.showing = False

    def _draw(self, watch) -> None:
        now = watch.read()  # None while the table is out of reach: the watch says so once
        if now is not None:
            self._show(*now)

    def _show(self, jobs, preparing: dict[int, tuple[str, str]]) -> None:
        from qrun.cli.status import jobs_table
        from qrun.views import progress_cell, progress_text

        if self.live is not None:
            self.live.update(jobs_table(jobs, preparing=preparing), refresh=True)
            return
        for job in jobs:
            state = f"{job.status} {progress_text(job)}".strip()
            if job.id in preparing:
                state = f"{job.status}, {progress_cell(job, preparing=preparing[job.id])}"
            if self.seen.get(job.id) != state and (job.id in self.seen or job.status != Status.QUEUED.value
                                                   or job.id in preparing):
                stderr_line(f"job {job.id} {job.kind}: {state}" + (f" -- {job.error}" if job.error else ""))
            self.seen[job.id] = state


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
@click.option("--grace", "grace_s", type=float, default=30.0, show_default=True,
              help="Seconds a stop (Ctrl-C, SIGTERM) waits for workers to give their jobs back before killing them.")
@click.pass_context
def run(ctx, gpus, cpu_workers, until_empty, serve, ray_address, lease_s, grace_s):
    """Start workers that take jobs from the table until it is empty (or until Ctrl-C with --serve).
    Ctrl-C once (or SIGTERM): finish the current layer and give running jobs back, killing the workers
    still busy after --grace seconds; twice: stop at once."""
    import qrun

    display = Display()
    outcome = qrun.run(gpus=gpus, cpu_workers=cpu_workers, serve=serve, until_empty=until_empty,
                       ray_address=ray_address, lease_s=lease_s, db=ctx.obj.get("db_url"), say=display.say,
                       on_tick=display.tick, grace_s=grace_s)
    if outcome.interrupted:
        ctx.exit(130)
    if outcome.failed:
        ctx.exit(1)


COMMANDS = [run]
