"""Opening the job table: where it lives, SQLite's settings for a shared queue, the schema version.

SQLite serves as a queue only with care: WAL so readers never block the writer, a busy timeout
so writers wait instead of failing, and BEGIN IMMEDIATE so a transaction that reads and then
writes takes the write lock up front (pysqlite's deferred BEGIN makes such a transaction fail
at once with "database is locked" when another writer got in between).
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import stat
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import create_engine, event, inspect, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import (
    ArgumentError,
    DatabaseError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateTable

from qrun.db import admins
from qrun.db.errors import BadInput, SchemaTooNew
from qrun.db.schema import SCHEMA_VERSION, Admin, AuditEntry, Base, Job, Meta, SweepJob, Worker

BUSY_TIMEOUT_S = 60
# How long a Postgres connection attempt may take before "unreachable" (libpq would wait forever
# on a host that drops packets).
CONNECT_TIMEOUT_S = 10
# Any constant shared by every qrun: the Postgres advisory lock that serialises schema creation and
# migration between processes opening one database at the same moment.
SCHEMA_LOCK_KEY = 0x7172756E  # "qrun"
POSTGRES_EXTRA = "pip install 'qrun-quant[postgres]'"
# File systems on which SQLite's WAL locking does not work (it needs shared memory between processes).
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "fuse.sshfs", "9p"}
# Shared-group defaults: members of the group can read and write the queue and its artifacts.
GROUP_UMASK = 0o002


def qrun_home() -> Path:
    """$QRUN_HOME, else ~/.qrun. Set but empty is refused: it would quietly mean ~/.qrun, which a user
    who cleared it to point elsewhere (or a script whose variable expanded to nothing) did not mean."""
    configured = os.environ.get("QRUN_HOME")
    if configured is not None and not configured.strip():
        raise BadInput("QRUN_HOME is set but empty: set it to a directory, or unset it to use ~/.qrun")
    if configured:
        return Path(configured)
    return home_directory() / ".qrun"


def home_directory() -> Path:
    """$HOME, which must be a directory where it exists: ~/.qrun, Ray's ~/.ray and the kernel caches go
    there (a file there made `qrun run` die with NotADirectoryError)."""
    home = Path.home()
    if home.exists() and not home.is_dir():
        raise BadInput(f"HOME {home} is not a directory: set HOME to your home directory (qrun keeps ~/.qrun "
                       "there, and `qrun run` Ray's ~/.ray)")
    return home


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
    if _is_in_memory(url):
        raise BadInput(f"{url_source(explicit)} {url}: an in-memory SQLite database lasts one process and no other "
                       "command or worker sees it: give a file path, or a postgresql:// URL")
    if "://" not in url:
        return f"sqlite:///{Path(url).absolute()}"
    if url.startswith("sqlite:///"):  # (in-memory ones were refused above)
        # Relative to where the command ran, once: workers run jobs in other directories.
        return f"sqlite:///{Path(url[len('sqlite:///'):]).absolute()}"
    return url


def _is_in_memory(url: str) -> bool:
    return url.startswith("sqlite:") and (url.rstrip("/") in ("sqlite:", "sqlite:/") or ":memory:" in url
                                          or "mode=memory" in url)


def url_source(explicit: str | None = None) -> str:
    """Which setting named the database, for error messages: "--db", "QRUN_DB" or "QRUN_HOME".

    The CLI's --db option also reads QRUN_DB (click's envvar), so an explicit URL equal to
    $QRUN_DB most likely came from the environment."""
    env = os.environ.get("QRUN_DB")
    if explicit:
        return "QRUN_DB" if explicit == env else "--db"
    return "QRUN_DB" if env else "QRUN_HOME"


def masked_url(url: str) -> str:
    """The URL with any password replaced by ***, fit for an error message."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _make_group_dir(path: Path, adopt_existing: bool = True) -> None:
    """Create `path` usable by the whole group (setgid, group-writable); OSError if we cannot write it.
    adopt_existing: also give an existing directory of ours that mode (QRUN_HOME and its folders are
    qrun's; the directory of a --db file is the user's, left as it is unless qrun creates it)."""
    existed = path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    if (adopt_existing or not existed) and path.stat().st_uid == os.getuid():
        path.chmod(0o2775)
    probe = path / f".write-test-{os.getpid()}"
    probe.touch()
    probe.unlink()


