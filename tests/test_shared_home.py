"""Cluster mode's shared QRUN_HOME: a worker proves it sees the runner's QRUN_HOME or refuses to start;
artifacts record the node that wrote them; a reader on another node is told where the file was made."""

from __future__ import annotations

import socket

import pytest

from helpers import finish_job, run_qrun
from qrun.db import queue
from qrun.db.errors import BadInput
from qrun.db.queue import ArtifactRecord, JobSpec
from qrun.db.states import Kind
from qrun.runner.worker import QueueWorker
from qrun.workers.artifacts import runner_marked

pytestmark = pytest.mark.reliability


def test_a_worker_that_does_not_see_the_runners_home_refuses_to_start(db, qrun_home):
    with runner_marked(qrun_home) as token:
        QueueWorker(db.url, "cpu0", use_gpu=False, home_token=token)  # sees it: starts
        assert (qrun_home / ".runs" / token).is_file()
    # The runner's mark is not there (another machine's QRUN_HOME, or a stale token).
    with pytest.raises(RuntimeError, match=rf"^node {socket.gethostname()} does not see the runner's QRUN_HOME "
                                           rf"{qrun_home} \(no {token} there\): mount the shared QRUN_HOME"):
        QueueWorker(db.url, "cpu0", use_gpu=False, home_token=token)
    assert not (qrun_home / ".runs" / token).exists()  # the runner took its mark away when it ended


def _claimed_eval_of_an_artifact_written_elsewhere(db, path: str, node: str):
    quantize = finish_job(db, JobSpec(kind=Kind.QUANTIZE, model="/models/m", params={"bits": 4}), {},
                          [ArtifactRecord(kind="model", path=path, bytes=1, sha256="0" * 64, node=node)],
                          worker="elsewhere:1:cpu0")
    (evaluate,) = queue.submit_jobs(db, [JobSpec(kind=Kind.EVAL, model="/models/m", depends_on=quantize,
                                                 params={"from_upstream": True, "variant": "w4g128"})])
    return queue.get_job(db, evaluate)


def test_an_eval_on_a_node_that_cannot_read_the_artifact_names_both_nodes(db, tmp_path):
    from qrun.workers.evaluate import resolve_model_dir

    job = _claimed_eval_of_an_artifact_written_elsewhere(db, str(tmp_path / "not-here"), "node-a")
    with pytest.raises(BadInput, match=rf"was written on node node-a and cannot be read on node "
                                       rf"{socket.gethostname()}: mount the shared QRUN_HOME"):
        resolve_model_dir(db, job)
    (stored,) = queue.artifacts_of(db, [job.depends_on])[job.depends_on]
    assert stored.node == "node-a"


def test_compare_names_the_node_of_predictions_it_cannot_read(db, tmp_path):
    finish_job(db, JobSpec(kind=Kind.EVAL, model="/models/m",
                           params={"variant": "baseline", "data": "/d.jsonl", "mode": "score"}), {"f1": 0.9},
               [ArtifactRecord(kind="predictions", path=str(tmp_path / "gone.jsonl"), bytes=1, sha256="0" * 64,
                               node="node-a")], worker="elsewhere:1:cpu0")
    result = run_qrun("--db", db.url, "compare", "--format", "csv", check=True)
    assert (f"cannot read predictions {tmp_path / 'gone.jsonl'}: No such file or directory (written on node "
            f"node-a, read on {socket.gethostname()})") in result.stderr
