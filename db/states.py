"""The job state machine, written down once.

    queued ──claim──▶ running ──succeed──▶ succeeded
      │  ▲              │ │ └──fail──────▶ failed ──retry──▶ queued
      │  └──release─────┘ │                                (also from cancelled)
      │   (Ctrl-C, lost   └──cancel──────▶ cancelled
      │    lease, retry)
      ├──cancel──▶ cancelled
      └──fail────▶ failed     (an upstream job failed, or attempts ran out)

Every transition is one guarded UPDATE in `db.queue` (`WHERE status IN allowed`);
an UPDATE that touches no row raises `TransitionError` naming the job and its state.
"""

import enum


class Status(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


class Kind(str, enum.Enum):
    QUANTIZE = "quantize"
    EVAL = "eval"

    def __str__(self) -> str:
        return self.value


def progress_unit(kind: str) -> str:
    """What a job of this kind counts its progress in: a quantize job layers, an eval job batches."""
    return "layer" if kind == Kind.QUANTIZE.value else "batch"


# transition name -> (states it may start from, state it ends in)
TRANSITIONS: dict[str, tuple[frozenset[Status], Status]] = {
    "claim": (frozenset({Status.QUEUED}), Status.RUNNING),
    "succeed": (frozenset({Status.RUNNING}), Status.SUCCEEDED),
    "fail": (frozenset({Status.QUEUED, Status.RUNNING}), Status.FAILED),
    "cancel": (frozenset({Status.QUEUED, Status.RUNNING}), Status.CANCELLED),
    "release": (frozenset({Status.RUNNING}), Status.QUEUED),
    "retry": (frozenset({Status.FAILED, Status.CANCELLED}), Status.QUEUED),
}

FINISHED = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})


def allowed_from(transition: str) -> frozenset[Status]:
    return TRANSITIONS[transition][0]


def target_of(transition: str) -> Status:
    return TRANSITIONS[transition][1]
