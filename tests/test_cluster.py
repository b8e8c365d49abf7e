"""Cluster mode on one box: a Ray head and a second node started with `ray start`, a Postgres job
table, `qrun run --ray-address`. Jobs spread over both nodes; killing the second node's raylet
mid-job loses no job; a node that comes back is used again; SQLite is refused on a cluster.

Each node is a real raylet with its own resources (one CPU each: one qrun worker per node). The
cluster uses Ray's token authentication, as Ray 2.60 turns it on: every node and client runs with
RAY_AUTH_MODE=token and this test session's own token in RAY_AUTH_TOKEN. (Not ~/.ray/auth_token: a
fresh machine has none until some local Ray makes one, and `ray start --head` refuses to start
without it.) A client without the cluster's token is refused in one line.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import BIN, QRUN, free_port, run_qrun, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}


class RayCluster:
    """`ray start --head` and `ray start --address` nodes, stopped by killing exactly their processes
    (`ray stop` would stop every Ray on the box, the test session's own too)."""

    def __init__(self, tmp: Path, *head_resources: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **RAY_ENV}
        self.log = tmp / "ray-start.log"
        self._ray("start", "--head", f"--port={self.port}", *(head_resources or ("--num-cpus=1",)),
                  "--include-dashboard=false")
        self.session = self._session_of_gcs_on(self.port)

    @staticmethod
    def _session_of_gcs_on(port: int) -> str:
        """This cluster's session name, from its GCS's own arguments (not /tmp/ray/session_latest,
        which another Ray starting at the same moment -- a `qrun run` -- may have taken)."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if f"--gcs_server_port={port}" in args:
                log_dir = next(a for a in args if a.startswith("--log_dir="))
                return Path(log_dir.split("=", 1)[1]).parent.name
        raise AssertionError(f"no GCS server on port {port}")

    def _ray(self, *args: str) -> None:
        with self.log.open("a") as log:
            subprocess.run([str(BIN / "ray"), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                           check=True, timeout=120)

    def add_node(self) -> None:
        self._ray("start", f"--address={self.address}", "--num-cpus=1")

    def nodes(self) -> list[dict]:
        """The live nodes as Ray lists them, asked from a fresh process (no Ray in the test's own)."""
        code = ("import json, ray; ray.init(address=%r, log_to_driver=False, logging_level='error'); "
                "print(json.dumps([n for n in ray.nodes() if n['Alive']]))" % self.address)
        result = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                                timeout=120, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    def raylet_pid(self, node: dict) -> int:
        """The raylet of one node: the process started with that node's raylet socket."""
        socket_arg = f"--raylet_socket_name={node['RayletSocketName']}"
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    args = (proc / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if args and args[0].endswith(b"raylet") and socket_arg.encode() in args:
                    return int(proc.name)
        raise AssertionError(f"no raylet with {socket_arg}")

    def stop(self) -> None:
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if self.session.encode() in (proc / "cmdline").read_bytes():
                        os.kill(int(proc.name), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass


@pytest.fixture
def cluster(tmp_path):
    ray_cluster = RayCluster(tmp_path)
    try:
        ray_cluster.add_node()
        yield ray_cluster
    finally:
        ray_cluster.stop()


def qrun_env(db_url: str, home: Path) -> dict:
    return {**RAY_ENV, "QRUN_DB": db_url, "QRUN_HOME": str(home)}


def submit(env: dict, *args: str) -> list[int]:
    return json.loads(run_qrun("submit", *args, "--json", env=env, check=True).stdout)


def jobs(env: dict) -> dict[int, dict]:
    return {j["id"]: j for j in json.loads(run_qrun("status", "--json", env=env, check=True).stdout)}


def node_of(job: dict) -> str:
    return job["worker"].split("@")[-1]  # host:pid:cpu0@<node id prefix>


def test_jobs_spread_over_the_nodes_of_a_cluster(cluster, postgres_url, tiny_qwen2, qrun_home, tmp_path):
    """--cpu-workers 2 on two nodes of one CPU each: one worker per node, said per node (Ray could
    never place a second one there, and the run would wait for it forever after the last job)."""
    env = qrun_env(postgres_url, qrun_home)
    ids = submit(env, "--model", str(tiny_qwen2), "--group-size", "32",
                 *[a for b in ("2", "3", "4", "8") for a in ("--bits", b)])
    result = run_qrun("run", "--until-empty", "--cpu-workers", "2", "--ray-address", cluster.address, env=env,
                      timeout=400)
    assert result.returncode == 0, result.stderr
    assert "2 worker(s)" in result.stderr  # one per node: each has one CPU
    host = socket.gethostname()  # both nodes' (one machine): messages add each node's id
    for node in cluster.nodes():
        assert (f"qrun: --cpu-workers 2: node {host} ({node['NodeID'][:6]}) has 1 CPU(s): 1 worker(s) there"
                in result.stderr), result.stderr
    done = jobs(env)
    assert {done[i]["status"] for i in ids} == {"succeeded"}
    assert len({node_of(done[i]) for i in ids}) == 2, [done[i]["worker"] for i in ids]
    workers = json.loads(run_qrun("workers", "--json", env=env, check=True).stdout)
    assert sorted(w["slot"].split("@")[1] for w in workers) == sorted(n["NodeID"][:6] for n in cluster.nodes())
    assert {w["state"] for w in workers} == {"stopped"}
    assert sum(w["jobs_done"] for w in workers) == 4


def test_losing_a_node_loses_no_job_and_a_node_that_comes_back_is_used(cluster, postgres_url, deep_qwen2,
                                                                        tiny_qwen2, qrun_home, tmp_path):
    env = qrun_env(postgres_url, qrun_home)
    deep = ("--model", str(deep_qwen2), "--group-size", "64", "--calib-samples", "16")
    ids = submit(env, *deep, "--bits", "4", "--bits", "8")
    log = tmp_path / "run.log"
    runner = subprocess.Popen([QRUN, "run", "--serve", "--ray-address", cluster.address],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **env},
                              start_new_session=True)
    try:
        nodes = cluster.nodes()  # Ray lists them in no set order: the head holds node:__internal_head__
        (head,) = [n for n in nodes if "node:__internal_head__" in n["Resources"]]
        (second,) = [n for n in nodes if n is not head]
        on_second = wait_for(lambda: next((j for j in jobs(env).values() if j["status"] == "running"
                                           and j["progress"]["done"] >= 2
                                           and node_of(j) == second["NodeID"][:6]), None),
                             240, "a job to quantize two layers on the second node")
        os.kill(cluster.raylet_pid(second), signal.SIGKILL)
        wait_for(lambda: {jobs(env)[i]["status"] for i in ids} == {"succeeded"}, 400, "both jobs to succeed")
        lost = jobs(env)[on_second["id"]]
        assert lost["attempts"] == 2
        assert node_of(lost) == head["NodeID"][:6]  # finished once, on the other node
        history = run_qrun("logs", str(on_second["id"]), env=env, check=True).stdout
        assert history.count("succeed:") == 1
        # The runner took the dead node's worker off at once: shown stopped (silence would say "lost" after 30 s).
        assert {w["slot"]: w["state"] for w in json.loads(run_qrun("workers", "--json", env=env).stdout)} \
            .get(on_second["worker"].split(":")[2]) == "stopped"
        assert runner.poll() is None, log.read_text()  # still serving

        cluster.add_node()  # the node comes back (a new raylet, a new node id)
        wait_for(lambda: "a node joined the cluster" in log.read_text(), 60, "the runner to see the new node")
        old_nodes = {head["NodeID"][:6], second["NodeID"][:6]}
        wait_for(lambda: any(w["slot"].split("@")[-1] not in old_nodes and w["state"] == "idle"
                             for w in json.loads(run_qrun("workers", "--json", env=env, check=True).stdout)),
                 120, "the new node's worker to be up and polling")
        more = submit(env, "--model", str(tiny_qwen2), "--group-size", "32",
                      *[a for b in ("2", "3", "4", "8") for a in ("--bits", b)])
        wait_for(lambda: {jobs(env)[i]["status"] for i in more} == {"succeeded"}, 300, "the new jobs")
        new_nodes = {node_of(jobs(env)[i]) for i in more} - {head["NodeID"][:6], second["NodeID"][:6]}
        assert new_nodes, [jobs(env)[i]["worker"] for i in more]  # the node that came back took jobs
    finally:
        if runner.poll() is None:
            os.kill(runner.pid, signal.SIGTERM)
            runner.wait(timeout=120)
    output = log.read_text()
    named = f"{socket.gethostname()} ({second['NodeID'][:6]})"  # the host name both nodes share, and the id
    assert f"its node {named} left the cluster" in output or f"(node {named}) died" in output, output


def test_sqlite_is_refused_on_a_cluster(cluster, qrun_home):
    result = run_qrun("run", "--ray-address", cluster.address, env=RAY_ENV)
    assert result.returncode == 2, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert "SQLite" in line and "cluster of 2 nodes" in line and "postgresql" in line


def test_a_client_without_the_clusters_token_is_refused_in_one_line(tmp_path, qrun_home):
    """No token on the client's machine, then another cluster's token: exit 2, at once, one line that
    says which, and none of the lines Ray's core prints (they go to the run's log)."""
    head = RayCluster(tmp_path)
    try:
        no_home = tmp_path / "home-without-a-token"
        no_home.mkdir()
        base = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        for token, says in ((None, "this machine has no Ray token"),
                            (secrets.token_hex(32), "the cluster refused this machine's Ray token")):
            env = {**base, "HOME": str(no_home), "RAY_AUTH_MODE": "token"}
            if token:
                env["RAY_AUTH_TOKEN"] = token
            started = time.monotonic()
            result = subprocess.run([QRUN, "run", "--until-empty", "--ray-address", head.address],
                                    capture_output=True, text=True, env=env, timeout=120)
            assert time.monotonic() - started < 15  # one GCS request, not ray.init's ~20 s of retries
            assert result.returncode == 2, result.stderr
            assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr  # one line
            assert result.stderr.startswith(f"Error: --ray-address {head.address}: ") and says in result.stderr
            assert "auth_token" in result.stderr, result.stderr  # where the token goes
        logs = "".join(p.read_text() for p in (qrun_home / "logs").glob("run-*.log"))
        assert "InvalidAuthToken" in logs  # what Ray's core said while it retried, kept
    finally:
        head.stop()


# ---------------------------------------------------------------- jobs that need several GPUs


@pytest.fixture
def two_gpu_node(tmp_path):
    """One node declaring two GPUs it does not have (Ray schedules them as real; QRUN_FAKE_GPUS
    makes qrun's workers run their jobs on the CPU): the bookkeeping of GPUs, tested without any."""
    ray_cluster = RayCluster(tmp_path, "--num-cpus=2", "--num-gpus=2")
    try:
        yield ray_cluster
    finally:
        ray_cluster.stop()


def test_a_job_that_needs_two_gpus_gets_both_and_is_not_starved(two_gpu_node, qrun_home, tiny_qwen2, tmp_path):
    """Four one-GPU jobs, then a two-GPU job, then four more one-GPU jobs, all of one priority: the
    two one-GPU workers finish what they hold and make way for one worker holding both GPUs, which
    runs the big job before any one-GPU job submitted after it; then the one-GPU workers come back."""
    from qrun.db import queue
    from qrun.db.queue import JobSpec
    from qrun.db.session import open_database
    from qrun.db.states import Kind

    env = {**RAY_ENV, "QRUN_HOME": str(qrun_home), "QRUN_FAKE_GPUS": "1"}
    spec = {"group_size": 32, "calib_samples": 8, "calib_max_len": 64}
    db = open_database()
    before = queue.submit_jobs(db, [JobSpec(Kind.QUANTIZE, str(tiny_qwen2), spec | {"bits": b}) for b in (2, 3, 4, 8)])
    (big,) = json.loads(run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--group-size", "32",
                                 "--calib-samples", "8", "--calib-max-len", "64", "--gpus-per-job", "2", "--json",
                                 env=env, check=True).stdout)
    after = queue.submit_jobs(db, [JobSpec(Kind.QUANTIZE, str(tiny_qwen2), spec | {"bits": b, "damp_percent": 0.02})
                                   for b in (2, 3, 4, 8)])
    result = run_qrun("run", "--until-empty", "--ray-address", two_gpu_node.address, env=env, timeout=400)
    assert result.returncode == 0, result.stderr
    rows = {j.id: j for j in queue.list_jobs(db)}
    assert {rows[i].status for i in rows} == {"succeeded"}, {i: rows[i].error for i in rows}
    assert rows[big].params["gpus"] == 2
    assert sorted(rows[big].gpu.split(",")) == ["0", "1"]  # one worker held both GPUs
    assert all(rows[i].gpu in ("0", "1") for i in before + after)  # the others one each
    assert rows[big].started_at <= min(rows[i].started_at for i in after), "a later one-GPU job overtook it"
    assert f"job {big} needs 2 GPUs: workers gpu0@" in result.stderr, result.stderr
    assert "make way for gpu0+gpu1@" in result.stderr
    db.dispose()


# ---------------------------------------------------------------- beside someone else's Ray


def test_qrun_run_starts_its_own_ray_beside_another_on_the_box(tmp_path, qrun_home, tiny_qwen2):
    """Another user's `ray start --head` on the machine: `qrun run` (no --ray-address) neither joins it
    nor fails ("num_cpus and num_gpus must not be provided"); it runs on a Ray of its own."""
    other = RayCluster(tmp_path)
    try:
        (job,) = json.loads(run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--group-size", "32",
                                     "--json", check=True).stdout)
        result = run_qrun("run", "--until-empty", env=RAY_ENV, timeout=300)
        assert result.returncode == 0, result.stderr
        assert jobs({"QRUN_HOME": str(qrun_home)})[job]["status"] == "succeeded"
        assert len(other.nodes()) == 1  # the other Ray is still there, untouched

        # That cluster's one CPU taken by someone else's actor: a worker Ray cannot place is said and left
        # out (not waited for forever), and with none left the run refuses in one line.
        hold_the_cpu(other)
        (queued,) = json.loads(run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "8", "--group-size", "32",
                                        "--json", check=True).stdout)
        refused = run_qrun("run", "--until-empty", "--ray-address", other.address, env=RAY_ENV, timeout=300)
        assert refused.returncode == 2, refused.stderr
        assert "left out: Ray cannot place it on node" in refused.stderr, refused.stderr
        assert "it needs 1 CPU, and 0 of its CPUs are free" in refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith("Error: no worker could start: worker cpu0@")
        assert jobs({"QRUN_HOME": str(qrun_home)})[queued]["status"] == "queued"
    finally:
        other.stop()


def hold_the_cpu(cluster: RayCluster) -> None:
    """A detached actor of another driver that reserves the cluster's one CPU (it outlives the driver)."""
    code = textwrap.dedent(f"""
        import ray
        ray.init(address={cluster.address!r}, log_to_driver=False, logging_level="error")

        @ray.remote(num_cpus=1)
        class Holder:
            def ready(self):
                return True

        ray.get(Holder.options(name="qrun-test-holder", lifetime="detached").remote().ready.remote())
    """)
    subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, timeout=120, check=True)
