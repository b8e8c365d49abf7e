"""The queue worker: the Ray actor that takes jobs from the table and runs them on its one device.

Life of a worker (after python-rq): bootstrap (pin the device), then claim → execute → repeat,
a heartbeat thread extending the lease of the job in hand, until the queue is drained (burst)
or a stop is requested. With nothing to claim, it removes what dead workers left of finished jobs.
A stop lets the job in hand reach its next layer, then releases it.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

from qrun.db import queue
from qrun.db.errors import JobLost
from qrun.db.session import GROUP_UMASK, artifacts_root, open_database
from qrun.workers import artifacts

IDLE_POLL_S = 1.0


def describe_worker(slot: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{slot}"


class QueueWorker:
    """Plain class; `runner.run` wraps it with ray.remote so it can also be tested without Ray."""

    def __init__(self, db_url: str, slot: str, use_gpu: bool, lease_s: float = queue.DEFAULT_LEASE_S,
                 env: dict[str, str] | None = None):
        # Before anything imports torch: CUDA_DEVICE_ORDER and OMP_NUM_THREADS are read once, at load.
        os.environ.update(env or {})
        self.db_url = db_url
        self.slot = slot
        self.use_gpu = use_gpu
        self.lease_s = lease_s
        self._stop = threading.Event()
        self.device = self._bootstrap()
        # The physical GPU, as Ray pinned it: what `qrun status` shows in its GPU column.
        self.gpu = os.environ.get("CUDA_VISIBLE_DEVICES") if use_gpu else None
        self.name = describe_worker(slot)
        self.db = open_database(db_url)

    def _bootstrap(self) -> str:
        """Pin the device. Imports torch only now, after Ray set CUDA_VISIBLE_DEVICES for this process."""
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        os.umask(GROUP_UMASK)  # artifacts and logs are shared with the group, like the queue
        if not self.use_gpu:
            return "cpu"
        import torch

        # torch reads OMP_NUM_THREADS once, at import; this holds even if something imported it earlier.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        visible = torch.cuda.device_count()
        if visible != 1:
            # GPTQModel spreads one job over every GPU it sees; two workers would then share cards.
            raise RuntimeError(
                f"worker {self.slot} sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')}); it must see exactly one"
            )
        return "cuda:0"

    def identity(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "device": self.device,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def request_stop(self) -> None:
        self._stop.set()

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        while not done.wait(self.lease_s / 3):
            try:
                queue.heartbeat(self.db, job_id, self.name, self.lease_s)
            except JobLost:
                return  # the next progress call will find out and stop the job
            except Exception:  # a passing database error must not kill the worker
                continue

    def run_one(self, job) -> str:
        from qrun.workers.jobs import JobContext, execute

        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, done), daemon=True)
        beat.start()
        try:
            ctx = JobContext(db=self.db, job=job, worker=self.name, device=self.device,
                             lease_s=self.lease_s, should_stop=self._stop.is_set)
            return execute(ctx)
        finally:
            done.set()
            beat.join()

    def _remove_staging_of_finished_jobs(self) -> None:
        """A worker that died on a job's last attempt left the job's staging directory (a model's
        worth of disk), which only a next attempt would remove. The directories are listed before
        the table is asked, so one that an attempt starting meanwhile makes is never among them."""
        found = artifacts.staging_dirs_by_job(artifacts_root())
        if found:
            for job_id in queue.finished_among(self.db, found):
                for path in found[job_id]:
                    shutil.rmtree(path, ignore_errors=True)

    def drain(self, burst: bool = True) -> list[tuple[int, str]]:
        """Run jobs until none is left (burst) or a stop is requested; returns (job id, outcome) pairs."""
        ran = []
        while not self._stop.is_set():
            job = queue.claim_job(self.db, self.name, self.gpu, self.lease_s)
            if job is not None:
                ran.append((job.id, self.run_one(job)))
                continue
            self._remove_staging_of_finished_jobs()
            if burst and queue.pending_count(self.db) == 0:
                break
            # Jobs are waiting on upstream jobs or on a lost worker's lease: look again shortly.
            self._stop.wait(IDLE_POLL_S)
        return ran
