"""Kernels built before the jobs that use them run, so that no job's time includes a one-time build.

GPTQModel compiles its kernels on first use and caches them (in GPTQMODEL_TORCH_EXTENSIONS_DIR, behind
a lock shared by every process of the machine; qrun points it at one directory per machine under
QRUN_HOME, shared by every user's workers and `qrun warmup`, so a kernel is built once per machine):
on a fresh H100 machine `gptq_cuda` took 21 s inside the first quantize job and each Marlin kernel ~2 min inside the first GPTQ eval; on a CPU, the AVX-512
int4 kernel ~45 s. `qrun warmup` builds them all ahead of time for an admin. A worker builds (or,
once cached, just loads) a kernel when the job it is about to claim uses it, in a thread at the
lowest CPU priority, and claims the job once it is ready: a GPTQ quantize job waits for `gptq_cuda`
(~25 s on a fresh machine), a GPTQ eval for the Marlin kernel of its dtype (~2 min), and nothing is
built that no job uses, nor beside a running job (KernelBuilds says why).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qrun.db.errors import BadInput
from qrun.db.session import GROUP_UMASK, ensure_home, qrun_home
from qrun.db.states import Kind
from qrun.workers import methods
from qrun.workers.params import EvalParams, QuantizeParams

log = logging.getLogger(__name__)

# What quantize and eval jobs load on each kind of device (GPTQModel 7.7). On a CPU: the packer every
# quantize job uses, and the int4 kernel used where the CPU has AVX512-BF16 (name -> CPU flag needed);
# left to the jobs, the demo's first 4-bit job showed the build (29.5 s against 3.5 s for 8 bits).
# The same int4 kernel serves AWQ checkpoints on a CPU. On a GPU, an AWQ quantize job packs with the
# AWQ GEMM extension ("awq") and its eval loads Marlin (built here anyway). The other methods build
# nothing: rtn is GPTQ's path, fp8 (one scale per row) dequantizes in plain torch, gguf is written in
# numpy and read back by transformers, bnb-nf4 uses bitsandbytes' prebuilt kernels.
# GPU_KERNELS is also the order a worker builds them in: what the commonest jobs need first.
GPU_KERNELS = ("gptq_cuda", "marlin_bf16", "marlin_fp16", "awq")
MARLIN = ("marlin_bf16", "marlin_fp16")
CPU_KERNELS = {"pack_block_cpu": None, "int4_qzero_group_scaled_cpu": "avx512_bf16"}


def kernels_for(device: str) -> tuple[str, ...]:
    return GPU_KERNELS if device.startswith("cuda") else tuple(CPU_KERNELS)


KERNELS_ENV = "GPTQMODEL_TORCH_EXTENSIONS_DIR"  # GPTQModel's own setting: where it builds and finds kernels


def kernels_dir() -> Path:
    """Where this machine's kernels are built: KERNELS_ENV where the user set it, else
    $QRUN_HOME/kernels/<host>, group-writable like the rest of QRUN_HOME, so that every user's
    workers and `qrun warmup` build each kernel once per machine (one directory per host: nodes that
    share QRUN_HOME may differ in GPUs and CPU features)."""
    override = os.environ.get(KERNELS_ENV)
    if override:
        return Path(override).expanduser()
    root = ensure_home(qrun_home() / "kernels")
    return ensure_home(root / socket.gethostname())


def kernel_cache_dir(name: str) -> Path:
    """Where GPTQModel keeps kernel `name` (gptqmodel.utils.cpp.default_torch_ops_build_root)."""
    return kernels_dir() / name


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def cpu_kernels_to_build() -> list[str]:
    """The CPU kernels this machine can use and GPTQModel has not built yet. Checked on disk, without
    importing GPTQModel (10 s on a busy 2-core box): a later run costs nothing."""
    flags = _cpu_flags()
    return [name for name, flag in CPU_KERNELS.items()
            if (flag is None or flag in flags) and not any(kernel_cache_dir(name).glob("*/*.so"))]


def build_kernel(name: str) -> tuple[bool, str]:
    """Build (or load from the cache) one kernel: (usable, why not)."""
    if name == "gptq_cuda":  # the GPTQ block update, not managed by gptqmodel.extension
        from gptqmodel.quantization.gptq_cuda import block_update_available

        return (True, "") if block_update_available() else (False, "could not be compiled")
    from gptqmodel import extension

    if extension.is_available(name):
        return True, ""
    return False, (extension.error(name) or "not supported here").strip().splitlines()[0][:200]


def check_device(device: str) -> None:
    """BadInput where `device` is a GPU's and torch sees none here: every GPU kernel would be
    "unusable", and a machine without a GPU is not made ready for GPU jobs by building nothing."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise BadInput(f"--device {device}: torch sees no CUDA GPU on this machine (torch {torch.__version__}, "
                       f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): run it on a GPU machine, "
                       "or give --device cpu")


