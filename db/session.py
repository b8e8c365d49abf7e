"""Opening the job table: where it lives, SQLite's settings for a shared queue, the schema version.

SQLite serves as a queue only with care: WAL so readers never block the writer, a busy timeout
so writers wait instead of failing, and BEGIN IMMEDIATE so a transaction that reads and then
writes takes the write lock up front (pysqlite's deferred BEGIN makes such a transaction fail
at once with "database is locked" when another writer got in between).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from qrun.db.errors import BadInput, SchemaTooNew
from qrun.db.schema import SCHEMA_VERSION, Base, Meta

BUSY_TIMEOUT_S = 60
# File systems on which SQLite's WAL locking does not work (it needs shared memory between processes).
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "fuse.sshfs", "9p"}
# Shared-group defaults: members of the group can read and write the queue and its artifacts.
GROUP_UMASK = 0o002


def qrun_home() -> Path:
    return Path(os.environ.get("QRUN_HOME") or Path.home() / ".qrun")


def pin_qrun_home() -> None:
    """Make a relative QRUN_HOME absolute, once, at start: a worker runs each job in a directory of
    its own, where the relative path would name another place (every job failed so)."""
    if os.environ.get("QRUN_HOME"):
        os.environ["QRUN_HOME"] = str(Path(os.environ["QRUN_HOME"]).absolute())


def database_url(explicit: str | None = None) -> str:
    """--db, else QRUN_DB, else $QRUN_HOME/qrun.db. A bare path is taken as a SQLite file."""
    url = explicit or os.environ.get("QRUN_DB")
    if not url:
        return f"sqlite:///{qrun_home() / 'qrun.db'}"
    if "://" not in url:
        return f"sqlite:///{Path(url).absolute()}"
    if url.startswith("sqlite:///") and url[len("sqlite:///"):] not in ("", ":memory:"):
        # Relative to where the command ran, once: workers run jobs in other directories.
        return f"sqlite:///{Path(url[len('sqlite:///'):]).absolute()}"
    return url


def ensure_home(path: Path) -> Path:
    """Create a qrun directory usable by the whole group (setgid, group-writable)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if path.stat().st_uid == os.getuid():
            path.chmod(0o2775)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise BadInput(
            f"QRUN_HOME {path} is not writable ({exc.strerror}): set QRUN_HOME to a directory you can write"
        ) from exc
    return path


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path`, from /proc/mounts ('' when unknown)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    resolved, best, fstype = str(path.resolve()), "", ""
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and resolved.startswith(parts[1]) and len(parts[1]) > len(best):
            best, fstype = parts[1], parts[2]
    return fstype


def _sqlite_file(url: str) -> Path | None:
    prefix = "sqlite:///"
    if url.startswith(prefix) and url[len(prefix):] not in ("", ":memory:"):
        return Path(url[len(prefix):])
    return None


def _check_sqlite_location(db_file: Path) -> None:
    ensure_home(db_file.parent)
    fstype = filesystem_type(db_file.parent)
    if fstype in NETWORK_FILESYSTEMS:
        raise BadInput(
            f"database {db_file} is on a network file system ({fstype}), where SQLite's locking is unsafe: "
            "use a local path or a Postgres URL (--db postgresql://...)"
        )


def share_with_group(db_file: Path) -> None:
    """SQLite creates its files 0644 whatever the umask: make ours group-writable (rw-rw-r--)."""
    for path in (db_file, Path(f"{db_file}-wal"), Path(f"{db_file}-shm")):
        try:
            if path.exists() and path.stat().st_uid == os.getuid():
                path.chmod(0o664)
        except OSError:
            pass


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    db_file = _sqlite_file(url)
    if db_file is not None:
        _check_sqlite_location(db_file)
        old_umask = os.umask(GROUP_UMASK)
        try:
            engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
            _configure_sqlite(engine)
            try:
                with engine.connect():
                    pass  # creates the file
            except OperationalError as exc:  # a directory, a file we may not write, a corrupt file
                raise BadInput(
                    f"database {db_file} cannot be opened ({exc.orig}): point --db or QRUN_DB at a SQLite file "
                    "you can write, or unset them to use $QRUN_HOME/qrun.db"
                ) from exc
        finally:
            os.umask(old_umask)
        share_with_group(db_file)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except (ArgumentError, ImportError) as exc:
        raise BadInput(
            f"database URL {url!r} is not usable ({exc}): give a SQLite path or a postgresql:// URL"
        ) from exc


# Steps from version N to N+1, applied in order to an older database.
MIGRATIONS: dict[int, callable] = {}


def _stored_version(session: Session) -> int | None:
    row = session.get(Meta, "schema_version")
    return int(row.value) if row else None


def prepare_schema(engine: Engine, url: str) -> None:
    """Create the tables on a new database, migrate an older one, refuse a newer one."""
    try:
        has_meta = inspect(engine).has_table(Meta.__tablename__)
    except OperationalError as exc:
        raise BadInput(f"database {url} cannot be opened: {exc.orig}") from exc
    with Session(engine) as session, session.begin():
        version = _stored_version(session) if has_meta else None
        if version is None:
            Base.metadata.create_all(session.connection())
            session.merge(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            return
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"database {url} has schema version {version}, newer than this qrun's {SCHEMA_VERSION}: "
                "upgrade qrun (pip install -U qrun) or point --db elsewhere"
            )
        while version < SCHEMA_VERSION:
            MIGRATIONS[version](session)
            version += 1
            session.merge(Meta(key="schema_version", value=str(version)))


class Database:
    """An opened job table: `with db.transaction() as s:` runs one transaction."""

    def __init__(self, url: str | None = None):
        self.url = database_url(url)
        self.engine = make_engine(self.url)
        prepare_schema(self.engine, self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def transaction(self):
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def open_database(url: str | None = None) -> Database:
    return Database(url)


# ---------------------------------------------------------------- transient errors

# SQLite raises OperationalError for bugs too ("no such table", syntax errors): only these messages
# mean the file is (maybe briefly) out of reach or unwritable.
SQLITE_TRANSIENT_MESSAGES = (
    "database is locked",
    "database table is locked",
    "database or disk is full",
    "disk i/o error",
    "unable to open database file",
    "attempt to write a readonly database",
)
# What a server-side database says when the connection, not the statement, is the trouble.
SERVER_TRANSIENT_MESSAGES = (
    "connection refused",
    "could not connect",
    "connection timed out",
    "server closed the connection",
    "terminating connection",
    "connection is closed",
    "connection already closed",
    "consuming input failed",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "no space left on device",
)


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, (DisconnectionError, PoolTimeout)):  # the pool could not get a live connection
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    driver_error = exc.orig if isinstance(exc, DBAPIError) else exc
    message = str(driver_error).lower()
    if isinstance(driver_error, sqlite3.Error):
        return any(m in message for m in SQLITE_TRANSIENT_MESSAGES)
    if isinstance(exc, (OperationalError, InterfaceError)):
        # Postgres (psycopg) keeps OperationalError for the connection, resources, operator
        # intervention and serialization failures; bugs are ProgrammingError, constraint
        # violations IntegrityError.
        return True
    if _is_driver_operational(driver_error):
        return True
    return any(m in message for m in SERVER_TRANSIENT_MESSAGES)


def _is_driver_operational(exc: BaseException) -> bool:
    """A DBAPI OperationalError/InterfaceError not (yet) wrapped by SQLAlchemy, e.g. psycopg's own."""
    return any(cls.__name__ in ("OperationalError", "InterfaceError") for cls in type(exc).__mro__
               if cls.__module__.split(".")[0] in ("psycopg", "psycopg2"))


def is_transient_db_error(exc: BaseException) -> bool:
    """Whether `exc` means the database is (maybe briefly) unreachable or unwritable — worth backing
    off and retrying — as opposed to a bug or a constraint violation, which retrying cannot fix.

    True for: SQLite "database is locked", "database or disk is full", "disk I/O error", "unable to
    open database file", a read-only file; Postgres connection refused, terminated or closed, and
    its other OperationalErrors/InterfaceErrors; a connection SQLAlchemy invalidated. Follows
    `raise ... from` causes, so a BadInput raised from such an error counts too.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if _is_transient_one(current):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def artifacts_root() -> Path:
    return ensure_home(qrun_home() / "artifacts")


def logs_root() -> Path:
    return ensure_home(qrun_home() / "logs")


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
