"""What does a process's first GPTQ load pay that its second does not?

In one fresh process, as a worker does it: GPTQModel imported and the checkpoint's Marlin kernel
loaded (workers/warmup.py), the unquantized model loaded once (the baseline eval), then qrun's own
load_model on GPTQ artifact A, then B, then A again, each under cProfile. Prints each load's time
and the functions whose cumulative time differs most between the first GPTQ load and the second;
writes the three profiles to $OUT/load_profile.txt, and the modules the first GPTQ load imported.
With --warm, the kernel's first eval is rehearsed on a tiny model first (workers.warmup.rehearse), as
a GPU worker's build thread does it: the first GPTQ load should then take as long as the second.

    python3 bench/load_profile.py BASE_MODEL ARTIFACT_A ARTIFACT_B [--warm]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import out_dir  # noqa: E402


def cumulative_by_function(profile: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profile)
    return {f"{Path(file).name}:{line}({name})": entry[3] for (file, line, name), entry in stats.stats.items()}


def main() -> None:
    base, first, second = map(Path, sys.argv[1:4])
    warm = "--warm" in sys.argv[4:]
    import torch

    from qrun.workers.evaluate import load_model
    from qrun.workers.jobs import free_memory
    from qrun.workers.warmup import build_kernel, kernels_a_job_uses, rehearse

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    import gptqmodel  # noqa: F401 -- the worker's background thread imports it before any job

    for name in kernels_a_job_uses("eval", {}, first, device):
        build_kernel(name)
        if warm:
            print(f"rehearsal of {name}'s first eval: {rehearse(name, device)[0]:.2f} s", flush=True)
    print(f"gptqmodel import + kernels: {time.perf_counter() - started:.2f} s", flush=True)
    started = time.perf_counter()
    model, _ = load_model(base, device, False)
    del model
    free_memory()
    print(f"unquantized load: {time.perf_counter() - started:.2f} s", flush=True)
    report = io.StringIO()
    profiles = []
    for label, path in (("first GPTQ load", first), ("second GPTQ load", second), ("first again", first)):
        modules_before = set(sys.modules)
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        model, _ = load_model(path, device, False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        profile.disable()
        seconds = time.perf_counter() - started
        del model
        free_memory()
        profiles.append(profile)
        imported = sorted(set(sys.modules) - modules_before)
        tops = sorted({name.split(".")[0] + "." + name.split(".")[1] if "." in name else name for name in imported})
        print(f"{label}{' (warm)' if warm else ''}: {seconds:.2f} s, {len(imported)} modules imported "
              f"({', '.join(tops[:12])})", flush=True)
        report.write(f"===== {label} ({path}): {seconds:.2f} s; imported: {' '.join(imported)}\n")
        pstats.Stats(profile, stream=report).sort_stats("cumulative").print_stats(45)
    one, two = (cumulative_by_function(p) for p in profiles[:2])
    gaps = sorted(((one.get(k, 0.0) - two.get(k, 0.0), k) for k in set(one) | set(two)), reverse=True)
    report.write("===== cumulative seconds, first GPTQ load minus second\n")
    for gap, name in gaps[:60]:
        report.write(f"{gap:8.3f}  {name}\n")
    (out_dir() / f"load_profile{'-warm' if warm else ''}.txt").write_text(report.getvalue())
    print("largest first-minus-second cumulative gaps:")
    for gap, name in gaps[:25]:
        print(f"  {gap:7.3f} s  {name}")


if __name__ == "__main__":
    main()
