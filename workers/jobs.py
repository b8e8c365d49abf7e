"""Running one claimed job from start to recorded outcome.

`execute` is what a worker does with a job it holds: it captures library output in the job's
log, runs the job's kind, publishes the output atomically and records success or failure.
Whatever happens, no half-written artifact is ever recorded or left under its final name.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qrun.db import queue
from qrun.db.errors import BadInput, JobLost
from qrun.db.schema import Job
from qrun.db.session import Database, artifacts_root, logs_root
from qrun.db.states import Kind, progress_unit
from qrun.workers import artifacts
from qrun.workers.limits import memory_cap

log = logging.getLogger("qrun.worker")


class StopRequested(Exception):
    """The runner is shutting down: give the job back to the queue."""


@dataclass
class JobContext:
    db: Database
    job: Job
    worker: str
    device: str
    lease_s: float
    should_stop: Callable[[], bool] = lambda: False

    def progress(self, done: int, total: int, module: str | None) -> None:
        """Record progress; this is also where cancellation and shutdown reach a running job."""
        if self.should_stop():
            raise StopRequested(f"runner stopping at {progress_unit(self.job.kind)} {done}/{total}")
        queue.record_progress(self.db, self.job.id, self.worker, done, total, module, self.lease_s)


@contextmanager
def working_directory(path: Path):
    """Run inside `path`: GPTQModel writes its own per-module logs under ./logs of the current directory."""
    path.mkdir(parents=True, exist_ok=True)
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(previous)


@contextmanager
def output_to(log_path: Path):
    """Send this process's stdout and stderr (file descriptors too: C extensions, progress bars) to log_path."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a", buffering=1) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            yield f
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.getLogger().removeHandler(handler)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def describe_failure(exc: BaseException, ctx: JobContext) -> tuple[str, bool]:
    """(one-line reason for `qrun status`, whether another attempt might succeed)."""
    job = queue.get_job(ctx.db, ctx.job.id)
    quantizing = job.kind == Kind.QUANTIZE.value
    where = f"at {progress_unit(job.kind)} {job.progress_done}/{job.progress_total}" + (
        f" ({job.progress_module})" if job.progress_module else "")
    if _is_out_of_memory(exc):
        hint = ("use a smaller calibration batch (--batch-size, --calib-max-len, --calib-samples)" if quantizing
                else "use a smaller eval batch (--eval-batch-size, or qrun eval --batch-size)")
        return (f"out of memory {where}: {hint} or free the GPU", True)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (f"no space left on {exc.filename or artifacts_root()}: free space or move QRUN_HOME", False)
    if isinstance(exc, BadInput):
        return (str(exc), False)
    return (f"{type(exc).__name__}: {exc}".splitlines()[0][:500], False)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc).lower()
    # torch's CPU allocator says "can't allocate memory ... Error code 12 (Cannot allocate memory)"
    return name == "OutOfMemoryError" or any(s in text for s in ("out of memory", "allocate memory"))


def run_quantize(ctx: JobContext, log_file) -> tuple[dict, list[queue.ArtifactRecord]]:
    from qrun.workers.inputs import inspect_model
    from qrun.workers.quantize import QuantizeParams, quantize_model

    job = ctx.job
    params = QuantizeParams.from_dict(job.params)
    info = inspect_model(job.model, trust_remote_code=params.trust_remote_code,
                         allow_pickle=job.params.get("allow_pickle", False))
    root = artifacts_root()
    final = artifacts.inside(root, f"{artifacts.safe_name(Path(job.model).name)}-{params.label()}-job{job.id}")
    artifacts.clear_stale_staging(root, job.id)
    staging = artifacts.new_staging_dir(root, job.id, job.attempts)
    # GPTQModel offloads finished modules to disk; left to itself it uses /tmp/gptqmodel_*, which a
    # killed worker leaves behind. Here it lies beside the staging directory and goes with it.
    offload = artifacts.new_staging_dir(root, job.id, f"{job.attempts}-offload")
    try:
        metrics = quantize_model(params, job.model, staging, ctx.device, info.num_layers, ctx.progress,
                                 offload_dir=offload)
        ctx.progress(info.num_layers, info.num_layers, "publishing")
        artifacts.publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    size = artifacts.directory_bytes(final)
    metrics["size_bytes"] = size
    record = queue.ArtifactRecord(kind="model", path=str(final), bytes=size, sha256=artifacts.weights_sha256(final))
    return metrics, [record]


