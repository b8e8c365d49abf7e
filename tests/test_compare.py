"""`qrun compare`: rows assembled from a real job table (filled through the queue's own functions),
every output format, the plot, and one end-to-end sweep through the real console script."""

import csv
import io
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from qrun.cli.compare import comparison_rows
from qrun.cli.main import cli
from qrun.db import queue
from qrun.db.states import Kind
from conftest import run_qrun
from conftest import write_labeled

T, F = True, False


@pytest.fixture
def source(tmp_path) -> Path:
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    return model


def _finish(db, tmp_path, spec: queue.JobSpec, metrics: dict, predictions: dict | None = None) -> int:
    """Submit, claim and succeed one job, with a predictions artifact written like an eval job's."""
    (job_id,) = queue.submit_jobs(db, [spec])
    assert queue.claim_job(db, "w", None).id == job_id
    records = []
    if predictions is not None:
        path = tmp_path / f"job{job_id}.predictions.jsonl"
        path.write_text("".join(json.dumps({"id": k, "label": None, "prediction": v, "score": None}) + "\n"
                                for k, v in predictions.items()))
        records.append(queue.ArtifactRecord("predictions", str(path), path.stat().st_size, "0" * 64))
    queue.finish_job(db, job_id, "w", metrics, records)
    return job_id


def _eval(model, data, variant, depends_on=None, mode="score") -> queue.JobSpec:
    params = {"data": str(data), "mode": mode, "variant": variant, "ppl_data": None}
    if depends_on is not None:
        params["from_upstream"] = True
    return queue.JobSpec(kind=Kind.EVAL, model=str(model), params=params, depends_on=depends_on)


def _quantize(db, tmp_path, model, bits, quantize_s) -> int:
    spec = queue.JobSpec(kind=Kind.QUANTIZE, model=str(model), params={"bits": bits, "group_size": 128})
    return _finish(db, tmp_path, spec, {"quantize_s": quantize_s, "bits": bits})


def _scores(precision, recall, accuracy, size, invalid=0.0, auc=0.9, perplexity=10.0) -> dict:
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall),
            "accuracy": accuracy, "invalid": invalid, "auc": auc, "perplexity": perplexity,
            "model_size_bytes": size, "eval_samples": 4, "samples_per_s": 2.0}


@pytest.fixture
def sweep(db, tmp_path, source):
    """A baseline, w4, w8 evaluated twice (the newer counts), a failed w3 eval, and another data set."""
    data, other = tmp_path / "data.jsonl", tmp_path / "other.jsonl"
    ids = {}
    ids["baseline"] = _finish(db, tmp_path, _eval(source, data, "baseline"), _scores(0.8, 0.6, 0.75, 3e6),
                              {"a": T, "b": F, "c": T, "d": F})
    q4 = _quantize(db, tmp_path, source, 4, 12.5)
    ids["w4"] = _finish(db, tmp_path, _eval(source, data, "w4g128", q4),
                        _scores(0.5, 0.5, 0.25, 1e6, invalid=1.0, auc=0.6, perplexity=14.0),
                        {"a": F, "b": T, "c": T, "d": "invalid"})
    q8 = _quantize(db, tmp_path, source, 8, 20.0)
    _finish(db, tmp_path, _eval(source, data, "w8g128", q8), _scores(0.1, 0.1, 0.1, 1.6e6))  # superseded
    ids["w8"] = _finish(db, tmp_path, _eval(source, data, "w8g128", q8), _scores(0.8, 0.6, 0.75, 1.5e6),
                        {"a": T, "b": F, "c": T, "d": F})
    q3 = _quantize(db, tmp_path, source, 3, 9.0)
    (failed,) = queue.submit_jobs(db, [_eval(source, data, "w3g128", q3)])
    queue.claim_job(db, "w", None)
    queue.fail_job(db, failed, "w", "boom")
    ids["other_job"] = _finish(db, tmp_path, _eval(source, other, "baseline"), _scores(0.5, 0.5, 0.5, 3e6))
    return ids | {"data": data, "other": other, "q4": q4}


