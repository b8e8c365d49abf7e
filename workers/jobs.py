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
import socket
import sys
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from qrun.db import queue
from qrun.db.errors import BadInput, JobLost
from qrun.db.schema import Job
from qrun.db.session import Database, artifacts_root, is_transient_db_error, logs_root
from qrun.db.states import Kind, Status, progress_unit
from qrun.workers import artifacts
from qrun.workers.limits import MEMORY_CAP_ENV, job_memory_cap_mb, memory_cap

log = logging.getLogger("qrun.job")
# An attempt's outcome beside the job states: the job moved on without this worker (cancelled, or its
# lease expired and another worker took it), which recorded nothing.
LOST = "lost"


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
    notice: Callable[[str], None] = log.warning  # what the runner's output should show

    def progress(self, done: int, total: int, module: str | None) -> None:
        """Record progress; this is also where cancellation and shutdown reach a running job.

        Progress is advisory: while the database is out of reach the job goes on (the heartbeat keeps
        trying too). If its lease runs out meanwhile and another worker takes the job, this worker
        learns it when it records the outcome (JobLost) and throws its output away."""
        if self.should_stop():
            raise StopRequested(f"runner stopping at {progress_unit(self.job.kind)} {done}/{total}")
        try:
            queue.record_progress(self.db, self.job.id, self.worker, done, total, module, self.lease_s)
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            log.warning("job %s: progress %s/%s not recorded (%s); going on", self.job.id, done, total, exc)


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
    """Send this process's stdout and stderr (file descriptors too: C extensions, progress bars) to log_path.

    Leaving it never raises: on a full disk the last flush fails, and that must not hide the
    job's outcome (the log is the only thing lost)."""
    _flush_quietly(sys.stdout, sys.stderr)
    f = open(log_path, "a", buffering=1)
    saved = os.dup(1), os.dup(2)
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    handler = logging.StreamHandler(f)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield f
    finally:
        _flush_quietly(sys.stdout, sys.stderr, f)
        logging.getLogger().removeHandler(handler)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        try:
            f.close()
        except OSError:
            pass


def _flush_quietly(*streams) -> None:
    for stream in streams:
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def describe_failure(exc: BaseException, ctx: JobContext) -> tuple[str, bool]:
    """(one-line reason for `qrun status`, whether another attempt might succeed)."""
    job = _current_row(ctx)
    quantizing = job.kind == Kind.QUANTIZE.value
    where = f"at {progress_unit(job.kind)} {job.progress_done}/{job.progress_total}" + (
        f" ({job.progress_module})" if job.progress_module else "")
    capped = _memory_cap_of(ctx.device)
    if _is_out_of_memory(exc, capped):
        hint = ("use a smaller calibration batch (--batch-size, --calib-max-len, --calib-samples)" if quantizing
                else "use a smaller eval batch (--eval-batch-size, or qrun eval --batch-size)")
        if capped:
            return (f"out of memory {where} under the worker's cap {MEMORY_CAP_ENV}={capped}: {hint} or "
                    "raise the cap", True)
        return (f"out of memory {where}: {hint} or free the GPU", True)
    full = _no_space(exc)
    if full is not None:
        return (f"no space left on device: {full.filename or artifacts_root()}: free space or move QRUN_HOME",
                False)
    if isinstance(exc, BadInput):
        return (str(exc), False)
    return (describe_error(exc)[:500], False)


def _current_row(ctx: JobContext):
    """The job as the table has it now (its latest progress), or as claimed if the table is out of reach."""
    try:
        return queue.get_job(ctx.db, ctx.job.id)
    except Exception:  # noqa: BLE001 -- describing a failure must not fail
        return ctx.job