def ensure_home(path: Path) -> Path:
    """Create a qrun directory usable by the whole group (setgid, group-writable)."""
    if path.exists() and not path.is_dir():
        raise BadInput(f"QRUN_HOME {path} is a file, not a directory: set QRUN_HOME to a directory")
    try:
        _make_group_dir(path)
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


def _check_sqlite_location(db_file: Path, source: str) -> None:
    """The database's directory must be writable (SQLite writes its -wal/-shm files beside it) and local.
    A refusal names the setting the user gave: --db, QRUN_DB, or QRUN_HOME for the default file."""
    if source == "QRUN_HOME":
        ensure_home(db_file.parent)
    else:
        if not db_file.parent.is_dir():  # made by nobody, root included: a typo must not grow directories
            raise BadInput(f"{source} {db_file}: its directory {db_file.parent} does not exist: create it, or point "
                           f"{source} at a SQLite file in an existing directory, or at a postgresql:// URL")
        try:
            _make_group_dir(db_file.parent, adopt_existing=False)
        except OSError as exc:
            raise BadInput(
                f"{source} {db_file}: its directory {db_file.parent} is not writable ({exc.strerror}): point "
                f"{source} at a SQLite file in a directory you can write, or at a postgresql:// URL"
            ) from exc
    fstype = filesystem_type(db_file.parent)
    if fstype in NETWORK_FILESYSTEMS:
        raise BadInput(
            f"database {db_file} is on a network file system ({fstype}), where SQLite's locking is unsafe: "
            "use a local path or a Postgres URL (--db postgresql://...)"
        )


def share_with_group(db_file: Path) -> None:
    """SQLite creates its files 0644 whatever the umask: give the group of ours what their owner has
    (rw-rw-r-- for a new file), so that a file its owner made read-only (0444) stays read-only."""
    for path in (db_file, Path(f"{db_file}-wal"), Path(f"{db_file}-shm")):
        try:
            if path.exists() and path.stat().st_uid == os.getuid():
                mode = file_mode(path)
                path.chmod(mode | (mode & 0o600) >> 3)
        except OSError:
            pass


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    return "database is locked" in str(exc) or "database table is locked" in str(exc)


def _set_wal_mode(cursor, timeout_s: float = BUSY_TIMEOUT_S) -> None:
    """Switch the file to WAL, waiting for other openers. Changing the journal mode needs an exclusive
    lock, and SQLite answers "database is locked" at once, busy timeout or not, while another process
    creates the same new file: so retry until the busy timeout has passed."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        _set_wal_mode(cur)
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_unopenable(db_file: Path, source: str, exc: DatabaseError) -> BadInput:
    if is_corrupt_db_error(exc) and (source == "QRUN_HOME" or _has_sqlite_header(db_file)):
        return corrupt_table(db_file, exc)  # a file qrun made, or one that was a database: damaged
    if is_corrupt_db_error(exc):  # any other file named by --db or QRUN_DB: most likely not a table at all
        return BadInput(f"{source} {db_file}: {_one_line(exc.orig)} (or a damaged one): point --db or QRUN_DB at a "
                        "qrun job table, or restore it from a backup")
    if _disk_is_full(db_file.parent):  # SQLite says only "disk I/O error": it cannot make its -shm file
        return BadInput(f"database {db_file} cannot be opened: the disk it is on is full (no space left on "
                        "device): free some space there")
    if source == "QRUN_HOME":
        return BadInput(f"database {db_file} (in QRUN_HOME) cannot be opened ({exc.orig}): set QRUN_HOME to a "
                        "directory you can write, or point --db or QRUN_DB at another database")
    return BadInput(f"{source} {db_file}: database cannot be opened ({exc.orig}): point --db or QRUN_DB at a "
                    "SQLite file you can write, or unset them to use $QRUN_HOME/qrun.db")


# SQLite's words for a file whose header or pages are damaged: no retry, permission or space mends it.
SQLITE_CORRUPT_MESSAGES = ("database disk image is malformed", "file is not a database")


def is_corrupt_db_error(exc: BaseException | None) -> bool:
    """Whether `exc` (or what it was raised from) is SQLite saying the file is damaged."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        driver_error = exc.orig if isinstance(exc, DBAPIError) else exc
        if isinstance(driver_error, sqlite3.DatabaseError) and any(
                m in str(driver_error).lower() for m in SQLITE_CORRUPT_MESSAGES):
            return True
        exc = exc.__cause__
    return False


