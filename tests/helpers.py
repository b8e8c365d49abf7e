"""What many test modules do alike: run the real console script, poll for a state, write labeled
dialogs, finish a job by hand, drain the queue with an in-process worker, and start the throwaway
PostgreSQL server that conftest's fixtures hand out. Imported as `from helpers import ...` (pytest
puts tests/ on sys.path for its rootdir conftest)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "anti_fraud"
BIN = Path(sys.executable).parent
QRUN = str(BIN / "qrun")  # the installed console script, as a user runs it

# Drops the capabilities that let root read and write anything: file modes then apply as to any user.
DROP_DAC = ("setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--")


# ---------------------------------------------------------------- the command line


def run_qrun(*args: str, env: dict | None = None, timeout: float = 600, check: bool = False,
             **popen) -> subprocess.CompletedProcess:
    """Run the real `qrun` console script in a subprocess."""
    result = subprocess.run([QRUN, *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})}, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"qrun {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


class _ConsoleScript:
    """`qrun` as the console script runs it (cli.main.main, error handling included), in the shape
    CliRunner.invoke expects of a command."""

    name = "qrun"

    def main(self, args, prog_name=None, **_):
        from qrun.cli.main import main

        main(list(args))


def invoke_main(*args: str):
    """cli.main.main in this process through click's CliRunner: the console script without a new
    interpreter (a second or more saved per call). Returns CliRunner's Result."""
    from click.testing import CliRunner

    return CliRunner().invoke(_ConsoleScript(), list(args))


def without_dac() -> list[str]:
    """A command prefix under which root meets file modes as any user does (none is needed for an
    ordinary user); skips the test where setpriv (util-linux) is missing."""
    import pytest

    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop root's power over file modes")
    return list(DROP_DAC)


# ---------------------------------------------------------------- waiting


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll predicate until it returns something truthy; fail naming what was awaited. Between polls
    it sleeps `interval` (short: most predicates read a file or a table row), or as long as the last
    poll took where that is longer: a predicate that runs `qrun status` (a second of CPU) then takes
    at most half a core from the jobs it waits for, on a box of two."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = time.monotonic()
        value = predicate()
        if value:
            return value
        time.sleep(max(interval, time.monotonic() - started))
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- data and jobs


def write_labeled(path: Path) -> Path:
    """Eight dialogs, the scam-like ones labeled fraud, with ids as the seed's data would have."""
    from qrun.workers.tiny import sample_texts

    lines = sample_texts()[:8]  # alternating: scam call, ordinary chat, ...
    with path.open("w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"id": f"d{i}", "input": line, "label": i % 2 == 0}, ensure_ascii=False) + "\n")
    return path


def write_predictions(path: Path, predictions: dict):
    """A predictions file as an eval job writes it (one JSON line per dialog id), and its artifact record."""
    from qrun.db.queue import ArtifactRecord

    path.write_text("".join(json.dumps({"id": k, "label": None, "prediction": v, "score": None}) + "\n"
                            for k, v in predictions.items()))
    return ArtifactRecord("predictions", str(path), path.stat().st_size, "0" * 64)


def submit_and_claim(db, spec, *, worker: str = "w", gpu: str | None = None, user: str | None = None,
                     sweep: str | None = None) -> int:
    """Submit one job and claim it as `worker` (it must be the job claimed); its id."""
    from qrun.db import queue

    submitted = {k: v for k, v in (("user", user), ("sweep", sweep)) if v is not None}
    (job_id,) = queue.submit_jobs(db, [spec], **submitted)
    claimed = queue.claim_job(db, worker, gpu)
    assert claimed is not None and claimed.id == job_id, f"claimed {claimed and claimed.id}, not job {job_id}"
    return job_id


def finish_job(db, spec, metrics: dict | None = None, artifacts=(), *, worker: str = "w", **claim) -> int:
    """Submit one job, claim it and succeed it with these metrics and artifact records, as a worker
    would; its id. `claim`: submit_and_claim's gpu, user and sweep."""
    from qrun.db import queue

    job_id = submit_and_claim(db, spec, worker=worker, **claim)
    queue.finish_job(db, job_id, worker, metrics or {}, list(artifacts))
    return job_id


def drain_here(db, worker=None) -> dict[int, str]:
    """Drain the queue with the real worker class in this process, without Ray (a CPU worker `cpu0`
    unless one is given); {job id: final status}. A job reported twice fails the test."""
    from qrun.runner.worker import QueueWorker

    worker = worker or QueueWorker(db.url, "cpu0", use_gpu=False, lease_s=30)
    outcomes = worker.drain(burst=True)
    ran = [job_id for job_id, _ in outcomes]
    assert len(ran) == len(set(ran)), f"a job ran twice: {outcomes}"
    return dict(outcomes)


# ---------------------------------------------------------------- PostgreSQL for the database layer
#
# conftest's `postgres_server` starts one throwaway cluster per test session (per xdist worker): initdb
# into a temporary directory, a unix socket only, fsync off; every test gets a database of its own.

POSTGRES_HOW_TO = ("apt-get install postgresql (Debian/Ubuntu; .ci/run does it), "
                   "or set QRUN_TEST_POSTGRES_URL to a server where you may CREATE DATABASE")


def ci_requires_postgres() -> bool:
    """CI=true (or any value but 0/false/no): Postgres cases must run, never skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def postgres_bin_dir() -> Path | None:
    """Where initdb, pg_ctl and postgres live: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


class PostgresServer:
    """A PostgreSQL server the tests may create databases on."""

    def __init__(self, admin_url: str, cluster: LocalCluster | None = None):
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.admin_url = admin_url
        self.cluster = cluster  # None for QRUN_TEST_POSTGRES_URL: tests that restart the server skip there
        self._admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self._count = 0

    def fresh_url(self) -> str:
        """The URL of a new, empty database (named by pid: xdist workers may share one server)."""
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
        """Let go of the admin connection pool."""
        self._admin.dispose()


class LocalCluster:
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

    def _pg_ctl_start(self) -> tuple[str, ...]:
        return (str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                "-o", f"-k {self.socket_dir} {self.SETTINGS}", "start")

    def start(self) -> str:
        """Start the cluster; its admin URL. Raises RuntimeError with the tool's output on failure."""
        steps = [
            (str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
             "--no-sync", "-E", "UTF8", "--locale=C"),
            self._pg_ctl_start(),
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
        """Start the paused server again on the same data and socket."""
        result = self._run(*self._pg_ctl_start())
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stdout}{result.stderr}")

    def stop(self) -> None:
        """Stop the server at once and remove its directory."""
        if self.data.exists():
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop",
                      timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------- processes that race on one table


def racing_processes():
    """A multiprocessing context for tests that race processes on one job table: forkserver. Its
    children fork from one clean server process that has imported pytest and the db layer once (spawn
    imports them again in every child, most of a second of CPU each), and they share none of this
    process's threads or open connections (as fork's would)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pytest", "qrun.db.queue", "qrun.db.session"])
    return ctx