def _no_space(exc: BaseException) -> OSError | None:
    """The 'no space left on device' error behind exc, if that is what it is: libraries wrap it
    (safetensors says StorageFull, SQLite 'database or disk is full'); an OSError with the path wins."""
    found = None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        text = str(exc).lower()
        if found is None and any(s in text for s in ("no space left on device", "storagefull",
                                                      "database or disk is full")):
            found = OSError(errno.ENOSPC, "No space left on device")
        exc = exc.__cause__ or exc.__context__
    return found


def describe_error(exc: BaseException) -> str:
    """One line: the database's own words for a database error, else the exception's type and text."""
    if is_transient_db_error(exc):
        text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return "database unavailable: " + (text[0] if text else type(exc).__name__)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Backoff:
    """Waits between attempts after failures: 1 s, 2 s, 4 s ... at most 30 s; reset by a success."""

    def __init__(self, first_s: float = 1.0, most_s: float = 30.0):
        self.first_s, self.most_s = first_s, most_s
        self.failures = 0

    def next_wait(self) -> float:
        self.failures += 1
        return min(self.most_s, self.first_s * 2 ** (self.failures - 1))

    def reset(self) -> None:
        self.failures = 0


def _memory_cap_of(device: str) -> int | None:
    """QRUN_JOB_MEMORY_MB where it applied to this job (CPU workers only, see workers/limits.py)."""
    try:
        return None if device.startswith("cuda") else job_memory_cap_mb()
    except BadInput:
        return None


def _is_out_of_memory(exc: BaseException, capped: int | None = None) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc).lower()
    # torch's CPU allocator says "can't allocate memory ... Error code 12 (Cannot allocate memory)"; under
    # the address-space cap a new thread's stack is the allocation that fails first.
    return (name == "OutOfMemoryError" or any(s in text for s in ("out of memory", "allocate memory"))
            or (capped is not None and "can't start new thread" in text))


def run_quantize(ctx: JobContext) -> tuple[dict, list[queue.ArtifactRecord]]:
    from qrun.workers.inputs import inspect_model
    from qrun.workers.params import QuantizeParams
    from qrun.workers.quantize import quantize_model

    job = ctx.job
    params = QuantizeParams.from_dict(job.params)
    info = inspect_model(job.model, trust_remote_code=params.trust_remote_code, allow_pickle=params.allow_pickle)
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


def run_kind(ctx: JobContext) -> tuple[dict, list[queue.ArtifactRecord]]:
    if ctx.job.kind == Kind.QUANTIZE.value:
        return run_quantize(ctx)
    if ctx.job.kind == Kind.EVAL.value:
        from qrun.workers.evaluate import run_eval

        return run_eval(ctx)
    raise ValueError(f"job {ctx.job.id} has unknown kind {ctx.job.kind!r}")


def execute(ctx: JobContext) -> str:
    """Run a claimed job and record its outcome; returns the status it ended in.

    Whatever fails, in the job or around it (its log, its directory, the database), ends as the
    job's recorded outcome with the real cause; it raises only when even that cannot be written
    and the runner is stopping (the lease then gives the job back)."""
    try:
        return _run_and_record(ctx)
    finally:
        free_memory()