def _has_sqlite_header(db_file: Path) -> bool:
    try:
        with db_file.open("rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def corrupt_table(db_file: Path | str, exc: BaseException) -> BadInput:
    """The one line for a damaged job table: what it is, and the way back (SQLite cannot repair it)."""
    said = exc.orig if isinstance(exc, DBAPIError) else exc
    return BadInput(f"database {db_file} is corrupt ({_one_line(said)}): restore it from a backup (`qrun doctor` "
                    "runs SQLite's integrity check on a table), or point --db or QRUN_DB at another database")


def check_integrity(url: str) -> list[str]:
    """SQLite's `PRAGMA integrity_check` of the job table at `url`, read-only and without qrun's own
    opening (which a damaged file fails): its findings, none for a sound file. A server database
    checks its own pages: only a connection is tried there."""
    db_file = _sqlite_file(url)
    if db_file is None:
        engine = _server_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except DBAPIError as exc:
            raise _unreachable(url, exc) from exc
        finally:
            engine.dispose()
        return []
    if not db_file.is_file():
        raise BadInput(f"database {db_file}: no such file: check the path (--db, QRUN_DB or QRUN_HOME)")
    try:
        with sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S) as conn:
            found = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:  # the header itself: no page could be read
        return [str(exc)]
    return [] if found == ["ok"] else found


def _disk_is_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 64 * 1024  # less than SQLite's WAL index needs
    except OSError:
        return False


def _sqlite_engine(url: str, db_file: Path, source: str) -> Engine:
    _check_sqlite_location(db_file, source)
    old_umask = os.umask(GROUP_UMASK)
    try:
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
        _configure_sqlite(engine)
        try:
            with engine.connect():
                pass  # creates the file
        except DatabaseError as exc:  # a directory, a file we may not write, a corrupt file, not a database
            raise _sqlite_unopenable(db_file, source, exc) from exc
    finally:
        os.umask(old_umask)
    share_with_group(db_file)
    _open_existing_only(engine, db_file)
    return engine


def _open_existing_only(engine: Engine, db_file: Path) -> None:
    """Once the file is made, a new connection opens it only where it is: SQLite would make an empty
    file in place of a table deleted under a running process (whose pooled connections go on serving
    the deleted one), and the process would go on in a table of nothing."""
    @event.listens_for(engine, "do_connect")
    def _existing(dialect, conn_rec, cargs, cparams):
        cargs[:] = [f"file:{quote(str(db_file.absolute()))}?mode=rw"]
        cparams["uri"] = True


def _missing_driver(url: str, exc: ImportError) -> BadInput:
    """A URL whose driver module is not installed: name the pip command that brings it."""
    shown = masked_url(url)
    try:
        backend, driver = make_url(url).get_backend_name(), make_url(url).get_driver_name()
    except ArgumentError:
        backend, driver = "", ""
    if backend == "postgresql" and driver not in ("", "psycopg"):
        return BadInput(f"database URL {shown} needs the {driver} driver, which is not installed ({exc}): "
                        f"use postgresql+psycopg://... after {POSTGRES_EXTRA}, or install {driver}")
    if backend == "postgresql":
        return BadInput(f"database URL {shown} needs the Postgres driver psycopg, which is not installed: "
                        f"{POSTGRES_EXTRA}")
    return BadInput(f"database URL {shown} is not usable ({exc}): give a SQLite path or a postgresql:// URL "
                    f"({POSTGRES_EXTRA})")


