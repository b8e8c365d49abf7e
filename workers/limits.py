"""A cap on the host memory one job may take, so that a job too big for the machine fails on its own.

Without it, a quantization that outgrows host memory wakes the kernel's OOM killer, which may
take the worker (the job then comes back only after its lease) or a neighbour's process. With
QRUN_JOB_MEMORY_MB=N, the worker lowers its address-space limit (RLIMIT_AS) to what it maps at
the start of the job plus N MiB: an allocation past that fails at once with ENOMEM, torch raises,
and the job fails as "out of memory at layer i/N" like a job that filled its GPU.

CPU workers only: CUDA reserves address ranges far larger than any real use, so on a GPU worker
the cap is not applied (and the log says so).
"""

from __future__ import annotations

import os
import resource
from contextlib import contextmanager

from qrun.db.errors import BadInput

MEMORY_CAP_ENV = "QRUN_JOB_MEMORY_MB"


def job_memory_cap_mb() -> int | None:
    """The cap from the environment, in MiB; None when unset."""
    value = os.environ.get(MEMORY_CAP_ENV, "").strip()
    if not value:
        return None
    try:
        cap = int(value)
    except ValueError:
        raise BadInput(f"{MEMORY_CAP_ENV}={value!r} is not a number of MiB: set it like {MEMORY_CAP_ENV}=4096") from None
    if cap <= 0:
        raise BadInput(f"{MEMORY_CAP_ENV}={value!r} must be positive (or unset for no cap)")
    return cap


def mapped_bytes() -> int:
    """This process's address space now (VmSize)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def memory_cap(device: str):
    """Apply QRUN_JOB_MEMORY_MB for the duration of one job; lift it afterwards."""
    cap_mb = job_memory_cap_mb()
    if cap_mb is None:
        yield None
        return
    if device.startswith("cuda"):
        print(f"=== {MEMORY_CAP_ENV} ignored on {device}: CUDA maps more address space than it uses", flush=True)
        yield None
        return
    # Map the heavy libraries first, so the cap measures the job's own allocations, not its imports.
    import gptqmodel  # noqa: F401
    import torch  # noqa: F401

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped_bytes() + cap_mb * 2**20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    print(f"=== host memory cap: {cap_mb} MiB above {mapped_bytes() // 2**20} MiB mapped ({MEMORY_CAP_ENV})",
          flush=True)
    try:
        yield cap_mb
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
