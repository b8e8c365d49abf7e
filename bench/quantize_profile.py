"""Where quantize() spends its time on the GPU, and what each of qrun's GPTQModel settings buys.

One process runs the probe job (Qwen2-1.5B shape, 4-bit g128, 128 x 1024 calibration tokens, batch 16)
through qrun's own quantize function (workers.quantize.quantize_model) once per variant; a variant
switches qrun's engine settings (workers.engine.Engine) or the job's calibration batch. For each:
quantize() time, GPTQModel's own stage times (its region timer), the GPU's mean utilisation (NVML,
every 100 ms), the mean layer loss (the same data, so it must stay within 1%) and peak GPU memory.

--torch-profile [VARIANT...] runs a CUDA-level profile (torch.profiler, CPU and CUDA activity) of
the probe on a 4-layer model of the same width, for the variants named (default: the first and the
last): the top kernels and operators by GPU time, and kernel and copy time against wall time.
--py-spy [VARIANT...] samples every thread's Python stack during those variants (default: the
first; py-spy's raw "collapsed" format). --awq then quantizes and evaluates AWQ 4-bit (the methods'
GPU row), with the bf16 baseline's perplexity beside it; its kernels are built in the background
(nice 19) while the profile runs. --shape qwen2-7b: the same job on Qwen2-7B's shape.

    source bench/device_env.sh && python3 bench/quantize_profile.py --torch-profile --py-spy --awq
    python bench/quantize_profile.py --shape tiny --samples 16 --max-len 256     # CPU smoke test

Writes quantize_profile.json (after every step) and the profile tables under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, run from anywhere
from common import REPO, SHAPES, build_bench_model, environment, out_dir, print_table, write_calibration  # noqa: E402

sys.path.insert(0, str(REPO))

# name -> (Engine settings, calibration batch size). Each switches one thing against its neighbour;
# "qrun" is qrun's default Engine(), "before" GPTQModel's own defaults (qrun until 2026-11-25).
OFF = dict(offload_to_disk=True, calibration_on_gpu=False, half_input_hessian=False, merged_sample_hooks=False)
VARIANTS = {
    "before": (OFF, 16),
    "no-offload": (OFF | dict(offload_to_disk=False), 16),
    "half-hessian": (OFF | dict(half_input_hessian=True), 16),
    "both": (OFF | dict(offload_to_disk=False, half_input_hessian=True), 16),
    "calib-gpu": (OFF | dict(offload_to_disk=False, half_input_hessian=True, calibration_on_gpu=True), 16),
    "merged-hooks": (OFF | dict(offload_to_disk=False, half_input_hessian=True, merged_sample_hooks=True), 16),
    "qrun": ({}, 16),
    "qrun-batch32": ({}, 32),
}


class GpuSampler:
    """The GPU's utilisation every 100 ms (NVML), so that a window's mean says how busy the GPU was."""

    def __init__(self):
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 -- no GPU, or no NVML binding: no utilisation column
            self._nvml = None
            return
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            self.samples.append((time.perf_counter(), util))

    def mean(self, start: float, end: float) -> float | None:
        window = [u for t, u in self.samples if start <= t <= end]
        return sum(window) / len(window) if window else None


@contextmanager
def py_spy(path: Path):
    """py-spy sampling every thread of this process (50 Hz, idle threads too) while inside."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists() and not shutil.which("py-spy"):
        site_bin = Path("/tmp/site/bin/py-spy")
        exe = str(site_bin) if site_bin.exists() else None
    if exe is None:
        print("py-spy not found: no stack samples", flush=True)
        yield
        return
    proc = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--rate", "50", "--threads", "--idle",
                             "--nonblocking", "--format", "raw", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached before the work starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
            if proc.returncode:
                print(f"py-spy exited {proc.returncode}: {err.decode()[-500:]}", flush=True)
        except subprocess.TimeoutExpired:
            proc.kill()


