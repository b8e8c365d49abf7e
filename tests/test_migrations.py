"""Schema migrations on real databases: a version-1 job table (written here as qrun 0.1 made it, with
rows in it), and version-2 and version-4 ones, opened by today's qrun, on SQLite and on Postgres."""

from datetime import datetime

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DataError, IntegrityError

from qrun.db import queue
from qrun.db.queue import ArtifactRecord, JobSpec
from qrun.db.schema import SCHEMA_VERSION, Meta
from qrun.db.session import open_database
from qrun.db.states import Kind

pytestmark = pytest.mark.reliability

EIGHT_GB = 8 * 1024**3
# A Mixture-of-Experts layer's module list, as GPTQModel names it in progress callbacks.
MOE_MODULES = "layer 3: " + ", ".join(f"mlp.experts.{i}.gate_proj" for i in range(16))

# The tables as schema version 1 created them (SQLAlchemy's DDL for each dialect): 32-bit INTEGER
# priority and bytes, VARCHAR(128) worker and progress_module, the claim index in its first order.
_V1_COMMON_TAIL = """
    kind VARCHAR(16) NOT NULL, status VARCHAR(16) NOT NULL, params JSON NOT NULL, model TEXT NOT NULL,
    depends_on INTEGER, priority INTEGER NOT NULL, attempts INTEGER NOT NULL, max_attempts INTEGER NOT NULL,
    worker VARCHAR(128), gpu VARCHAR(64), lease_expires_at {ts}, progress_done INTEGER NOT NULL,
    progress_total INTEGER NOT NULL, progress_module VARCHAR(128), submitted_by VARCHAR(64) NOT NULL,
    created_at {ts} NOT NULL, started_at {ts}, finished_at {ts}, error TEXT, log_path TEXT,
    PRIMARY KEY (id),
    CONSTRAINT job_status_known CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    CONSTRAINT job_kind_known CHECK (kind IN ('quantize', 'eval')),
    FOREIGN KEY(depends_on) REFERENCES jobs (id)
)"""


def v1_ddl(dialect: str) -> list[str]:
    serial, ts = ("INTEGER", "DATETIME") if dialect == "sqlite" else ("SERIAL", "TIMESTAMP WITHOUT TIME ZONE")
    return [
        f"CREATE TABLE jobs (id {serial} NOT NULL, " + _V1_COMMON_TAIL.format(ts=ts),
        "CREATE INDEX ix_jobs_claim ON jobs (status, priority, id)",
        "CREATE TABLE qrun_meta (key VARCHAR(64) NOT NULL, value VARCHAR(256) NOT NULL, PRIMARY KEY (key))",
        f"CREATE TABLE artifacts (id {serial} NOT NULL, job_id INTEGER NOT NULL, kind VARCHAR(32) NOT NULL, "
        "path TEXT NOT NULL, bytes INTEGER NOT NULL, sha256 VARCHAR(64) NOT NULL, PRIMARY KEY (id), "
        "UNIQUE (job_id, kind), FOREIGN KEY(job_id) REFERENCES jobs (id))",
        "CREATE INDEX ix_artifacts_job_id ON artifacts (job_id)",
        f"CREATE TABLE events (id {serial} NOT NULL, job_id INTEGER NOT NULL, transition VARCHAR(16) NOT NULL, "
        f"from_status VARCHAR(16), to_status VARCHAR(16) NOT NULL, at {ts} NOT NULL, detail TEXT, "
        "PRIMARY KEY (id), FOREIGN KEY(job_id) REFERENCES jobs (id))",
        "CREATE INDEX ix_events_job_id ON events (job_id)",
        f"CREATE TABLE metrics (id {serial} NOT NULL, job_id INTEGER NOT NULL, name VARCHAR(64) NOT NULL, "
        "value FLOAT NOT NULL, PRIMARY KEY (id), UNIQUE (job_id, name), FOREIGN KEY(job_id) REFERENCES jobs (id))",
        "CREATE INDEX ix_metrics_job_id ON metrics (job_id)",
    ]