def run_kind(ctx: JobContext, log_file) -> tuple[dict, list[queue.ArtifactRecord]]:
    if ctx.job.kind == Kind.QUANTIZE.value:
        return run_quantize(ctx, log_file)
    if ctx.job.kind == Kind.EVAL.value:
        from qrun.workers.evaluate import run_eval

        return run_eval(ctx, log_file)
    raise ValueError(f"job {ctx.job.id} has unknown kind {ctx.job.kind!r}")


def execute(ctx: JobContext) -> str:
    """Run a claimed job and record its outcome; returns the status it ended in."""
    try:
        return _run_and_record(ctx)
    finally:
        free_memory()


def free_memory() -> None:
    """Give back what the job left: a worker runs many jobs, and whatever still refers to a finished
    job's model (a reference cycle, a library's saved traceback, a library's idle thread) would
    count in (or crowd out) the next job's memory. tests/test_runner.py checks that none is left."""
    import gc

    try:
        drop_kept_tracebacks()
        stop_engine_threads()
    except Exception:  # reaching into libraries: a surprise there must not take the worker down
        log.warning("could not release a library's references to the last job", exc_info=True)
    gc.collect()
    torch = sys.modules.get("torch")  # only where a job imported it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def drop_kept_tracebacks() -> None:
    """Drop the tracebacks of exceptions that libraries keep in module globals.

    GPTQModel keeps the ImportErrors of its optional kernels (llama_cpp, ...) and raises one
    StopForward instance to end each calibration pass. A traceback holds every frame of the stack
    it was raised through, and a finished frame keeps its locals: after a job, those were the job's
    model. On an H100 an 8-bit model's 1.8 GB stayed through the worker's next jobs. The exceptions
    keep their type and message."""
    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            while isinstance(value, BaseException) and value.__traceback__ is not None:
                value.__traceback__ = None
                value = value.__context__


def stop_engine_threads() -> None:
    """Stop GPTQModel's device thread pool; the next job that needs one builds a new one.

    The pool's idle threads keep the last task they ran, its arguments and its result, in their
    loop's locals until they get another: after a quantize job, closures over the job's model."""
    gptqmodel = sys.modules.get("gptqmodel")  # only where a job imported it
    pool = getattr(gptqmodel, "_DEVICE_THREAD_POOL", None)
    if pool is not None:
        pool.shutdown(wait=True)
        gptqmodel._DEVICE_THREAD_POOL = None


def _run_and_record(ctx: JobContext) -> str:
    job = ctx.job
    log_path = logs_root() / f"job-{job.id}.log"
    queue.set_log_path(ctx.db, job.id, str(log_path))
    started = time.perf_counter()
    with working_directory(logs_root() / f"job-{job.id}.d"), output_to(log_path) as log_file:
        print(f"=== job {job.id} ({job.kind}) attempt {job.attempts}/{job.max_attempts} "
              f"on {ctx.worker}, device {ctx.device}", flush=True)
        try:
            with memory_cap(ctx.device):  # QRUN_JOB_MEMORY_MB, CPU workers only
                metrics, records = run_kind(ctx, log_file)
        except JobLost as exc:
            print(f"=== stopped: {exc}", flush=True)
            return "lost"
        except StopRequested as exc:
            print(f"=== released: {exc}", flush=True)
            queue.release_job(ctx.db, job.id, ctx.worker, str(exc))
            return "queued"
        except BaseException as exc:  # a job's failure must never take the worker down
            traceback.print_exc()
            reason, retryable = describe_failure(exc, ctx)
            print(f"=== failed: {reason}", flush=True)
            try:
                return queue.fail_job(ctx.db, job.id, ctx.worker, reason, retryable=retryable).value
            except JobLost:
                return "lost"
        metrics["job_wall_s"] = time.perf_counter() - started
        try:
            queue.finish_job(ctx.db, job.id, ctx.worker, metrics, records)
        except JobLost as exc:  # cancelled in the last instant: the artifact is not ours to keep
            print(f"=== finished but {exc}: removing output", flush=True)
            for r in records:
                shutil.rmtree(r.path, ignore_errors=True) if Path(r.path).is_dir() else Path(r.path).unlink(True)
            return "lost"
        print(f"=== succeeded in {time.perf_counter() - started:.1f}s", flush=True)
        return "succeeded"
