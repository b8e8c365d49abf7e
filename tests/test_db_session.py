"""db.session: which database errors are transient (a worker backs off and retries) and which are bugs."""

import socket
import sqlite3

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from qrun.db.errors import BadInput
from qrun.db.session import is_transient_db_error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    engine = create_engine(f"postgresql+psycopg://qrun@127.0.0.1:{_free_port()}/qrun",
                           connect_args={"connect_timeout": 5})
    exc = _error_of(engine.connect)
    assert isinstance(exc, OperationalError)
    assert "refused" in str(exc).lower()
    assert is_transient_db_error(exc)
    assert is_transient_db_error(exc.orig)