def _server_engine(url: str) -> Engine:
    """Postgres (or any server database): pings each pooled connection before use, so a server restart
    costs one reconnect instead of an error; a connection attempt gives up after CONNECT_TIMEOUT_S."""
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError as exc:
        raise BadInput(f"database URL {masked_url(url)!r} is not usable ({exc}): give a SQLite path or a "
                       "postgresql:// URL") from exc
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if backend == "postgresql" else {}
    try:
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except ImportError as exc:  # the dialect is known, its driver module is not installed
        raise _missing_driver(url, exc) from exc
    except ArgumentError as exc:  # an unknown dialect or driver name
        raise BadInput(f"database URL {masked_url(url)!r} is not usable ({exc}): give a SQLite path or a "
                       "postgresql:// URL") from exc


def make_engine(url: str, source: str | None = None) -> Engine:
    db_file = _sqlite_file(url)
    if db_file is not None:
        return _sqlite_engine(url, db_file, source or url_source(url))
    return _server_engine(url)


def _one_line(exc: BaseException) -> str:
    """A driver's message on one line (libpq's spans several: a reason, then a tab-indented hint)."""
    return re.sub(r"\s+", " ", str(exc)).strip()


def _unreachable(url: str, exc: DBAPIError) -> BadInput:
    return BadInput(f"database {masked_url(url)} cannot be reached ({_one_line(exc.orig)}): check that the server "
                    "runs and the URL's host, port, user and password, or point --db or QRUN_DB elsewhere")


def _migrate_1_to_2(session: Session) -> None:
    """64-bit priority and artifact sizes, unbounded worker and progress texts; the node of each
    artifact and a table of workers (cluster mode).

    SQLite needs no change: its INTEGER already holds 64 bits and it never enforces VARCHAR
    lengths (and it has no ALTER COLUMN). Postgres alters the four columns in place. Both get the
    claim index in its current order (status, priority DESC, id): databases made before it had
    (status, priority, id) under the same name.
    """
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("ALTER TABLE jobs ALTER COLUMN priority TYPE BIGINT, "
                          "ALTER COLUMN worker TYPE TEXT, ALTER COLUMN progress_module TYPE TEXT"))
        conn.execute(text("ALTER TABLE artifacts ALTER COLUMN bytes TYPE BIGINT"))
    conn.execute(text("DROP INDEX IF EXISTS ix_jobs_claim"))
    conn.execute(text("CREATE INDEX ix_jobs_claim ON jobs (status, priority DESC, id)"))
    # Cluster mode: the node that wrote each artifact, and the workers' own table.
    conn.execute(text("ALTER TABLE artifacts ADD COLUMN node TEXT"))
    Worker.__table__.create(conn)


def _migrate_2_to_3(session: Session) -> None:
    """Sweeps: each job's sweep id and name, both NULL for the jobs already there, and their indexes.
    ADD COLUMN of a nullable column is the same statement on SQLite and Postgres and rewrites no row."""
    conn = session.connection()
    conn.execute(text("ALTER TABLE jobs ADD COLUMN sweep VARCHAR(16)"))
    conn.execute(text("ALTER TABLE jobs ADD COLUMN sweep_name TEXT"))
    conn.execute(text("CREATE INDEX ix_jobs_sweep ON jobs (sweep)"))
    conn.execute(text("CREATE INDEX ix_jobs_sweep_name ON jobs (sweep_name)"))


