"""`qrun compare`: rows assembled from a real job table (filled through the queue's own functions),
every output format, the plot, and one end-to-end sweep through the real console script."""

import csv
import io
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from qrun.comparison import comparison_rows, describe_smallest, groups, smallest_within
from qrun.plotting import plot_points
from qrun.cli.main import cli
from qrun.db import queue
from qrun.db.states import Kind
from helpers import QRUN, invoke_main, run_qrun, submit_and_claim, without_dac, write_labeled, write_predictions

T, F = True, False


@pytest.fixture
def source(tmp_path) -> Path:
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    return model


def _finish(db, tmp_path, spec: queue.JobSpec, metrics: dict, predictions: dict | None = None) -> int:
    """Submit, claim and succeed one job, with a predictions artifact written like an eval job's."""
    job_id = submit_and_claim(db, spec)
    records = [] if predictions is None else [write_predictions(tmp_path / f"job{job_id}.predictions.jsonl",
                                                                predictions)]
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
    failed = submit_and_claim(db, _eval(source, data, "w3g128", q3))
    queue.fail_job(db, failed, "w", "boom")
    ids["other_job"] = _finish(db, tmp_path, _eval(source, other, "baseline"), _scores(0.5, 0.5, 0.5, 3e6))
    return ids | {"data": data, "other": other, "q4": q4, "failed": failed}


def test_rows_baseline_first_then_by_size_then_bits_newest_wins(db, sweep, source, tmp_path):
    # Baseline first even where a variant is larger; then by size, largest first; equal sizes by bits, most
    # first; a row of unknown size last. Finished in none of these orders (the baseline last).
    data = tmp_path / "order.jsonl"
    for bits, size in ((3, None), (4, 1e6), (2, 5e6), (8, 1e6)):
        metrics = {k: v for k, v in _scores(0.5, 0.5, 0.5, size).items() if v is not None}
        _finish(db, tmp_path, _eval(source, data, f"w{bits}g128", _quantize(db, tmp_path, source, bits, 1.0)), metrics)
    _finish(db, tmp_path, _eval(source, data, "baseline"), _scores(0.5, 0.5, 0.5, 3e6))
    assert [r["variant"] for r in comparison_rows(db, data=str(data))] == [
        "baseline", "w2g128", "w8g128", "w4g128", "w3g128"]

    rows = comparison_rows(db, data=str(sweep["data"]))
    assert [(r["variant"], r["bits"], r["job_id"], r["evaluated"]) for r in rows] == [
        ("baseline", 16, sweep["baseline"], True), ("w8g128", 8, sweep["w8"], True), ("w4g128", 4, sweep["w4"], True),
        ("w3g128", 3, sweep["failed"], False)]  # the failed eval: last, with no numbers
    base, w8, w4, w3 = rows
    assert (w3["eval_status"], w3["missing_reason"], w3["precision"], w3["size_pct"]) == (
        "failed", "eval failed: boom", None, None)
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
        [(str(sweep["data"]), "generate")] + [(str(sweep["data"]), "score")] * 4 + [(str(sweep["other"]), "score")])
    assert rows[0]["job_id"] == generate and rows[0]["precision_delta"] is None  # no generate baseline
    assert comparison_rows(db, data="other.jsonl")[0]["job_id"] == sweep["other_job"]
    assert len(comparison_rows(db, model=str(source))) == 6
    assert len(comparison_rows(db, model="my-model")) == 6
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
    assert [(r["variant"], r["evaluated"]) for r in rows] == [
        ("baseline", True), ("w8g128", True), ("w4g128", True), ("w3g128", False)]
    assert rows == json.loads(json.dumps(comparison_rows(db, data=str(sweep["data"]))))

    table = _compare(*data).stdout
    assert "w4g128" in table and "0.500 (-0.300)" in table and "33.3" in table
    assert table.splitlines()[-3:] == ["", "missing from this table:", "  w3g128: eval failed: boom"]
    markdown = _compare(*data, "--format", "markdown").stdout.splitlines()
    assert markdown[0].startswith("### ") and markdown[2].startswith("| variant | bits |")
    assert markdown[6].startswith("| w4g128 | 4 |") and markdown[7:] == [
        "", "Missing from this table:", "", "- w3g128: eval failed: boom"]
    table_csv = list(csv.DictReader(io.StringIO(_compare(*data, "--format", "csv").stdout)))
    assert [(r["variant"], r["evaluated"]) for r in table_csv] == [
        ("baseline", "True"), ("w8g128", "True"), ("w4g128", "True"), ("w3g128", "False")]
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
    # Nothing has numbers, and compare says why each variant is missing (exit 0, as before).
    missing = run_qrun("compare", "--format", "json", check=True)
    assert [(r["variant"], r["evaluated"], r["eval_status"]) for r in json.loads(missing.stdout)] == [
        ("baseline", False, "failed"), ("w4g32", False, "failed")]
    reasons = [r["missing_reason"] for r in json.loads(missing.stdout)]
    assert reasons[0].startswith("eval failed: ") and reasons[1].startswith("quantize failed: ")


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
    import subprocess

    prefix = without_dac()
    path = _w4_predictions(sweep, tmp_path)
    path.chmod(0o000)
    try:
        result = subprocess.run([*prefix, QRUN, "compare", "--data",
                                 str(sweep["data"]), "--format", "json"],
                                capture_output=True, text=True, timeout=120, env=os.environ.copy())
    finally:
        path.chmod(0o644)
    assert result.returncode == 0, result.stderr
    line, agreement = _warning_and_agreement(result, path)
    assert line.endswith("Permission denied") and agreement is None


