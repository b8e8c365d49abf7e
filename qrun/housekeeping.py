"""Housekeeping of a shared queue: which old finished jobs `qrun prune` removes (files and rows), the
space `qrun du` counts per user and per model, who may cap priorities and prune for others (qrun's
admins, `qrun admin`), and the audit log of such acts (`qrun audit`)."""

from __future__ import annotations

import os
import pwd
import shutil
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from qrun.db.errors import BadInput


def disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a directory; 0 when it is not there. Links are not followed."""
    try:
        if path.is_symlink() or path.is_file():
            return path.lstat().st_size
        if not path.is_dir():
            return 0
    except OSError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                pass
    return total


def log_paths(job_id: int, log_path: str | None) -> list[Path]:
    """A job's log and its working directory under logs/ (and its recorded log, if elsewhere in logs/)."""
    from qrun.db.session import logs_root

    root = logs_root()
    paths = [root / f"job-{job_id}.log", root / f"job-{job_id}.d"]
    if log_path and Path(log_path) not in paths:
        paths.append(Path(log_path))
    return [p for p in paths if _inside(p, root)]


def _inside(path: Path, root: Path) -> bool:
    """Whether path lies under root: prune removes nothing outside QRUN_HOME's artifacts/ and logs/."""
    try:
        return Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(root)))
    except (OSError, ValueError):
        return False


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _job_files(candidate) -> list[Path]:
    """The files prune removes with a job: its artifacts under artifacts/ and its logs."""
    from qrun.db.session import artifacts_root

    root = artifacts_root()
    files = [Path(p) for p, _ in candidate.artifacts if _inside(Path(p), root)]
    return files + log_paths(candidate.id, candidate.log_path)


# ---------------------------------------------------------------- prune


def prune_jobs(db, before: datetime, *, failed_only: bool = False, user: str | None = None,
               yes: bool = False, force: bool = False) -> dict:
    """The finished jobs that finished before `before` (naive UTC), with their files and bytes; with yes,
    their rows deleted, then their files. As `qrun prune --json` prints it: {removed, bytes, jobs: [{id,
    kind, status, user, model, finished_at, bytes, paths}], others}, only the jobs actually deleted when
    removed (a job that changed meanwhile stays); a dry run's paths are those that are there; others:
    how many of the jobs belong to other users. Removing another user's job needs force, and only an
    admin may; every removal is audit-logged."""
    from qrun.db import queue

    me = queue.current_user()
    candidates = queue.prune_candidates(db, before, failed_only=failed_only, user=user)
    others = [c for c in candidates if c.submitted_by != me]
    if yes and others:
        _check_prune_of_others(db, others[0], force, me)
    files_of = {c.id: _job_files(c) for c in candidates}
    sized = [(c, files_of[c.id], sum(disk_bytes(f) for f in files_of[c.id])) for c in candidates]
    if yes and candidates:
        deleted = set(queue.delete_finished_jobs(db, [c.id for c in candidates], actor=me, forced=force))
        sized = [row for row in sized if row[0].id in deleted]
        for _c, files, _b in sized:
            for f in files:
                _remove(f)
    return {"removed": yes, "bytes": sum(b for _, _, b in sized),
            "jobs": [{"id": c.id, "kind": c.kind, "status": c.status, "user": c.submitted_by, "model": c.model,
                      "finished_at": c.finished_at, "bytes": b,
                      "paths": [str(f) for f in files if yes or f.exists() or f.is_symlink()]}
                     for c, files, b in sized],
            "others": sum(1 for c, _, _ in sized if c.submitted_by != me)}


def _check_prune_of_others(db, first, force: bool, me: str) -> None:
    """Another user's job goes only with --force (as cancel and retry ask), and only by an admin."""
    from qrun.db.admins import check_admin as require
    from qrun.db.errors import TransitionError

    if not force:
        raise TransitionError(f"job {first.id} belongs to {first.submitted_by}: add --force to prune another "
                              "user's job")
    require(db, me, "prune another user's jobs")


# ---------------------------------------------------------------- du


def usage(db) -> dict[str, list[dict]]:
    """Space per user and per model (the model directory's name), as `qrun du --json` prints it: {users,
    models}, each a list of {name, jobs, artifact_bytes (as recorded), log_bytes (on disk), bytes}, the
    largest first."""
    from qrun.db import queue

    per_user: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    per_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in queue.usage_rows(db):
        logs = sum(disk_bytes(p) for p in log_paths(row.id, row.log_path))
        for key, table in ((row.submitted_by, per_user), (Path(row.model).name or row.model, per_model)):
            entry = table[key]
            entry[0] += 1
            entry[1] += int(row.artifact_bytes or 0)
            entry[2] += logs
    return {"users": _usage_rows(per_user), "models": _usage_rows(per_model)}


def _usage_rows(table: dict[str, list[int]]) -> list[dict]:
    return [{"name": k, "jobs": v[0], "artifact_bytes": v[1], "log_bytes": v[2], "bytes": v[1] + v[2]}
            for k, v in sorted(table.items(), key=lambda kv: (-(kv[1][1] + kv[1][2]), kv[0]))]


# ---------------------------------------------------------------- priority caps and admins


def check_admin(db, what: str = "set priority caps") -> None:
    """BadInput unless the caller is one of qrun's admins (the list in the table: `qrun admin list`)."""
    from qrun.db.admins import check_admin as require
    from qrun.db.queue import current_user

    require(db, current_user(), what)


def check_user_exists(user: str, option: str = "user") -> str:
    """BadInput unless `user` is a login name on this machine: a cap or an admin for a mistyped name
    would quietly bind nobody."""
    try:
        pwd.getpwnam(user)
    except (KeyError, ValueError):  # ValueError: a name with a NUL
        raise BadInput(f"{option} {user!r} does not exist on this machine: give a login name "
                       "(`getent passwd NAME` finds it)") from None
    return user


def set_cap(db, user: str, cap: int | None) -> bool:
    """An admin caps `user`'s priority (None: removes the cap); whether a cap was there. Audit-logged."""
    from qrun.db import queue

    check_admin(db)
    return queue.set_priority_cap(db, user, cap, actor=queue.current_user())


def change_admins(db, add: str | None = None, remove: str | None = None) -> bool:
    """An admin adds or removes an admin; whether the list changed. Audit-logged."""
    from qrun.db import admins
    from qrun.db.queue import current_user

    if add is not None:
        return admins.add_admin(db, add, current_user())
    return admins.remove_admin(db, remove, current_user())


# ---------------------------------------------------------------- the audit log


def audit_rows(db, since: datetime | None = None) -> list[dict]:
    """`qrun audit --json`: one dict per entry (id, at, user, action, target, detail), oldest first."""
    from qrun.db.audit import entries

    return [{"id": e.id, "at": e.at, "user": e.user, "action": e.action, "target": e.target, "detail": e.detail}
            for e in entries(db, since)]