V1_ROWS = [
    "INSERT INTO qrun_meta (key, value) VALUES ('schema_version', '1')",
    "INSERT INTO jobs (kind, status, params, model, priority, attempts, max_attempts, worker, gpu, "
    "progress_done, progress_total, progress_module, submitted_by, created_at, started_at, finished_at) VALUES "
    "('quantize', 'succeeded', '{\"bits\": 4}', '/models/m', 7, 1, 3, 'host:1:gpu0', '0', 2, 2, 'layer 2', "
    "'alice', '2026-01-02 03:04:05', '2026-01-02 03:04:06', '2026-01-02 03:10:00')",
    "INSERT INTO jobs (kind, status, params, model, depends_on, priority, attempts, max_attempts, progress_done, "
    "progress_total, submitted_by, created_at) VALUES "
    "('eval', 'queued', '{}', '/models/m', 1, 7, 0, 3, 0, 0, 'alice', '2026-01-02 03:04:05')",
    "INSERT INTO artifacts (job_id, kind, path, bytes, sha256) VALUES (1, 'model', '/a/m-w4', 123456789, "
    "'" + "ab" * 32 + "')",
    "INSERT INTO events (job_id, transition, from_status, to_status, at, detail) VALUES "
    "(1, 'submit', NULL, 'queued', '2026-01-02 03:04:05', 'by alice')",
    "INSERT INTO metrics (job_id, name, value) VALUES (1, 'quantize_s', 12.5)",
]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def v1_database(request, qrun_home):
    """The URL of a database holding version 1's tables and rows, not yet opened by today's qrun."""
    url, engine = _with_v1_rows(request, qrun_home, "v1.db")
    engine.dispose()
    return url


def _with_v1_rows(request, qrun_home, sqlite_name: str):
    """(URL, engine) of a fresh database (SQLite file or the test's Postgres, as `request.param` says)
    holding version 1's tables and rows."""
    if request.param == "sqlite":
        qrun_home.mkdir(parents=True)
        url = f"sqlite:///{qrun_home / sqlite_name}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in v1_ddl(request.param) + V1_ROWS:
            conn.execute(text(statement))
    return url, engine


def _store_raw(url: str, statement: str, read_back: str | None = None):
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement))
            return conn.execute(text(read_back)).scalar() if read_back else None
    finally:
        engine.dispose()


def test_version_1_columns_refuse_real_values_on_postgres(v1_database):
    """Why version 2 exists: Postgres enforces INTEGER's 32 bits and VARCHAR's length. SQLite does
    neither, which is why its migration step changes no column."""
    if v1_database.startswith("sqlite"):
        assert _store_raw(v1_database, f"UPDATE artifacts SET bytes = {EIGHT_GB}",
                          "SELECT bytes FROM artifacts") == EIGHT_GB
        assert _store_raw(v1_database, f"UPDATE jobs SET progress_module = '{MOE_MODULES}'",
                          "SELECT progress_module FROM jobs WHERE id = 1") == MOE_MODULES
        return
    with pytest.raises(DataError, match="out of range"):
        _store_raw(v1_database, f"UPDATE artifacts SET bytes = {EIGHT_GB}")
    with pytest.raises(DataError, match="too long"):
        _store_raw(v1_database, f"UPDATE jobs SET progress_module = '{MOE_MODULES}'")


