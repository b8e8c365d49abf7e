"""A model directory that only some nodes can read (a disk of one node, a mount missing on another).

Node B is a real worker process in mount and host-name namespaces of its own (`unshare -mu`): its host
is named qrun-test-node-b and a tmpfs hides the directory that holds the model, as a node without
that disk sees it. Node A is a worker in the test's own process, on this machine's host name. Both
work one SQLite job table (a single machine's file system underneath)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from helpers import finish_job, write_labeled
from qrun.db import queue
from qrun.db.queue import ArtifactRecord, JobSpec
from qrun.db.states import Kind
from qrun.runner.worker import QueueWorker
from qrun.workers.params import EvalParams

pytestmark = [pytest.mark.reliability]

NODE_B = "qrun-test-node-b"


def on_node_b(db_url: str, hidden: os.PathLike) -> tuple[list, list[str]]:
    """Drain the queue (burst) with a CPU worker on node B, which cannot see `hidden`: (its outcomes,
    its notices)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1): a mount and host name of the worker's own")
    code = textwrap.dedent(f"""
        import json
        from qrun.runner.worker import QueueWorker

        worker = QueueWorker({db_url!r}, "cpu0", use_gpu=False, lease_s=30)
        print(json.dumps([worker.drain(burst=True), worker.take_notices()]))
    """)
    script = (f"hostname {NODE_B} && mount -t tmpfs -o size=1m tmpfs {hidden} && "
              f"exec {sys.executable} -c \"$QRUN_NODE_B\"")
    result = subprocess.run(["unshare", "--mount", "--uts", "sh", "-c", script], capture_output=True, text=True,
                            env={**os.environ, "QRUN_NODE_B": code}, timeout=300)
    assert result.returncode == 0, result.stderr
    outcomes, notices = json.loads(result.stdout.strip().splitlines()[-1])
    return outcomes, notices


@pytest.fixture
def node_a_disk(tmp_path, tiny_qwen2):
    """A model on a disk that only node A (this process) sees."""
    disk = tmp_path / "node-a-disk"
    shutil.copytree(tiny_qwen2, disk / "model")
    return disk


def test_a_model_one_node_cannot_read_goes_to_another_or_fails_once_naming_where_it_is(db, qrun_home, node_a_disk,
                                                                                      tmp_path, restore_umask):
    import qrun

    model = node_a_disk / "model"
    data = write_labeled(tmp_path / "dialogs.jsonl")
    baseline = qrun.evaluate(str(model), data=str(data), db=db)  # `qrun eval --model DIR`
    node_a = QueueWorker(db.url, "cpu0", use_gpu=False, lease_s=30)  # up: its row says so

    # Node B claims the eval first: it cannot read the model, and node A is up: the job goes back to the
    # queue for node A, its attempt not counted, and B leaves it alone (its burst ends).
    outcomes, notices = on_node_b(db.url, node_a_disk)
    assert outcomes == [[baseline, "queued"]]
    assert notices == [f"cpu0: job {baseline}: this node ({NODE_B}) cannot read {model}: left for a worker on "
                       "another node"]
    assert node_a.drain(burst=True) == [(baseline, "succeeded")]
    job = queue.get_job(db, baseline)
    assert job.attempts == 1 and job.worker.startswith(f"{socket.gethostname()}:")
    events = [(e.transition, e.detail) for e in queue.events_of(db, baseline)]
    assert [t for t, _ in events] == ["submit", "claim", "release", "claim", "succeed"]
    assert events[1][1].startswith(f"{NODE_B}:") and events[3][1].startswith(f"{socket.gethostname()}:")
    assert events[2][1] == f"node {NODE_B} cannot read {model}: left for a worker on another node"

    # An artifact written on node A, whose eval only node B is up to take: failed once, naming the node
    # that wrote it, the nodes tried and the fix; not "retry job N" (that job succeeded), nor a loader's error.
    quantized = finish_job(db, JobSpec(Kind.QUANTIZE, str(model), {"bits": 8, "group_size": 32}),
                           artifacts=[ArtifactRecord("model", str(model), 1, "0" * 64, node="qrun-test-node-a")])
    params = EvalParams(data=str(data), variant="w8g32", from_upstream=True).to_dict()
    (evaluation,) = queue.submit_jobs(db, [JobSpec(Kind.EVAL, str(model), params, depends_on=quantized)])
    assert on_node_b(db.url, node_a_disk)[0] == [[evaluation, "failed"]]
    failed = queue.get_job(db, evaluation)
    assert (failed.status, failed.attempts) == ("failed", 1)
    assert failed.error == (f"{model} (the model of job {quantized}, written on node qrun-test-node-a) cannot be "
                            f"read on node {NODE_B}, and no other node has a live worker: put QRUN_HOME on storage "
                            "that every node mounts at the same path, or run qrun on node qrun-test-node-a")
