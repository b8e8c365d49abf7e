"""Housekeeping of a shared queue: `qrun prune` (old finished jobs' files and rows), `qrun du` (space per
user and per model) and `qrun cap-priority` (the highest --priority a user may submit with)."""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path

import click

from qrun.cli.common import open_db, print_json, stderr_line
from qrun.cli.table import Column, output_settings, render
from qrun.db.errors import BadInput


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


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
    from qrun.db.session import artifacts_root

    root = artifacts_root()
    files = [Path(p) for p, _ in candidate.artifacts if _inside(Path(p), root)]
    return files + log_paths(candidate.id, candidate.log_path)


# ---------------------------------------------------------------- prune


@click.command()
@click.option("--older-than", "older_than", required=True, metavar="30d",
              help="Jobs that finished before this long ago (30d, 12h, 2w) or an ISO time.")
@click.option("--failed", "failed_only", is_flag=True, help="Only failed and cancelled jobs.")
@click.option("--user", default=None, metavar="U", help="Only this user's jobs.")
@click.option("--yes", is_flag=True, help="Remove them (without it: show what would go).")
@click.option("--json", "as_json", is_flag=True, help="What would go (or went) as JSON.")
@click.pass_context
def prune(ctx, older_than, failed_only, user, yes, as_json):
    """Remove old finished jobs: their artifacts, predictions, logs and rows (jobs, events, metrics,
    artifacts). Dry run unless --yes. Queued and running jobs are never touched, nor a job that a
    kept job depends on (a quantize job whose eval stays)."""
    from qrun.cli.status import parse_since
    from qrun.db import queue

    before = parse_since(older_than, option="--older-than")
    db = open_db(ctx, create=False)
    try:
        candidates = queue.prune_candidates(db, before, failed_only=failed_only, user=user)
        sized = [(c, _job_files(c)) for c in candidates]
        sized = [(c, files, sum(disk_bytes(f) for f in files)) for c, files in sized]
        total = sum(b for _, _, b in sized)
        if yes and candidates:
            deleted = set(queue.delete_finished_jobs(db, [c.id for c in candidates]))
            sized = [row for row in sized if row[0].id in deleted]
            for _c, files, _b in sized:
                for f in files:
                    _remove(f)
            total = sum(b for _, _, b in sized)
    finally:
        db.dispose()
    if as_json:
        print_json({"removed": yes, "bytes": total,
                    "jobs": [{"id": c.id, "kind": c.kind, "status": c.status, "user": c.submitted_by,
                              "model": c.model, "finished_at": c.finished_at, "bytes": b,
                              "paths": [str(f) for f in files if f.exists() or f.is_symlink()] if not yes
                              else [str(f) for f in files]}
                             for c, files, b in sized]})
        return
    if not sized:
        stderr_line("nothing to prune")
        return
    columns = [Column("ID", keep=100, right=True), Column("USER", keep=90), Column("KIND", keep=50),
               Column("STATUS", keep=80), Column("MODEL", keep=60, shrink=12), Column("FINISHED", keep=40),
               Column("BYTES", keep=100, right=True)]
    rows = [[str(c.id), c.submitted_by, c.kind, c.status, Path(c.model).name,
             c.finished_at.strftime("%Y-%m-%d") if c.finished_at else "", human_bytes(b)] for c, _f, b in sized]
    for line in render(columns, rows, output_settings()):
        click.echo(line)
    verb = "removed" if yes else "would remove"
    stderr_line(f"{verb} {len(sized)} job(s), freeing {human_bytes(total)} ({total} bytes)"
                + ("" if yes else "; add --yes to remove them"))


# ---------------------------------------------------------------- du


def usage(db) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """{user: [jobs, artifact bytes, log bytes]} and the same per model (the model directory's name)."""
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
    return dict(per_user), dict(per_model)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="The same numbers as JSON.")
@click.pass_context
def du(ctx, as_json):
    """Space per user and per model: bytes of artifacts (as recorded) and of logs on disk."""
    db = open_db(ctx, create=False)
    try:
        per_user, per_model = usage(db)
    finally:
        db.dispose()

    def as_dict(table):
        return [{"name": k, "jobs": v[0], "artifact_bytes": v[1], "log_bytes": v[2], "bytes": v[1] + v[2]}
                for k, v in sorted(table.items(), key=lambda kv: (-(kv[1][1] + kv[1][2]), kv[0]))]

    if as_json:
        print_json({"users": as_dict(per_user), "models": as_dict(per_model)})
        return
    out = output_settings()
    for title, table in (("USER", per_user), ("MODEL", per_model)):
        columns = [Column(title, keep=100, shrink=12), Column("JOBS", keep=50, right=True),
                   Column("ARTIFACTS", keep=60, right=True), Column("LOGS", keep=60, right=True),
                   Column("TOTAL", keep=100, right=True)]
        rows = [[d["name"], str(d["jobs"]), human_bytes(d["artifact_bytes"]), human_bytes(d["log_bytes"]),
                 human_bytes(d["bytes"])] for d in as_dict(table)]
        if title == "MODEL":
            click.echo("")
        for line in render(columns, rows, out):
            click.echo(line)


# ---------------------------------------------------------------- cap-priority


def _check_admin(db) -> None:
    """Only the owner of the SQLite file may set caps; on Postgres anyone may (its roles are the check)."""
    from qrun.db.session import _sqlite_file

    if not db.is_sqlite:
        return
    path = _sqlite_file(db.url)
    if path is not None and path.exists() and path.stat().st_uid != os.getuid():
        raise BadInput(f"only the owner of {path} may set priority caps: ask them to run `qrun cap-priority`")


@click.command("cap-priority")
@click.argument("user", required=False)
@click.argument("cap", required=False, type=int)
@click.option("--clear", is_flag=True, help="Remove USER's cap.")
@click.pass_context
def cap_priority(ctx, user, cap, clear):
    """Cap the --priority USER may submit with (USER CAP), remove it (USER --clear), or list caps (no
    arguments). Only the owner of the SQLite database file may change caps; on Postgres, anyone."""
    from qrun.db import queue

    if user is not None and (cap is None) == (not clear):
        raise click.UsageError("give USER and CAP, or USER --clear", ctx=ctx)
    db = open_db(ctx, create=user is not None)
    try:
        if user is None:
            for name, value in sorted(queue.priority_caps(db).items()):
                click.echo(f"{name}\t{value}")
            return
        _check_admin(db)
        had_cap = queue.set_priority_cap(db, user, None if clear else cap)
    finally:
        db.dispose()
    if clear:
        stderr_line(f"priority cap of {user} removed" if had_cap else f"{user} had no priority cap")
    else:
        stderr_line(f"{user} may submit with --priority {cap} at most")


COMMANDS = [prune, du, cap_priority]