# ---------------------------------------------------------------- several methods: size order, --max-drop, --plot


def _method_variant(db, tmp_path, model, data, params: dict, size: float, f1: float, perplexity: float) -> int:
    """A succeeded quantize job of these params and its succeeded eval (F1 and perplexity as given)."""
    quantize = _finish(db, tmp_path, queue.JobSpec(kind=Kind.QUANTIZE, model=str(model), params=params),
                       {"quantize_s": 5.0})
    metrics = _scores(0.9, 0.9, 0.9, size, perplexity=perplexity) | {"f1": f1}
    return _finish(db, tmp_path, _eval(model, data, "ignored", quantize), metrics)


# (params, size in bytes, F1, perplexity); the baseline: 4.1 MB, F1 0.912, perplexity 10.0
METHOD_VARIANTS = (
    ({"bits": 8, "group_size": 128}, 2.2e6, 0.913, 10.01),
    ({"method": "fp8", "bits": 8}, 2.05e6, 0.911, 10.02),
    ({"method": "gguf", "bits": 4, "gguf_type": "q4_k_m"}, 1.25e6, 0.899, 10.3),
    ({"method": "gguf", "bits": 4, "gguf_type": "q4_0"}, 1.18e6, 0.880, 10.9),  # 4 bits too: another variant
    ({"method": "awq", "bits": 4, "group_size": 128}, 1.2e6, 0.909, 10.1),
    ({"method": "bnb-nf4", "bits": 4}, 1.15e6, 0.897, 10.2),
    ({"bits": 4, "group_size": 128}, 1.1e6, 0.905, 10.4),  # GPTQ as every job before methods: no `method`
    ({"method": "rtn", "bits": 4, "group_size": 128}, 0.9e6, 0.871, 12.5),
)
BY_SIZE = ["baseline", "w8g128", "fp8", "gguf-q4_k_m", "awq-w4g128", "gguf-q4_0", "bnb-nf4", "w4g128", "rtn-w4g128"]


@pytest.fixture
def methods(db, tmp_path, source):
    """A baseline and a variant of each method, each evaluated on one data file."""
    data = tmp_path / "methods.jsonl"
    baseline = _finish(db, tmp_path, _eval(source, data, "baseline"),
                       _scores(0.9, 0.9, 0.9, 4.1e6, perplexity=10.0) | {"f1": 0.912})
    ids = [_method_variant(db, tmp_path, source, data, *variant) for variant in METHOD_VARIANTS]
    return {"data": data, "baseline": baseline, "ids": ids}


