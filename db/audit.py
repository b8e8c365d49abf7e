"""The audit log (`qrun audit`): who pruned, capped, made admins, or acted on another user's jobs.

An entry is written in the same transaction as the change it records, so the log never says that
something happened that did not, nor misses what did. Nothing in qrun deletes an entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from qrun.db.schema import AuditEntry


def record(s: Session, user: str, action: str, target: str, detail: str | None = None) -> None:
    """Add one entry to the transaction `s` (it commits or rolls back with the change it records)."""
    s.add(AuditEntry(at=datetime.now(timezone.utc).replace(tzinfo=None), user=user, action=action,
                     target=target, detail=detail))


def id_ranges(ids: Iterable[int]) -> str:
    """Job ids as short ranges: `3-5, 9` (a prune of 10,000 jobs stays one readable line)."""
    ordered = sorted(set(ids))
    parts: list[str] = []
    start = prev = None
    for job_id in ordered + [None]:
        if prev is not None and job_id == prev + 1:
            prev = job_id
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = job_id
    return ", ".join(parts)


def entries(db, since: datetime | None = None) -> list[AuditEntry]:
    """The entries at or after `since` (naive UTC; all when None), oldest first."""
    query = select(AuditEntry).order_by(AuditEntry.id)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    with db.transaction() as s:
        return list(s.scalars(query))