def device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def quantize_once(model: Path, calib: Path, args, engine: dict, batch_size: int, work: Path) -> dict:
    """qrun's quantize function on the probe job, with these engine settings."""
    import torch

    from qrun.workers.inputs import inspect_model
    from qrun.workers.jobs import free_memory
    from qrun.workers.engine import Engine
    from qrun.workers.params import QuantizeParams
    from qrun.workers.quantize import quantize_model

    target, offload = work / "out", work / "offload"
    for path in (target, offload):
        shutil.rmtree(path, ignore_errors=True)
    target.mkdir(parents=True)
    params = QuantizeParams(bits=args.bits, group_size=args.group_size, calib=str(calib), calib_samples=args.samples,
                            calib_max_len=args.max_len, batch_size=batch_size)
    layers = inspect_model(str(model)).num_layers
    metrics = quantize_model(params, str(model), target, device(), layers, lambda *_: None, offload_dir=offload,
                             engine=Engine(**engine))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    for path in (target, offload):
        shutil.rmtree(path, ignore_errors=True)
    free_memory()
    return metrics


def torch_profile(model: Path, calib: Path, args, engine: dict, batch_size: int, work: Path, name: str) -> dict:
    """torch.profiler over quantize(): the top CUDA kernels and operators, and how busy the GPU was."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        metrics = quantize_once(model, calib, args, engine, batch_size, work)
    wall = time.perf_counter() - started
    events = prof.key_averages()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=45, max_name_column_width=70)
    (out_dir() / f"torch_profile-{name}.txt").write_text(table)
    # Kernels and copies only (as torch's own table footer counts): an operator's device time is its kernels'.
    from torch.autograd import DeviceType

    gpu_us = sum(e.self_device_time_total for e in events
                 if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    return {"variant": name, "profiled_wall_s": wall, "gpu_busy_s": gpu_us / 1e6,
            "gpu_busy_share": gpu_us / 1e6 / wall if wall else None, "quantize_s": metrics.get("quantize_s"),
            "top": table.splitlines()[:12]}


def start_background_builds(names: list[str], log: Path) -> subprocess.Popen | None:
    """GPTQModel kernels built at the lowest CPU priority while the profile runs (qrun's own warmup code)."""
    if device() == "cpu":
        return None
    code = ("import sys; from qrun.workers.warmup import build_kernels, describe; "
            "print(describe(build_kernels('cuda', sys.argv[1:])), flush=True)")
    out = log.open("a")
    return subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", code, *names], stdout=out, stderr=out,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})


def awq_row(model: Path, calib: Path, args, work: Path) -> list[dict]:
    """AWQ 4-bit g128 quantized and evaluated as bench/methods_sweep.py does it, with the baseline beside it."""
    import methods_sweep as sweep

    sweep_args = argparse.Namespace(group_size=args.group_size, calib=calib, samples=args.samples,
                                    max_len=args.max_len, batch_size=16)
    ppl_file = sweep.ppl_text(work / "ppl.jsonl", 60000)
    rows = [{"variant": "baseline", **sweep.evaluate(model, ppl_file, 8)}]
    params = sweep.variant_params("awq", 4, sweep_args)
    target = work / "variant-awq"
    row = {"variant": "awq-w4g128", **sweep.quantize(model, params, target, work)}
    sweep.free()
    row |= sweep.evaluate(target, ppl_file, 8)
    row["ppl_vs_baseline"] = row["perplexity"] / rows[0]["perplexity"]
    row["size_vs_baseline"] = row["size_bytes"] / sum(p.stat().st_size for p in model.glob("*.safetensors"))
    shutil.rmtree(target, ignore_errors=True)
    return rows + [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2-1.5b")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["before", "both", "calib-gpu", "qrun"])
    parser.add_argument("--torch-profile", nargs="*", default=None, metavar="VARIANT",
                        help="profile these variants (none named: the first and the last) on a 4-layer model")
    parser.add_argument("--py-spy", nargs="*", default=None, metavar="VARIANT",
                        help="sample these variants' stacks with py-spy (none named: the first)")
    parser.add_argument("--awq", action="store_true")
    parser.add_argument("--work", default="/tmp/qrun-profile")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 8)))

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = out_dir()
    log = out / "quantize_profile.log"
    builds = start_background_builds(["marlin_bf16", "awq"], log) if args.awq else None
    started = time.perf_counter()
    model = build_bench_model(work / f"model-{args.shape}", args.shape)
    calib = write_calibration(work / "calib.jsonl", args.samples, min_chars=args.max_len * 3)
    result: dict = {"environment": environment(), "args": vars(args), "runs": [], "profiles": []}
    save = lambda: (out / "quantize_profile.json").write_text(json.dumps(result, indent=2))  # noqa: E731

    # Imports, CUDA's first use and GPTQModel's gptq_cuda build (~30 s on a fresh machine) stay out of the rows.
    tiny = build_bench_model(work / "model-tiny", "tiny")
    warm_args = argparse.Namespace(**{**vars(args), "samples": 8, "max_len": 128, "group_size": 32})
    quantize_once(tiny, calib, warm_args, VARIANTS["before"][0], 4, work)
    quantize_once(tiny, calib, warm_args, VARIANTS["qrun"][0], 4, work)
    result["setup_s"] = time.perf_counter() - started
    print(f"setup (model, warm-up, gptq_cuda): {result['setup_s']:.1f} s", flush=True)

    from qrun.workers.engine import Engine

    gpu = GpuSampler()
    for i, name in enumerate(args.variants):
        engine, batch = VARIANTS[name]
        sampled = args.py_spy is not None and (name in args.py_spy or (not args.py_spy and i == 0))
        spy = py_spy(out / f"pyspy-{name}.txt") if sampled else None
        begin = time.perf_counter()
        if spy:
            with spy:
                metrics = quantize_once(model, calib, args, engine, batch, work)
        else:
            metrics = quantize_once(model, calib, args, engine, batch, work)
        end = time.perf_counter()
        row = {"variant": name, "batch": batch, **Engine(**engine).__dict__, "quantize_s": metrics["quantize_s"],
               "wall_s": end - begin, "gpu_util": gpu.mean(begin, end), "loss_mean": metrics.get("loss_mean"),
               "peak_gpu_gb": metrics.get("peak_gpu_mem_gb"), "process_peak_rss_gb": metrics.get("process_peak_rss_gb"),
               **{k: v for k, v in metrics.items() if k.startswith("stage_")}}
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        save()
    base_loss = result["runs"][0]["loss_mean"]
    for row in result["runs"]:
        row["loss_vs_first"] = row["loss_mean"] / base_loss if base_loss and row["loss_mean"] else None
    save()

    if args.torch_profile is not None:
        SHAPES[args.shape + "-4l"] = dict(SHAPES[args.shape], layers=4)
        small = build_bench_model(work / f"model-{args.shape}-4l", args.shape + "-4l")
        for name in args.torch_profile or dict.fromkeys([args.variants[0], args.variants[-1]]):
            engine, batch = VARIANTS[name]
            result["profiles"].append(torch_profile(small, calib, args, engine, batch, work, name))
            print(json.dumps(result["profiles"][-1]), flush=True)
            save()

    if args.awq:
        if builds is not None:
            waited = time.perf_counter()
            builds.wait()
            result["awq_kernel_wait_s"] = time.perf_counter() - waited
        try:
            result["awq"] = awq_row(model, calib, args, work)
        except Exception as exc:  # noqa: BLE001 -- the profile above is kept whatever happens here
            result["awq"] = [{"error": f"{type(exc).__name__}: {exc}"[:400]}]
        print(json.dumps(result["awq"]), flush=True)
        save()

    columns = ["variant", "batch", "quantize_s", "gpu_util", "loss_vs_first", "peak_gpu_gb",
               "stage_pre_quant_forward_s", "stage_process_quant_s", "stage_submodule_finalize_s",
               "stage_post_quant_forward_s"]
    print_table(result["runs"], columns)
    print(json.dumps(result["environment"]))


if __name__ == "__main__":
    main()