def test_rows_of_several_methods_baseline_first_then_by_size_and_named_by_method(db, methods):
    rows = comparison_rows(db)
    assert [r["variant"] for r in rows] == BY_SIZE
    assert [r["method"] for r in rows] == [None, "gptq", "fp8", "gguf", "awq", "gguf", "bnb-nf4", "gptq", "rtn"]
    assert [r["size_bytes"] for r in rows] == sorted((r["size_bytes"] for r in rows), reverse=True)
    assert {r["gguf_type"] for r in rows if r["method"] == "gguf"} == {"q4_k_m", "q4_0"}
    assert all(r["within_max_drop"] is None and r["max_drop_answer"] is None for r in rows)  # only with max_drop


def test_smallest_within_names_the_smallest_variant_that_keeps_f1(db, methods):
    rows = comparison_rows(db)
    answer = smallest_within(rows, "f1", 0.01)
    assert (answer["metric"], answer["max_drop"], answer["lower_is_better"]) == ("f1", 0.01, False)
    assert answer["baseline"] == 0.912 and answer["threshold"] == pytest.approx(0.902)
    pick, below = answer["pick"], answer["next_smaller"]
    assert (pick["variant"], pick["method"], pick["value"], pick["size_bytes"]) == ("w4g128", "gptq", 0.905, 1_100_000)
    assert pick["delta"] == pytest.approx(-0.007) and pick["size_pct"] == pytest.approx(100 * 1.1 / 4.1)
    assert (below["variant"], below["value"]) == ("rtn-w4g128", 0.871) and below["delta"] == pytest.approx(-0.041)
    assert describe_smallest(rows) == (
        "smallest within 0.01 F1 of the baseline (0.912): w4g128 — 1.1 MB (27% of baseline), F1 0.905; "
        "next smaller: rtn-w4g128 — 0.9 MB (22% of baseline), F1 0.871 (−0.041)")
    # 0.902 is exactly one point below 0.912 (0.0100000000000000009 in floating point): still within
    assert smallest_within([*rows[:1], {**rows[7], "f1": 0.902}], "f1", 0.01)["pick"]["variant"] == "w4g128"
    # a tighter drop: awq's 0.909 is within 0.005, GPTQ's 0.905 is not; the next smaller is the largest below awq
    tight = smallest_within(rows, "f1", 0.005)
    assert (tight["pick"]["variant"], tight["next_smaller"]["variant"]) == ("awq-w4g128", "gguf-q4_0")
    assert describe_smallest(rows, max_drop=0) == (
        "smallest within 0 F1 of the baseline (0.912): w8g128 — 2.2 MB (54% of baseline), F1 0.913; "
        "next smaller: fp8 — 2.0 MB (50% of baseline), F1 0.911 (−0.001)")


def test_perplexity_drops_by_rising(db, methods):
    rows = comparison_rows(db)
    answer = smallest_within(rows, "perplexity", 0.5)
    assert answer["lower_is_better"] and answer["threshold"] == 10.5
    assert (answer["pick"]["variant"], answer["next_smaller"]["variant"]) == ("w4g128", "rtn-w4g128")
    assert describe_smallest(rows, "perplexity", 0.5) == (
        "smallest within 0.5 perplexity of the baseline (10.00, lower is better): w4g128 — 1.1 MB (27% of "
        "baseline), perplexity 10.40; next smaller: rtn-w4g128 — 0.9 MB (22% of baseline), perplexity 12.50 (+2.50)")
    assert smallest_within(rows, "perplexity", 0.05)["pick"]["variant"] == "fp8"


def _row(variant, f1, size_pct, bits=4, **more) -> dict:
    """A row as the demo's tests make them: no model, data or bytes, only the share of the baseline."""
    return {"variant": variant, "bits": bits, "f1": f1, "size_pct": size_pct, **more}


