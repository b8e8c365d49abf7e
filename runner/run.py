"""`qrun run`: start or join Ray, put one worker actor on each GPU, and keep them draining the queue.

Ray pins each actor to one GPU through `num_gpus=1` (it sets CUDA_VISIBLE_DEVICES); the actor
checks that it sees exactly one. Where the cluster has no GPU, CPU actors take the jobs, so
qrun works on a laptop and in CI. An actor that dies (OOM kill, segfault) is restarted by Ray
and set to draining again; the job it held returns to the queue when its lease expires.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

from qrun.db import queue
from qrun.db.errors import BadInput
from qrun.db.session import qrun_home
from qrun.runner.worker import FAKE_GPUS_ENV, QueueWorker
from qrun.workers.jobs import Backoff
from qrun.workers.warmup import KERNELS_ENV, REHEARSAL_ENV

MAX_ACTOR_RESTARTS = 5  # per slot, per `qrun run`: a worker that keeps dying is a bug, not bad luck
STOP_GRACE_S = 30.0  # after one Ctrl-C or SIGTERM: how long workers have to give their jobs back


@dataclass(frozen=True)
class Slot:
    name: str  # "gpu0", "cpu1" (on a cluster "cpu0@1a2b3c": its node): which worker this is
    use_gpu: bool
    node_id: str | None = None  # the Ray node it is pinned to (None: wherever Ray puts it)
    gpus: int = 1  # more than one: a worker made for jobs that need several GPUs of one node
    host: str = field(default="", compare=False)  # its node as messages name it: "gpu-b", "gpu-b (1a2b3c)"


def start_ray(address: str | None, gpus: list[int] | None, cpu_workers: int) -> bool:
    """Join the cluster at `address`, or start a local Ray limited to `gpus` (None: all it finds).
    Returns False where this process was connected already (then the caller must not stop Ray)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        join_cluster(address)
        return True
    if gpus is not None:
        # Ray hands out GPUs from CUDA_VISIBLE_DEVICES: restricting it here restricts what qrun uses.
        from ray._private.accelerators import NvidiaGPUAcceleratorManager as Nvidia  # how Ray counts them

        os.environ["CUDA_VISIBLE_DEVICES"] = chosen_gpus(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"),
                                                         Nvidia.get_current_node_num_accelerators())
    # Ray prestarts one worker process per CPU it manages; qrun needs one per CPU worker (GPU workers
    # reserve no CPU), so announcing every core only slows start-up (ray.init took 9 s on 16 cores).
    # address="local": always a Ray of our own; with no address ray.init joins a cluster that someone
    # else started on this box (`ray start`) and then refuses num_cpus.
    ray.init(address="local", num_cpus=cpu_workers + 1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return True


def chosen_gpus(gpus: list[int], visible: str | None, on_machine: int) -> str:
    """CUDA_VISIBLE_DEVICES for `--gpus`, which counts as CUDA does: GPU i is the i-th one this shell
    may see. Where CUDA_VISIBLE_DEVICES already narrows that (a user's share of a shared server),
    qrun picks from it: replacing it with the same numbers would take GPUs outside that share. A
    number past the last GPU is refused here: Ray would count it as a GPU that no worker can use."""
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else \
        [str(i) for i in range(on_machine)]
    if any(g >= len(ids) for g in gpus):
        shown = f"GPUs 0-{len(ids) - 1}" if len(ids) > 1 else "GPU 0" if ids else "no GPU"
        where = (f"CUDA_VISIBLE_DEVICES={visible!r} lets this shell see {shown} (--gpus counts within it)"
                 if visible is not None else f"this machine has {shown}")
        raise BadInput(f"--gpus {','.join(map(str, gpus))}: {where}")
    return ",".join(ids[g] for g in gpus)


def join_cluster(address: str) -> None:
    """Connect to the Ray cluster at `address`, or say in one line why not."""
    import ray

    check_something_answers(address)
    with core_output_to_ray_log() as core_said:
        check_token_accepted(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level="warning", configure_logging=False)
            return
        except Exception as exc:  # noqa: BLE001 -- Ray's errors here are of many types, all about the start
            error = str(exc)
            said = core_said()
    raise BadInput(_why_not_joined(address, error, said)) from None


def check_something_answers(address: str, timeout_s: float = 10.0) -> None:
    """ray.init(address) retries an address where nothing listens for many minutes (20 tries of ~40 s
    each, silently: measured with Ray 2.60), so a mistyped port looked like a hang. A plain TCP
    connect answers in seconds. Addresses that are not host:port ("auto") are Ray's to judge."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = ("unknown host" if isinstance(exc, socket.gaierror) else
                  f"no answer in {timeout_s:.0f} s" if isinstance(exc, TimeoutError) else
                  "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc))
        raise BadInput(f"--ray-address {address}: nothing answers there ({reason}): start Ray's head node "
                       f"there (`ray start --head --port {port}`) or give its address") from None


def check_token_accepted(address: str, wait_s: float = 5.0) -> None:
    """ray.init retries a cluster that refuses this machine's token for ~20 s, then fails with no
    reason given; one request to the cluster's GCS, as ray.init would send it, is refused in
    milliseconds. Where no answer comes in `wait_s` (a port that is not a GCS: Ray's client waits
    40 s there), or Ray's internals used here have moved, ray.init judges, only slower."""
    host, colon, port = address.rpartition(":")
    if address.startswith("ray://") or not colon or not port.isdigit():
        return
    try:
        from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
        from ray._raylet import GcsClient
    except ImportError:
        return
    try:  # first, as ray.init does: without it, GcsClient aborts the process where a token is missing
        ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    except Exception as exc:  # noqa: BLE001 -- Ray's AuthenticationError, or what it becomes
        raise BadInput(_why_not_joined(address, str(exc), "")) from None
    refused: list[str] = []

    def ask() -> None:
        try:
            GcsClient(address=address).internal_kv_get(b"qrun-token-probe", namespace=None, timeout=wait_s)
        except Exception as exc:  # noqa: BLE001 -- only a refused token is this check's business
            refused.append(str(exc))

    asking = threading.Thread(target=ask, name="qrun-token-probe", daemon=True)
    asking.start()
    asking.join(wait_s)
    if refused and "InvalidAuthToken" in refused[0]:
        raise BadInput(_why_not_joined(address, refused[0], ""))


def _why_not_joined(address: str, error: str, core_said: str) -> str:
    """A cluster refuses a client without its token only in what Ray's core prints while it retries
    (InvalidAuthToken, for ~20 s); the exception then says no more than "Failed to connect"."""
    if "no authentication token was found" in error:  # RAY_AUTH_MODE=token here, and no token
        return (f"--ray-address {address}: RAY_AUTH_MODE=token but this machine has no Ray token: copy the "
                "head node's ~/.ray/auth_token here, or export RAY_AUTH_TOKEN")
    if "InvalidAuthToken" in error + core_said:
        return (f"--ray-address {address}: the cluster refused this machine's Ray token (none, or not the "
                "cluster's): export RAY_AUTH_MODE=token and give this machine the head node's "
                "~/.ray/auth_token (or RAY_AUTH_TOKEN)")
    return f"--ray-address {address}: cannot join the Ray cluster ({_first_sentence(error)})"


@contextmanager
def core_output_to_ray_log() -> Iterator[Callable[[], str]]:
    """While inside, what this process writes to file descriptor 2 -- Ray's C++ core writes its
    warnings there, past Python's logging: a line a second while a cluster refuses the token -- goes
    to a temporary file; on leaving, its text goes to Ray's logger (`qrun run`'s log file, under
    ray_notices_to). Yields a function that returns the text written so far."""
    import sys
    import tempfile

    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        def written() -> str:
            return os.pread(sink.fileno(), os.fstat(sink.fileno()).st_size, 0).decode(errors="replace")

        terminal = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield written
        finally:
            sys.stderr.flush()
            os.dup2(terminal, 2)
            os.close(terminal)
            if written().strip():
                logging.getLogger("ray").warning("%s", written().rstrip())


@contextmanager
def ray_notices_to(stream: TextIO) -> Iterator[None]:
    """While inside, Ray's own notices go to `stream` (a run's log file), not to the terminal: the
    lines its loggers write at start ("Token authentication is enabled for this Ray cluster...") and the
    "(raylet) ..." messages its driver thread prints to stdout (ray._private.worker.print_to_stdstream,
    called by listen_error_messages; a worker killed for memory, say). Nothing is lost: it is all in
    the file, and qrun's runner reports what matters for the jobs itself."""
    import ray._private.worker as ray_worker

    ray_logger = logging.getLogger("ray")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    propagate, printer, own = ray_logger.propagate, ray_worker.print_to_stdstream, list(ray_logger.handlers)
    last_resort = logging.lastResort
    for terminal in own:  # the handler Ray puts on its logger at import writes to stderr
        ray_logger.removeHandler(terminal)
    ray_logger.addHandler(handler)
    ray_logger.propagate = False
    # ray.init takes the handlers off its logger again, and its start-up lines then reach Python's
    # last-resort handler (stderr): that one goes to the file too while inside.
    logging.lastResort = handler
    # The thread looks the function up at each message, so replacing the module's name reroutes it.
    ray_worker.print_to_stdstream = lambda data, ignore_prefix: ray_worker.print_worker_logs(data, stream,
                                                                                             ignore_prefix)
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = printer
        logging.lastResort = last_resort
        ray_logger.propagate = propagate
        ray_logger.removeHandler(handler)
        for terminal in own:
            ray_logger.addHandler(terminal)


def stop_ray() -> None:
    """Leave (or stop the local) Ray now: left to interpreter exit, Ray first sleeps 0.5 s."""
    import ray

    ray.shutdown()


def refuse_sqlite_on_a_cluster(db, nodes: int) -> None:
    """SQLite's lock does not cross machines (and its WAL does not work on network file systems)."""
    if db.is_sqlite and nodes > 1:
        raise BadInput(
            f"the job table {db.url} is a SQLite file, which cannot serve a Ray cluster of {nodes} nodes (its "
            "lock does not cross machines): use a Postgres job table, --db postgresql+psycopg://USER@HOST/DB"
        )


def alive_nodes() -> list[dict]:
    """Ray's live nodes, in a stable order (the head first, as Ray lists it)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def node_names(nodes: list[dict]) -> dict[str, str]:
    """Node id -> the node as messages name it: its host name, and its id's start where another
    live node has the same host name (several raylets of one machine, containers named alike)."""
    hosts = [n.get("NodeManagerHostname") or n["NodeID"][:6] for n in nodes]
    return {n["NodeID"]: host if hosts.count(host) == 1 else f"{host} ({n['NodeID'][:6]})"
            for n, host in zip(nodes, hosts)}


def cpu_workers_on(node: dict, cpu_workers: int | None) -> int:
    """CPU workers a node can hold: each reserves one of its CPUs, and one Ray cannot place would
    wait for a CPU forever."""
    return min(cpu_workers or 1, int(node["Resources"].get("CPU", 0)))


def cpu_shortfalls(cpu_workers: int | None) -> list[str]:
    """What `--cpu-workers N` cannot have on the cluster, one line per node short of CPUs (said at
    start); BadInput where no node can hold a CPU worker at all."""
    nodes = alive_nodes()
    names = node_names(nodes)
    if not any(cpu_workers_on(n, cpu_workers) for n in nodes):
        shown = ", ".join(f"{names[n['NodeID']]} {int(n['Resources'].get('CPU', 0))}" for n in nodes)
        raise BadInput(f"--cpu-workers {cpu_workers or 1}: no node of the Ray cluster has a CPU for a worker (CPUs "
                       f"per node: {shown}): start the nodes with CPUs (`ray start --num-cpus N`)")
    return [f"--cpu-workers {cpu_workers}: node {names[n['NodeID']]} has {int(n['Resources'].get('CPU', 0))} "
            f"CPU(s): {cpu_workers_on(n, cpu_workers)} worker(s) there"
            for n in nodes if cpu_workers_on(n, cpu_workers) < (cpu_workers or 1)]


def plan_slots(gpus: list[int] | None, cpu_workers: int | None, on_cluster: bool = False) -> list[Slot]:
    """One slot per GPU of every node; where the cluster has no GPU (or --cpu-workers is given),
    `cpu_workers` (default 1) CPU slots per node, as many as its CPUs hold. Each slot is pinned to
    its node, so a node that leaves takes only its own slots with it, and one that joins gets its
    own. On a cluster (on_cluster, or several nodes) a slot's name says its node: cpu0@1a2b3c."""
    nodes = alive_nodes()
    names = node_names(nodes)
    available = sum(int(n["Resources"].get("GPU", 0)) for n in nodes)
    if gpus is not None and len(gpus) > available:
        found = f"only {available} GPU(s)" if available else "no GPU"
        raise BadInput(f"--gpus {','.join(map(str, gpus))}: Ray found {found} on this machine")
    use_gpu = cpu_workers is None and available > 0
    several = on_cluster or len(nodes) > 1
    slots = []
    for node in nodes:
        resources = node["Resources"]
        count = int(resources.get("GPU", 0)) if use_gpu else cpu_workers_on(node, cpu_workers)
        for i in range(count):
            kind = "gpu" if use_gpu else "cpu"
            where = f"@{node['NodeID'][:6]}" if several else ""
            slots.append(Slot(f"{kind}{i}{where}", use_gpu=use_gpu, node_id=node["NodeID"],
                              host=names[node["NodeID"]]))
    return slots


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
    # GPTQMODEL_TORCH_EXTENSIONS_DIR: where the user keeps kernels; unset, each worker takes its own
    # machine's directory under QRUN_HOME (workers.warmup.kernels_dir), as `qrun warmup` does there.
    # QRUN_REHEARSAL: bench/first_job.py's choice of the kernels' rehearsal model (workers.warmup).
    for name in ("QRUN_DB", "QRUN_JOB_MEMORY_MB", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", FAKE_GPUS_ENV,
                 KERNELS_ENV, REHEARSAL_ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def create_worker(slot: Slot, db_url: str, lease_s: float, threads: int = 1, home_token: str | None = None):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    resources = {"num_gpus": slot.gpus} if slot.use_gpu else {"num_cpus": 1}
    if slot.node_id:
        resources["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slot.node_id, soft=False)
    actor_class = ray.remote(QueueWorker)
    # The environment travels as an argument, not as a runtime_env: a runtime_env makes Ray start a
    # fresh process for the actor (~1 s) where it could take one of the workers it prestarted.
    return actor_class.options(
        **resources,
        max_restarts=MAX_ACTOR_RESTARTS,
        max_concurrency=2,  # one thread drains, the other can take request_stop
    ).remote(db_url, slot.name, slot.use_gpu, lease_s, worker_env(threads), home_token, slot.gpus)


@dataclass
class RunSummary:
    outcomes: list[tuple[int, str]]  # (job id, the status an attempt ended in), one per attempt
    restarts: int
    interrupted: bool
    given_back: set[int] = field(default_factory=set)  # jobs the runner took back from a dead worker
    workers: set[str] = field(default_factory=set)  # every worker's name in the table, restarted ones too

    def jobs_touched(self) -> list[int]:
        """Every job a worker of this run ran, whatever ended it (its own outcome, or the runner's or a
        lease's verdict after its worker died), in order."""
        return sorted({job_id for job_id, _ in self.outcomes} | self.given_back)


class Supervisor:
    """Keeps one draining worker per slot for as long as `qrun run` runs.

    Nothing a worker meets ends the run: a worker process that dies is restarted by Ray (and replaced
    by a fresh actor once Ray's restarts for it are spent), the job it held is given back at once
    with the cause, and a drain that fails on a bug is started again after a pause. Every few
    seconds the slots are planned again from the cluster's live nodes: a node that left takes its
    workers along (their jobs are given back), a node that joined (or came back) gets workers. A
    worker that cannot start (it does not see QRUN_HOME) is left out, with its reason, and so is one
    that Ray cannot place (its node's CPUs or GPUs are held by others): said after PLACEMENT_S. What
    workers report (`take_notices`) is passed to `say`, so the run's output tells about database outages.
    """

    REPLAN_S = 5.0
    PLACEMENT_S = 10.0  # a worker Ray has not placed by then, for want of free CPUs or GPUs, is left out
    START_S = 300.0  # one placed but not up by then (its process does not start) is left out too

    def __init__(self, db, plan: Callable[[], list[Slot]], burst: bool, lease_s: float,
                 say: Callable[[str], None], home_token: str | None = None):
        self.db, self.plan, self.burst, self.lease_s, self.say = db, plan, burst, lease_s, say
        self.home_token = home_token
        self.actors: dict[Slot, object] = {}
        self.identities: dict[Slot, object] = {}  # identity() calls not yet answered
        self.names: dict[Slot, str] = {}  # each live worker's name in the table (host:pid:slot)
        self.draining: dict[object, Slot] = {}
        self.notices: dict[Slot, object] = {}
        self.backoffs: dict[Slot, Backoff] = {}  # failed drains in a row, per slot, and the pause they earn
        self.resume_at: dict[Slot, float] = {}  # slots that wait out a pause before draining again
        self.started: set[Slot] = set()  # slots whose worker came up at least once
        self.refused: dict[Slot, str] = {}  # slots whose worker could not start, and why
        self.multi: dict[Slot, list[Slot]] = {}  # a worker of several GPUs -> the one-GPU slots it replaces
        self.lent: dict[Slot, Slot] = {}  # one-GPU slot -> the worker of several GPUs it makes room for
        self.told: set[int] = set()  # jobs already said to need more GPUs than any node has
        self.passable: set[int] = set()  # jobs of several GPUs placed already: one-GPU workers pass them
        self.outcomes: list[tuple[int, str]] = []
        self.given_back: set[int] = set()
        self.ever_named: set[str] = set()  # every worker's name learnt, those that died since too
        self.drained: set[Slot] = set()  # workers whose drain ended with the queue drained for them
        self.added_at: dict[Slot, float] = {}
        self.restarts = 0
        self.stopping = False
        slots = plan()
        self.threads = threads_per_worker(len(slots))
        for slot in slots:
            self._add(slot)
        self.planned_at = time.monotonic()

    def _add(self, slot: Slot, drain: bool = True) -> None:
        self.actors[slot] = create_worker(slot, self.db.url, self.lease_s, self.threads, self.home_token)
        self.added_at[slot] = time.monotonic()
        self.identities[slot] = self.actors[slot].identity.remote()
        self.backoffs.setdefault(slot, Backoff())
        if drain:
            self._start_drain(slot)

    def _start_drain(self, slot: Slot) -> None:
        self.draining[self.actors[slot].drain.remote(self.burst, slot.gpus > 1, tuple(self.passable))] = slot

    def _drop(self, slot: Slot) -> None:
        import ray

        self.resume_at.pop(slot, None)
        self.identities.pop(slot, None)
        self.notices.pop(slot, None)
        self.added_at.pop(slot, None)
        for ref in [ref for ref, drained in self.draining.items() if drained == slot]:
            del self.draining[ref]  # a killed actor's drain ends in an error nobody needs to read
        actor = self.actors.pop(slot, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)

    @property
    def busy(self) -> bool:
        return bool(self.draining or self.resume_at)

    def wait(self, timeout_s: float) -> None:
        """Collect the drains that ended within timeout_s; restart what must go on."""
        import ray

        if self.draining:
            done, _ = ray.wait(list(self.draining), num_returns=1, timeout=timeout_s)
        else:
            done = []
            time.sleep(timeout_s)
        for ref in done:
            self._drain_ended(self.draining.pop(ref), ref)
        if not self.stopping and time.monotonic() - self.planned_at >= self.REPLAN_S:
            self._replan()
        if not self.stopping:
            self._make_room_for_a_multi_gpu_job()
        now = time.monotonic()
        for slot, at in list(self.resume_at.items()):
            if at <= now and not self.stopping:
                del self.resume_at[slot]
                self._start_drain(slot)
        self._learn_names()
        self._relay_notices()
        if not self.stopping:
            self._leave_out_unplaced()
            self._end_a_drained_burst()
        if not self.actors and self.refused:
            raise BadInput(f"no worker could start: {next(iter(self.refused.values()))}")

    # ------------------------------------------------------------ placement, checked

    def _leave_out_unplaced(self) -> None:
        """A worker Ray cannot place (its node's CPUs or GPUs are held: another run, another user's
        tasks) would wait forever, and the run with it: said, and left out of the run."""
        now = time.monotonic()
        for slot, added in list(self.added_at.items()):
            if slot in self.started or slot not in self.actors or now - added < self.PLACEMENT_S:
                continue
            why = self._why_not_placed(slot, now - added)
            if why:
                reason = f"worker {slot.name} left out: {why}"
                self.say(reason)
                self.refused[slot] = reason
                self._drop(slot)

    def _why_not_placed(self, slot: Slot, waited_s: float) -> str | None:
        """Why the worker of `slot` is not up after `waited_s`, where that is for good; None while
        it may yet come (placed, its process starting)."""
        placed, free = _placement_of(self.actors[slot], slot.node_id, "GPU" if slot.use_gpu else "CPU")
        if placed is False and free is not None and free < slot.gpus:  # a CPU worker's slot.gpus is 1, its CPUs
            need = f"{slot.gpus} GPU(s)" if slot.use_gpu else "1 CPU"
            return (f"Ray cannot place it on node {slot.host or slot.node_id} in {waited_s:.0f} s: it needs {need}, "
                    f"and {free} of its {'GPUs' if slot.use_gpu else 'CPUs'} are free (another run or task holds "
                    "them)")
        if waited_s >= self.START_S:
            return f"it did not start in {waited_s:.0f} s"
        return None

    def _end_a_drained_burst(self) -> None:
        """Once every worker that came up has drained the queue, a burst run is over: workers that
        never came up (not placed yet, still starting) are not waited for. Not while GPUs change
        hands for a job that needs several (the worker that takes them is new)."""
        if not self.burst or not self.drained or self.resume_at or self.multi or self.lent:
            return
        waiting = set(self.draining.values())
        if waiting and not waiting & self.started:
            for slot in waiting:
                self.say(f"worker {slot.name} never started; the queue is drained without it")
                self._drop(slot)

    def unstarted_unplaced(self) -> list[Slot]:
        """The workers that have not come up and that Ray has not placed (nothing to stop there)."""
        return [slot for slot in list(self.actors) if slot not in self.started
                and _placement_of(self.actors[slot], slot.node_id, "CPU")[0] is False]

    def _replan(self) -> None:
        """Follow the cluster: slots of nodes that left go, slots of nodes that joined come."""
        self.planned_at = time.monotonic()
        try:
            planned = set(self.plan())
        except Exception as exc:  # noqa: BLE001 -- Ray's view of the cluster is briefly unavailable
            self.say(f"cannot list the cluster's nodes now ({_first_sentence(str(exc))})")
            return
        for slot in list(self.actors):
            parts = self.multi.get(slot, [slot])
            if not all(part in planned for part in parts):
                self.say(f"worker {slot.name}: its node {slot.host} left the cluster")
                self._give_back_jobs_of(slot, f"worker {slot.name} lost with its node")
                self._drop(slot)
        if self.burst and not self.draining and not self.resume_at:
            return  # a drained burst run is over; new nodes are not waited for
        for slot in planned - set(self.actors) - set(self.refused) - set(self.lent):
            self.say(f"worker {slot.name}: a node joined the cluster: {slot.host}")
            self._add(slot)

    def _drain_ended(self, slot: Slot, ref) -> None:
        import ray
        from ray.exceptions import RayActorError

        if slot not in self.actors:
            return  # dropped with its node
        if slot.node_id and not self._node_alive(slot.node_id):
            self.say(f"worker {slot.name}: its node {slot.host} left the cluster")
            self._give_back_jobs_of(slot, f"worker {slot.name} lost with its node")
            self._drop(slot)
            return
        try:
            self.outcomes.extend(ray.get(ref))
            self.backoffs[slot].reset()
            if slot in self.lent or slot in self.multi:
                self._room_changed(slot)
            else:
                self.drained.add(slot)
            return
        except RayActorError as exc:
            if slot not in self.started and "creation task" in str(exc):
                reason = f"worker {slot.name} could not start: {_creation_error(exc)}"
                self.say(reason)
                self._drop(slot)
                if _is_passing(reason):  # the job table out of reach (locked, restarting): try again later
                    self._add(slot, drain=False)
                    self.resume_at[slot] = time.monotonic() + self.backoffs[slot].next_wait()
                    return
                # Its constructor failed for good (it does not see QRUN_HOME, a GPU worker that sees two GPUs).
                self.refused[slot] = reason
                return
            # The worker process died (OOM kill, segfault, its node went down): Ray restarts it, and
            # its job goes back to the queue now, with the cause, instead of after the lease as "lost".
            # Ray knows only that the process is gone (its words: "Socket closed", "unavailable");
            # the kernel's reason is not ours to read, so say what it can be.
            self.restarts += 1
            cause = "its process ended unexpectedly (killed, out of host memory, or crashed)"
            self.say(f"worker {slot.name}{f' (node {slot.host})' if slot.host else ''} died: {cause}; Ray restarts it")
            self._give_back_jobs_of(slot, f"worker {slot.name} died while running it: {cause}")
        except Exception as exc:  # noqa: BLE001 -- a bug in the worker's loop: say it, start it again
            self.say(f"worker {slot.name} stopped on an error: {_first_sentence(str(exc))}")
        if self.stopping:
            return
        if slot in self.lent or slot in self.multi:
            self._room_changed(slot)
            return
        backoff = self.backoffs[slot]
        pause_s = backoff.next_wait()
        if backoff.failures > MAX_ACTOR_RESTARTS:  # Ray's restarts are spent: a fresh actor
            self._drop(slot)
            self._add(slot, drain=False)  # it drains once the pause below is over
            backoff.reset()
            pause_s = backoff.next_wait()
        self.resume_at[slot] = time.monotonic() + pause_s

    # ------------------------------------------------------------ jobs that need several GPUs
    #
    # Policy: when the most urgent ready job (priority, then submission order) needs N GPUs of one
    # node, the first node with N one-GPU workers lends N of them: they finish the job in hand, take
    # no other, and give way to one worker holding the N GPUs, which runs every ready job that needs
    # several GPUs (up to N) and then gives the GPUs back. One-GPU jobs submitted after the big one
    # cannot overtake it there, so a stream of them never starves it; the other workers go on.
    # Until the runner has placed such a job, one-GPU workers take nothing (db.queue.claim_job's
    # `passable`): a worker that finishes a job in the meantime must not take a later one instead.
    # Once placed (room made, or no node has room: said once) it is passed by all but the lent ones.

    def _make_room_for_a_multi_gpu_job(self) -> None:
        try:
            head = queue.most_urgent_ready_job(self.db)
        except Exception:  # noqa: BLE001 -- the table is out of reach: workers say so already
            return
        if head is None or head[1] <= 1:
            return
        job_id, need = head
        if self.multi:  # one at a time: it waits for the big worker to end (or is taken by it)
            self._let_pass(job_id)
            return
        by_node: dict[str, list[Slot]] = {}
        for slot in self.actors:
            if slot.use_gpu and slot.gpus == 1 and slot.node_id:
                by_node.setdefault(slot.node_id, []).append(slot)
        node = next((n for n, slots in by_node.items() if len(slots) >= need), None)
        if node is None:
            if job_id not in self.told:
                self.told.add(job_id)
                self.say(f"job {job_id} needs {need} GPUs of one node and no node here has that many: it waits")
            self._let_pass(job_id)
            return
        parts = sorted(by_node[node], key=lambda s: s.name)[:need]
        on_cluster = "@" in parts[0].name
        big = Slot("+".join(p.name.split("@")[0] for p in parts) + (f"@{node[:6]}" if on_cluster else ""),
                   use_gpu=True, node_id=node, gpus=need, host=parts[0].host)
        self.multi[big] = parts
        self.say(f"job {job_id} needs {need} GPUs: workers {', '.join(p.name for p in parts)} finish their "
                 f"jobs, then make way for {big.name}")
        draining = set(self.draining.values())
        for part in parts:
            self.lent[part] = big
            if part in draining:
                self.actors[part].yield_after_job.remote()
            else:  # paused after a failure: nothing to finish
                self._room_changed(part)
        self._let_pass(job_id, lent=parts)

    def _let_pass(self, job_id: int, lent: list[Slot] = ()) -> None:
        """Tell the one-GPU workers (but the lent ones) that later jobs may overtake this one now."""
        if job_id in self.passable:
            return
        self.passable.add(job_id)
        for slot, actor in self.actors.items():
            if slot.use_gpu and slot.gpus == 1 and slot not in lent:  # those a multi-GPU job may borrow
                actor.may_pass.remote([job_id])

    def _room_changed(self, slot: Slot) -> None:
        """A lent one-GPU worker left (the big worker starts once all have), or the big one ended
        (its GPUs go back to one-GPU workers)."""
        if slot in self.multi:  # the big worker is done: no such job is ready any more
            parts = self.multi.pop(slot)  # a job it held was given back where its drain ended
            self._drop(slot)
            for part in parts:
                self.lent.pop(part, None)
                if not self.stopping and self._node_alive(part.node_id):
                    self._add(part)
            return
        big = self.lent[slot]
        self.names.pop(slot, None)
        self._drop(slot)
        if big not in self.actors and all(p not in self.actors for p in self.multi[big]):
            self._add(big)

    def _node_alive(self, node_id: str) -> bool:
        try:
            return any(n["NodeID"] == node_id for n in alive_nodes())
        except Exception:  # noqa: BLE001 -- not knowable now: assume it is, the next plan will tell
            return True

    def _learn_names(self) -> None:
        """Each worker's name in the table (host:pid:slot), as soon as its actor is up."""
        import ray

        for slot, ref in list(self.identities.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                del self.identities[slot]
                try:
                    self.names[slot] = ray.get(ref)["name"]
                    self.ever_named.add(self.names[slot])
                    self.started.add(slot)
                except Exception:  # noqa: BLE001 -- it died starting: its drain says why
                    pass

    def _give_back_jobs_of(self, slot: Slot, reason: str) -> None:
        name = self.names.pop(slot, None)
        if slot in self.actors:
            # The restarted process has another pid, hence another name: ask for it again.
            self.identities[slot] = self.actors[slot].identity.remote()
        if name is None:
            return

        def fail(job: int) -> None:
            queue.fail_job(self.db, job, name, reason, retryable=True)
            self.given_back.add(job)

        self._settle_jobs_of(name, fail)
        try:  # its row stops showing it as running at once, not after the 30 s of silence that mean lost
            queue.worker_stopped(self.db, name)
        except Exception:  # noqa: BLE001 -- a view: the silence will tell
            pass

    def _settle_jobs_of(self, name: str, settle: Callable[[int], None]) -> None:
        """settle(job) for each running job the worker `name` holds; the table out of reach is said, not
        raised: the jobs' lease gives them back instead."""
        try:
            for job in queue.jobs_held_by(self.db, name):
                settle(job)
        except Exception as exc:  # noqa: BLE001
            self.say(f"could not give back the jobs of {name} now ({_first_sentence(str(exc))}); "
                     "their lease will")

    def _relay_notices(self) -> None:
        import ray

        for slot in list(self.actors):
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
        """Ctrl-C once: workers finish their current layer and give their jobs back. One that Ray has
        not placed holds nothing: it goes now (it would take the stop only once placed)."""
        self.stopping = True
        self.resume_at.clear()
        for slot in self.unstarted_unplaced():
            self._drop(slot)
        for actor in self.actors.values():
            actor.request_stop.remote()

    def last_notices(self, wait_s: float = 2.0) -> None:
        """Relay what the workers said last: a drain that just ended (the table gone, say) told why
        in a notice that the run's loop, over with it, would not read."""
        import ray

        asked = {slot: self.notices.get(slot) or actor.take_notices.remote() for slot, actor in self.actors.items()}
        self.notices.clear()
        for _ in range(2):  # the calls made before the drains ended, then one more each
            if not asked:
                return
            ray.wait(list(asked.values()), num_returns=len(asked), timeout=wait_s)
            for slot, ref in asked.items():
                try:
                    for line in ray.get(ref, timeout=0):
                        self.say(line)
                except Exception:  # noqa: BLE001 -- gone, or not answering: nothing more to tell
                    pass
            asked = {slot: actor.take_notices.remote() for slot, actor in self.actors.items()}

    def stop_cold(self, reason: str = "the runner was stopped (Ctrl-C twice)") -> None:
        """Ctrl-C twice (or a warm stop past its grace): kill the workers now, then give their jobs back
        (without counting the attempt, as a warm stop would), so that none waits out its lease and comes
        back as "lost". `reason`: the release's, in each job's history."""
        import ray

        if self.identities:  # a worker that started a moment ago: its name is what its jobs are held by
            ray.wait(list(self.identities.values()), num_returns=len(self.identities), timeout=2)
            self._learn_names()
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        for name in self.names.values():
            self._settle_jobs_of(name, lambda job, name=name: queue.release_job(self.db, job, name, reason))


def _placement_of(actor, node_id: str | None, resource: str) -> tuple[bool | None, int | None]:
    """(whether Ray has given the actor a process yet, how much of `resource` its node has free), from
    Ray's own tables (its state API needs the dashboard, which a run does not start); None for what
    cannot be known now, or where Ray's internals used here have moved."""
    try:
        from ray._private import state

        info = state.actors(actor._actor_id.hex()) or {}
        placed = bool(info.get("Pid")) or info.get("State") not in ("PENDING_CREATION", "DEPENDENCIES_UNREADY")
        free = state.available_resources_per_node().get(node_id, {}).get(resource, 0) if node_id else None
    except Exception:  # noqa: BLE001
        return None, None
    return placed, None if free is None else int(free)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Words of a worker that could not start because the job table was out of reach for a while.
PASSING_CAUSES = ("database is locked", "database unavailable", "disk i/o error", "unable to open database file",
                  "cannot be reached", "connection refused", "the database system is starting up")


def _creation_error(exc: BaseException) -> str:
    """The worker constructor's own error, out of Ray's report of a failed creation task (whose
    exception names may be module-qualified: qrun.db.errors.BadInput)."""
    lines = [ANSI_ESCAPE.sub("", line).strip() for line in str(exc).splitlines()]
    raised = [line for line in lines if line and not line.startswith(("File ", "Traceback", "^", "~"))
              and ":" in line and all(part.isidentifier() for part in line.split(":")[0].split("."))]
    return (raised[-1] if raised else _first_sentence(ANSI_ESCAPE.sub("", str(exc))))[:300]


def _is_passing(reason: str) -> bool:
    return any(cause in reason.lower() for cause in PASSING_CAUSES)


def _first_sentence(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no reason given"
    return line[:300]


def run_queue(db, plan: Callable[[], list[Slot]], burst: bool, lease_s: float = queue.DEFAULT_LEASE_S,
              on_tick: Callable[[], None] | None = None, tick_s: float = 1.0,
              say: Callable[[str], None] = print, home_token: str | None = None,
              grace_s: float = STOP_GRACE_S) -> RunSummary:
    """Drain the queue with one actor per planned slot. Ctrl-C (or SIGTERM): warm stop (release jobs);
    twice, or once and `grace_s` later with workers still busy: cold stop (kill them, release jobs)."""
    supervisor = Supervisor(db, plan, burst, lease_s, say, home_token)
    interrupts = 0
    cold_at = float("inf")
    previous_handler = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops as warmly as Ctrl-C
    try:
        while supervisor.busy:
            try:
                if time.monotonic() >= cold_at:
                    say(f"workers did not give their jobs back within {grace_s:g} s: stopping them now")
                    supervisor.stop_cold(f"the runner was stopped (its workers did not stop within {grace_s:g} s)")
                    break
                supervisor.wait(min(tick_s, max(0.0, cold_at - time.monotonic())))
                if on_tick:
                    on_tick()
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    cold_at = time.monotonic() + grace_s
                    supervisor.stop_warm()
                else:
                    supervisor.stop_cold()
                    break
        if interrupts < 2 and time.monotonic() < cold_at:
            supervisor.last_notices()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return RunSummary(outcomes=supervisor.outcomes, restarts=supervisor.restarts, interrupted=interrupts > 0,
                      given_back=supervisor.given_back, workers=supervisor.ever_named)