def test_rows_baseline_first_then_bits_descending_newest_wins(db, sweep, source):
    rows = comparison_rows(db, data=str(sweep["data"]))
    assert [(r["variant"], r["bits"], r["job_id"]) for r in rows] == [
        ("baseline", 16, sweep["baseline"]), ("w8g128", 8, sweep["w8"]), ("w4g128", 4, sweep["w4"])]
    base, w8, w4 = rows
    assert all(base[f"{m}_delta"] == 0 for m in ("precision", "recall", "f1", "accuracy", "invalid", "auc",
                                                  "perplexity"))
    assert (base["size_pct"], base["agreement"], base["flips_fraud_to_not"], base["quantize_s"]) == (100, 1, 0, None)
    assert w4["precision_delta"] == pytest.approx(-0.3)
    assert w4["recall_delta"] == pytest.approx(-0.1)
    assert w4["accuracy_delta"] == pytest.approx(-0.5)
    assert (w4["invalid_delta"], w4["perplexity_delta"]) == (1.0, 4.0)
    assert w4["auc_delta"] == pytest.approx(-0.3)
    assert w4["size_mb"] == 1.0 and w4["size_pct"] == pytest.approx(100 / 3)
    assert w4["quantize_s"] == 12.5 and w8["quantize_s"] == 20.0
    # a: fraud -> not, b: not -> fraud, c: same, d: now invalid (a change, but no flip between classes)
    assert (w4["agreement"], w4["flips_fraud_to_not"], w4["flips_not_to_fraud"]) == (0.25, 1, 1)
    assert (w8["agreement"], w8["precision_delta"], w8["size_pct"]) == (1.0, 0.0, 50.0)


def test_rows_are_grouped_by_data_and_mode_and_filtered(db, sweep, source, tmp_path):
    # generate-mode numbers are not comparable with score-mode ones: a group of their own
    generate = _finish(db, tmp_path, _eval(source, sweep["data"], "w4g128", sweep["q4"], mode="generate"),
                       _scores(0.4, 0.4, 0.4, 1e6))
    rows = comparison_rows(db)
    assert [(r["data"], r["mode"]) for r in rows] == (
        [(str(sweep["data"]), "generate")] + [(str(sweep["data"]), "score")] * 3 + [(str(sweep["other"]), "score")])
    assert rows[0]["job_id"] == generate and rows[0]["precision_delta"] is None  # no generate baseline
    assert comparison_rows(db, data="other.jsonl")[0]["job_id"] == sweep["other_job"]
    assert len(comparison_rows(db, model=str(source))) == 5
    assert len(comparison_rows(db, model="my-model")) == 5
    assert comparison_rows(db, model="/no/such/model") == []


def test_variant_without_baseline_has_no_deltas(db, tmp_path, source):
    q4 = _quantize(db, tmp_path, source, 4, 1.0)
    _finish(db, tmp_path, _eval(source, tmp_path / "d.jsonl", "w4g128", q4), _scores(0.5, 0.5, 0.5, 1e6))
    (row,) = comparison_rows(db)
    assert row["precision"] == 0.5 and row["precision_delta"] is None and row["size_pct"] is None