BUILT = "qrun-kernel-built: "  # the line a build's process ends with: its result as JSON


def build_kernels(device: str, names: tuple[str, ...] | list[str] | None = None) -> list[tuple[str, float, bool, str]]:
    """The kernels the device's jobs use (or `names`), built at once, each in a process of its own,
    into the machine's kernel directory: (name, seconds, usable, why not). A kernel that cannot be
    built is reported, not raised: the job that needs it then fails with the library's own error, or
    GPTQModel picks another kernel. Ctrl-C stops every build at once (their processes, compilers
    included, are killed: GPTQModel's build lock is released with its holder)."""
    check_device(device)
    names = tuple(names) if names is not None else kernels_for(device)
    if not names:
        return []  # nothing to build: not even GPTQModel's import (seconds) is paid here
    env = {**os.environ, KERNELS_ENV: str(kernels_dir())}
    builds = [_start_build(name, env) for name in names]
    try:
        return [_build_result(name, build) for name, build in zip(names, builds)]
    except BaseException:  # Ctrl-C (KeyboardInterrupt), or anything else: no build goes on without us
        for build in builds:
            _stop_build(build)
        raise


def _start_build(name: str, env: dict[str, str]) -> subprocess.Popen:
    """A process of its own session that builds `name`: its compilers are its process group's, so
    that they can be stopped together (a terminal's Ctrl-C does not reach them: build_kernels stops them)."""
    code = f"from qrun.workers.warmup import build_here; build_here({name!r})"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


def _build_result(name: str, build: subprocess.Popen) -> tuple[str, float, bool, str]:
    out, _ = build.communicate()
    said = [line[len(BUILT):] for line in out.splitlines() if line.startswith(BUILT)]
    if said:
        built = json.loads(said[-1])
        return name, float(built[1]), bool(built[2]), str(built[3])
    return name, 0.0, False, f"its build process ended with exit status {build.returncode}"


