"""db.session: which database errors are transient (a worker backs off and retries) and which are bugs;
what a user sees when the database named cannot be opened."""

import importlib.util
import os
import sqlite3
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from helpers import QRUN, free_port, without_dac
from qrun.db.errors import BadInput
from qrun.db.session import is_transient_db_error


def _error_of(action):
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the error itself is what the test looks at
        return exc
    raise AssertionError("expected the database to raise")


def test_a_locked_sqlite_file_is_transient(tmp_path):
    path = tmp_path / "q.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")  # holds the write lock
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        exc = _error_of(lambda: engine.connect().exec_driver_sql("BEGIN IMMEDIATE"))
        assert isinstance(exc, OperationalError) and "database is locked" in str(exc)
        assert is_transient_db_error(exc)
        assert is_transient_db_error(exc.orig)  # the driver's own error, unwrapped
        assert not is_transient_db_error(BadInput("cannot open"))
        wrapped = BadInput("database cannot be opened")
        wrapped.__cause__ = exc
        assert is_transient_db_error(wrapped)  # raise BadInput(...) from OperationalError
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()


def test_an_unopenable_sqlite_file_is_transient(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'q.db'}")
    exc = _error_of(engine.connect)
    assert "unable to open database file" in str(exc)
    assert is_transient_db_error(exc)


def test_sqlite_bugs_and_constraint_violations_are_not_transient(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'q.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    with engine.connect() as conn:
        no_table = _error_of(lambda: conn.execute(text("SELECT * FROM no_such_table")))
        assert isinstance(no_table, OperationalError)  # SQLite calls a bug "operational" too
        assert not is_transient_db_error(no_table)
        syntax = _error_of(lambda: conn.execute(text("SELEC 1")))
        assert not is_transient_db_error(syntax)
        duplicate = _error_of(lambda: conn.execute(text("INSERT INTO t VALUES (1)")))
        assert isinstance(duplicate, IntegrityError)
        assert not is_transient_db_error(duplicate)
    engine.dispose()
    assert not is_transient_db_error(ValueError("database is locked"))  # not a database error at all


def test_a_refused_postgres_connection_is_transient():
    pytest.importorskip("psycopg", reason="pip install 'qrun-quant[postgres]' to test Postgres URLs")
    engine = create_engine(f"postgresql+psycopg://qrun@127.0.0.1:{free_port()}/qrun",
                           connect_args={"connect_timeout": 5})
    exc = _error_of(engine.connect)
    assert isinstance(exc, OperationalError)
    assert "refused" in str(exc).lower()
    assert is_transient_db_error(exc)
    assert is_transient_db_error(exc.orig)


# ---------------------------------------------------------------- opening errors, through the real console script
#
# Each is bad input: exit 2, one line that names the setting the user gave and the fix, no traceback.


def _qrun(*args: str, env: dict | None = None, prefix: list[str] | tuple[str, ...] = (),
          python_first: str | None = None) -> subprocess.CompletedProcess:
    """The real `qrun` console script; python_first: Python run in the same process before the CLI."""
    if python_first is None:
        command = [*prefix, QRUN, *args]
    else:
        command = [*prefix, sys.executable, "-c",
                   f"{python_first}\nimport sys\nfrom qrun.cli.main import main\nsys.argv = ['qrun', *sys.argv[1:]]\n"
                   "main()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def _refusal(result: subprocess.CompletedProcess) -> str:
    """The one line of a bad-input refusal."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


@pytest.mark.reliability
def test_database_in_a_read_only_directory_names_the_setting_used(tmp_path, qrun_home):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    db_file = read_only / "qrun.db"
    # `run` makes the database it works (`status` only looks: "no such database")
    by_option = _refusal(_qrun("--db", str(db_file), "run", "--until-empty", prefix=without_dac()))
    assert by_option.startswith(f"Error: --db {db_file}: its directory {read_only} is not writable (Permission denied)")
    assert "point --db at a SQLite file in a directory you can write" in by_option
    by_env = _refusal(_qrun("run", "--until-empty", env={"QRUN_DB": str(db_file)}, prefix=without_dac()))
    assert by_env.startswith(f"Error: QRUN_DB {db_file}: its directory {read_only} is not writable")
    assert "QRUN_HOME" not in by_option + by_env
    assert not db_file.exists()


@pytest.mark.reliability
def test_postgres_url_without_its_driver_names_the_extra(qrun_home):
    # A driver that is not installed here (psycopg2), and psycopg itself made unimportable.
    url = "postgresql+psycopg2://qrun:s3cret@db.example/queue"
    if importlib.util.find_spec("psycopg2") is None:
        line = _refusal(_qrun("--db", url, "status"))
        assert "needs the psycopg2 driver, which is not installed" in line
        assert "pip install 'qrun-quant[postgres]'" in line and "s3cret" not in line
    hidden = "import sys\nsys.modules['psycopg'] = None\nsys.modules['psycopg2'] = None"
    line = _refusal(_qrun("--db", "postgresql://qrun:s3cret@db.example/queue", "status", python_first=hidden))
    assert line == ("Error: database URL postgresql://qrun:***@db.example/queue needs the Postgres driver psycopg, "
                    "which is not installed: pip install 'qrun-quant[postgres]'")


@pytest.mark.reliability
def test_unreachable_postgres_server_is_one_line_naming_the_url(qrun_home):
    pytest.importorskip("psycopg", reason="pip install 'qrun-quant[postgres]' to test Postgres URLs")
    port = free_port()
    line = _refusal(_qrun("--db", f"postgresql+psycopg://qrun:s3cret@127.0.0.1:{port}/queue", "status"))
    assert line.startswith(f"Error: database postgresql+psycopg://qrun:***@127.0.0.1:{port}/queue cannot be reached (")
    assert "Connection refused" in line and "s3cret" not in line