def test_describe_smallest_says_what_it_cannot_answer():
    base = _row("baseline", 0.990, 100.0, bits=16)
    assert smallest_within([_row("w4g128", 0.98, 60.0)]) is None  # no baseline
    assert describe_smallest([_row("w4g128", 0.98, 60.0)]) == (
        "no baseline F1 to measure a drop from: evaluate the unquantized model on the same data "
        "(qrun submit --eval, or qrun eval --model on the source model)")
    assert describe_smallest([{**base, "f1": None}], "f1") == "no row has F1: nothing to hold against a drop of 0.01"
    assert describe_smallest([base]) == ("no variant here has F1 and a size: nothing to compare with the baseline "
                                         "(0.990)")
    worse = [base, _row("w8g128", 0.950, 73.5, bits=8), _row("w4g128", 0.900, 59.4)]
    assert smallest_within(worse)["pick"] is None
    assert describe_smallest(worse) == ("no variant within 0.01 F1 of the baseline (0.990); the largest: w8g128 — "
                                        "74% of baseline, F1 0.950 (−0.040)")
    flat = [base, _row("w8g128", 0.990, 73.5, bits=8), _row("w2g128", 0.995, 52.3, bits=2)]
    assert describe_smallest(flat) == ("smallest within 0.01 F1 of the baseline (0.990): w2g128 — 52% of baseline, "
                                       "F1 0.995; nothing here is smaller")
    # rows without the metric or a size are skipped
    assert smallest_within([*flat, _row("w1g128", 0.999, None), _row("w3", None, 40.0)])["pick"]["variant"] == "w2g128"
    # equal sizes: the better one
    twins = [base, _row("rtn-w4g128", 0.985, 50.0), _row("w4g128", 0.989, 50.0)]
    assert smallest_within(twins)["pick"]["variant"] == "w4g128"


def test_smallest_within_takes_one_group_and_known_metrics(db, sweep, methods):
    rows = comparison_rows(db)
    with pytest.raises(ValueError, match=r"rows of 3 comparison groups: pass one group's rows"):
        smallest_within(rows)
    with pytest.raises(ValueError, match=r"metric 'auc' is not one of f1, precision, recall, accuracy, perplexity"):
        smallest_within(groups(rows)[0], "auc")
    answers = [smallest_within(g) for g in groups(rows)]  # data.jsonl, methods.jsonl, other.jsonl (a baseline alone)
    assert [a["pick"] and a["pick"]["variant"] for a in answers] == ["w8g128", "w4g128", None]


def test_max_drop_answers_under_each_table_and_in_every_format(db, methods):
    table = _compare("--max-drop", "0.01").stdout.splitlines()
    assert [line.split()[0] for line in table[2:11]] == BY_SIZE
    assert table[11:] == ["", describe_smallest(comparison_rows(db))]
    header = table[1].split()
    assert header[:4] == ["variant", "bits", "method", "size"]
    assert table[3].split()[:3] == ["w8g128", "8", "gptq"] and table[2].split()[:3] == ["baseline", "16", "-"]

    rows = json.loads(_compare("--max-drop", "0.01", "--format", "json").stdout)
    assert rows == json.loads(json.dumps(comparison_rows(db, metric="f1", max_drop=0.01)))
    assert [r["variant"] for r in rows if r["smallest_within"]] == ["w4g128"]
    assert [r["variant"] for r in rows if r["within_max_drop"]] == ["baseline", "w8g128", "fp8", "awq-w4g128",
                                                                    "w4g128"]
    assert {r["max_drop_answer"] for r in rows} == {describe_smallest(comparison_rows(db))}
    by_perplexity = json.loads(_compare("--max-drop", "0.05", "--metric", "perplexity", "--format", "json").stdout)
    assert [r["variant"] for r in by_perplexity if r["smallest_within"]] == ["fp8"]
    assert "perplexity 10.02" in by_perplexity[0]["max_drop_answer"]

    markdown = _compare("--max-drop", "0.01", "--format", "markdown").stdout.splitlines()
    assert markdown[2].startswith("| variant | bits | method |") and markdown[-1].startswith("smallest within 0.01 F1")
    table_csv = list(csv.DictReader(io.StringIO(_compare("--max-drop", "0.01", "--format", "csv").stdout)))
    assert [r["smallest_within"] for r in table_csv].count("True") == 1
    assert table_csv[0]["max_drop_answer"].startswith("smallest within 0.01 F1")


