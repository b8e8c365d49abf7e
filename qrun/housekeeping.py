"""Housekeeping of a shared queue: which old finished jobs `qrun prune` removes (files and rows), the
space `qrun du` counts per user and per model, and who may cap priorities (`qrun cap-priority`)."""

from __future__ import annotations

import os
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
               yes: bool = False) -> dict:
    """The finished jobs that finished before `before` (naive UTC), with their files and bytes; with yes,
    their rows deleted, then their files. As `qrun prune --json` prints it: {removed, bytes, jobs: [{id,
    kind, status, user, model, finished_at, bytes, paths}]}, only the jobs actually deleted when removed
    (a job that changed meanwhile stays); a dry run's paths are those that are there."""
    from qrun.db import queue

    candidates = queue.prune_candidates(db, before, failed_only=failed_only, user=user)
    files_of = {c.id: _job_files(c) for c in candidates}
    sized = [(c, files_of[c.id], sum(disk_bytes(f) for f in files_of[c.id])) for c in candidates]
    if yes and candidates:
        deleted = set(queue.delete_finished_jobs(db, [c.id for c in candidates]))
        sized = [row for row in sized if row[0].id in deleted]
        for _c, files, _b in sized:
            for f in files:
                _remove(f)
    return {"removed": yes, "bytes": sum(b for _, _, b in sized),
            "jobs": [{"id": c.id, "kind": c.kind, "status": c.status, "user": c.submitted_by, "model": c.model,
                      "finished_at": c.finished_at, "bytes": b,
                      "paths": [str(f) for f in files if yes or f.exists() or f.is_symlink()]}
                     for c, files, b in sized]}


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


# ---------------------------------------------------------------- priority caps


def check_admin(db) -> None:
    """Only the owner of the SQLite file may set caps; on Postgres anyone may (its roles are the check)."""
    from qrun.db.session import _sqlite_file

    if not db.is_sqlite:
        return
    path = _sqlite_file(db.url)
    if path is not None and path.exists() and path.stat().st_uid != os.getuid():
        raise BadInput(f"only the owner of {path} may set priority caps: ask them to run `qrun cap-priority`")