def _compare(*args):
    result = CliRunner().invoke(cli, ["compare", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_every_format_carries_the_same_rows(db, sweep):
    data = ["--data", str(sweep["data"])]
    rows = json.loads(_compare(*data, "--format", "json").stdout)
    assert [r["variant"] for r in rows] == ["baseline", "w8g128", "w4g128"]
    assert rows == json.loads(json.dumps(comparison_rows(db, data=str(sweep["data"]))))

    table = _compare(*data).stdout
    assert "w4g128" in table and "0.500 (-0.300)" in table and "33.3" in table
    markdown = _compare(*data, "--format", "markdown").stdout.splitlines()
    assert markdown[0].startswith("### ") and markdown[2].startswith("| variant | bits |")
    assert markdown[6].startswith("| w4g128 | 4 |") and len(markdown) == 7
    table_csv = list(csv.DictReader(io.StringIO(_compare(*data, "--format", "csv").stdout)))
    assert [r["variant"] for r in table_csv] == ["baseline", "w8g128", "w4g128"]
    assert float(table_csv[2]["precision_delta"]) == pytest.approx(-0.3)


def test_plot_writes_a_png(db, sweep, tmp_path):
    out = tmp_path / "sweep.png"
    result = _compare("--plot", str(out), "--format", "json")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in result.stderr and json.loads(result.stdout)


def test_plot_into_missing_directory_is_bad_input(db, tmp_path):
    result = run_qrun("compare", "--plot", str(tmp_path / "nope" / "x.png"))
    assert result.returncode == 2
    missing = tmp_path / "nope"
    assert result.stderr.strip() == f"Error: --plot {missing / 'x.png'}: directory {missing} does not exist"


def test_no_rows(db):
    table = _compare()
    assert table.stdout == "" and table.stderr.count("\n") == 1 and "No succeeded eval jobs" in table.stderr
    assert json.loads(_compare("--format", "json").stdout) == []


@pytest.mark.slow
def test_sweep_end_to_end(qrun_home, tiny_qwen2, tmp_path):
    data = write_labeled(tmp_path / "dialogs.jsonl")
    ids = json.loads(run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--bits", "8", "--group-size", "32",
                          "--eval", str(data), "--eval-ppl", str(data), "--json", check=True).stdout)
    assert len(ids) == 5  # baseline eval, then quantize + eval for each of w4g32 and w8g32
    run = run_qrun("run", "--until-empty", check=True)
    assert "ran 5 job(s), 0 failed" in run.stderr
    rows = json.loads(run_qrun("compare", "--format", "json", check=True).stdout)
    assert [(r["variant"], r["bits"]) for r in rows] == [("baseline", 32), ("w8g32", 8), ("w4g32", 4)]
    base = rows[0]
    for name in ("precision", "recall", "f1", "accuracy", "invalid", "auc", "perplexity"):
        assert base[name] is not None and base[f"{name}_delta"] == 0, name
        assert all(r[f"{name}_delta"] == pytest.approx(r[name] - base[name]) for r in rows), name
    assert base["size_pct"] == 100 and base["agreement"] == 1
    assert rows[2]["size_mb"] < rows[1]["size_mb"] < base["size_mb"]
    assert all(r["quantize_s"] > 0 and 0 <= r["agreement"] <= 1 for r in rows[1:])
    assert all(r["eval_samples"] == 8 for r in rows)
    plot = tmp_path / "sweep.png"
    table = run_qrun("compare", "--plot", str(plot), check=True)
    assert "w4g32" in table.stdout and plot.stat().st_size > 0


@pytest.mark.slow
def test_failed_quantize_fails_its_eval(qrun_home, tiny_qwen2, tmp_path):
    import shutil

    model = tmp_path / "broken"
    shutil.copytree(tiny_qwen2, model)
    data = write_labeled(tmp_path / "dialogs.jsonl")
    baseline, quantize, evaluation = json.loads(run_qrun("submit", "--model", str(model), "--bits", "4", "--group-size",
                                                     "32", "--eval", str(data), "--json", check=True).stdout)
    (model / "model.safetensors").write_bytes(b"not safetensors")  # broken after submit's checks
    run = run_qrun("run", "--until-empty")
    assert run.returncode == 1
    jobs = {j["id"]: j for j in json.loads(run_qrun("status", "--json", check=True).stdout)}
    assert jobs[quantize]["status"] == "failed" and jobs[baseline]["status"] == "failed"
    assert jobs[evaluation]["status"] == "failed"
    assert jobs[evaluation]["error"] == f"upstream job {quantize} failed"
    empty = run_qrun("compare", "--format", "json", check=True)
    assert json.loads(empty.stdout) == [] and "No succeeded eval jobs" in empty.stderr


# ---------------------------------------------------------------- predictions that cannot be read


def _w4_predictions(sweep, tmp_path) -> Path:
    return tmp_path / f"job{sweep['w4']}.predictions.jsonl"


def _warning_and_agreement(result, path: Path) -> tuple[str, object]:
    """The one stderr line, and the w4 row's agreement from the JSON on stdout."""
    rows = {r["variant"]: r for r in json.loads(result.stdout)}
    assert rows["w8g128"]["agreement"] == 1.0  # the readable files still count
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"cannot read predictions {path}: "), line
    return line, rows["w4g128"]["agreement"]


@pytest.mark.reliability
@pytest.mark.parametrize("damage, reason", [
    ("directory", "Is a directory"),
    ("missing", "No such file or directory"),
    ("not_json", "not JSONL"),
    ("no_id", "lacks its id or prediction"),
])
def test_unreadable_predictions_are_named_not_silent(db, sweep, tmp_path, damage, reason):
    """Before, each of these printed `-` in the agreement columns and nothing else."""
    path = _w4_predictions(sweep, tmp_path)
    path.unlink()
    if damage == "directory":
        path.mkdir()
    elif damage == "not_json":
        path.write_bytes(b'{"id": "a", "prediction": tr\n')
    elif damage == "no_id":
        path.write_text('{"prediction": true}\n')
    result = _compare("--data", str(sweep["data"]), "--format", "json")
    line, agreement = _warning_and_agreement(result, path)
    assert reason in line and agreement is None
    table = _compare("--data", str(sweep["data"]))
    assert f"cannot read predictions {path}" in table.stderr and "w4g128" in table.stdout


@pytest.mark.reliability
def test_predictions_without_read_permission_are_named(db, sweep, tmp_path):
    """A file made unreadable (chmod 000), read by the real console script without root's power to
    read anything (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH)."""
    import shutil
    import subprocess
    import sys

    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root and setpriv (util-linux) is missing: cannot make a file unreadable")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]
    path = _w4_predictions(sweep, tmp_path)
    path.chmod(0o000)
    try:
        result = subprocess.run([*prefix, str(Path(sys.executable).parent / "qrun"), "compare", "--data",
                                 str(sweep["data"]), "--format", "json"],
                                capture_output=True, text=True, timeout=120, env=os.environ.copy())
    finally:
        path.chmod(0o644)
    assert result.returncode == 0, result.stderr
    line, agreement = _warning_and_agreement(result, path)
    assert line.endswith("Permission denied") and agreement is None
