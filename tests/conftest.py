"""Fixtures and hooks: a private QRUN_HOME and job table per test, tiny models built once per session,
and PostgreSQL databases for the db layer's [postgres] cases. Shared helper functions live in
helpers.py (`from helpers import ...`); pytest advises against importing conftest."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import helpers

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
# Four test files run at once on two cores: torch's threads in each would spin against each other's.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# pytest-xdist's workers get COLUMNS=80 and LINES=24: qrun's tables would take them for a terminal's.
# A test that wants a width sets COLUMNS itself.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One kernel cache for the whole session (qrun's default is one per QRUN_HOME, which is one per test here):
# GPTQModel's CPU kernels are built once, not in every test that runs a job.
os.environ.setdefault("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gptqmodel" / "torch_extensions"))


# `make test` runs the files in parallel (pytest-xdist, one file per process at a time): the slowest
# start first so that none of them is left running alone at the end. Seconds each, serial, 2 cores.
SLOWEST_FIRST = ("test_cluster.py", "test_reliability_faults.py", "test_reliability_load.py",
                 "test_end_to_end.py", "test_demo.py", "test_runner.py", "test_quantize_corners.py",
                 "test_compare.py", "test_method_sweeps.py", "test_methods.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "postgres: runs against a real PostgreSQL server (the [postgres] cases)")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


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


@pytest.fixture
def restore_umask():
    """The in-process worker sets the group umask (002), as it does in its own process."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


# ---------------------------------------------------------------- tiny models, built once per session


def _tiny_model(tmp_path_factory, name: str, **config) -> Path:
    from qrun.workers.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / name, **config)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory, "tiny-qwen2", arch="qwen2", hidden=128, intermediate=256, layers=2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory, "tiny-llama", arch="llama", hidden=128, intermediate=256, layers=2)


@pytest.fixture(scope="session")
def deep_qwen2(tmp_path_factory) -> Path:
    """More layers, so a quantization runs long enough to be interrupted mid-way."""
    return _tiny_model(tmp_path_factory, "deep-qwen2", arch="qwen2", hidden=256, intermediate=512, layers=24)


@pytest.fixture(scope="session")
def wide_qwen2(tmp_path_factory) -> Path:
    """Width 256: GGUF's K-quants pack rows in blocks of 256."""
    return _tiny_model(tmp_path_factory, "wide-qwen2", arch="qwen2", hidden=256, intermediate=512, layers=2)


@pytest.fixture(scope="session")
def wide_mlp_qwen2(tmp_path_factory) -> Path:
    """A 4096-wide MLP: its activations grow with the calibration batch, as a real model's do."""
    return _tiny_model(tmp_path_factory, "wide-mlp-qwen2", arch="qwen2", hidden=128, intermediate=4096, layers=2)


# ---------------------------------------------------------------- Postgres for the database layer
#
# The db layer's tests run on SQLite and on a real PostgreSQL server: `any_db` is a fresh database
# of each kind (test ids [sqlite] and [postgres]). For Postgres, one throwaway cluster is started per
# test session (per xdist worker) and every test gets a database of its own. Other tests can ask for
# `postgres_url` (a fresh, empty database's URL, e.g. for `qrun --db URL ...`) or `postgres_server`
# (the session's server: `.fresh_url()`).
#
# Where no server can be had, the Postgres cases are skipped with a reason that says how to get one;
# with CI set (CI=true) they fail instead, so a CI run can never pass without them.
# QRUN_TEST_POSTGRES_URL=postgresql+psycopg://user:pw@host/db uses an existing server instead (the
# user must be allowed to CREATE DATABASE).


def _postgres_unavailable(reason: str):
    if helpers.ci_requires_postgres():
        pytest.fail(f"PostgreSQL is required when CI is set, and {reason}: {helpers.POSTGRES_HOW_TO}", pytrace=False)
    pytest.skip(f"PostgreSQL cases skipped: {reason}. To run them: {helpers.POSTGRES_HOW_TO}")


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
        bin_dir = helpers.postgres_bin_dir()
        if bin_dir is None:
            _postgres_unavailable("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
        cluster = helpers.LocalCluster(bin_dir)
        try:
            admin_url = cluster.start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            cluster.stop()
            _postgres_unavailable(f"a throwaway PostgreSQL cluster did not start ({exc})")
    server = helpers.PostgresServer(admin_url, cluster)
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
