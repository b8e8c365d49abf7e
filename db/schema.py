"""Tables of the job table database, and the schema version they carry."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from qrun.db.states import Kind, Status

# Bump when a table changes, and add a step to db.session.MIGRATIONS.
# 2: 64-bit priority and artifact sizes, unbounded worker and progress texts (Postgres enforces both).
# 3: each job's sweep (the submit that added it) and the sweep's optional name.
# 4: what a worker without a job is doing (waiting for a kernel build before its next job).
# 5: job ids never reused (SQLite AUTOINCREMENT), the audit log, the admins, sweep membership.
SCHEMA_VERSION = 5

# Postgres' INTEGER is 32-bit and enforces VARCHAR(n); SQLite stores up to 64 bits in any INTEGER and
# ignores lengths. So sizes and free-form numbers are BigInteger, and texts whose length the user's
# model or host decides (module lists of MoE layers run past 350 characters) are Text.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _sql_list(values) -> str:
    return ", ".join(f"'{v.value}'" for v in values)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "qrun_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({_sql_list(Status)})", name="job_status_known"),
        CheckConstraint(f"kind IN ({_sql_list(Kind)})", name="job_kind_known"),
        # An id once given is never given again, even after `qrun prune` deleted the newest jobs: an old
        # listing, log or audit row must never name a new job. (Postgres' sequences never reuse one.)
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=Status.QUEUED.value)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    model: Mapped[str] = mapped_column(Text)  # source model directory
    depends_on: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    priority: Mapped[int] = mapped_column(BigInteger, default=0)  # any signed 64-bit value
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(Text, nullable=True)  # host:pid:slot, host names vary
    gpu: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_module: Mapped[str | None] = mapped_column(Text, nullable=True)  # "layer 3: a, b, ..." (MoE: long)
    submitted_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    log_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The sweep: every job one `qrun submit` added shares its id (8 hex characters) and its --name,
    # if given (a name given again adds to that sweep). NULL for jobs older than schema 3.
    sweep: Mapped[str | None] = mapped_column(String(16), nullable=True)
    sweep_name: Mapped[str | None] = mapped_column(Text, nullable=True)


# The claim takes the first queued job in (priority DESC, id) order: with this index SQLite reads it
# straight off the index instead of sorting every queued job on every claim. Status lists use it too.
Index("ix_jobs_claim", Job.status, Job.priority.desc(), Job.id)
# `--sweep ID|NAME` picks a sweep's jobs by either.
Index("ix_jobs_sweep", Job.sweep)
Index("ix_jobs_sweep_name", Job.sweep_name)


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # "model", "predictions"
    path: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)  # an 8 GB artifact is ordinary
    sha256: Mapped[str] = mapped_column(String(64))
    # The host whose worker wrote it: on a cluster, where to look when another node cannot read it.
    node: Mapped[str | None] = mapped_column(Text, nullable=True)


class Worker(Base):
    """A worker of some `qrun run`, as it last reported itself (`qrun workers`). One row per worker
    process; a worker that stopped heartbeating without saying goodbye shows as lost."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(Text, primary_key=True)  # host:pid:slot, as in jobs.worker
    node: Mapped[str] = mapped_column(Text)
    slot: Mapped[str] = mapped_column(Text)
    device: Mapped[str] = mapped_column(Text)
    gpu: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    current_job: Mapped[int | None] = mapped_column(Integer, nullable=True)
    jobs_done: Mapped[int] = mapped_column(Integer, default=0)
    # Between jobs, what the worker is doing, e.g. "preparing job 3: GPTQModel kernel marlin_bf16"
    # (a fresh machine's build takes minutes); NULL when idle or running a job.
    activity: Mapped[str | None] = mapped_column(Text, nullable=True)


class Event(Base):
    """One row per transition: the job's history, for `qrun logs` and for audits."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    transition: Mapped[str] = mapped_column(String(16))
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_status: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(DateTime)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class SweepJob(Base):
    """A sweep's jobs: those its submit added, and the equal jobs it found already there and used
    instead (possibly a teammate's), each with the label the sweep gave it (`w4g128·d0.01` in a damp
    study). NULL labels for sweeps older than schema 5."""

    __tablename__ = "sweep_jobs"

    sweep: Mapped[str] = mapped_column(String(16), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True, index=True)
    label: Mapped[str | None] = mapped_column(Text, nullable=True)


class Admin(Base):
    """Who may set priority caps, prune other users' jobs and change this list (`qrun admin`). A new
    table starts with its owner and root."""

    __tablename__ = "admins"

    name: Mapped[str] = mapped_column(Text, primary_key=True)  # a login name
    added_by: Mapped[str] = mapped_column(Text)
    added_at: Mapped[datetime] = mapped_column(DateTime)


class AuditEntry(Base):
    """What was done to other people's work or to the queue's rules (`qrun audit`): prunes, cap and
    admin changes, cancels and retries of another user's jobs, every forced action. Nothing deletes
    these rows; they name jobs by id, with no foreign key, so a pruned job's entry stays."""

    __tablename__ = "audit_log"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    user: Mapped[str] = mapped_column(Text)  # who did it (login name)
    action: Mapped[str] = mapped_column(String(32))  # prune, cancel, retry, cap-priority, admin add, ...
    target: Mapped[str] = mapped_column(Text)  # "jobs 3-5, 9", "user bob"
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
