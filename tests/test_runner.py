"""How `qrun run` shares a machine among its workers, and what a GPU worker insists on."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from qrun.db.errors import BadInput
from qrun.runner.run import chosen_gpus, gptqmodel_cpu_workers, worker_env
from qrun.runner.worker import QueueWorker
from helpers import REPO, drain_here, run_qrun, write_labeled


def test_gptqmodel_gets_its_default_of_the_workers_share_of_cores():
    # GPTQModel alone takes half the cores, at most 12; on a 2-core box it needs at least 2.
    assert [gptqmodel_cpu_workers(t) for t in (1, 2, 8, 16, 64)] == [2, 2, 4, 8, 12]


def test_worker_env_keeps_a_users_gptqmodel_setting(qrun_home, monkeypatch):
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "3")
    env = worker_env(threads=16)
    assert env["GPTQMODEL_CPU_WORKERS"] == "3"
    assert env["OMP_NUM_THREADS"] == "16" and env["QRUN_HOME"] == str(qrun_home)
    monkeypatch.delenv("GPTQMODEL_CPU_WORKERS")
    assert worker_env(threads=16)["GPTQMODEL_CPU_WORKERS"] == "8"


def test_workers_look_for_kernels_where_they_were_built_ahead(qrun_home, monkeypatch, tmp_path, restore_umask):
    """One kernel directory per machine under QRUN_HOME, group-writable (setgid), for every user's
    workers and `qrun warmup` (their builds run in it): a kernel is built once per machine, not once
    per user. GPTQMODEL_TORCH_EXTENSIONS_DIR, where a user sets it, wins."""
    import socket
    import stat

    from qrun.db.session import database_url
    from qrun.workers.warmup import kernel_cache_dir

    monkeypatch.delenv("GPTQMODEL_TORCH_EXTENSIONS_DIR")
    shared = qrun_home / "kernels" / socket.gethostname()
    assert kernel_cache_dir("pack_block_cpu") == shared / "pack_block_cpu"
    assert "GPTQMODEL_TORCH_EXTENSIONS_DIR" not in worker_env(threads=1)  # each worker takes its own machine's
    QueueWorker(database_url(), "cpu0", use_gpu=False)
    assert os.environ["GPTQMODEL_TORCH_EXTENSIONS_DIR"] == str(shared)  # where its builds go (restored after)
    for directory in (shared.parent, shared):
        mode = stat.S_IMODE(directory.stat().st_mode)
        assert mode & 0o2070 == 0o2070, oct(mode)  # the group writes, new files keep the group
    monkeypatch.setenv("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(tmp_path / "kernels"))
    env = worker_env(threads=1)
    assert env["GPTQMODEL_TORCH_EXTENSIONS_DIR"] == str(tmp_path / "kernels")
    monkeypatch.setattr("os.environ", env)  # as a worker process sees it
    assert kernel_cache_dir("pack_block_cpu") == tmp_path / "kernels" / "pack_block_cpu"


def test_gpus_count_within_what_cuda_visible_devices_already_shows():
    """--gpus 0,1 on a shared server where CUDA_VISIBLE_DEVICES=2,3 is the user's share: GPUs 2 and 3,
    not the physical 0 and 1 (another team's). Unset, the machine's own numbering."""
    assert chosen_gpus([0, 1], "2,3", on_machine=8) == "2,3"
    assert chosen_gpus([1], "2, 3", on_machine=8) == "3"
    assert chosen_gpus([0], "GPU-5f1c,GPU-77aa", on_machine=2) == "GPU-5f1c"
    assert chosen_gpus([1, 0], None, on_machine=2) == "1,0"
    refusals = (([2], "2,3", 8, "CUDA_VISIBLE_DEVICES='2,3' lets this shell see GPUs 0-1"),
                ([0], "", 8, "CUDA_VISIBLE_DEVICES='' lets this shell see no GPU"),
                ([3], None, 2, "--gpus 3: this machine has GPUs 0-1"),
                ([0], None, 0, "--gpus 0: this machine has no GPU"))
    for gpus, visible, on_machine, says in refusals:
        with pytest.raises(BadInput) as refused:
            chosen_gpus(gpus, visible, on_machine)
        assert says in str(refused.value)


def test_more_cpu_workers_than_cores_run_with_a_warning(qrun_home):
    """Allowed (the user may know better), but said: each worker holds a model and gets one thread."""
    cores = os.cpu_count()
    result = run_qrun("run", "--cpu-workers", str(cores + 1), timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"--cpu-workers {cores + 1} on {cores} cores" in result.stderr
    assert f"{cores + 1} worker(s)" in result.stderr
    assert "--cpu-workers" not in run_qrun("run", "--cpu-workers", str(cores), timeout=300).stderr


def test_worker_applies_its_environment_before_anything_else(db, monkeypatch):
    monkeypatch.delenv("QRUN_JOB_MEMORY_MB", raising=False)
    QueueWorker(db.url, "cpu0", use_gpu=False, env={"QRUN_JOB_MEMORY_MB": "1234"})
    assert os.environ.pop("QRUN_JOB_MEMORY_MB") == "1234"


def test_gpu_worker_refuses_to_start_without_exactly_one_gpu(db):
    """GPTQModel spreads a job over every GPU it sees, so a GPU worker that sees none (this CPU box)
    or several would share cards with its neighbours: it must not start."""
    import torch

    if torch.cuda.device_count() == 1:
        pytest.skip("this machine shows exactly one GPU")
    with pytest.raises(RuntimeError, match=r"sees \d+ GPUs .* it must see exactly 1$"):
        QueueWorker(db.url, "gpu0", use_gpu=True)


# A worker in a fresh process, as Ray starts one (so GPTQModel is first imported inside a job, as
# there, not by an earlier test): drains the queue, then lists the torch modules that hold weights
# and are still alive (transformers keeps weightless activation modules in a global table).
DRAIN_AND_LIST_WEIGHTS = """
import gc, json, sys
from qrun.runner.worker import QueueWorker

outcomes = QueueWorker(sys.argv[1], "cpu0", use_gpu=False).drain()
gc.collect()
import torch

def holds_weights(o):
    return isinstance(o, torch.nn.Module) and any(True for _ in o.state_dict(keep_vars=True))

alive = sorted({type(o).__name__ for o in gc.get_objects() if holds_weights(o)})
print(json.dumps({"outcomes": [status for _, status in outcomes], "alive": alive}))
"""


@pytest.mark.slow
def test_a_worker_keeps_no_model_after_its_jobs(db, qrun_home, tiny_qwen2, tmp_path):
    """On an H100 an 8-bit model's 1.8 GB stayed on the GPU through a worker's next eval jobs:
    GPTQModel's saved exceptions (their tracebacks) and its idle pool threads still referred to it.
    Quantize, eval of the result and baseline eval in one worker; then no weights may be left."""
    data = write_labeled(tmp_path / "eval.jsonl")
    run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "8", "--group-size", "32", "--eval", str(data),
         "--calib-samples", "8", "--calib-max-len", "64", check=True)
    result = subprocess.run([sys.executable, "-c", DRAIN_AND_LIST_WEIGHTS, db.url], capture_output=True,
                            text=True, timeout=600, cwd=REPO, env={**os.environ, "QRUN_HOME": str(qrun_home)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outcomes"] == ["succeeded"] * 3
    assert report["alive"] == []


def test_warmup_builds_or_loads_the_kernels_a_cpu_job_uses(qrun_home):
    result = run_qrun("warmup", "--device", "cpu", check=True)
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("GPTQModel's kernels ready")]
    assert "int4_qzero_group_scaled_cpu" in line, result.stderr


def test_a_cpu_worker_drains_past_a_job_that_needs_several_gpus(db, tiny_qwen2):
    """`qrun run --until-empty` on a machine without GPUs ends: a job that needs 2 GPUs is left queued
    (a GPU runner takes it), not waited for."""
    from qrun.db import queue
    from qrun.db.queue import JobSpec
    from qrun.db.states import Kind

    (big,) = queue.submit_jobs(db, [JobSpec(Kind.QUANTIZE, str(tiny_qwen2), {"bits": 4, "gpus": 2})])
    assert drain_here(db) == {}
    assert queue.get_job(db, big).status == "queued"


def test_a_job_waits_only_for_the_kernels_it_uses(tmp_path):
    """A GPU worker builds its kernels in the background and holds a job back only for its own: a
    GPTQ quantize job for gptq_cuda (~25 s on a fresh machine), not for Marlin (~2 min each)."""
    from qrun.workers.warmup import CPU_KERNELS, GPU_KERNELS, MARLIN, kernels_a_job_uses

    gpu = "cuda:0"
    assert kernels_a_job_uses("quantize", {"bits": 4}, "m", gpu) == ("gptq_cuda",)
    assert kernels_a_job_uses("quantize", {"bits": 4, "method": "awq"}, "m", gpu) == ("awq",)
    for method in ("rtn", "fp8", "gguf", "bnb-nf4"):
        assert kernels_a_job_uses("quantize", {"bits": 8, "method": method}, "m", gpu) == ()
    assert kernels_a_job_uses("quantize", {"bits": 4}, "m", "cpu") == tuple(CPU_KERNELS)
    assert kernels_a_job_uses("eval", {}, None, gpu) == ()  # its artifact is gone: the job says so itself
    assert set(MARLIN) | {"gptq_cuda", "awq"} == set(GPU_KERNELS)


def _checkpoint(path, quantize_config: dict | None, dtype: str = "bfloat16"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "dtype": dtype}))
    if quantize_config is not None:
        (path / "quantize_config.json").write_text(json.dumps(quantize_config))
    return path


def test_an_eval_waits_for_the_one_marlin_kernel_its_checkpoint_loads_with(tmp_path):
    """GPTQModel loads a checkpoint in its config's dtype where that is float16, else in bfloat16, and
    Marlin is built once per dtype (~2 min each on a fresh machine): an eval waits for that one only,
    and for none where the checkpoint does not load with Marlin."""
    from qrun.workers.warmup import kernels_a_job_uses

    def waits_for(name, quantize_config, dtype="bfloat16"):
        return kernels_a_job_uses("eval", {}, _checkpoint(tmp_path / name, quantize_config, dtype), "cuda:0")

    assert waits_for("plain", None) == ()  # not a GPTQModel checkpoint: transformers loads it
    for method in ("gptq", "awq"):  # rtn checkpoints are GPTQ's format, "gptq" in their config
        assert waits_for(f"{method}-bf16", {"bits": 4, "group_size": 128, "quant_method": method}) == ("marlin_bf16",)
        assert waits_for(f"{method}-fp16", {"bits": 4, "group_size": 128, "quant_method": method},
                         "float16") == ("marlin_fp16",)
    assert waits_for("fp32", {"bits": 8, "group_size": 128, "quant_method": "gptq"}, "float32") == ("marlin_bf16",)
    assert waits_for("w2", {"bits": 2, "group_size": 128, "quant_method": "gptq"}) == ()  # not Marlin's
    assert waits_for("fp8", {"bits": 8, "quant_method": "fp8"}) == ()
    assert kernels_a_job_uses("eval", {}, tmp_path / "fp8", "cpu") != ()  # a CPU worker: the CPU kernels


def test_kernel_builds_run_on_demand_at_the_lowest_priority_and_report_what_failed():
    import threading

    from qrun.workers.warmup import KernelBuilds, _lowest_priority_for_this_thread

    seen = {}

    def probe():
        _lowest_priority_for_this_thread()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert seen["nice"] == 19 and os.getpriority(os.PRIO_PROCESS, 0) == before  # that thread only

    builds = KernelBuilds(["no_such_kernel"])
    assert builds.results == []  # nothing is built before a job asks for it
    builds.wait(["no_such_kernel", "gptq_cuda"])  # gptq_cuda is not this worker's to build: not waited for
    ((name, _, ok, why),) = builds.results
    assert name == "no_such_kernel" and not ok and why
    assert builds.new_results() == [(name, _, ok, why)] and builds.new_results() == []
    builds.wait(["no_such_kernel"])  # built once: asked again, nothing new
    assert len(builds.results) == 1
    nothing = KernelBuilds([])
    nothing.wait(["gptq_cuda"])  # nothing to build: no wait, not even GPTQModel's import
    assert nothing.results == []


def test_a_gpu_workers_build_thread_rehearses_each_kernels_first_job():
    """What a process's first quantize or GPTQ eval pays once (`datasets` with pandas and pyarrow,
    GPTQModel's looper and set-ups, torch.compile's stack, CUDA's lazy loads) is paid by the build
    thread's rehearsal on a tiny model, before the job is claimed, and only by a worker that asks for
    it (a GPU worker's; here on the CPU, where the same code runs): the first real quantize after it
    imports nothing. A fresh interpreter: this one may have imported it all already."""
    probe = textwrap.dedent("""
        import json, sys, tempfile
        from pathlib import Path
        from qrun.workers.warmup import KernelBuilds
        plain = KernelBuilds(["gptq_cuda"])
        plain.wait(["gptq_cuda"])
        assert "gptqmodel" in sys.modules and "datasets" not in sys.modules and plain.rehearsals == []
        warming = KernelBuilds(["gptq_cuda", "marlin_bf16"], rehearse_on="cpu")
        warming.wait(["gptq_cuda"])
        assert [(name, ok) for name, _, ok in warming.rehearsals] == [("gptq_cuda", True)], warming.rehearsals
        from qrun.workers.tiny import build_tiny_model, sample_texts
        from qrun.workers.params import QuantizeParams
        from qrun.workers.quantize import quantize_model
        work = Path(tempfile.mkdtemp())
        model = build_tiny_model(work / "model", hidden=128, intermediate=256, layers=2, seed=1)
        calib = work / "calib.jsonl"
        calib.write_text("".join(json.dumps({"text": t}) + "\\n" for t in sample_texts()[:8]))
        (work / "out").mkdir()
        before = set(sys.modules)
        quantize_model(QuantizeParams(bits=4, calib=str(calib), calib_samples=8, calib_max_len=64),
                       str(model), work / "out", "cpu", 2, lambda *_: None)
        assert set(sys.modules) == before, sorted(set(sys.modules) - before)[:20]
        warming.wait(["marlin_bf16"])  # the eval's: an rtn checkpoint quantized, loaded, run forward
        assert [(name, ok) for name, _, ok in warming.rehearsals][1:] == [("marlin_bf16", True)], warming.rehearsals
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_a_kernels_rehearsal_copies_the_model_of_the_job_that_waits_for_it(tmp_path, caplog):
    """The rehearsal runs the waiting job's own work on its model cut to one layer (the job's matrix
    shapes are what CUDA loads kernels for), and falls back to a tiny model where no copy can be made:
    pickle weights are never linked nor loaded, and remote code runs only in the job itself."""
    import logging

    from qrun.workers.tiny import build_tiny_model, sample_texts
    from qrun.workers.params import QuantizeParams
    from qrun.workers.quantize import quantize_model
    from qrun.workers.warmup import JobShape, KernelBuilds, one_layer_copy, rehearse

    model = build_tiny_model(tmp_path / "model", hidden=128, intermediate=256, layers=3, seed=1)
    (model / "extra.bin").write_bytes(b"not a checkpoint")
    copy = one_layer_copy(model, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["layer_types"] == ["full_attention"]  # one entry per layer
    assert (copy / "model.safetensors").is_symlink() and not (copy / "extra.bin").exists()
    assert json.loads((model / "config.json").read_text())["num_hidden_layers"] == 3  # the original untouched
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "extra.bin"):
        (pickled / name).write_bytes((model / name).read_bytes())
    assert one_layer_copy(pickled, tmp_path / "no-copy") is None
    assert one_layer_copy(tmp_path / "no-such-model", tmp_path / "no-copy") is None

    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts()[:8]))
    params = QuantizeParams(bits=4, calib=str(calib), calib_samples=8, calib_max_len=64).to_dict()
    caplog.set_level(logging.INFO, logger="qrun.workers.warmup")
    builds = KernelBuilds(["gptq_cuda"], rehearse_on="cpu")
    builds.wait(["gptq_cuda"], job=JobShape("quantize", params, str(model)))
    assert [(name, ok) for name, _, ok in builds.rehearsals] == [("gptq_cuda", True)]
    assert f"gptq_cuda's first job on a one-layer copy of {model}" in caplog.text
    for job in (JobShape("quantize", params, str(pickled)), JobShape("quantize", params, str(tmp_path / "gone")),
                JobShape("quantize", {**params, "trust_remote_code": True}, str(model))):
        caplog.clear()
        assert rehearse("gptq_cuda", "cpu", job)[1]
        assert "gptq_cuda's first job on a tiny model" in caplog.text

    quantized = tmp_path / "quantized"
    quantized.mkdir()
    quantize_model(QuantizeParams.from_dict(params), str(model), quantized, "cpu", 3, lambda *_: None)
    caplog.clear()
    eval_job = JobShape("eval", {"ppl_data": str(calib), "batch_size": 2}, str(quantized))
    assert rehearse("marlin_bf16", "cpu", eval_job)[1], caplog.text
    assert f"marlin_bf16's first job on a one-layer copy of {quantized}" in caplog.text
    caplog.clear()
    assert not rehearse("marlin_bf16", "cpu", JobShape("eval", {"ppl_data": str(tmp_path / "gone.jsonl")}, str(quantized)))[1]
    assert "the rehearsal of marlin_bf16's first job failed" in caplog.text


def test_a_worker_that_could_not_start_is_named_by_its_own_error():
    """Ray reports a failed constructor with a traceback, color codes and module-qualified names; the
    runner shows the constructor's own line, and tells a table out of reach (tried again) from a
    refusal (given up)."""
    from qrun.runner.run import _creation_error, _is_passing

    report = ("\x1b[36mray::QueueWorker.__init__()\x1b[39m (pid=1, ip=10.0.0.1)\nTraceback (most recent call last):\n"
              '  File "runner/worker.py", line 84, in __init__\n'
              "qrun.db.errors.BadInput: database /q/qrun.db cannot be opened: database is locked\n"
              "The actor died because of an error raised in its creation task")
    reason = _creation_error(RuntimeError(report))
    assert reason == "qrun.db.errors.BadInput: database /q/qrun.db cannot be opened: database is locked"
    assert _is_passing(reason)
    assert not _is_passing("BadInput: QRUN_HOME /q is not writable (Permission denied)")
