"""`qrun export JOB DIR`: a quantize job's artifact copied out whole, with its card, every file checked
against the sha256 the table and the manifest recorded; bad input is one line, exit 2, and nothing at
DIR nor beside it. The artifact here is written as a quantize job leaves one (weights, config, manifest,
card) and recorded as a worker records it; tests/test_artifact_loading.py exports a real one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import finish_job, invoke_main
from qrun.db import queue
from qrun.db.queue import JobSpec
from qrun.db.states import Kind
from qrun.workers import artifacts, card

pytestmark = pytest.mark.reliability

FACTS = {"qrun_manifest": 1, "method": "gptq", "variant": "w4g128", "base_model": "tiny",
         "settings": {"bits": 4, "group_size": 128}, "source_model": "/models/tiny", "source_bytes": 4096,
         "weights_bytes": 1024, "size_pct": 25.0, "quantize_s": 1.5, "wall_s": 2.0, "machine": "CPU: test, 2 cores",
         "host": "here", "quantized_at": "2026-12-06T12:00:00Z", "versions": {"qrun-quant": "0.1.0"},
         "weights": ["model.safetensors"]}


@pytest.fixture
def artifact(db, qrun_home) -> tuple[int, Path]:
    """A succeeded quantize job's artifact as the worker leaves it: (job id, directory)."""
    path = qrun_home / "artifacts" / "tiny-w4g128-job1"
    path.mkdir(parents=True)
    weights = {"model.layers.0.qweight": np.arange(256, dtype=np.int32).reshape(16, 16)}
    save_file(weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "quantization_config": {"bits": 4}}))
    (path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    manifest = artifacts.write_manifest(path, FACTS)
    (path / artifacts.CARD).write_text(card.render(manifest, []))
    record = queue.ArtifactRecord("model", str(path), artifacts.directory_bytes(path), artifacts.weights_sha256(path))
    job_id = finish_job(db, JobSpec(Kind.QUANTIZE, "/models/tiny", {"bits": 4}), {"wall_s": 2.0}, [record])
    return job_id, path


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.glob(f".{target.name}.qrun-export-*"))


def test_export_copies_every_file_with_its_card(artifact, tmp_path):
    job_id, path = artifact
    target = tmp_path / "shared" / "tiny-w4g128"
    target.parent.mkdir()
    result = invoke_main("export", str(job_id), str(target))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(target)
    assert f"exported job {job_id}: 5 files" in result.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in path.iterdir())
    for name in ("model.safetensors", "config.json", "tokenizer.json", artifacts.MANIFEST):
        assert (target / name).read_bytes() == (path / name).read_bytes()
    text = (target / artifacts.CARD).read_text()
    assert text.startswith("---\nbase_model: \"tiny\"\n") and "GPTQ quantization of `tiny`" in text
    assert "Not evaluated yet" in text
    assert leftovers(target) == []


def test_an_empty_directory_is_a_fine_target(artifact, tmp_path):
    job_id, _ = artifact
    (tmp_path / "empty").mkdir()
    result = invoke_main("export", str(job_id), str(tmp_path / "empty"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == 5


def _remove(path: Path, name: str) -> None:
    (path / name).unlink()


def _append(path: Path, name: str) -> None:
    with (path / name).open("ab") as f:
        f.write(b" ")


@pytest.mark.parametrize("spoil, message", [
    (lambda p: _remove(p, "tokenizer.json"), "lacks tokenizer.json, which it was written with"),
    (lambda p: _append(p, "config.json"), "has changed since it was written: config.json differs"),
    (lambda p: _append(p, "model.safetensors"), "has changed since it was written: model.safetensors differs"),
    (lambda p: _remove(p, "model.safetensors"), "lacks model.safetensors"),
])
def test_a_missing_or_changed_file_is_refused_and_nothing_is_written(artifact, tmp_path, spoil, message):
    job_id, path = artifact
    spoil(path)
    target = tmp_path / "out"
    result = invoke_main("export", str(job_id), str(target))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.output
    assert not target.exists() and leftovers(target) == []


def test_weights_changed_together_with_the_manifest_are_caught_by_the_table(artifact, tmp_path):
    """The manifest lies beside the files; the weights' digest in the job table does not."""
    job_id, path = artifact
    save_file({"model.layers.0.qweight": np.zeros((16, 16), dtype=np.int32)}, str(path / "model.safetensors"))
    artifacts.write_manifest(path, FACTS)
    result = invoke_main("export", str(job_id), str(tmp_path / "out"))
    assert result.exit_code == 2 and "model.safetensors differs from its recorded sha256" in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_targets_and_jobs_are_one_line(artifact, db, tmp_path):
    job_id, path = artifact
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    eval_id = finish_job(db, JobSpec(Kind.EVAL, "/models/tiny", {"data": "/d.jsonl", "variant": "baseline"}))
    cases = [
        ((str(job_id), str(busy)), f"export target {busy} exists and is not an empty directory"),
        ((str(job_id), str(tmp_path / "no" / "such" / "dir")), f"its parent directory {tmp_path / 'no' / 'such'}"),
        ((str(eval_id), str(tmp_path / "a")), f"job {eval_id} has no model artifact to export (an eval job"),
        (("99", str(tmp_path / "b")), "job 99 does not exist"),
        (("seven", str(tmp_path / "c")), "job id 'seven' is not a number"),
    ]
    for args, message in cases:
        result = invoke_main("export", *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.count("\n") == 1 and message in result.stderr, (args, result.stderr)
    assert (busy / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "qrun-home"]  # nothing else made


def test_an_artifact_that_is_gone_is_one_line(artifact, tmp_path):
    import shutil

    job_id, path = artifact
    shutil.rmtree(path)
    result = invoke_main("export", str(job_id), str(tmp_path / "out"))
    assert result.exit_code == 2 and f"artifact {path} of job {job_id} is gone: retry job {job_id}" in result.stderr
