"""Where `qrun run`'s start-up goes: torch import and CUDA init in a plain process, ray.init, the
worker actor's creation (which imports torch and checks its one GPU), and ray.shutdown.

    cd bench && python3 startup_probe.py
"""

import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    t = {}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch; torch.cuda.is_available() and torch.cuda.init()"],
                   check=True)
    t["plain_torch_import_and_cuda_init_s"] = time.perf_counter() - start
    # What a quantize job imports next (paid by GPTQModel direct as well).
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, gptqmodel, transformers"], check=True,
                   capture_output=True)
    t["plain_torch_gptqmodel_import_s"] = time.perf_counter() - start
    os.environ["QRUN_HOME"] = tempfile.mkdtemp()
    start = time.perf_counter()
    from qrun.runner.run import create_worker, plan_slots, start_ray

    t["import_runner_s"] = time.perf_counter() - start
    start = time.perf_counter()
    profile = cProfile.Profile()
    profile.runcall(start_ray, None, None, 1)
    t["ray_init_s"] = time.perf_counter() - start
    report = io.StringIO()
    pstats.Stats(profile, stream=report).sort_stats("cumulative").print_stats(30)
    import ray

    from qrun.db.session import database_url

    slots = plan_slots(None, None)
    start = time.perf_counter()
    actors = [create_worker(s, database_url(), 60.0) for s in slots]
    t["identities"] = ray.get([a.identity.remote() for a in actors])
    t["actor_ready_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ray.shutdown()
    t["ray_shutdown_s"] = time.perf_counter() - start
    start = time.perf_counter()
    start_ray(None, None, 1)  # again, everything now in the page cache
    t["ray_init_again_s"] = time.perf_counter() - start
    ray.shutdown()
    print(json.dumps(t, indent=1))
    out = Path(os.environ.get("OUT", "."))
    (out / "startup_probe.json").write_text(json.dumps(t, indent=1))
    (out / "startup_probe_ray_init.txt").write_text(report.getvalue())


if __name__ == "__main__":
    main()
