"""Why a queued job waits, and its place in line: `qrun status`'s REASON column, the `reason` and
`position` of its JSON rows, and the line `submit --wait` and `logs -f` say when no runner is there.

The line is the claim's order (db.queue.claim_order: priority, then the users take turns, the one who
used the least worker time lately first, each user's jobs oldest first); #1 is the job the next free
worker takes. A reason names the one thing that holds the job now, the first that applies of: no live
the job it waits for, no live worker at all, a worker readying it, a device no live worker has, higher
priorities, other users' turns, the user's own earlier jobs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from qrun.db.states import Status
from qrun.views import LOST_AFTER_S, needs_text, utcnow

NO_RUNNER = "no runner serves this table"
NO_RUNNER_LINE = "no `qrun run` serves this table: the jobs wait until one starts"


@dataclass(frozen=True)
class Waiting:
    """Where a queued job stands. position: its place in the claim's line (1: next), None while it
    cannot be claimed yet (it waits for another job); reason: why it is not running, in a few words."""

    position: int | None
    reason: str

    def text(self) -> str:
        """The REASON cell: `#3 · other users' turn`."""
        return f"#{self.position} · {self.reason}" if self.position is not None else self.reason


def live_workers(db, now: datetime | None = None) -> list:
    """The workers of any `qrun run` that reported within LOST_AFTER_S and have not stopped."""
    from qrun.db.queue import list_workers

    now = now or utcnow()
    return [w for w in list_workers(db, now - timedelta(seconds=LOST_AFTER_S)) if w.stopped_at is None]


def no_runner_line(db) -> str | None:
    """NO_RUNNER_LINE when no live worker serves the table, else None."""
    return None if live_workers(db) else NO_RUNNER_LINE


def _gpus_per_node(workers) -> dict[str, int]:
    """How many GPUs the live workers of each node hold (a worker of several lists them all: `0,1`)."""
    held: dict[str, set[str]] = defaultdict(set)
    for w in workers:
        if w.gpu:
            held[w.node].update(w.gpu.split(","))
    return {node: len(gpus) for node, gpus in held.items()}


def _device_reason(params: dict, gpus_per_node: dict[str, int]) -> str | None:
    """What no live worker has that the job needs (a GPU, or several of one node); None if some has it."""
    need = params.get("gpus") or 1
    if need > 1 and max(gpus_per_node.values(), default=0) < need:
        return needs_text(params)
    if params.get("needs_gpu") and not gpus_per_node:
        return needs_text(params)
    return None


def _turn_reasons(order: list[int], rows: dict) -> dict[int, str]:
    """Why each job in line is not taken yet: what is ahead of it (one pass: the line is in priority order)."""
    reasons: dict[int, str] = {}
    higher = 0  # jobs of higher priority than the group being read
    group: dict[str, int] = {}  # the jobs of this priority read so far, per user
    for n, job_id in enumerate(order):
        row = rows[job_id]
        if n and row.priority != rows[order[n - 1]].priority:
            higher, group = n, {}
        own, same = group.get(row.submitted_by, 0), n - higher
        if higher:
            reasons[job_id] = f"behind {higher} job{'s' if higher > 1 else ''} of higher priority"
        elif same > own:
            reasons[job_id] = "other users' turn"
        elif own:
            reasons[job_id] = f"behind {own} earlier job{'s' if own > 1 else ''} of {row.submitted_by}"
        else:
            reasons[job_id] = "next in line"
        group[row.submitted_by] = own + 1
    return reasons


def waiting_now(db, jobs, preparing: dict[int, tuple[str, str]] | None = None) -> dict[int, Waiting]:
    """Waiting of each queued job of `jobs`. preparing: views.preparing_now's answer, if already read."""
    from qrun.db.queue import claim_order, queued_line
    from qrun.views import preparing_now

    wanted = [j for j in jobs if j.status == Status.QUEUED.value]
    if not wanted:
        return {}
    queued, usage = queued_line(db)
    rows = {r.id: r for r in queued}
    order = claim_order(queued, usage)
    index = {job_id: n for n, job_id in enumerate(order)}
    workers = live_workers(db)
    gpus_per_node = _gpus_per_node(workers)
    preparing = preparing_now(db, wanted) if preparing is None else preparing
    turns = _turn_reasons(order, rows)
    found = {}
    for job in wanted:
        row = rows.get(job.id)
        if row is None:  # claimed or cancelled since the jobs were read
            continue
        position = index[job.id] + 1 if job.id in index else None
        found[job.id] = Waiting(position, _reason(row, position, workers, gpus_per_node, preparing, turns))
    return found


def _needs(row) -> dict:
    """What a queued job needs of a device, as its params say it (queued_line reads only these)."""
    return {"gpus": row.gpus, "needs_gpu": row.needs_gpu, "min_compute_capability": row.min_compute_capability}


def _reason(row, position, workers, gpus_per_node, preparing, turns: dict[int, str]) -> str:
    if position is None:
        if row.upstream_status in (Status.FAILED.value, Status.CANCELLED.value):
            return f"job {row.depends_on} {row.upstream_status}: it will fail too"
        return f"after job {row.depends_on}"
    if not workers:  # and what it will need of the one that starts
        return " · ".join([NO_RUNNER] + ([needs] if (needs := needs_text(_needs(row))) else []))
    if row.id in preparing:
        slot, what = preparing[row.id]
        return f"preparing on {slot}: {what}"
    return _device_reason(_needs(row), gpus_per_node) or turns[row.id]