def test_version_1_database_is_migrated_with_its_data(v1_database):
    database = open_database(v1_database)
    try:
        with database.transaction() as s:
            assert s.get(Meta, "schema_version").value == str(SCHEMA_VERSION) == "5"
        # The rows survived, every column of them.
        first, second = queue.list_jobs(database)
        assert (first.kind, first.status, first.params, first.priority, first.worker, first.progress_module,
                first.submitted_by, first.started_at) == (
            "quantize", "succeeded", {"bits": 4}, 7, "host:1:gpu0", "layer 2", "alice",
            datetime(2026, 1, 2, 3, 4, 6))
        assert (second.kind, second.status, second.depends_on) == ("eval", "queued", first.id)
        (artifact,) = queue.artifacts_of(database, [first.id])[first.id]
        assert (artifact.path, artifact.bytes, artifact.sha256) == ("/a/m-w4", 123456789, "ab" * 32)
        assert queue.metrics_of(database, [first.id]) == {first.id: {"quantize_s": 12.5}}
        assert [(e.transition, e.detail) for e in queue.events_of(database, first.id)] == [("submit", "by alice")]
        # The claim index has its current order; the table goes on working as a queue.
        index = next(i for i in inspect(database.engine).get_indexes("jobs") if i["name"] == "ix_jobs_claim")
        assert index["column_names"] == ["status", "priority", "id"]
        if database.is_sqlite:  # SQLite's reflection leaves out the order: read the index's own SQL
            with database.engine.connect() as conn:
                sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'ix_jobs_claim'").scalar()
            assert "priority DESC" in sql
        else:
            assert index["column_sorting"] == {"priority": ("desc",)}
        # Values version 1 could not hold on Postgres are stored and read back.
        (big,) = queue.submit_jobs(database, [JobSpec(kind=Kind.QUANTIZE, model="/models/moe", priority=2**62)])
        assert queue.claim_job(database, "w-" + "x" * 300, None).id == big  # priority 2**62 first; a long name
        queue.record_progress(database, big, "w-" + "x" * 300, 3, 48, MOE_MODULES)
        assert queue.get_job(database, big).progress_module == MOE_MODULES and len(MOE_MODULES) > 400
        queue.finish_job(database, big, "w-" + "x" * 300, {},
                         [ArtifactRecord(kind="model", path="/a/moe-w4", bytes=EIGHT_GB, sha256="cd" * 32)])
        assert queue.artifacts_of(database, [big])[big][0].bytes == EIGHT_GB
        assert queue.get_job(database, big).priority == 2**62
    finally:
        database.dispose()


def test_a_migrated_database_opens_again_without_change(v1_database):
    open_database(v1_database).dispose()
    database = open_database(v1_database)  # version 2 now: no step runs again
    with database.transaction() as s:
        assert s.get(Meta, "schema_version").value == str(SCHEMA_VERSION)
    assert len(queue.list_jobs(database)) == 2
    database.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def v2_database(request, qrun_home):
    """The URL of a version-2 database with rows, as qrun 0.2 left one: version 1's tables migrated by
    its step (MIGRATIONS[1]), no sweep columns."""
    from sqlalchemy.orm import Session

    from qrun.db.session import MIGRATIONS

    url, engine = _with_v1_rows(request, qrun_home, "v2.db")
    with Session(engine) as session, session.begin():
        MIGRATIONS[1](session)
        session.execute(text("UPDATE qrun_meta SET value = '2' WHERE key = 'schema_version'"))
    engine.dispose()
    return url


