"""Housekeeping of a shared queue: `qrun prune` (old finished jobs' files and rows), `qrun du` (space per
user and per model), `qrun cap-priority` (the highest --priority a user may submit with), `qrun admin`
(who may cap and prune for others) and `qrun audit` (what was done to others' work and to the rules)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from qrun.cli.common import print_json, stderr_line
from qrun.cli.table import Column, output_settings, render


def human_bytes(n: int) -> str:
    """A byte count the way people read it: 512 B, 1.5 KiB, 3.2 GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# ---------------------------------------------------------------- prune


@click.command()
@click.option("--older-than", "older_than", required=True, metavar="30d",
              help="Jobs that finished before this long ago (30d, 12h, 2w) or an ISO time.")
@click.option("--failed", "failed_only", is_flag=True, help="Only failed and cancelled jobs.")
@click.option("--user", default=None, metavar="U", help="Only this user's jobs.")
@click.option("--yes", is_flag=True, help="Remove them (without it: show what would go).")
@click.option("--force", is_flag=True, help="Remove other users' jobs too (admins only).")
@click.option("--json", "as_json", is_flag=True, help="What would go (or went) as JSON.")
@click.pass_context
def prune(ctx, older_than, failed_only, user, yes, force, as_json):
    """Remove old finished jobs: their artifacts, predictions, logs and rows (jobs, events, metrics,
    artifacts). Dry run unless --yes. Queued and running jobs are never touched, nor a job that a
    kept job depends on (a quantize job whose eval stays). Other users' jobs only with --force, by an
    admin; every removal is recorded (`qrun audit`)."""
    import qrun

    result = qrun.prune(older_than, failed_only=failed_only, user=user, yes=yes, force=force,
                        db=ctx.obj.get("db_url"))
    if as_json:
        print_json(result)
        return
    jobs = result["jobs"]
    if not jobs:
        stderr_line("nothing to prune")
        return
    columns = [Column("ID", keep=100, right=True), Column("USER", keep=90), Column("KIND", keep=50),
               Column("STATUS", keep=80), Column("MODEL", keep=60, shrink=12), Column("FINISHED", keep=40),
               Column("BYTES", keep=100, right=True)]
    rows = [[str(j["id"]), j["user"], j["kind"], j["status"], Path(j["model"]).name, _day(j["finished_at"]),
             human_bytes(j["bytes"])] for j in jobs]
    for line in render(columns, rows, output_settings()):
        click.echo(line)
    verb = "removed" if yes else "would remove"
    total = result["bytes"]
    others = "" if force or not result["others"] else f" ({result['others']} of another user: add --force too)"
    stderr_line(f"{verb} {len(jobs)} job(s), freeing {human_bytes(total)} ({total} bytes)"
                + ("" if yes else f"; add --yes to remove them{others}"))


def _day(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d") if when else ""


# ---------------------------------------------------------------- du


@click.command()
@click.option("--json", "as_json", is_flag=True, help="The same numbers as JSON.")
@click.pass_context
def du(ctx, as_json):
    """Space per user and per model: bytes of artifacts (as recorded) and of logs on disk."""
    import qrun

    usage = qrun.du(db=ctx.obj.get("db_url"))
    if as_json:
        print_json(usage)
        return
    out = output_settings()
    for title, table in (("USER", usage["users"]), ("MODEL", usage["models"])):
        columns = [Column(title, keep=100, shrink=12), Column("JOBS", keep=50, right=True),
                   Column("ARTIFACTS", keep=60, right=True), Column("LOGS", keep=60, right=True),
                   Column("TOTAL", keep=100, right=True)]
        rows = [[d["name"], str(d["jobs"]), human_bytes(d["artifact_bytes"]), human_bytes(d["log_bytes"]),
                 human_bytes(d["bytes"])] for d in table]
        if title == "MODEL":
            click.echo("")
        for line in render(columns, rows, out):
            click.echo(line)


# ---------------------------------------------------------------- cap-priority


@click.command("cap-priority")
@click.argument("user", required=False)
@click.argument("cap", required=False, type=int)
@click.option("--clear", is_flag=True, help="Remove USER's cap.")
@click.pass_context
def cap_priority(ctx, user, cap, clear):
    """Cap the --priority USER (a login name of this machine) may submit with (USER CAP), remove it
    (USER --clear), or list caps (no arguments). Only qrun's admins (`qrun admin list`) change caps."""
    import qrun

    if user is not None and (cap is None) == (not clear):
        raise click.UsageError("give USER and CAP, or USER --clear", ctx=ctx)
    if user is None:
        for name, value in sorted(qrun.priority_caps(db=ctx.obj.get("db_url")).items()):
            click.echo(f"{name}\t{value}")
        return
    had_cap = qrun.set_priority_cap(user, None if clear else cap, db=ctx.obj.get("db_url"))
    if clear:
        stderr_line(f"priority cap of {user} removed" if had_cap else f"{user} had no priority cap")
    else:
        stderr_line(f"{user} may submit with --priority {cap} at most")


# ---------------------------------------------------------------- admin


@click.group()
def admin():
    """qrun's admins: who may set priority caps and prune other users' jobs (at first the table's owner
    and root). Only admins change the list; every change is recorded (`qrun audit`)."""


@admin.command("list")
@click.pass_context
def admin_list(ctx):
    """The admins' login names, one a line."""
    import qrun

    for name in qrun.admins(db=ctx.obj.get("db_url")):
        click.echo(name)


@admin.command("add")
@click.argument("user")
@click.pass_context
def admin_add(ctx, user):
    """Make USER (a login name of this machine) an admin."""
    import qrun

    added = qrun.add_admin(user, db=ctx.obj.get("db_url"))
    stderr_line(f"{user} is an admin" + ("" if added else " already"))


@admin.command("remove")
@click.argument("user")
@click.pass_context
def admin_remove(ctx, user):
    """Take USER off the admins (never the last one)."""
    import qrun

    removed = qrun.remove_admin(user, db=ctx.obj.get("db_url"))
    stderr_line(f"{user} is no longer an admin" if removed else f"{user} was not an admin")


# ---------------------------------------------------------------- audit


@click.command()
@click.option("--since", metavar="7d|ISO", help="Only what was done since then (a span like 7d, or an ISO time).")
@click.option("--json", "as_json", is_flag=True, help="The entries as a JSON array.")
@click.pass_context
def audit(ctx, since, as_json):
    """What was done to other people's work and to the queue's rules, oldest first: prunes, cap and
    admin changes, cancels and retries of another user's jobs, and every --force."""
    import qrun
    from qrun.views import local_time

    entries = qrun.audit(since=since, db=ctx.obj.get("db_url"))
    if as_json:
        print_json(entries)
        return
    if not entries:
        stderr_line("nothing recorded" + (f" since {since}" if since else ""))
        return
    columns = [Column("AT", keep=90), Column("USER", keep=100), Column("ACTION", keep=100),
               Column("TARGET", keep=80, shrink=12), Column("DETAIL", keep=40, shrink=12)]
    rows = [[local_time(e["at"]), e["user"], e["action"], e["target"], e["detail"] or ""] for e in entries]
    for line in render(columns, rows, output_settings()):
        click.echo(line)


COMMANDS = [prune, du, cap_priority, admin, audit]
