"""`qrun run`: start or join Ray, put one worker actor on each GPU, and keep them draining the queue.

Ray pins each actor to one GPU through `num_gpus=1` (it sets CUDA_VISIBLE_DEVICES); the actor
checks that it sees exactly one. Where the cluster has no GPU, CPU actors take the jobs, so
qrun works on a laptop and in CI. An actor that dies (OOM kill, segfault) is restarted by Ray
and set to draining again; the job it held returns to the queue when its lease expires.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

from qrun.db import queue
from qrun.db.errors import BadInput
from qrun.db.session import qrun_home
from qrun.runner.worker import QueueWorker

MAX_ACTOR_RESTARTS = 5  # per slot, per `qrun run`: a worker that keeps dying is a bug, not bad luck


@dataclass(frozen=True)
class Slot:
    name: str  # "gpu0", "cpu1": which worker this is, in logs and status
    use_gpu: bool


def start_ray(address: str | None, gpus: list[int] | None, cpu_workers: int) -> bool:
    """Join the cluster at `address`, or start a local Ray limited to `gpus` (None: all it finds).
    Returns False where this process was connected already (then the caller must not stop Ray)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return True
    if gpus is not None:
        # Ray hands out GPUs from CUDA_VISIBLE_DEVICES: restricting it here restricts what qrun uses.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    # Ray prestarts one worker process per CPU it manages; qrun needs one per CPU worker (GPU workers
    # reserve no CPU), so announcing every core only slows start-up (ray.init took 9 s on 16 cores).
    # address="local": always a Ray of our own; with no address ray.init joins a cluster that someone
    # else started on this box (`ray start`) and then refuses num_cpus.
    ray.init(address="local", num_cpus=cpu_workers + 1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return True


def stop_ray() -> None:
    """Leave (or stop the local) Ray now: left to interpreter exit, Ray first sleeps 0.5 s."""
    import ray

    ray.shutdown()


def plan_slots(gpus: list[int] | None, cpu_workers: int | None) -> list[Slot]:
    """One slot per GPU Ray has; CPU slots where it has none (or when --cpu-workers is given)."""
    import ray

    available = int(ray.cluster_resources().get("GPU", 0))
    if gpus is not None and len(gpus) > available:
        raise BadInput(f"--gpus {','.join(map(str, gpus))} asks for {len(gpus)} GPUs but Ray found {available}")
    if cpu_workers is not None or available == 0:
        return [Slot(f"cpu{i}", use_gpu=False) for i in range(cpu_workers or 1)]
    return [Slot(f"gpu{i}", use_gpu=True) for i in range(available)]


def threads_per_worker(n_slots: int) -> int:
    """This machine's cores shared among its workers. Ray would give an actor that reserves no CPU
    (a GPU worker) OMP_NUM_THREADS=1, which made GPTQModel's CPU-side packing ~15% slower on an H100."""
    return max(1, (os.cpu_count() or 1) // max(1, n_slots))


def gptqmodel_cpu_workers(threads: int) -> int:
    """GPTQModel's own default (half the cores, at most 12), but of this worker's share of the cores,
    and at least 2 (on a 2-core box GPTQModel asks for more than it finds). A fixed 2 made quantize()
    ~3 s slower on a 16-core H100 machine, where GPTQModel alone would take 8."""
    return max(2, min(12, (threads + 1) // 2))


def worker_env(threads: int) -> dict[str, str]:
    """What a worker sets in its own environment before it imports torch (see QueueWorker)."""
    env = {"QRUN_HOME": str(qrun_home()), "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "OMP_NUM_THREADS": str(threads),
           "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", str(gptqmodel_cpu_workers(threads)))}
    for name in ("QRUN_DB", "QRUN_JOB_MEMORY_MB", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def create_worker(slot: Slot, db_url: str, lease_s: float, threads: int = 1):
    import ray

    resources = {"num_gpus": 1} if slot.use_gpu else {"num_cpus": 1}
    actor_class = ray.remote(QueueWorker)
    # The environment travels as an argument, not as a runtime_env: a runtime_env makes Ray start a
    # fresh process for the actor (~1 s) where it could take one of the workers it prestarted.
    return actor_class.options(
        **resources,
        max_restarts=MAX_ACTOR_RESTARTS,
        max_concurrency=2,  # one thread drains, the other can take request_stop
    ).remote(db_url, slot.name, slot.use_gpu, lease_s, worker_env(threads))


@dataclass
class RunSummary:
    outcomes: list[tuple[int, str]]
    restarts: int
    interrupted: bool


class Supervisor:
    """Keeps one draining worker per slot for as long as `qrun run` runs.

    Nothing a worker meets ends the run: a worker process that dies is restarted by Ray (and replaced
    by a fresh actor once Ray's restarts for it are spent), the job it held is given back at once
    with the cause, and a drain that fails on a bug is started again after a pause. What workers
    report (`take_notices`) is passed to `say`, so the run's output tells about database outages.
    """

    def __init__(self, db, slots: list[Slot], burst: bool, lease_s: float, say: Callable[[str], None]):
        self.db, self.slots, self.burst, self.lease_s, self.say = db, slots, burst, lease_s, say
        self.threads = threads_per_worker(len(slots))
        self.actors = {slot: self._new_actor(slot) for slot in slots}
        self.identities: dict[Slot, object] = {slot: self.actors[slot].identity.remote() for slot in slots}
        self.names: dict[Slot, str] = {}
        self.draining = {self.actors[slot].drain.remote(burst): slot for slot in slots}
        self.notices: dict[Slot, object] = {}
        self.failures = {slot: 0 for slot in slots}  # in a row, per slot
        self.resume_at: dict[Slot, float] = {}  # slots that wait out a pause before draining again
        self.started: set[Slot] = set()  # slots whose worker came up at least once
        self.outcomes: list[tuple[int, str]] = []
        self.restarts = 0
        self.stopping = False

    def _new_actor(self, slot: Slot):
        return create_worker(slot, self.db.url, self.lease_s, self.threads)

    @property
    def busy(self) -> bool:
        return bool(self.draining or self.resume_at)

    def wait(self, timeout_s: float) -> None:
        """Collect the drains that ended within timeout_s; restart what must go on."""
        import ray

        done, _ = ray.wait(list(self.draining), num_returns=1, timeout=timeout_s) if self.draining else ([], [])
        if not self.draining:
            time.sleep(timeout_s)
        for ref in done:
            self._drain_ended(self.draining.pop(ref), ref)
        now = time.monotonic()
        for slot, at in list(self.resume_at.items()):
            if at <= now and not self.stopping:
                del self.resume_at[slot]
                self.draining[self.actors[slot].drain.remote(self.burst)] = slot
        self._learn_names()
        self._relay_notices()

    def _drain_ended(self, slot: Slot, ref) -> None:
        import ray
        from ray.exceptions import RayActorError

        try:
            self.outcomes.extend(ray.get(ref))
            self.failures[slot] = 0
            return
        except RayActorError as exc:
            if slot not in self.started and "creation task" in str(exc):
                # Its constructor failed (a GPU worker that sees two GPUs): a fault of this start.
                raise BadInput(f"worker {slot.name} could not start: {_creation_error(exc)}") from None
            # The worker process died (OOM kill, segfault): Ray restarts it, and its job goes back
            # to the queue now, with the cause, instead of after the lease as "lost".
            self.restarts += 1
            # Ray knows only that the process is gone (its words: "Socket closed", "unavailable");
            # the kernel's reason is not ours to read, so say what it can be.
            cause = "its process ended unexpectedly (killed, out of host memory, or crashed)"
            self.say(f"worker {slot.name} died: {cause}; Ray restarts it")
            self._give_back_jobs_of(slot, f"worker {slot.name} died while running it: {cause}")
        except Exception as exc:  # noqa: BLE001 -- a bug in the worker's loop: say it, start it again
            self.say(f"worker {slot.name} stopped on an error: {_first_sentence(str(exc))}")
        if self.stopping:
            return
        self.failures[slot] += 1
        if self.failures[slot] > MAX_ACTOR_RESTARTS:  # Ray's restarts are spent: a fresh actor
            self._replace_actor(slot)
        pause_s = min(30.0, 2.0 ** (self.failures[slot] - 1))
        self.resume_at[slot] = time.monotonic() + pause_s

    def _replace_actor(self, slot: Slot) -> None:
        import ray

        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor(slot)
        self.identities[slot] = self.actors[slot].identity.remote()
        self.names.pop(slot, None)
        self.failures[slot] = 1

    def _learn_names(self) -> None:
        """Each worker's name in the table (host:pid:slot), as soon as its actor is up."""
        import ray

        for slot, ref in list(self.identities.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                del self.identities[slot]
                try:
                    self.names[slot] = ray.get(ref)["name"]
                    self.started.add(slot)
                except Exception:  # noqa: BLE001 -- it died starting: its drain says why
                    pass

    def _give_back_jobs_of(self, slot: Slot, reason: str) -> None:
        name = self.names.pop(slot, None)
        # The restarted process has another pid, hence another name: ask for it again.
        self.identities[slot] = self.actors[slot].identity.remote()
        if name is None:
            return
        try:
            for job in queue.jobs_held_by(self.db, name):
                queue.fail_job(self.db, job, name, reason, retryable=True)
        except Exception as exc:  # noqa: BLE001 -- the lease will give it back instead
            self.say(f"could not give back the jobs of {name} now ({_first_sentence(str(exc))}); "
                     "their lease will")

    def _relay_notices(self) -> None:
        import ray

        for slot in self.slots:
            ref = self.notices.get(slot)
            if ref is not None:
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                try:
                    for line in ray.get(ref):
                        self.say(line)
                except Exception:  # noqa: BLE001 -- a dead worker has nothing to say; its drain tells
                    pass
            self.notices[slot] = self.actors[slot].take_notices.remote()

    def stop_warm(self) -> None:
        """Ctrl-C once: workers finish their current layer and give their jobs back."""
        self.stopping = True
        self.resume_at.clear()
        for actor in self.actors.values():
            actor.request_stop.remote()

    def stop_cold(self) -> None:
        import ray

        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)


def _creation_error(exc: BaseException) -> str:
    """The worker constructor's own error, out of Ray's report of a failed creation task."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "~"))
              and ":" in line and line.split(":")[0].isidentifier()]
    return (raised[-1] if raised else _first_sentence(str(exc)))[:300]


def _first_sentence(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no reason given"
    return line[:300]


def run_queue(db, slots: list[Slot], burst: bool, lease_s: float = queue.DEFAULT_LEASE_S,
              on_tick: Callable[[], None] | None = None, tick_s: float = 1.0,
              say: Callable[[str], None] = print) -> RunSummary:
    """Drain the queue with one actor per slot. Ctrl-C: warm stop (release jobs); twice: cold stop."""
    supervisor = Supervisor(db, slots, burst, lease_s, say)
    interrupts = 0
    previous_handler = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops as warmly as Ctrl-C
    try:
        while supervisor.busy:
            try:
                supervisor.wait(tick_s)
                if on_tick:
                    on_tick()
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    supervisor.stop_warm()
                else:
                    supervisor.stop_cold()
                    break
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return RunSummary(outcomes=supervisor.outcomes, restarts=supervisor.restarts, interrupted=interrupts > 0)