def test_version_2_database_gains_sweeps_and_keeps_its_jobs(v2_database):
    engine = create_engine(v2_database)
    assert "sweep" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    engine.dispose()
    database = open_database(v2_database)
    try:
        with database.transaction() as s:
            assert s.get(Meta, "schema_version").value == "5"
        old = queue.list_jobs(database)
        assert [(j.kind, j.status, j.sweep, j.sweep_name) for j in old] == [
            ("quantize", "succeeded", None, None), ("eval", "queued", None, None)]
        indexes = {i["name"]: i["column_names"] for i in inspect(database.engine).get_indexes("jobs")}
        assert indexes["ix_jobs_sweep"] == ["sweep"] and indexes["ix_jobs_sweep_name"] == ["sweep_name"]
        assert "activity" in {c["name"] for c in inspect(database.engine).get_columns("workers")}  # version 4
        new = queue.submit_jobs(database, [JobSpec(kind=Kind.QUANTIZE, model="/models/m", params={"bits": 8})],
                                sweep="0badcafe", sweep_name="after-upgrade")
        assert [j.id for j in queue.jobs_of_sweep(database, "after-upgrade")] == new
        assert [j.id for j in queue.jobs_of_sweep(database, "0badcafe")] == new
    finally:
        database.dispose()
    database = open_database(v2_database)  # version 3 now: no step runs again
    assert len(queue.list_jobs(database)) == 3
    database.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def v4_database(request, qrun_home):
    """The URL of a version-4 database with rows, as qrun 0.4 left one: version 1's tables migrated by
    its steps, job 1 in a named sweep; no AUTOINCREMENT on SQLite, no sweep, admin or audit tables."""
    from sqlalchemy.orm import Session

    from qrun.db.session import MIGRATIONS

    url, engine = _with_v1_rows(request, qrun_home, "v4.db")
    with Session(engine) as session, session.begin():
        for step in (1, 2, 3):
            MIGRATIONS[step](session)
        session.execute(text("UPDATE jobs SET sweep = 'abcd1234', sweep_name = 'old-study' WHERE id = 1"))
        session.execute(text("UPDATE qrun_meta SET value = '4' WHERE key = 'schema_version'"))
    engine.dispose()
    return url


def _raw_state(url: str) -> tuple[list, dict, dict]:
    """Every row of jobs (all columns), the jobs table's indexes, and each table's foreign keys, read
    without qrun."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(text("SELECT * FROM jobs ORDER BY id"))]
        inspector = inspect(engine)
        indexes = {i["name"]: (i["column_names"], bool(i["unique"])) for i in inspector.get_indexes("jobs")}
        keys = {t: sorted((tuple(k["constrained_columns"]), k["referred_table"], tuple(k["referred_columns"]))
                          for k in inspector.get_foreign_keys(t))
                for t in ("jobs", "events", "metrics", "artifacts")}
        return rows, indexes, keys
    finally:
        engine.dispose()


def test_version_4_database_keeps_every_row_index_and_key_and_never_reuses_an_id(v4_database):
    from qrun.db.admins import admin_names

    rows, indexes, keys = _raw_state(v4_database)
    assert keys["events"] == [(("job_id",), "jobs", ("id",))] and len(rows) == 2 and "ix_jobs_claim" in indexes
    database = open_database(v4_database)
    try:
        with database.transaction() as s:
            assert s.get(Meta, "schema_version").value == "5"
        assert _raw_state(v4_database) == (rows, indexes, keys)  # same rows, indexes and foreign keys
        if database.is_sqlite:
            with database.engine.connect() as conn:
                ddl = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'jobs'").scalar()
            assert "AUTOINCREMENT" in ddl
        with pytest.raises(IntegrityError):  # the other tables' foreign keys are still enforced
            with database.transaction() as s:
                s.execute(text("INSERT INTO events (job_id, transition, to_status, at) "
                               "VALUES (999, 'submit', 'queued', '2026-01-01 00:00:00')"))
        # Job 1's sweep has its membership; the table's owner (root, who made the file) and root are admins.
        assert [j.id for j in queue.jobs_of_sweep(database, "old-study")] == [1]
        assert admin_names(database) == ["root"] == [queue.current_user()]
        # The newest job pruned, the next one gets a new id (SQLite gave 2 again before version 5).
        queue.cancel_jobs(database, [2], user="alice")
        assert queue.delete_finished_jobs(database, [2]) == [2]
        (new,) = queue.submit_jobs(database, [JobSpec(kind=Kind.QUANTIZE, model="/models/m", params={"bits": 8})])
        assert new == 3
    finally:
        database.dispose()
    database = open_database(v4_database)  # version 5 now: no step runs again
    assert [j.id for j in queue.list_jobs(database)] == [1, 3]
    database.dispose()
