"""How `qrun run` shares a machine among its workers, and what a GPU worker insists on."""

import os

import pytest

from runner.run import gptqmodel_cpu_workers, worker_env
from runner.worker import QueueWorker


def test_gptqmodel_gets_its_default_of_the_workers_share_of_cores():
    # GPTQModel alone takes half the cores, at most 12; on a 2-core box it needs at least 2.
    assert [gptqmodel_cpu_workers(t) for t in (1, 2, 8, 16, 64)] == [2, 2, 4, 8, 12]


def test_worker_env_keeps_a_users_gptqmodel_setting(qrun_home, monkeypatch):
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "3")
    env = worker_env(threads=16)
    assert env["GPTQMODEL_CPU_WORKERS"] == "3"
    assert env["OMP_NUM_THREADS"] == "16" and env["QRUN_HOME"] == str(qrun_home)
    monkeypatch.delenv("GPTQMODEL_CPU_WORKERS")
    assert worker_env(threads=16)["GPTQMODEL_CPU_WORKERS"] == "8"


def test_worker_applies_its_environment_before_anything_else(db, monkeypatch):
    monkeypatch.delenv("QRUN_JOB_MEMORY_MB", raising=False)
    QueueWorker(db.url, "cpu0", use_gpu=False, env={"QRUN_JOB_MEMORY_MB": "1234"})
    assert os.environ.pop("QRUN_JOB_MEMORY_MB") == "1234"


def test_gpu_worker_refuses_to_start_without_exactly_one_gpu(db):
    """GPTQModel spreads a job over every GPU it sees, so a GPU worker that sees none (this CPU box)
    or several would share cards with its neighbours: it must not start."""
    import torch

    if torch.cuda.device_count() == 1:
        pytest.skip("this machine shows exactly one GPU")
    with pytest.raises(RuntimeError, match=r"sees \d+ GPUs .* it must see exactly one"):
        QueueWorker(db.url, "gpu0", use_gpu=True)