def _migrate_4_to_5(session: Session) -> None:
    """Job ids never reused, and the tables of sharing: sweep membership (filled from each job's own
    sweep), the admins (the table's owner and root) and the audit log.

    SQLite reuses the largest rowid after it is deleted unless the table says AUTOINCREMENT, which only
    CREATE TABLE can say: the jobs table is rebuilt (copied into the new form, dropped, the copy renamed,
    its indexes made again) inside this transaction, with foreign keys off on this connection
    (prepare_schema) so that dropping the old table does not count the other tables' rows as orphans;
    `foreign_key_check` then proves every reference still holds. Postgres' sequences never reuse an id."""
    conn = session.connection()
    if conn.dialect.name == "sqlite":
        _rebuild_sqlite_jobs(conn)
    for model in (SweepJob, Admin, AuditEntry):
        model.__table__.create(conn)
    conn.execute(text("INSERT INTO sweep_jobs (sweep, job_id) SELECT sweep, id FROM jobs WHERE sweep IS NOT NULL"))
    admins.seed(conn)


def _rebuild_sqlite_jobs(conn: Connection) -> None:
    indexes = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs' "
                                   "AND sql IS NOT NULL").scalars().all()
    ddl = str(CreateTable(Job.__table__).compile(dialect=conn.dialect))
    conn.exec_driver_sql(ddl.replace("CREATE TABLE jobs ", "CREATE TABLE jobs_v5 ", 1))
    columns = ", ".join(column.name for column in Job.__table__.columns)
    conn.exec_driver_sql(f"INSERT INTO jobs_v5 ({columns}) SELECT {columns} FROM jobs")  # sets sqlite_sequence
    conn.exec_driver_sql("DROP TABLE jobs")
    conn.exec_driver_sql("ALTER TABLE jobs_v5 RENAME TO jobs")
    for sql in indexes:
        conn.exec_driver_sql(sql)
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        raise RuntimeError(f"rebuilding the jobs table left references that point nowhere: {broken[:3]}")


def _migrate_3_to_4(session: Session) -> None:
    """What a worker without a job is doing (`qrun workers`): NULL for the rows already there. A
    version-1 database has it already: step 1 to 2 creates the workers table as the model is today."""
    conn = session.connection()
    if "activity" not in {c["name"] for c in inspect(conn).get_columns("workers")}:
        conn.execute(text("ALTER TABLE workers ADD COLUMN activity TEXT"))


# Steps from version N to N+1, applied in order to an older database, in one transaction.
MIGRATIONS: dict[int, callable] = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4, 4: _migrate_4_to_5}


def _stored_version(session: Session) -> int | None:
    row = session.get(Meta, "schema_version")
    return int(row.value) if row else None