def test_no_max_drop_no_answer_and_gptq_sweeps_keep_their_table(db, sweep):
    table = _compare("--data", str(sweep["data"])).stdout.splitlines()
    assert [line.split()[:3] for line in table[2:5]] == [["baseline", "16", "-"], ["w8g128", "8", "gptq"],
                                                         ["w4g128", "4", "gptq"]]
    assert table[5:] == ["", "missing from this table:", "  w3g128: eval failed: boom"]
    answered = _compare("--data", str(sweep["data"]), "--max-drop", "0.01").stdout.splitlines()
    assert answered[:len(table)] == table and answered[len(table):] == [
        "", "smallest within 0.01 F1 of the baseline (0.686): w8g128 — 1.5 MB (50% of baseline), F1 0.686; "
            "next smaller: w4g128 — 1.0 MB (33% of baseline), F1 0.500 (−0.186)"]


# ---------------------------------------------------------------- variants the table lacks


def _in_sweep(db, spec: queue.JobSpec, sweep: str) -> int:
    (job_id,) = queue.submit_jobs(db, [spec], sweep=sweep)
    return job_id


def _claimed(db, job_id: int) -> int:
    assert queue.claim_job(db, "w", None).id == job_id
    return job_id


@pytest.fixture
def gappy_sweep(db, tmp_path, source):
    """A sweep in which a baseline and w4 were evaluated, while w8's eval failed, w2's quantize failed
    (so its eval failed as the upstream's), w3's eval waits in the queue, gguf was quantized and never
    evaluated; and another sweep's quantize job with no eval, which this comparison does not concern."""
    data, sweep = tmp_path / "data.jsonl", "5eed5eed"
    _finish(db, tmp_path, _eval(source, data, "baseline"), _scores(0.8, 0.6, 0.75, 3e6))
    ids = {}
    for bits, params in ((4, {}), (8, {}), (2, {}), (3, {}), ("gguf", {"method": "gguf", "gguf_type": "q4_k_m"})):
        spec = queue.JobSpec(kind=Kind.QUANTIZE, model=str(source),
                             params={"bits": 4 if bits == "gguf" else bits, "group_size": 128, **params})
        ids[bits] = _claimed(db, _in_sweep(db, spec, sweep))
        if bits == 2:
            queue.fail_job(db, ids[2], "w", "boom at layer 1\nTraceback (most recent call last): ...")
        else:
            queue.finish_job(db, ids[bits], "w", {"quantize_s": 1.0}, [])
    w4 = _claimed(db, _in_sweep(db, _eval(source, data, "w4g128", ids[4]), sweep))
    queue.finish_job(db, w4, "w", _scores(0.8, 0.5, 0.7, 1e6), [])
    w8 = _claimed(db, _in_sweep(db, _eval(source, data, "w8g128", ids[8]), sweep))
    queue.fail_job(db, w8, "w", "CUDA out of memory. Tried to allocate 2.00 GiB\nTraceback ...")
    orphan = _in_sweep(db, _eval(source, data, "w2g128", ids[2]), sweep)
    assert queue.claim_job(db, "w", None) is None  # nothing ready: the orphan fails as its upstream's
    _finish(db, tmp_path, queue.JobSpec(kind=Kind.QUANTIZE, model=str(source), params={"bits": 8, "group_size": 32}),
            {"quantize_s": 1.0})
    waiting = _in_sweep(db, _eval(source, data, "w3g128", ids[3]), sweep)
    return {"data": data, "sweep": sweep, "w8": w8, "orphan": orphan, "waiting": waiting, **ids}


