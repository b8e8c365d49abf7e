"""Kernels built before the jobs that use them run, so that no job's time includes a one-time build.

GPTQModel compiles its kernels on first use and caches them (~/.cache/gptqmodel, behind a lock
shared by every process of the machine): on a fresh H100 machine `gptq_cuda` took 21 s inside the
first quantize job and each Marlin kernel ~2 min inside the first GPTQ eval; on a CPU, the AVX-512
int4 kernel ~45 s. `qrun warmup` builds them all ahead of time for an admin. A worker starts
building (or, once cached, just loading) them as it sees its first ready job, in the background at
the lowest CPU priority, and before it takes a job waits only for the kernels that job uses: a GPTQ
quantize job starts once `gptq_cuda` is ready (~25 s on a fresh machine) rather than after every
kernel (~7 min for the four), and a GPTQ eval once Marlin is.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def kernel_cache_dir(name: str) -> Path:
    """Where GPTQModel keeps CPU kernel `name` (gptqmodel.utils.cpp.default_torch_ops_build_root)."""
    override = os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR")
    root = Path(override).expanduser() if override else Path.home() / ".cache" / "gptqmodel" / "torch_extensions"
    return root / name


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


def build_kernels(device: str, names: tuple[str, ...] | list[str] | None = None) -> list[tuple[str, float, bool, str]]:
    """The kernels the device's jobs use (or `names`), built at once (each compiles in processes of its
    own): (name, seconds, usable, why not). A kernel that cannot be built is reported, not raised: the
    job that needs it then fails with the library's own error, or GPTQModel picks another kernel."""

    names = tuple(names) if names is not None else kernels_for(device)
    if not names:
        return []  # nothing to build: not even GPTQModel's import (seconds) is paid here
    import gptqmodel  # noqa: F401 -- its import (seconds) is no build: keep it out of the timings
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return list(pool.map(_timed_build, names))


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


def kernels_a_job_uses(kind: str, params: dict, model_dir: str, upstream_params: dict | None,
                       device: str) -> tuple[str, ...]:
    """The kernels a job will load on `device`: a GPTQ quantize job gptq_cuda, an AWQ one awq, an eval
    of a GPTQ-format (gptq, rtn) or AWQ checkpoint Marlin (its dtype is the artifact's: both are
    waited for). On a CPU, every CPU kernel (the packer serves every quantize job)."""
    if not device.startswith("cuda"):
        return tuple(CPU_KERNELS)
    if kind == "quantize":
        return {"gptq": ("gptq_cuda",), "awq": ("awq",)}.get(params.get("method") or "gptq", ())
    if upstream_params is not None:  # the eval of a quantize job's artifact
        method = upstream_params.get("method") or "gptq"
    else:  # the eval of a model on disk: a GPTQModel checkpoint names its method
        try:
            config = json.loads((Path(model_dir) / "quantize_config.json").read_text())
        except (OSError, ValueError):
            return ()
        method = str(config.get("quant_method") or config.get("method") or "gptq").lower()
    return MARLIN if method in ("gptq", "rtn", "awq") else ()


def _lowest_priority_for_this_thread() -> None:
    """Linux keeps a nice value per thread, and the compilers this thread starts inherit it: the
    builds then take only the CPU that running jobs leave."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class BackgroundBuilds:
    """The kernels built one after another in a thread of their own, at the lowest CPU priority.
    wait() returns once the named ones are built (or failed: the job then says why itself)."""

    def __init__(self, names: tuple[str, ...] | list[str]):
        self.names = tuple(names)
        self.results: list[tuple[str, float, bool, str]] = []
        # GPTQModel's import comes first, and every wait waits for it: a job importing the same
        # modules from another thread at the same time could meet Python's import-deadlock error.
        self._steps = {name: threading.Event() for name in ("import", *self.names)}
        self._thread = threading.Thread(target=self._run, name="qrun-kernel-builds", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _lowest_priority_for_this_thread()
        try:
            if self.names:
                import gptqmodel  # noqa: F401 -- its import (seconds) is no build: kept out of the timings
            self._steps["import"].set()
            for name in self.names:
                self.results.append(_timed_build(name))
                self._steps[name].set()
        except Exception as exc:  # noqa: BLE001 -- GPTQModel itself did not import: the jobs will say so
            why = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            self.results = [(name, 0.0, False, why) for name in self.names]
        finally:
            for event in self._steps.values():
                event.set()

    def wait(self, names, stop: threading.Event | None = None) -> None:
        """Wait for GPTQModel's import and those of `names` this builds; return early once `stop` is set."""
        for name in ("import", *names):
            event = self._steps.get(name)
            while event is not None and not event.wait(0.5):
                if stop is not None and stop.is_set():
                    return

    def finished(self) -> bool:
        return all(event.is_set() for event in self._steps.values())