def free_memory() -> None:
    """Give back what the job left: a worker runs many jobs, and whatever still refers to a finished
    job's model (a reference cycle, a library's saved traceback, a library's idle thread) would
    count in (or crowd out) the next job's memory. tests/test_runner.py checks that none is left.
    Never raises: a surprise here is logged, and the worker goes on to its next job."""
    import gc

    try:
        drop_kept_tracebacks()
        stop_engine_threads()
        gc.collect()
        torch = sys.modules.get("torch")  # only where a job imported it
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # reaching into libraries: a surprise there must not take the worker down
        log.warning("could not release a library's references to the last job", exc_info=True)


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
    started = time.perf_counter()
    with ExitStack() as job_files:
        try:
            _open_job_files(ctx, job_files)
        except Exception as exc:  # a full disk, a log path that is a directory, ...
            return _record_failure(ctx, exc)
        _say(f"=== job {job.id} ({job.kind}) attempt {job.attempts}/{job.max_attempts} "
             f"on {ctx.worker}, device {ctx.device}")
        try:
            with memory_cap(ctx.device):  # QRUN_JOB_MEMORY_MB, CPU workers only
                metrics, records = run_kind(ctx)
        except JobLost as exc:
            _say(f"=== stopped: {exc}")
            return LOST
        except StopRequested as exc:
            _say(f"=== released: {exc}")
            return _record(ctx, lambda: queue.release_job(ctx.db, job.id, ctx.worker, str(exc))
                           or Status.QUEUED.value)
        except BaseException as exc:  # a job's failure must never take the worker down
            _say(traceback.format_exc())
            return _record_failure(ctx, exc)
        metrics["job_wall_s"] = time.perf_counter() - started
        outcome = _record_success(ctx, metrics, records)
        if outcome == Status.SUCCEEDED.value:
            _say(f"=== succeeded in {time.perf_counter() - started:.1f}s")
            if job.kind == Kind.EVAL.value:  # the evaluated model's card shows the result
                from qrun.workers.card import refresh_after_eval

                refresh_after_eval(ctx.db, job)
        return outcome


def _open_job_files(ctx: JobContext, stack: ExitStack) -> None:
    """Name the job's log in the table, enter its working directory, send output to its log."""
    log_path = logs_root() / f"job-{ctx.job.id}.log"
    _record(ctx, lambda: queue.set_log_path(ctx.db, ctx.job.id, str(log_path)))
    stack.enter_context(working_directory(logs_root() / f"job-{ctx.job.id}.d"))
    stack.enter_context(output_to(log_path))


def _say(text: str) -> None:
    """A line in the job's log. A log that cannot be written (a full disk) must not hide the
    outcome being recorded, so a failed write is dropped."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def _record(ctx: JobContext, write: Callable[[], str]) -> str:
    """Write to the table, waiting out a database that is out of reach (restarted, disk full): an
    outcome (an artifact, a reason) is worth the wait. Gives up only when the runner is stopping."""
    backoff = Backoff()
    while True:
        try:
            return write()
        except Exception as exc:
            if not is_transient_db_error(exc) or ctx.should_stop():
                raise
            wait_s = backoff.next_wait()
            ctx.notice(f"job {ctx.job.id}: {describe_error(exc)}; trying again in {wait_s:.0f} s")
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and not ctx.should_stop():
                time.sleep(0.2)


def _record_failure(ctx: JobContext, exc: BaseException) -> str:
    reason, retryable = describe_failure(exc, ctx)
    _say(f"=== failed: {reason}")
    try:
        return _record(ctx, lambda: queue.fail_job(ctx.db, ctx.job.id, ctx.worker, reason,
                                                   retryable=retryable).value)
    except JobLost:
        return LOST


def _record_success(ctx: JobContext, metrics: dict, records: list[queue.ArtifactRecord]) -> str:
    node = socket.gethostname()  # on a cluster: where the files were written
    records = [replace(r, node=r.node or node) for r in records]
    try:
        return _record(ctx, lambda: queue.finish_job(ctx.db, ctx.job.id, ctx.worker, metrics, records)
                       or Status.SUCCEEDED.value)
    except JobLost as exc:  # cancelled in the last instant: the artifact is not ours to keep
        _say(f"=== finished but {exc}: removing output")
        _remove_outputs(records)
        return LOST
    except Exception as exc:  # noqa: BLE001 -- the result could not be stored: fail the job, say why
        outcome = _record_failure(ctx, RuntimeError(f"recording the result failed: {describe_error(exc)}"))
        _remove_outputs(records)  # only once the failure is recorded: until then the output is the result
        return outcome


def _remove_outputs(records: list[queue.ArtifactRecord]) -> None:
    for r in records:
        shutil.rmtree(r.path, ignore_errors=True) if Path(r.path).is_dir() else Path(r.path).unlink(True)