def test_variants_without_a_succeeded_eval_are_listed_under_their_table_with_the_reason(db, gappy_sweep):
    missing = [
        "w8g128: eval failed: CUDA out of memory. Tried to allocate 2.00 GiB",
        "w2g128: quantize failed: boom at layer 1",
        "w3g128: eval queued",
        "gguf-q4_k_m: not evaluated",
    ]
    table = _compare().stdout.splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["baseline", "w4g128"]
    assert table[4:] == ["", "missing from this table:"] + ["  " + line for line in missing]
    assert _compare("--sweep", gappy_sweep["sweep"]).stdout.splitlines()[4:] == table[4:]

    rows = json.loads(_compare("--format", "json").stdout)
    marks = [(r["variant"], r["evaluated"], r["eval_status"], r["job_id"], r["quantize_job_id"]) for r in rows]
    assert marks == [("baseline", True, "succeeded", rows[0]["job_id"], None),
                     ("w4g128", True, "succeeded", rows[1]["job_id"], gappy_sweep[4]),
                     ("w8g128", False, "failed", gappy_sweep["w8"], gappy_sweep[8]),
                     ("w2g128", False, "failed", gappy_sweep["orphan"], gappy_sweep[2]),
                     ("w3g128", False, "queued", gappy_sweep["waiting"], gappy_sweep[3]),
                     ("gguf-q4_k_m", False, None, None, gappy_sweep["gguf"])]
    assert [f"{r['variant']}: {r['missing_reason']}" for r in rows if not r["evaluated"]] == missing
    assert all(r["missing_reason"] is None for r in rows if r["evaluated"])
    assert (rows[2]["bits"], rows[2]["method"], rows[2]["precision"], rows[5]["gguf_type"]) == (8, "gptq", None, "q4_k_m")
    # the numbers of the evaluated rows are what they were: the missing ones take no part in them
    assert rows[1]["f1_delta"] == pytest.approx(rows[1]["f1"] - rows[0]["f1"]) and rows[1]["size_pct"] == 100 / 3
    markdown = _compare("--format", "markdown").stdout.splitlines()
    assert markdown[-len(missing) - 2:] == ["Missing from this table:", ""] + [f"- {line}" for line in missing]


def test_a_variant_evaluated_after_a_failure_is_not_missing(db, tmp_path, gappy_sweep, source):
    queue.cancel_jobs(db, [gappy_sweep["waiting"]])
    again = _claimed(db, _in_sweep(db, _eval(source, gappy_sweep["data"], "w8g128", gappy_sweep[8]), "5eed5eed"))
    queue.finish_job(db, again, "w", _scores(0.7, 0.5, 0.7, 1.5e6), [])
    rows = comparison_rows(db)
    assert [(r["variant"], r["evaluated"]) for r in rows][:3] == [
        ("baseline", True), ("w8g128", True), ("w4g128", True)]
    assert [(r["variant"], r["missing_reason"]) for r in rows[3:]] == [
        ("w2g128", "quantize failed: boom at layer 1"), ("w3g128", "eval cancelled"),
        ("gguf-q4_k_m", "not evaluated")]


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_compare_of_a_sweep_that_matches_no_job_is_bad_input(db, gappy_sweep, fmt):
    result = invoke_main("compare", "--sweep", "nosuch", "--format", fmt)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("Error: --sweep 'nosuch' matches no job: give a sweep id or name from "
                                     "`qrun status --json`")


def test_a_group_without_baseline_says_so_and_exits_0(db, tmp_path, source):
    q4 = _quantize(db, tmp_path, source, 4, 1.0)
    _finish(db, tmp_path, _eval(source, tmp_path / "d.jsonl", "w4g128", q4), _scores(0.5, 0.5, 0.5, 1e6))
    result = _compare("--max-drop", "0.01")
    assert result.stdout.splitlines()[-1].startswith("no baseline F1 to measure a drop from")
    (row,) = json.loads(_compare("--max-drop", "0.01", "--format", "json").stdout)
    assert (row["within_max_drop"], row["smallest_within"]) == (None, False)
    assert row["max_drop_answer"].startswith("no baseline F1")