def _lock_schema(conn: Connection) -> None:
    """Serialise schema creation and migration between processes opening the database together.
    SQLite: the transaction's BEGIN IMMEDIATE already holds the write lock. Postgres: an advisory
    lock held until the transaction ends (two create_all at once would both try CREATE TABLE)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})


def prepare_schema(engine: Engine, url: str, create: bool = True, source: str | None = None) -> None:
    """Create the tables on a new database (unless create is False: then BadInput, naming `source`),
    migrate an older one, refuse a newer one.

    Everything happens in one transaction that first takes the schema lock, so processes that
    open a new database at the same moment create it once, and the others find it made."""
    try:
        _prepare_schema_locked(engine, url, create, source or url_source(url))
    except (OperationalError, InterfaceError) as exc:
        if engine.dialect.name == "sqlite":
            raise BadInput(f"database {url} cannot be opened: {_one_line(exc.orig)}") from exc
        raise _unreachable(url, exc) from exc
    except DatabaseError as exc:  # a damaged page of its schema (a damaged header fails sooner, at connect)
        if is_corrupt_db_error(exc):
            raise corrupt_table(_sqlite_file(url) or url, exc) from exc
        raise


@contextmanager
def _sqlite_foreign_keys_off(conn: Connection):
    """SQLite's foreign keys off on this connection while it is held (a migration rebuilds a table that
    others refer to). The pragma is ignored inside a transaction, so it goes to the driver directly,
    before SQLAlchemy begins one; the connection gets them back before it returns to the pool."""
    if conn.dialect.name != "sqlite":
        yield
        return
    driver = conn.connection.driver_connection
    driver.execute("PRAGMA foreign_keys = OFF")
    try:
        yield
    finally:
        driver.execute("PRAGMA foreign_keys = ON")


def _prepare_schema_locked(engine: Engine, url: str, create: bool, source: str) -> None:
    with engine.connect() as conn, _sqlite_foreign_keys_off(conn), Session(bind=conn) as session, session.begin():
        _lock_schema(session.connection())
        has_meta = inspect(session.connection()).has_table(Meta.__tablename__)
        version = _stored_version(session) if has_meta else None
        if version is None and not create:
            raise BadInput(no_table(source, url, in_database=True))
        if version is None:
            Base.metadata.create_all(session.connection())
            session.merge(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            admins.seed(session.connection())
            return
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"database {masked_url(url)} has schema version {version}, newer than this qrun's {SCHEMA_VERSION}: "
                "upgrade qrun (pip install -U qrun-quant) or point --db elsewhere"
            )
        while version < SCHEMA_VERSION:
            MIGRATIONS[version](session)
            version += 1
            session.merge(Meta(key="schema_version", value=str(version)))


def no_table(source: str, url: str, in_database: bool) -> str:
    """Why a command that only looks found nothing to look at, naming the setting that chose the place."""
    makers = "`qrun submit` or `qrun run` creates one"
    db_file = _sqlite_file(url)
    if source == "QRUN_HOME":
        home = db_file.parent if db_file is not None else qrun_home()
        unset = "" if os.environ.get("QRUN_HOME") else " (QRUN_HOME unset: the default)"
        return f"QRUN_HOME {home}{unset}: no qrun table there ({makers}): check QRUN_HOME, or give --db"
    where = db_file if db_file is not None else masked_url(url)
    if in_database:
        return f"{source} {where}: no qrun table in that database ({makers}): check {source}"
    return f"{source} {where}: no such database, so no qrun table there ({makers}): check the path"


class Database:
    """An opened job table: `with db.transaction() as s:` runs one transaction.

    create=False (commands that only look): where there is no qrun table (no SQLite file, or a
    database without qrun's tables) it is refused, not made, since a mistyped path or QRUN_HOME would
    look like an empty queue and leave a table behind. `qrun submit` and `qrun run` create it."""

    def __init__(self, url: str | None = None, create: bool = True):
        qrun_home()  # an empty QRUN_HOME, or a HOME that is a file, is refused whatever the database
        self.url = database_url(url)
        source = url_source(url)
        db_file = _sqlite_file(self.url)
        if not create and db_file is not None and not db_file.exists():
            raise BadInput(no_table(source, self.url, in_database=False))
        if not create and db_file is not None and db_file.is_file() and db_file.stat().st_size == 0:
            raise BadInput(no_table(source, self.url, in_database=True))  # (opening it would write a header)
        self.engine = make_engine(self.url, source)
        prepare_schema(self.engine, self.url, create, source)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def transaction(self):
        try:
            with self._sessions() as session, session.begin():
                yield session
        except DatabaseError as exc:  # a damaged file says so in one line, wherever it is met
            if is_corrupt_db_error(exc):
                raise corrupt_table(_sqlite_file(self.url) or self.url, exc) from exc
            raise

    def dispose(self) -> None:
        self.engine.dispose()


def open_database(url: str | None = None, create: bool = True) -> Database:
    return Database(url, create)


TABLE_ID_KEY = "table_id"


def table_id(db: Database) -> str:
    """This job table's own id (a qrun_meta row, made the first time it is asked for): a runner keeps
    it to tell its table from another one put at the same path or URL meanwhile."""
    for _ in range(2):
        try:
            with db.transaction() as s:
                row = s.get(Meta, TABLE_ID_KEY)
                if row is not None:
                    return row.value
                made = uuid.uuid4().hex
                s.add(Meta(key=TABLE_ID_KEY, value=made))
            return made
        except IntegrityError:  # another process made it at the same moment: read theirs
            continue
    raise RuntimeError(f"could not read or make the job table's {TABLE_ID_KEY}")


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