def _stop_build(build: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if build.poll() is not None:
            return
        try:
            os.killpg(build.pid, sig)
        except ProcessLookupError:
            return
        try:
            build.wait(timeout=1)
        except subprocess.TimeoutExpired:
            continue


def build_here(name: str) -> None:
    """A build's process (build_kernels): GPTQModel's import, then the timed build, its result on
    stdout. What it builds is the group's (the kernel directory is shared by every user)."""
    os.umask(GROUP_UMASK)
    import gptqmodel  # noqa: F401 -- its import (seconds) is no build: keep it out of the timings

    print(BUILT + json.dumps(_timed_build(name)), flush=True)


def _timed_build(name: str) -> tuple[str, float, bool, str]:
    started = time.perf_counter()
    try:
        ok, why = build_kernel(name)
    except Exception as exc:  # noqa: BLE001 -- a build failure is information, not a crash
        ok, why = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return name, time.perf_counter() - started, ok, why


def was_built(results: list[tuple[str, float, bool, str]]) -> bool:
    """Whether anything was compiled now (a cached kernel loads in well under a second)."""
    return any(seconds >= 1.0 or not ok for _, seconds, ok, _ in results)


def describe(results: list[tuple[str, float, bool, str]]) -> str:
    """One line: 'GPTQModel's kernels ready (built once per machine): int4_qzero_group_scaled_cpu 41 s'
    (and which are unusable here, why: GPTQModel then picks another kernel or the job says so)."""
    parts = [f"{name} {seconds:.0f} s" + ("" if ok else f" (unusable: {why})") for name, seconds, ok, why in results]
    return "GPTQModel's kernels ready (built once per machine): " + ", ".join(parts)


def kernels_a_job_uses(kind: str, params: dict, model_dir: Path | str | None, device: str) -> tuple[str, ...]:
    """The kernels a job will load on `device`: a GPTQ quantize job gptq_cuda, an AWQ one awq, an eval
    the Marlin kernel of the dtype its checkpoint loads in, where it loads with Marlin (`model_dir`:
    the directory the eval reads, its upstream job's artifact included; None where that cannot be
    told, and the job then says why itself). On a CPU, every CPU kernel (the packer serves every
    quantize job)."""
    if not device.startswith("cuda"):
        return tuple(CPU_KERNELS)
    if kind == Kind.QUANTIZE.value:
        try:
            return methods.method_of(params).kernels
        except KeyError:  # a method this qrun does not know: its job says so itself
            return ()
    if model_dir is None:
        return ()
    from qrun.workers.evaluate import gptq_backend  # "marlin" only for a GPTQModel checkpoint Marlin reads
    from qrun.workers.inputs import config_dtype

    if gptq_backend(Path(model_dir), device) != "marlin":
        return ()
    # GPTQModel loads a checkpoint in the dtype its config names where that is float16, else in
    # bfloat16 (gptqmodel.utils.model.auto_dtype), and Marlin is compiled once per dtype.
    return ("marlin_fp16",) if config_dtype(model_dir) == "float16" else ("marlin_bf16",)


def _lowest_priority_for_this_thread() -> None:
    """Linux keeps a nice value per thread, and the compilers this thread starts inherit it: the
    builds then take only the CPU that running jobs leave."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class KernelBuilds:
    """GPTQModel's kernels, built (or loaded from the machine's cache) in a thread of their own at the
    lowest CPU priority, one at a time, each when the job a worker is about to claim needs it.

    Only on demand, never ahead: a build beside a running job slows it, whatever its priority (on an
    H200, the Marlin fp16 and AWQ builds that a worker used to start for every kernel made the quantize
    jobs beside them 1.5x slower: 27 s against 18 s), and a kernel no job of the queue uses is not
    worth minutes of 16 cores. The worker waits before it claims the job, so no job's time includes
    a build. The thread first imports GPTQModel, so that no job imports it from another thread at the
    same time (Python's import-deadlock error), and on a GPU worker, after each kernel, rehearses the
    first job that uses it on a one-layer copy of that job's model (REHEARSALS): once per kernel,
    so a later job of another model is not rehearsed."""

    def __init__(self, buildable: tuple[str, ...] | list[str], rehearse_on: str | None = None):
        self.buildable = tuple(buildable)  # what this worker may build: the rest is never waited for
        self.rehearse_on = rehearse_on  # a GPU worker's device: see REHEARSALS
        self.results: list[tuple[str, float, bool, str]] = []
        self.rehearsals: list[tuple[str, float, bool]] = []  # (kernel, seconds, ran through)
        self._told = 0  # results already reported (new_results)
        self._imported = threading.Event()
        self._import_error: str | None = None
        self._built: dict[str, threading.Event] = {}
        self._first_job: dict[str, JobShape | None] = {}  # the job that first asked for a kernel
        self._todo: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="qrun-kernel-builds", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _lowest_priority_for_this_thread()
        try:
            if self.buildable:
                import gptqmodel  # noqa: F401 -- its import (seconds) is no build: kept out of the timings
        except Exception as exc:  # noqa: BLE001 -- GPTQModel itself did not import: the jobs will say so
            self._import_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        finally:
            self._imported.set()
        while True:
            name = self._todo.get()
            why = self._import_error
            self.results.append((name, 0.0, False, why) if why else _timed_build(name))
            if self.rehearse_on is not None and not why and name in REHEARSALS:
                # what the job waiting for this kernel pays once per process
                self.rehearsals.append((name, *rehearse(name, self.rehearse_on, self._first_job.get(name))))
            self._built[name].set()

    def _request(self, names, job: JobShape | None) -> list[threading.Event]:
        with self._lock:
            for name in names:
                if name not in self._built:
                    self._built[name] = threading.Event()
                    self._first_job[name] = job
                    self._todo.put(name)
            return [self._built[name] for name in names]

    def waited_for(self, names) -> list[str]:
        """Those of `names` this worker builds and waits for (the others it never waits for)."""
        return [n for n in names if n in self.buildable]

    def wait(self, names, stop: threading.Event | None = None, job: JobShape | None = None,
             while_waiting: Callable[[], None] | None = None) -> None:
        """Build those of `names` this worker may build, after GPTQModel's import, and wait for them;
        return early once `stop` is set. `job`: the job that waits, whose shape a kernel's rehearsal
        copies (None: a tiny model's). `while_waiting` is called every half second meanwhile (a
        fresh machine's build takes minutes: the worker says it is alive and what it waits for)."""
        for event in [self._imported, *self._request(self.waited_for(names), job)]:
            while not event.wait(0.5):
                if stop is not None and stop.is_set():
                    return
                if while_waiting is not None:
                    while_waiting()

    def new_results(self) -> list[tuple[str, float, bool, str]]:
        """The builds finished since the last call (for the worker's notice)."""
        fresh = self.results[self._told:]
        self._told += len(fresh)
        return fresh


# What a process's first job of a kind pays once, besides the kernel: imports (the first quantize:
# Hugging Face `datasets` with pandas and pyarrow, and GPTQModel's looper, ~700 modules; the first
# GPTQ load: torch.compile's stack, ~500), GPTQModel's one-time set-ups (its linear-algebra pre-warm,
# its logging), and CUDA's lazy loading of each kernel and library handle (cuBLAS, cuSOLVER) at first
# use. On an H200 (bench/first_job.py) importing the modules first left the first quantize 1.21x the
# second (5.76 vs 4.76 s, spread over every GPTQModel stage) and the first GPTQ load 1.30x (0.96 vs
# 0.74 s). So a GPU worker's build thread rehearses, once per process and before the first job that
# needs the kernel is claimed, what that job does, with the same qrun functions: on a one-layer copy
# of that job's own model (JobShape), so that the matrix shapes, and so the cuBLAS, cuSOLVER and
# Marlin kernels CUDA loads lazily for each, are the job's; where that cannot be (remote code, pickle
# weights, a config without num_hidden_layers) on a one-layer random model of the commonest layout
# (Qwen2; bf16, as GPTQModel loads most checkpoints). On one H100 (BENCHMARKS, "At the job's own
# shape"), after the tiny rehearsal the first GPTQ load still took 1.22-1.40x the later ones; after
# the job's one-layer copy 0.97-1.09x, for 0.3-1.5 s more of rehearsal per kernel.
# kernel -> (job kind, method, dtype) of the tiny rehearsal: a quantize kernel's method quantizes it; a
# Marlin rehearsal quantizes it with the cheapest method Marlin loads (rtn: GPTQ's format, no
# calibration) to have something to load.
REHEARSALS = {
    **{kernel: (Kind.QUANTIZE.value, method.name, "bfloat16")
       for method in methods.METHODS.values() for kernel in method.kernels},
    "marlin_bf16": (Kind.EVAL.value, methods.rehearsal_method_for_marlin().name, "bfloat16"),
    "marlin_fp16": (Kind.EVAL.value, methods.rehearsal_method_for_marlin().name, "float16"),
}
# Marlin reads 4-bit group-128 weights whose in-features are a multiple of 128 and out-features of 64.
REHEARSAL_SHAPE = dict(hidden=256, intermediate=512, layers=1, heads=4, kv_heads=2)
# "tiny": rehearse on the tiny model even where the job's shape could be copied; "full": on the job's
# whole model (bench/first_job.py's comparisons).
REHEARSAL_ENV = "QRUN_REHEARSAL"


@dataclass(frozen=True)
class JobShape:
    """The job a kernel's rehearsal copies: its kind, its parameters, and the directory it reads (a
    quantize job's model, an eval's checkpoint)."""

    kind: str
    params: dict
    model_dir: str


def rehearse(kernel: str, device: str, job: JobShape | None = None) -> tuple[float, bool]:
    """Run what the first job that uses `kernel` runs on `device`: on a one-layer copy of `job`'s
    model where it can, else on a tiny model: (seconds, whether it ran through). A warm-up only: a
    failure is logged, and the job then pays (or fails on) it itself."""
    started = time.perf_counter()
    ok = True
    try:
        with tempfile.TemporaryDirectory(prefix="qrun-rehearsal-") as work:
            if _rehearse_job(job, device, Path(work)):
                on = f"a one-layer copy of {job.model_dir}"
            else:
                _rehearse_tiny(*REHEARSALS[kernel], device, Path(work))
                on = "a tiny model"
        log.info("rehearsed %s's first job on %s in %.1f s", kernel, on, time.perf_counter() - started)
    except Exception:  # noqa: BLE001
        ok = False
        log.warning("the rehearsal of %s's first job failed (that job pays its one-time costs itself)",
                    kernel, exc_info=True)
    finally:
        from qrun.workers.jobs import free_memory

        free_memory()
    return time.perf_counter() - started, ok


def one_layer_copy(model_dir: Path, out_dir: Path) -> Path | None:
    """A model directory that reads as `model_dir` cut to its first decoder layer: its files linked,
    pickle weights left out, and a config.json that says one layer (lists of one entry per layer cut
    to their first). None where it cannot be: no readable config.json, no safetensors weights, or a
    config without num_hidden_layers (a multimodal model's nests it). The loaders read layer 0's
    tensors and skip the others'."""
    from qrun.db.errors import BadInput
    from qrun.workers.inputs import PICKLE_SUFFIXES, read_model_config

    try:
        config = read_model_config(model_dir)
    except BadInput:  # no model there: the job itself says what is wrong
        return None
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1 or not any(model_dir.glob("*.safetensors")):
        return None
    out_dir.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.name != "config.json" and path.suffix not in PICKLE_SUFFIXES:
            (out_dir / path.name).symlink_to(path.resolve())
    for key, value in config.items():
        if isinstance(value, list) and len(value) == layers and layers > 1:
            config[key] = value[:1]  # e.g. Qwen2's layer_types
    config["num_hidden_layers"] = 1
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_dir


def _rehearse_job(job: JobShape | None, device: str, work: Path) -> bool:
    """The job itself on a one-layer copy of its model; False where there is none to make (the
    caller then rehearses on a tiny model). A job that runs remote code runs it only as itself."""
    mode = os.environ.get(REHEARSAL_ENV)
    if job is None or mode == "tiny" or job.params.get("trust_remote_code"):
        return False
    model = Path(job.model_dir) if mode == "full" else one_layer_copy(Path(job.model_dir), work / "model")
    if model is None:
        return False
    if job.kind == Kind.QUANTIZE.value:
        _quantize_rehearsal(QuantizeParams.from_dict(job.params), model, device, work)
    else:
        _eval_rehearsal(job.params, model, device)
    return True


def _quantize_rehearsal(params, model: Path, device: str, work: Path) -> Path:
    """qrun's quantize of a one-layer `model` with `params` (QuantizeParams): the directory written."""
    from qrun.workers.quantize import quantize_model

    quantized = work / "quantized"
    quantized.mkdir()
    quantize_model(params, str(model), quantized, device, 1, lambda *_: None, offload_dir=work / "offload")
    return quantized


def _eval_rehearsal(params: dict, model: Path, device: str) -> None:
    """The job's load, then its longest and shortest batches of each kind (classification, perplexity)."""
    from qrun.workers.evaluate import classify, load_model, perplexity, plan_eval

    eval_params = EvalParams.from_dict(params)
    loaded, tokenizer = load_model(model, device, False)
    plan = plan_eval(eval_params, loaded, tokenizer)
    plan.batches = _ends(plan.batches)
    plan.ppl_batches = _ends(plan.ppl_batches)
    if plan.batches:
        classify(plan, eval_params, loaded, tokenizer, device, lambda *_: None)
    if plan.ppl_batches:
        perplexity(plan, loaded, tokenizer, device, lambda *_: None)


def _ends(batches: list) -> list:
    """The first and the last of `batches`: the longest and the shortest, as the eval orders them.
    Not all: a one-layer model still computes the whole vocabulary's logits, most of an eval's time
    on a small model."""
    return batches if len(batches) <= 2 else [batches[0], batches[-1]]


def _rehearse_tiny(kind: str, method: str, dtype: str, device: str, work: Path) -> None:
    from qrun.workers.tiny import build_tiny_model, sample_texts

    model = build_tiny_model(work / "tiny", dtype=dtype, **REHEARSAL_SHAPE)
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in sample_texts()[:16]),
                     encoding="utf-8")
    params = QuantizeParams(bits=4, method=method, calib=str(calib), calib_samples=16, calib_max_len=64)
    quantized = _quantize_rehearsal(params, model, device, work)
    if kind == Kind.EVAL.value:
        import torch

        from qrun.workers.evaluate import load_model

        loaded, tokenizer = load_model(quantized, device, False)
        ids = tokenizer(sample_texts()[0], return_tensors="pt").input_ids.to(loaded.device)
        with torch.inference_mode():
            loaded(input_ids=ids)
