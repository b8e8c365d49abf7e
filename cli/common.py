"""Pieces every command shares: the database option, JSON output, job-id arguments, error printing."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import click

from qrun.db.errors import BadInput


def open_db(ctx: click.Context, create: bool = True):
    """The job table named by --db / QRUN_DB (opened lazily so usage errors never touch it).
    create=False for commands that only look: a --db file that does not exist is refused, not made."""
    from qrun.db.session import open_database

    return open_database(ctx.obj.get("db_url"), create)


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default))


def _json_default(value):
    if isinstance(value, datetime):
        return value.isoformat() + "Z"
    raise TypeError(f"cannot serialise {type(value).__name__}")


MAX_JOB_ID = 2**63 - 1  # the widest integer column of SQLite and Postgres


def parse_job_ids(values: tuple[str, ...]) -> list[int]:
    """Job ids as given, each once (`qrun cancel 7 7` cancels job 7)."""
    ids = []
    for value in values:
        try:
            job_id = int(value)
        except ValueError:
            raise BadInput(f"job id {value!r} is not a number: see `qrun status` for job ids") from None
        if not 0 < job_id <= MAX_JOB_ID:
            raise BadInput(f"job id {value!r} must be between 1 and {MAX_JOB_ID}: see `qrun status` for job ids")
        if job_id not in ids:
            ids.append(job_id)
    return ids


def stderr_line(message: str) -> None:
    """One line to standard error: every command's messages go there, its results to standard output."""
    click.echo(message, err=True)


def is_tty() -> bool:
    """Whether standard error is a terminal (a live table) or not (a log: one line per change)."""
    return sys.stderr.isatty()
