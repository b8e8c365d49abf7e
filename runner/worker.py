"""The queue worker: the Ray actor that takes jobs from the table and runs them on its one device.

Life of a worker (after python-rq): bootstrap (pin the device), then claim → execute → repeat,
a heartbeat thread extending the lease of the job in hand, until the queue is drained (burst)
or a stop is requested. With nothing to claim, it removes what dead workers left of finished jobs.
A stop lets the job in hand reach its next layer, then releases it.

A worker never stops because of an error outside a job's own code: a job's failure is recorded
by `workers.jobs.execute`, and anything else that goes wrong in one round of the loop (the
database out of reach, its disk full, a bug) makes the worker say so, wait (1 s, doubling up to
30 s) and try again. What it says reaches the runner's output through `take_notices`. The one
exception is a job table that is no longer the one it opened (deleted, replaced, corrupt:
`TableWatch`): what it would record there would be in no table anyone reads, so it stops.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

from qrun.db import queue
from qrun.db.errors import BadInput, JobLost
from qrun.db.session import (
    GROUP_UMASK,
    artifacts_root,
    is_corrupt_db_error,
    logs_root,
    masked_url,
    open_database,
    pin_qrun_home,
    qrun_home,
    table_id,
)
from qrun.db.states import Kind, Status
from qrun.workers import artifacts
from qrun.workers.artifacts import runner_marker
from qrun.workers.jobs import LOST, Backoff, JobContext, describe_error, execute

log = logging.getLogger("qrun.worker")

IDLE_POLL_S = 1.0
FAKE_GPUS_ENV = "QRUN_FAKE_GPUS"  # tests: Ray's GPUs are declared, not real; jobs run on the CPU
WORKER_REPORT_S = 10.0  # an idle worker's heartbeat in its row; `qrun workers` calls it lost after 3 missed
DRAINED = "drained"  # what a round of the loop returns when a burst worker has nothing left
IDLE = "idle"
# An attempt's outcome when the job ended but the table it was recorded in is no longer the job table.
NOT_RECORDED = "not recorded"
LIVE_WORKER_S = 3 * WORKER_REPORT_S  # a worker that reported within this is up (`qrun workers`' "lost" after)
UNREADABLE = re.compile(r"node (\S+) cannot read ")  # the release of a job whose model a node cannot read
LEASE_LOST = re.compile(r"worker (\S+) lost \(lease expired\) on attempt (\d+)/")


def describe_worker(slot: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{slot}"


def check_sees_runners_home(token: str) -> None:
    """Refuse to work on a node that does not see the runner's QRUN_HOME: its artifacts and logs
    would be invisible to every other node (an eval there would find no model to load)."""
    marker = runner_marker(qrun_home(), token)
    if not marker.is_file():
        raise RuntimeError(
            f"node {socket.gethostname()} does not see the runner's QRUN_HOME {qrun_home()} (no {marker.name} "
            "there): mount the shared QRUN_HOME at the same path on every node"
        )


class TableWatch:
    """Whether the job table this process opened is still the one at its path or URL.

    A SQLite file deleted or replaced under a running process goes on serving it from the file it
    opened: what it records then is in no table anyone else reads (a restored backup, a new file, or
    nothing). So the file is known by its device and inode, and every table by the id it keeps in
    qrun_meta (a Postgres database dropped and made again has another)."""

    def __init__(self, db):
        self.db = db
        self.file = Path(db.engine.url.database) if db.is_sqlite else None
        self.inode = self._inode()
        self.table_id = table_id(db)

    @property
    def where(self) -> str:
        return str(self.file) if self.file is not None else masked_url(self.db.url)

    def _inode(self) -> tuple[int, int] | None:
        try:
            found = os.stat(self.file) if self.file is not None else None
        except FileNotFoundError:
            return None
        return (found.st_dev, found.st_ino) if found else None

    def problem(self, error: BaseException | None = None) -> str | None:
        """None while the table is the one opened (or out of reach for now: that passes, and workers
        wait it out); else one line saying what became of it, and the way back. `error`: one the
        caller met, which may itself be the news (SQLite found the file damaged)."""
        if is_corrupt_db_error(error):
            return self._corrupt(error)
        if self.file is not None:
            inode = self._inode()
            if inode is None:
                return self._said("was deleted since it was opened: restore it from a backup, or start qrun run "
                                  "again on a new one")
            if inode != self.inode:
                return self._said("was replaced by another file since it was opened: start qrun run again to "
                                  "work on the table there now")
        try:
            now = table_id(self.db)
        except Exception as exc:  # noqa: BLE001 -- out of reach is not gone; damaged is
            return self._corrupt(exc) if is_corrupt_db_error(exc) else None
        if now == self.table_id:
            return None
        return self._said("is another job table than the one opened (made again, or another restored): start "
                          "qrun run again to work on it")

    def _corrupt(self, error: BaseException) -> str:
        return self._said(f"is corrupt ({_database_words(error)}): restore it from a backup (`qrun doctor` checks "
                          "a table)")

    def _said(self, what: str) -> str:
        return f"the job table {self.where} {what}"


def _readable_dir(path: Path) -> bool:
    """A directory this process can list and that holds something (a mount point whose file system is
    not mounted on this node is an empty directory)."""
    try:
        return path.is_dir() and os.access(path, os.R_OK | os.X_OK) and any(path.iterdir())
    except OSError:
        return False


def _database_words(error: BaseException) -> str:
    """The database's own words behind `error` (SQLite's "database disk image is malformed")."""
    seen = error
    while seen is not None and getattr(seen, "orig", None) is None:
        seen = seen.__cause__
    said = str(getattr(seen, "orig", None) or error).strip()
    return said.splitlines()[0] if said else type(error).__name__


class QueueWorker:
    """Plain class; `runner.run` wraps it with ray.remote so it can also be tested without Ray."""

    def __init__(self, db_url: str, slot: str, use_gpu: bool, lease_s: float = queue.DEFAULT_LEASE_S,
                 env: dict[str, str] | None = None, home_token: str | None = None, gpus: int = 1):
        # Before anything imports torch: CUDA_DEVICE_ORDER and OMP_NUM_THREADS are read once, at load.
        os.environ.update(env or {})
        pin_qrun_home()  # a relative QRUN_HOME means the same place after a job changes directory
        if home_token is not None:
            check_sees_runners_home(home_token)
        self.db_url = db_url
        self.slot = slot
        self.use_gpu = use_gpu
        self.lease_s = lease_s
        self.gpus = gpus  # GPUs this worker holds (jobs that need several GPUs of one node get one such)
        self._stop = threading.Event()
        self._yield = threading.Event()  # leave after the job in hand: its GPUs go to a bigger worker
        # A one-GPU worker may be lent to a job that needs several GPUs of its node: it waits behind
        # such a job until the runner has placed it, then passes it (ids the runner sends, may_pass).
        self._lendable = use_gpu and gpus == 1
        self._passable: set[int] = set()
        self._builds = None  # workers.warmup.KernelBuilds, started when the first job is ready
        self._notices: collections.deque[str] = collections.deque(maxlen=200)
        self.device = self._bootstrap()
        # What the jobs' methods may ask of the device (workers.methods); None: a CPU worker.
        self.compute_capability = self._compute_capability() if use_gpu else None
        # The physical GPU, as Ray pinned it: what `qrun status` shows in its GPU column.
        self.gpu = os.environ.get("CUDA_VISIBLE_DEVICES") if use_gpu else None
        self.name = describe_worker(slot)
        self.db = open_database(db_url)
        self._table = TableWatch(self.db)
        self._skip: set[int] = set()  # jobs left for workers of other nodes (this one cannot read their model)
        self._job_in_hand: int | None = None
        self._last_report = 0.0
        self._activity_shown = False  # the row says what it prepares (_reporter_while_waiting)
        self._report(queue.register_worker, self.name, socket.gethostname(), slot, self.device, self.gpu)

    def _bootstrap(self) -> str:
        """Pin the device. Imports torch only now, after Ray set CUDA_VISIBLE_DEVICES for this process."""
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        from qrun.workers.warmup import KERNELS_ENV, kernels_dir

        os.environ.setdefault(KERNELS_ENV, str(kernels_dir()))  # this machine's one cache, for every user
        os.umask(GROUP_UMASK)  # artifacts and logs are shared with the group, like the queue
        if not self.use_gpu:
            return "cpu"
        if os.environ.get(FAKE_GPUS_ENV):
            # Ray's GPUs declared on a machine without any (`ray start --num-gpus 2`): the scheduling
            # is real, the jobs run on the CPU. For tests of the GPU bookkeeping only.
            return "cpu"
        import torch

        # torch reads OMP_NUM_THREADS once, at import; this holds even if something imported it earlier.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        visible = torch.cuda.device_count()
        if visible != self.gpus:
            # GPTQModel spreads one job over every GPU it sees; two workers would then share cards.
            raise RuntimeError(
                f"worker {self.slot} sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')}); it must see exactly {self.gpus}"
            )
        return "cuda:0"  # with several GPUs, the job's model is spread from there (device_map="auto")

    def _compute_capability(self) -> float:
        """The GPU's compute capability as a number (9.0 for an H100); 0.0 for GPUs Ray only declares."""
        if not self.device.startswith("cuda"):
            return 0.0
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        return major + minor / 10

    def identity(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "device": self.device,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def request_stop(self) -> None:
        self._stop.set()

    def yield_after_job(self) -> None:
        """Finish the job in hand, then leave the drain without claiming another (see runner.run)."""
        self._yield.set()

    def may_pass(self, job_ids) -> None:
        """The runner has placed these jobs that need several GPUs: later jobs may overtake them here."""
        self._passable.update(job_ids)

    def notice(self, text: str) -> None:
        """Something the people watching the runner should read (it prints them between jobs)."""
        log.warning(text)
        self._notices.append(f"{self.slot}: {text}")

    def take_notices(self) -> list[str]:
        """The notices since the last call, oldest first (the runner polls this)."""
        taken = []
        while self._notices:
            taken.append(self._notices.popleft())
        return taken

    def _start_kernel_builds(self) -> None:
        """Once a job is ready: GPTQModel's import and the builds of the kernels jobs wait for
        (workers.warmup.KernelBuilds). On a CPU the cache is checked on disk, without importing
        GPTQModel: where nothing is missing, nothing is imported or built here."""
        from qrun.workers.warmup import KernelBuilds, cpu_kernels_to_build, kernels_for

        gpu = self.device.startswith("cuda")
        self._builds = KernelBuilds(kernels_for(self.device) if gpu else cpu_kernels_to_build(),
                                    rehearse_on=self.device if gpu else None)

    def _wait_for_kernels(self, job) -> None:
        """Before a job: build (or load) the kernels it uses and wait for them, so that no job's time
        includes a build. What was built is said in the run's output."""
        from qrun.workers.warmup import JobShape, describe, kernels_a_job_uses, was_built

        if self._builds is None:
            self._start_kernel_builds()
        model_dir = self._model_dir_of(job)
        shape = JobShape(job.kind, job.params, str(model_dir)) if model_dir is not None else None
        kernels = kernels_a_job_uses(job.kind, job.params, model_dir, self.device)
        building = self._builds.waited_for(kernels)
        doing = f"GPTQModel kernel {', '.join(building)}" if building else "importing GPTQModel"
        self._builds.wait(kernels, self._stop, shape,
                          self._reporter_while_waiting(queue.preparing_activity(job.id, doing)))
        built = self._builds.new_results()
        if was_built(built):
            self.notice(describe(built))

    def _reporter_while_waiting(self, activity: str):
        """What the kernel wait calls every half second: it keeps this worker's row alive (`qrun
        workers` takes a worker silent for 30 s for lost) and says what it waits for, first after a
        second (a cached kernel loads in less), then every WORKER_REPORT_S. The claim's report
        clears it."""
        started = time.monotonic()
        told = False

        def report() -> None:
            nonlocal told
            now = time.monotonic()
            if (not told and now - started >= 1.0) or now - self._last_report >= WORKER_REPORT_S:
                told = True
                self._report(queue.worker_heartbeat, self.name, job=None, activity=activity)

        return report

    def _may_build(self) -> bool:
        """Whether a job may still have to wait for a kernel here: not on a CPU whose kernels are cached."""
        return self._builds is None or bool(self._builds.buildable)

    def _model_dir_of(self, job):
        """The directory the job reads (an eval: its upstream's artifact, which exists once the job is
        ready); None where it cannot be found: the job itself then says why."""
        from qrun.workers.evaluate import resolve_model_dir

        try:
            return resolve_model_dir(self.db, job) if job.kind == Kind.EVAL.value else job.model
        except BadInput:
            return None

    def _report(self, write, *args, **kwargs) -> None:
        """Keep this worker's row (`qrun workers`) current. It is a view, not the queue: a write
        that fails is logged and dropped, never a reason to stop."""
        self._last_report = time.monotonic()
        self._activity_shown = kwargs.get("activity") is not None
        try:
            write(self.db, *args, **kwargs)
        except Exception:  # noqa: BLE001
            log.warning("could not update worker %s's row", self.name, exc_info=True)

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        while not done.wait(min(self.lease_s / 3, WORKER_REPORT_S)):
            self._report(queue.worker_heartbeat, self.name, job=job_id)
            try:
                queue.heartbeat(self.db, job_id, self.name, self.lease_s)
            except JobLost:
                return  # the next progress call will find out and stop the job
            except Exception:  # a passing database error must not kill the worker
                continue

    def run_one(self, job) -> str:
        self._take_over_log(job)
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, done), daemon=True)
        beat.start()
        try:
            ctx = JobContext(db=self.db, job=job, worker=self.name, device=self.device,
                             lease_s=self.lease_s, should_stop=self._stop.is_set, notice=self.notice)
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

    def _one_round(self, burst: bool, only_multi_gpu: bool = False):
        """Claim and run one job: (job id, outcome); or IDLE / DRAINED when there is none to claim."""
        if self._yield.is_set():
            return DRAINED
        # The most urgent ready job is most likely the one this worker claims: its kernels are built
        # (and waited for) before the claim, not inside the job. Another job claimed instead (a
        # race, fair share) waits for its own after the claim.
        waited_for = None
        if self._may_build():
            ready = queue.most_urgent_ready_job(self.db)
            waited_for = ready[0] if ready is not None else None
        if waited_for is not None:
            self._wait_for_kernels(queue.get_job(self.db, waited_for))
            if self._stop.is_set():
                return IDLE  # the drain ends there
        passable = frozenset(self._passable) if self._lendable and not only_multi_gpu else None
        job = queue.claim_job(self.db, self.name, self.gpu, self.lease_s, gpus=self.gpus,
                              only_multi_gpu=only_multi_gpu, passable=passable,
                              compute_capability=self.compute_capability, skip=self._skip)
        if job is not None:
            unreadable = self._unreadable_model_dir(job)
            if unreadable is not None:
                return job.id, self._leave_for_another_node(job, *unreadable)
            if job.id != waited_for and self._may_build():
                self._wait_for_kernels(job)
            self._report(queue.worker_heartbeat, self.name, job=job.id)
            self._job_in_hand = job.id
            outcome = self.run_one(job)
            self._job_in_hand = None
            self._report(queue.worker_heartbeat, self.name, job=None, finished_one=True)
            return job.id, outcome
        if self._activity_shown or time.monotonic() - self._last_report >= WORKER_REPORT_S:
            self._report(queue.worker_heartbeat, self.name, job=None)  # idle: no longer preparing a job
        self._remove_staging_of_finished_jobs()
        # A GPU worker may yet be merged into one for jobs that need several GPUs; a CPU worker never,
        # and it never takes a job whose method needs a GPU: its drain ends when only such are left.
        if only_multi_gpu or (burst and queue.pending_count(self.db, cpu_worker=not self.use_gpu,
                                                            skip=self._skip) == 0):
            return DRAINED  # a worker of several GPUs lives only while such jobs are ready
        return IDLE

    def drain(self, burst: bool = True, only_multi_gpu: bool = False,
              passable: tuple[int, ...] = ()) -> list[tuple[int, str]]:
        """Run jobs until none is left (burst) or a stop is requested; returns (job id, outcome) pairs.
        only_multi_gpu: take only jobs that need several GPUs, and return when none is ready.
        passable: jobs that need several GPUs which the runner has placed already (see may_pass)."""
        self._passable.update(passable)
        ran = []
        backoff = Backoff()
        while not self._stop.is_set():
            gone = self._table.problem()
            if gone:
                self.notice(f"{gone}; this worker takes no more jobs")
                break
            try:
                result = self._one_round(burst, only_multi_gpu)
            except Exception as exc:  # noqa: BLE001 -- outside any job: say so, wait, try again
                if self._table_lost_on(exc):
                    break
                wait_s = backoff.next_wait()
                if backoff.failures == 1:
                    log.exception("round of the worker loop failed")
                self.notice(f"{describe_error(exc)}; trying again in {wait_s:.0f} s")
                self._stop.wait(wait_s)
                continue
            if backoff.failures:
                self.notice("working again")
                backoff.reset()
            if result == DRAINED:
                break
            if result == IDLE:
                # Jobs are waiting on upstream jobs or on a lost worker's lease: look again shortly.
                self._stop.wait(IDLE_POLL_S)
                continue
            job_id, outcome = result
            gone = self._table.problem()
            if gone and outcome != LOST:  # recorded in a file that is no longer the job table
                self.notice(f"job {job_id} ended ({outcome}) but {gone}; its outcome is in no job table (its "
                            "output and log stay under QRUN_HOME); this worker takes no more jobs")
                ran.append((job_id, NOT_RECORDED))
                break
            ran.append(result)
        self._report(queue.worker_stopped, self.name)
        return ran

    def _table_lost_on(self, error: BaseException) -> bool:
        """Whether `error` came of a job table that is no longer the one opened (then said: the
        worker stops); a job in hand whose outcome could not be recorded is named, with where its
        output stays."""
        gone = self._table.problem(error)
        if not gone:
            return False
        job_id, self._job_in_hand = self._job_in_hand, None
        if job_id is not None:
            self.notice(f"job {job_id} ran but its outcome could not be recorded: {gone}; its output and log "
                        "stay under QRUN_HOME; this worker takes no more jobs")
        else:
            self.notice(f"{gone}; this worker takes no more jobs")
        return True

    # ------------------------------------------------------------ a model this node cannot read

    def _unreadable_model_dir(self, job) -> tuple[Path, str | None, int | None] | None:
        """(the directory, the node that wrote it, the job that did) where this node cannot read the
        directory the job reads (a file system one node mounts, a model copied to one node only);
        None where it can, or where the job itself must say what is wrong: an artifact written on
        this very node and gone since, a job with no model artifact, a model that is no path."""
        from qrun.workers.params import EvalParams

        if job.kind == Kind.EVAL.value and EvalParams.from_dict(job.params).from_upstream:
            records = queue.artifacts_of(self.db, [job.depends_on]).get(job.depends_on, [])
            model = next((a for a in records if a.kind == "model"), None)
            if model is None or not model.node or model.node == socket.gethostname():
                return None
            path, node, upstream = Path(model.path), model.node, job.depends_on
        elif Path(job.model).is_absolute():
            path, node, upstream = Path(job.model), None, None
        else:
            return None
        return None if _readable_dir(path) else (path, node, upstream)

    def _leave_for_another_node(self, job, path: Path, node: str | None, upstream: int | None) -> str:
        """Give the job back for a worker of another node, not counting the attempt, while a live
        worker's node has not tried it yet; where none is left, fail it once, naming the nodes
        tried, the node that wrote the model, and the fix. Returns the status the job is in."""
        here = socket.gethostname()
        tried = self._nodes_that_could_not_read(job.id) | {here}
        whose = f" (the model of job {upstream}, written on node {node})" if upstream is not None else ""
        if self._live_nodes() - tried:
            queue.release_job(self.db, job.id, self.name, f"node {here} cannot read {path}: left for a worker "
                                                          "on another node")
            self._skip.add(job.id)
            self.notice(f"job {job.id}: this node ({here}) cannot read {path}{whose}: left for a worker on another "
                        "node")
            return Status.QUEUED.value
        fix = (f"put QRUN_HOME on storage that every node mounts at the same path, or run qrun on node {node}"
               if node else "put the model on storage that every node mounts at the same path, or run qrun on "
                            "the node that has it")
        return queue.fail_job(self.db, job.id, self.name,
                              f"{path}{whose} cannot be read on node {', '.join(sorted(tried))}, and no other node "
                              f"has a live worker: {fix}").value

    def _nodes_that_could_not_read(self, job_id: int) -> set[str]:
        """The nodes that gave this job back for want of its model since it was last submitted or retried."""
        nodes: set[str] = set()
        for event in queue.events_of(self.db, job_id):
            if event.transition == "retry":
                nodes.clear()
            found = UNREADABLE.match(event.detail or "") if event.transition == "release" else None
            if found:
                nodes.add(found[1])
        return nodes

    def _live_nodes(self) -> set[str]:
        since = queue.utcnow() - timedelta(seconds=LIVE_WORKER_S)
        return {w.node for w in queue.list_workers(self.db, since) if w.stopped_at is None}

    # ------------------------------------------------------------ a lease taken over

    def _take_over_log(self, job) -> None:
        """Where the job's last attempt ended by its worker's lease running out, that worker may be
        alive (stopped, cut off from the table) and write to the job's log when it wakes, in the
        middle of this attempt's lines. Its log so far moves into the job's directory, where the
        old worker's lines then land, and a copy of it starts this attempt's log, which says who
        took over from whom. A log that cannot be moved is left as it is: the job runs regardless."""
        lost = self._lost_attempt(job.id)
        log_path = logs_root() / f"job-{job.id}.log"
        if lost is None or not log_path.is_file():
            return
        old_worker, attempt = lost
        aside = logs_root() / f"job-{job.id}.d" / f"attempt-{attempt}.log"
        try:
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(log_path, aside)
            earlier = aside.read_bytes()
            with log_path.open("xb") as log_file:
                log_file.write(earlier if earlier.endswith(b"\n") or not earlier else earlier + b"\n")
                log_file.write(f"=== worker {old_worker} lost its lease on attempt {attempt}; {self.name} takes "
                               f"over. Anything {old_worker} still writes goes to {aside}\n".encode())
        except OSError:
            log.warning("job %s: could not set the lost attempt's log aside", job.id, exc_info=True)

    def _lost_attempt(self, job_id: int) -> tuple[str, str] | None:
        """(the worker, its attempt) where the job's attempt before this one ended by a lease running out."""
        events = queue.events_of(self.db, job_id)
        before = events[-2] if len(events) >= 2 and events[-1].transition == "claim" else None
        found = LEASE_LOST.match(before.detail or "") if before is not None and before.transition == "release" \
            else None
        return (found[1], found[2]) if found else None
