"""Shared fixtures: a private QRUN_HOME and database per test, tiny models built once per session,
and one Ray instance for the whole session (ray.init costs seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "anti_fraud"


@pytest.fixture
def qrun_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "qrun-home"
    monkeypatch.setenv("QRUN_HOME", str(home))
    monkeypatch.delenv("QRUN_DB", raising=False)
    return home


@pytest.fixture
def db(qrun_home):
    from qrun.db.session import open_database

    database = open_database()
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    from qrun.workers.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2",
                            hidden=128, intermediate=256, layers=2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from qrun.workers.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama",
                            hidden=128, intermediate=256, layers=2)


@pytest.fixture(scope="session")
def deep_qwen2(tmp_path_factory) -> Path:
    """More layers, so a quantization runs long enough to be interrupted mid-way."""
    from qrun.workers.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "deep-qwen2", arch="qwen2",
                            hidden=256, intermediate=512, layers=24)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def run_qrun(*args: str, env: dict | None = None, timeout: float = 600, check: bool = False,
         **popen) -> subprocess.CompletedProcess:
    """Run the real `qrun` console script in a subprocess."""
    exe = Path(sys.executable).parent / "qrun"
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})}, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"qrun {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def wait_for(predicate, timeout: float, what: str):
    """Poll predicate until it returns something truthy; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def write_labeled(path: Path) -> Path:
    """Eight dialogs, the scam-like ones labeled fraud, with ids as the seed's data would have."""
    from qrun.workers.tiny import sample_texts

    lines = sample_texts()[:8]  # alternating: scam call, ordinary chat, ...
    with path.open("w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"id": f"d{i}", "input": line, "label": i % 2 == 0}, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------- Postgres for the database layer
#
# The db layer's tests run on SQLite and on a real PostgreSQL server: `any_db` is a fresh database
# of each kind (test ids [sqlite] and [postgres]). For Postgres, one throwaway cluster is started per
# test session (initdb into a temporary directory, a unix socket only, fsync off) and every test gets
# a database of its own. Other tests can ask for `postgres_url` (a fresh, empty database's URL, e.g.
# for `qrun --db URL ...`) or `postgres_server` (the session's server: `.fresh_url()`).
#
# Where no server can be had, the Postgres cases are skipped with a reason that says how to get one;
# with CI set (CI=true) they fail instead, so a CI run can never pass without them.
# QRUN_TEST_POSTGRES_URL=postgresql+psycopg://user:pw@host/db uses an existing server instead (the
# user must be allowed to CREATE DATABASE).

POSTGRES_HOW_TO = ("apt-get install postgresql (Debian/Ubuntu; .ci/run does it), "
                   "or set QRUN_TEST_POSTGRES_URL to a server where you may CREATE DATABASE")


def pytest_configure(config):
    config.addinivalue_line("markers", "postgres: runs against a real PostgreSQL server (the [postgres] cases)")


def _ci_requires_postgres() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _postgres_unavailable(reason: str):
    if _ci_requires_postgres():
        pytest.fail(f"PostgreSQL is required when CI is set, and {reason}: {POSTGRES_HOW_TO}", pytrace=False)
    pytest.skip(f"PostgreSQL cases skipped: {reason}. To run them: {POSTGRES_HOW_TO}")


def _postgres_bin_dir() -> Path | None:
    """Where initdb, pg_ctl and postgres live: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


class PostgresServer:
    """A PostgreSQL server the tests may create databases on."""

    def __init__(self, admin_url: str):
        from sqlalchemy import create_engine

        self.admin_url = admin_url
        self._admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=_null_pool())
        self._count = 0

    def fresh_url(self) -> str:
        """The URL of a new, empty database."""
        from sqlalchemy import make_url, text

        self._count += 1
        name = f"qrun_test_{os.getpid()}_{self._count}"
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        """Drop a database fresh_url made, whoever is still connected to it (PG 13+: WITH (FORCE))."""
        from sqlalchemy import make_url, text

        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))

    def close(self) -> None:
        self._admin.dispose()


def _null_pool():
    from sqlalchemy.pool import NullPool

    return NullPool


class _LocalCluster:
    """initdb + pg_ctl in a temporary directory. As root, the server runs as the `postgres` user
    (Debian's package makes it; else `nobody`): postgres refuses to run as root."""

    SETTINGS = ("-c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=200 -c shared_buffers=32MB")

    def __init__(self, bin_dir: Path):
        import pwd
        import tempfile

        self.bin_dir = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="qrun-pg-"))  # short: a socket path has ~100 bytes
        self.data, self.socket_dir, self.log = self.base / "data", self.base / "sock", self.base / "server.log"
        self.socket_dir.mkdir()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = "postgres"
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                user, entry = "nobody", pwd.getpwnam("nobody")
            for path in (self.base, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            self.as_user = ["runuser", "-u", user, "--"]

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout)

    def start(self) -> str:
        """Start the cluster; its admin URL. Raises RuntimeError with the tool's output on failure."""
        steps = [
            (str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
             "--no-sync", "-E", "UTF8", "--locale=C"),
            (str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
             "-o", f"-k {self.socket_dir} {self.SETTINGS}", "start"),
        ]
        for step in steps:
            result = self._run(*step)
            if result.returncode != 0:
                log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                raise RuntimeError(f"{Path(step[0]).name} failed: {result.stdout}{result.stderr}{log}".strip())
        return f"postgresql+psycopg://postgres@/postgres?host={self.socket_dir}"

    def pause(self) -> None:
        """Stop the server (fast: connections are cut), keeping its data: a database outage."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)

    def resume(self) -> None:
        result = self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                           "-t", "60", "-o", f"-k {self.socket_dir} {self.SETTINGS}", "start")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stdout}{result.stderr}")

    def stop(self) -> None:
        import shutil

        if self.data.exists():
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop",
                      timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server (started on first use), or a loud skip (a failure with CI set)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _postgres_unavailable("the driver psycopg is not installed (pip install 'qrun-quant[postgres]')")
    existing = os.environ.get("QRUN_TEST_POSTGRES_URL")
    cluster = None
    if existing:
        admin_url = existing
    else:
        bin_dir = _postgres_bin_dir()
        if bin_dir is None:
            _postgres_unavailable("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
        cluster = _LocalCluster(bin_dir)
        try:
            admin_url = cluster.start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            cluster.stop()
            _postgres_unavailable(f"a throwaway PostgreSQL cluster did not start ({exc})")
    server = PostgresServer(admin_url)
    server.cluster = cluster  # None for QRUN_TEST_POSTGRES_URL: tests that restart the server skip there
    yield server
    server.close()
    if cluster is not None:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty Postgres database for this test (dropped after it); its SQLAlchemy URL."""
    url = postgres_server.fresh_url()
    yield url
    postgres_server.drop(url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db(request, qrun_home, monkeypatch):
    """A fresh, opened job table on SQLite ($QRUN_HOME/qrun.db) and on Postgres (QRUN_DB set to it)."""
    from qrun.db.session import open_database

    url = None
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("QRUN_DB", url)
    database = open_database(url)
    yield database
    database.dispose()


@pytest.fixture
def restore_umask():
    """The in-process worker sets the group umask (002), as it does in its own process."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)
