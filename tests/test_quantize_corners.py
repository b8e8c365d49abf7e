"""What `qrun submit --help` offers works: every corner of --bits, --group-size, --desc-act and
--no-sym that submit accepts quantizes the tiny model through the real worker, and the artifact
loads back (its eval job loads it with GPTQModel and classifies); a corner GPTQModel cannot do is
refused at submit instead of failing inside a job.

One worker drains every corner in this process (GPTQModel is imported once): about a minute on a
2-core CPU box.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from qrun.db import queue
from helpers import drain_here, invoke_main, write_labeled

# (bits, group size, desc_act, sym): each value of each option at least once, and the pairs that
# used to break or are most likely to: -1 without desc_act (GPTQModel's act_group_aware default
# failed every such job), -1 with desc_act, asymmetric with activation order, 2 and 3 bits.
CORNERS = [
    (2, 32, False, True),
    (3, 64, True, False),
    (4, -1, False, True),
    (8, -1, True, False),
    (4, 128, True, True),
    (8, 16, False, False),
    (3, -1, False, False),
]


def corner_args(bits: int, group: int, desc_act: bool, sym: bool) -> list[str]:
    return ["--bits", str(bits), "--group-size", str(group), "--desc-act" if desc_act else "--no-desc-act",
            "--sym" if sym else "--no-sym"]


@pytest.mark.slow
def test_every_offered_corner_quantizes_and_loads_back(db, qrun_home, tiny_qwen2, tmp_path, restore_umask):
    data = write_labeled(tmp_path / "dialogs.jsonl")
    submitted: dict[tuple, list[int]] = {}
    for corner in CORNERS:
        # Short calibration (8 samples of at most 64 tokens): the corners, not the quality, are tested.
        result = invoke_main("submit", "--model", str(tiny_qwen2), *corner_args(*corner), "--calib", str(data),
                      "--calib-samples", "8", "--calib-max-len", "64", "--eval", str(data), "--json")
        assert result.exit_code == 0, (corner, result.output)
        submitted[corner] = json.loads(result.stdout)  # stderr says which sweep they joined

    started = time.perf_counter()
    outcomes = drain_here(db)
    took = time.perf_counter() - started
    print(f"\n{len(CORNERS)} corners (quantize + eval each) and the baseline eval drained in {took:.1f} s")

    failed = {job_id: queue.get_job(db, job_id).error for job_id, status in outcomes.items() if status != "succeeded"}
    assert not failed, failed
    for (bits, group, desc_act, sym), ids in submitted.items():
        quantize_id, eval_id = ids[-2:]  # the first corner's list also holds the baseline eval
        (artifact,) = queue.artifacts_of(db, [quantize_id])[quantize_id]
        config = json.loads((Path(artifact.path) / "quantize_config.json").read_text())
        assert (config["bits"], config["group_size"], config["desc_act"], config["sym"]) == (bits, group, desc_act, sym)
        metrics = queue.metrics_of(db, [eval_id])[eval_id]
        assert metrics["eval_samples"] == 8  # the artifact loaded back and classified every dialog
        assert outcomes[quantize_id] == outcomes[eval_id] == "succeeded"
    assert len(outcomes) == 2 * len(CORNERS) + 1


@pytest.mark.reliability
@pytest.mark.parametrize("args, names", [
    (["--bits", "4", "--group-size", "8"], ("--group-size 8", "not supported by GPTQModel")),
    (["--bits", "8", "--group-size", "1"], ("--group-size 1", "not supported by GPTQModel")),
    (["--bits", "4", "--group-size", "256"], ("--group-size 256", "does not divide", "hidden size 128")),
    (["--bits", "4", "--calib-max-len", "9"], ("--calib-max-len 9", "below 10")),
])
def test_corners_gptqmodel_cannot_do_are_refused_at_submit(db, qrun_home, tiny_qwen2, args, names):
    """Before, each of these was accepted and its job failed inside GPTQModel (packing a group of 8 or 1:
    "TorchLinear only supports [-1, 16, ...] group_size"; 9 tokens: no calibration sample left)."""
    result = invoke_main("submit", "--model", str(tiny_qwen2), *args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert all(name in lines[0] for name in names), lines[0]
    assert queue.list_jobs(db) == []