@pytest.mark.parametrize("args, line", [
    (["--max-drop", "-0.01"], "Error: --max-drop -0.01: give a drop of 0 or more (0.01 = one point of F1)"),
    (["--max-drop", "nan"], "Error: --max-drop nan: give a drop of 0 or more (0.01 = one point of F1)"),
    (["--max-drop", "1pt"],
     "Error: Invalid value for '--max-drop': '1pt' is not a valid float. (see `qrun compare --help`)"),
    (["--metric", "auc"], "Error: Invalid value for '--metric': 'auc' is not one of 'f1', 'precision', 'recall', "
                          "'accuracy', 'perplexity'. (see `qrun compare --help`)"),
])
def test_bad_metric_or_drop_is_bad_input(db, methods, args, line):
    result = run_qrun("compare", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == line


def test_help_says_a_perplexity_drop_is_a_rise():
    text = " ".join(CliRunner().invoke(cli, ["compare", "--help"]).stdout.split())
    assert "Perplexity: lower is better, so a drop is a rise." in text
    assert "(0.01 = one point of F1; for perplexity, at most D higher)" in text


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_several_methods_fit_narrow_terminals(db, methods, width):
    from qrun.cli.table import display_width

    result = run_qrun("compare", "--max-drop", "0.01", env={"COLUMNS": str(width)}, check=True)
    lines = result.stdout.splitlines()
    assert all(display_width(line) <= width and line == line.rstrip() for line in lines), result.stdout
    answer = lines[len(lines) - lines[::-1].index(""):]  # the lines after the last blank one
    assert " ".join(answer) == describe_smallest(comparison_rows(db))
    assert not any(line.endswith((" 1.1", " 0.9")) for line in answer)  # a size stays with its unit
    if width >= 80:  # a table: each variant's row starts with its label (which names any method but GPTQ)
        assert [line.split()[0] for line in lines[2:11]] == BY_SIZE
        assert lines[1].split()[:3] == (["variant", "bits", "method"] if width >= 100 else ["variant", "bits", "size"])
    else:  # too narrow for the columns that must stay: a block per variant, the method in each
        assert [line.split()[1] for line in lines if line.startswith("variant ")] == BY_SIZE
        assert [line.split()[1] for line in lines if line.startswith("method ")] == [
            "-", "gptq", "fp8", "gguf", "awq", "gguf", "bnb-nf4", "gptq", "rtn"]


def test_plot_points_pareto_front_and_band(db, methods):
    (group,) = groups(comparison_rows(db))
    points = plot_points(group, "f1", 0.01)
    assert sorted(p["variant"] for p in points) == sorted(BY_SIZE)
    assert [p["variant"] for p in points if p["pareto"]] == ["rtn-w4g128", "w4g128", "awq-w4g128", "fp8", "w8g128"]
    assert [p["variant"] for p in points if p["pick"]] == ["w4g128"]
    assert [p["variant"] for p in points if p["baseline"]] == ["baseline"]
    assert {p["variant"] for p in points if p["within"]} == {"baseline", "w8g128", "fp8", "awq-w4g128", "w4g128"}
    assert all(p["within"] is None for p in plot_points(group, "f1"))
    lower = plot_points(group, "perplexity")
    assert [p["variant"] for p in lower if p["pareto"]] == ["rtn-w4g128", "w4g128", "bnb-nf4", "awq-w4g128",
                                                            "fp8", "w8g128", "baseline"]


def test_plot_draws_one_labelled_point_per_variant(db, methods, sweep, tmp_path):
    from matplotlib.collections import PathCollection

    from qrun.plotting import draw_plot

    rows = comparison_rows(db)
    fig, panels = draw_plot(rows, "f1", 0.01)
    assert [len(points) for points in panels] == [3, 9, 1]  # the GPTQ sweep's group, the methods', a baseline alone
    # the methods' panel: one label per variant, a linear x (0.9 to 4.1 MB is not a wide range), the band
    ax = fig.axes[1]
    assert sorted(t.get_text() for t in ax.texts) == sorted(BY_SIZE)
    assert ax.get_xscale() == "linear" and len(ax.patches) == 1
    drawn = sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))
    assert drawn == 8 + 1 + 1  # the variants, the baseline as a star, the ring round the pick
    out = tmp_path / "methods.png"
    result = _compare("--plot", str(out), "--max-drop", "0.01", "--metric", "f1")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out}" in result.stderr


def test_plot_of_a_wide_size_range_has_a_log_axis(db, tmp_path, source):
    from qrun.plotting import draw_plot

    data = tmp_path / "data.jsonl"
    _finish(db, tmp_path, _eval(source, data, "baseline"), _scores(0.9, 0.9, 0.9, 140e9) | {"f1": 0.9})
    _method_variant(db, tmp_path, source, data, {"method": "gguf", "bits": 4, "gguf_type": "q4_0"}, 4e9, 0.85, 9.0)
    fig, (points,) = draw_plot(comparison_rows(db), "f1")
    assert len(points) == 2 and fig.axes[0].get_xscale() == "log" and not fig.axes[0].patches

