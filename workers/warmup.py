"""Kernels built before any job runs, so that no job's time includes a one-time build.

GPTQModel compiles its kernels on first use and caches them (~/.cache/gptqmodel, behind a lock
shared by every process of the machine): on a fresh H100 machine `gptq_cuda` took 21 s inside the
first quantize job and each Marlin kernel ~2 min inside the first GPTQ eval; on a CPU, the AVX-512
int4 kernel ~45 s. A worker builds (or, once cached, just loads) them before its first job, and
`qrun warmup` does it ahead of time for an admin.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

# What quantize and eval jobs load on each kind of device (GPTQModel 7.7).
GPU_KERNELS = ("gptq_cuda", "marlin_fp16", "marlin_bf16")
CPU_KERNELS = ("int4_qzero_group_scaled_cpu",)


def kernels_for(device: str) -> tuple[str, ...]:
    return GPU_KERNELS if device.startswith("cuda") else CPU_KERNELS


def build_kernel(name: str) -> tuple[bool, str]:
    """Build (or load from the cache) one kernel: (usable, why not)."""
    if name == "gptq_cuda":  # the GPTQ block update, not managed by gptqmodel.extension
        from gptqmodel.quantization.gptq_cuda import block_update_available

        return (True, "") if block_update_available() else (False, "could not be compiled")
    from gptqmodel import extension

    if extension.is_available(name):
        return True, ""
    return False, (extension.error(name) or "not supported here").strip().splitlines()[0][:200]


def build_kernels(device: str) -> list[tuple[str, float, bool, str]]:
    """Every kernel the device's jobs use, built at once (each compiles in processes of its own):
    (name, seconds, usable, why not). A kernel that cannot be built is reported, not raised: the job
    that needs it then fails with the library's own error, or GPTQModel picks another kernel."""

    def timed(name: str):
        started = time.perf_counter()
        try:
            ok, why = build_kernel(name)
        except Exception as exc:  # noqa: BLE001 -- a build failure is information, not a crash
            ok, why = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return name, time.perf_counter() - started, ok, why

    import gptqmodel  # noqa: F401 -- its import (seconds) is no build: keep it out of the timings

    names = kernels_for(device)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return list(pool.map(timed, names))


def was_built(results: list[tuple[str, float, bool, str]]) -> bool:
    """Whether anything was compiled now (a cached kernel loads in well under a second)."""
    return any(seconds >= 1.0 or not ok for _, seconds, ok, _ in results)


def describe(results: list[tuple[str, float, bool, str]]) -> str:
    """One line: 'GPTQModel's kernels ready (built once per machine): int4_qzero_group_scaled_cpu 41 s'
    (and which are unusable here, why: GPTQModel then picks another kernel or the job says so)."""
    parts = [f"{name} {seconds:.0f} s" + ("" if ok else f" (unusable: {why})") for name, seconds, ok, why in results]
    return "GPTQModel's kernels ready (built once per machine): " + ", ".join(parts)
