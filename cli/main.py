"""`qrun`: the entry point. Every command lives in its own module; this one wires them and turns
qrun's errors into one-line messages with the right exit code (2 for bad input)."""

from __future__ import annotations

import sys
import traceback

import click

from qrun.cli import (compare, control, dashboard, demo, doctor, export, housekeeping, run, status, submit, warmup,
                      workers)
from qrun import DISTRIBUTION
from qrun.db.errors import QrunError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name=DISTRIBUTION, prog_name="qrun", message="%(prog)s %(version)s",
                      help="Print qrun's version and exit.")
@click.option("--db", "db_url", envvar="QRUN_DB", metavar="URL",
              help="Job table: a SQLAlchemy URL or a SQLite path (default $QRUN_HOME/qrun.db).")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.pass_context
def cli(ctx: click.Context, db_url: str | None, verbose: bool) -> None:
    """qrun: queue GPTQ quantization and evaluation jobs on a shared GPU server and compare what
    each variant costs in accuracy, size and speed."""
    ctx.ensure_object(dict)
    ctx.obj["db_url"] = db_url
    ctx.obj["verbose"] = verbose
    from qrun.db.session import pin_qrun_home

    pin_qrun_home()  # a relative QRUN_HOME names one place for the whole run, workers included


for module in (submit, status, control, run, workers, warmup, doctor, compare, housekeeping, export, demo, dashboard):
    for command in module.COMMANDS:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """The console script: run one command, and turn what it raised into one line and an exit code."""
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        code = cli.main(args=argv, prog_name="qrun", standalone_mode=False)
        if isinstance(code, int) and code:  # ctx.exit(n) comes back as a return value without standalone_mode
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line, like every other bad input, with where to look
        where = exc.ctx.command_path if exc.ctx else "qrun"
        click.echo(f"Error: {exc.format_message()} (see `{where} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except QrunError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 -- the last line of defence: one line, no traceback
        if verbose:
            traceback.print_exc()
        read_only = _read_only_database(exc)
        if read_only:
            click.echo(f"Error: the job table is read-only for you ({read_only}): ask its owner "
                       "for write access (the file and its directory), or point --db or QRUN_DB elsewhere", err=True)
            sys.exit(2)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"Error: {type(exc).__name__}: {first} (run with -v for the traceback)", err=True)
        sys.exit(1)


def _read_only_database(exc: BaseException) -> str:
    """SQLite's words where a command tried to write a job table it may only read, else ''."""
    while exc is not None:
        if "readonly database" in str(exc).lower():
            return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return ""


if __name__ == "__main__":
    main()
