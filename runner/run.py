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
    ray.init(num_cpus=cpu_workers + 1, include_dashboard=False, log_to_driver=False,
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


def run_queue(db_url: str, slots: list[Slot], burst: bool, lease_s: float = queue.DEFAULT_LEASE_S,
              on_tick: Callable[[], None] | None = None, tick_s: float = 1.0) -> RunSummary:
    """Drain the queue with one actor per slot. Ctrl-C: warm stop (release jobs); twice: cold stop."""
    import ray
    from ray.exceptions import RayActorError

    threads = threads_per_worker(len(slots))
    actors = {slot: create_worker(slot, db_url, lease_s, threads) for slot in slots}
    pending = {actors[slot].drain.remote(burst): slot for slot in slots}
    outcomes: list[tuple[int, str]] = []
    restarts = 0
    interrupts = 0
    previous_handler = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops as warmly as Ctrl-C
    try:
        while pending:
            try:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=tick_s)
                for ref in done:
                    slot = pending.pop(ref)
                    try:
                        outcomes.extend(ray.get(ref))
                    except RayActorError:
                        # The worker process died mid-job; Ray restarts it. Its job comes back
                        # through lease expiry, so only the draining has to be resumed here.
                        restarts += 1
                        if restarts > MAX_ACTOR_RESTARTS * len(slots) or interrupts:
                            continue
                        pending[actors[slot].drain.remote(burst)] = slot
                if on_tick:
                    on_tick()
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    for actor in actors.values():
                        actor.request_stop.remote()
                else:
                    for actor in actors.values():
                        ray.kill(actor, no_restart=True)
                    break
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return RunSummary(outcomes=outcomes, restarts=restarts, interrupted=interrupts > 0)
