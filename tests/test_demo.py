"""`qrun demo`: its synthetic dataset, the demo model it trains, and the whole demo through the CLI."""

import json
import re

import pytest

from helpers import run_qrun

HAN = re.compile(r"[\u4e00-\u9fff]")


def _is_chinese(row: dict) -> bool:
    return bool(HAN.search(row["input"]))


# ---------------------------------------------------------------- the dataset


def test_rows_are_balanced_bilingual_and_in_the_seed_form(tmp_path):
    from qrun.demo.dataset import generate_rows, write_jsonl
    from qrun.workers.datasets import DEFAULT_INSTRUCTION, load_labeled

    rows = generate_rows(400, seed=3)
    assert sum(r["label"] for r in rows) == 200
    for label in (True, False):
        of_label = [r for r in rows if r["label"] is label]
        assert sum(map(_is_chinese, of_label)) == 100  # half Chinese, half English, in each class
    for row in rows:
        assert set(row) == {"input", "label", "instruction"}
        assert row["instruction"] == DEFAULT_INSTRUCTION
        lines = row["input"].split("\n")
        assert len(lines) >= 2 and all(re.match(r"^[^:\n]{1,20}: \S", line) for line in lines), row["input"]
    samples = load_labeled(write_jsonl(rows, tmp_path / "rows.jsonl"))  # qrun's own loader reads them back
    assert [s.label for s in samples] == [r["label"] for r in rows]


def test_rows_vary_in_names_amounts_and_speakers():
    from qrun.demo.dataset import generate_rows

    rows = generate_rows(400, seed=4)
    assert len({r["input"] for r in rows}) == 400
    speakers = {line.split(":")[0] for r in rows for line in r["input"].split("\n")}
    assert any(s.startswith("发言人") for s in speakers) and any(s.startswith("Speaker ") for s in speakers)
    assert len(speakers) > 100
    amounts = set(re.findall(r"\d[\d,.]*(?:元|块|万元| dollars)|[$£][\d,]+", " ".join(r["input"] for r in rows)))
    assert len(amounts) > 50


def test_generation_is_deterministic_and_seeds_differ():
    from qrun.demo.dataset import generate_rows

    assert generate_rows(50, seed=7) == generate_rows(50, seed=7)
    assert generate_rows(50, seed=7) != generate_rows(50, seed=8)


def test_held_out_split_never_copies_a_training_row():
    from qrun.demo.dataset import generate_splits

    splits = generate_splits(5, {"train": 1000, "eval": 200})
    assert [len(v) for v in splits.values()] == [1000, 200]
    train = {r["input"] for r in splits["train"]}
    assert not train & {r["input"] for r in splits["eval"]}
    assert sum(r["label"] for r in splits["eval"]) == 100


# ---------------------------------------------------------------- the demo model


@pytest.fixture(scope="module")
def demo_home(demo_run):
    """The QRUN_HOME in which `qrun demo` built its model (demo_run), and build_demo's paths there:
    one build of the model for the whole module, not two (training takes most of a minute)."""
    from qrun.demo.build import build_demo

    _, _, home = demo_run
    return home, build_demo(home)


@pytest.mark.slow
def test_demo_model_reaches_target_accuracy_by_qrun_s_own_scoring(demo_home):
    """The accuracy build_demo reports is what qrun's eval measures on the saved model and eval file."""
    from qrun.demo.build import TARGET_ACCURACY
    from qrun.workers.datasets import load_labeled
    from qrun.workers.evaluate import load_model, prompt_ids, score_batch

    _, paths = demo_home
    info = paths.info()
    assert info["eval_accuracy"] >= TARGET_ACCURACY
    config = json.loads((paths.model / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    for width in (config["hidden_size"], config["intermediate_size"]):
        assert width % 32 == 0 and width % 128 == 0
    assert "not a fraud detector" in (paths.model / "README.md").read_text()
    model, tokenizer = load_model(paths.model, "cpu", trust_remote_code=False)
    samples = load_labeled(paths.eval)
    assert len(samples) == 200
    predictions = []
    for i in range(0, len(samples), 16):
        predictions += score_batch(model, tokenizer, [prompt_ids(tokenizer, s) for s in samples[i:i + 16]], "cpu")
    accuracy = sum(p == s.label for (p, _), s in zip(predictions, samples)) / len(samples)
    assert accuracy >= TARGET_ACCURACY
    assert abs(accuracy - info["eval_accuracy"]) <= 0.01
    calib = [json.loads(line) for line in paths.calib.read_text().splitlines()]
    train = {json.loads(line)["input"] for line in paths.train.read_text().splitlines()}
    assert len(calib) == 128 and all(r["input"] in train for r in calib)
    assert not train & {json.loads(line)["input"] for line in paths.eval.read_text().splitlines()}


@pytest.mark.slow
def test_demo_model_has_outlier_channels_and_still_gives_the_same_answers(demo_home):
    """The outlier step (what makes round-to-nearest lose answers) is recorded, is in the saved
    weights, and leaves the function alone: validation accuracy as training left it."""
    from safetensors.torch import load_file

    from qrun.demo.build import OUTLIER_CHANNELS, OUTLIER_SCALE

    _, paths = demo_home
    info = paths.info()
    assert abs(info["valid_accuracy"] - info["training"][-1]["valid_accuracy"]) <= 1 / 120, info["training"]
    outliers = info["outliers"]
    assert outliers["scale"] == OUTLIER_SCALE and "validation" in outliers["ranked_on"]
    weights = load_file(paths.model / "model.safetensors")
    assert sorted(outliers["channels"]) == ["0", "1"]
    for layer, norms in outliers["channels"].items():
        assert sorted(norms) == ["input_layernorm", "post_attention_layernorm"]
        for norm, channels in norms.items():
            assert len(set(channels)) == OUTLIER_CHANNELS
            weight = weights[f"model.layers.{layer}.{norm}.weight"].float().abs()
            others = [i for i in range(weight.numel()) if i not in channels]
            assert weight[channels].min() > 3 * weight[others].max(), (layer, norm)


@pytest.mark.slow
def test_demo_model_is_built_once_then_reused(demo_home):
    from qrun.demo.build import build_demo

    home, paths = demo_home
    weights = paths.model / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_demo(home) == paths
    assert weights.stat().st_mtime_ns == before
    assert (home / "demo").is_dir() and not list(home.glob(".demo-staging*"))  # no staging directory left


def test_demo_model_and_data_are_the_teams(demo_home):
    """Every file of the demo is group-readable and -writable, every directory setgid 2775 (README's
    "Sharing a server"): save_pretrained wrote the weights 0600, which a teammate could not read."""
    import stat

    _, paths = demo_home
    items = [paths.root, *paths.root.rglob("*")]
    modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in items}
    assert modes == {str(p): "0o2775" if p.is_dir() else "0o664" for p in items}


def test_the_model_is_trained_with_the_tokenizer_it_saves(tmp_path):
    """Training encodes each prompt exactly as qrun's eval encodes it with the tokenizer loaded from the
    saved model directory (for a Qwen2 config transformers loads its own Qwen2Tokenizer, which splits
    digits one by one: "226" was one token in training and three at eval, in 116 of the 200 prompts)."""
    from transformers import AutoTokenizer

    from qrun.demo.build import _new_model, _save_model, encode_rows
    from qrun.demo.dataset import generate_splits
    from qrun.workers.datasets import to_sample
    from qrun.workers.evaluate import prompt_ids

    splits = generate_splits(11, {"train": 300, "eval": 60})
    tokenizer, model = _new_model(splits["train"], tmp_path / "staging")
    _save_model(model, tokenizer, tmp_path / "saved", accuracy=1.0)
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")  # as workers.evaluate.load_model reads it
    assert sum(bool(re.search(r"\d\d", row["input"])) for row in splits["eval"]) > 30  # amounts, times
    trained = [row.prompt for row in encode_rows(splits["eval"], tokenizer)]
    evaluated = [prompt_ids(saved, to_sample(tmp_path, n, row)) for n, row in enumerate(splits["eval"], 1)]
    assert trained == evaluated


def test_missed_target_fails_clearly_and_keeps_nothing(tmp_path, monkeypatch):
    from qrun.demo import build

    monkeypatch.setattr(build, "MAX_STEPS", 2)  # far too little training to leave chance level
    with pytest.raises(build.DemoBuildError, match=r"reached only 0\.\d+ held-out accuracy \(target 0\.9\)"):
        build.build_demo(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the whole demo


VARIANTS = {"baseline": 16, "w8g128": 8, "w4g128": 4, "w2g128": 2, "rtn-w8g128": 8, "rtn-w4g128": 4,
            "rtn-w2g128": 2}


def _table_rows(stdout: str) -> dict[str, list[str]]:
    return {cells[0]: cells for cells in (line.split() for line in stdout.splitlines())
            if cells and cells[0] in VARIANTS}


def _foreign_lines(stderr: str) -> list[str]:
    """Terminal lines that are not qrun's own: qrun's start with "qrun demo:" or "job N", plus the
    disclaimer's and the closing hint's."""
    own = re.compile(r"^(qrun demo:|job \d+ |See `qrun status`)")
    return [line for line in stderr.splitlines() if line.strip() and not own.match(line)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `qrun demo` in a fresh QRUN_HOME (the whole path: model build, kernels, Ray, jobs), shared by
    the tests below; yields (its result, `qrun compare --format json` rows, the home)."""
    home = tmp_path_factory.mktemp("demo-run") / "qrun-home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QRUN_HOME", str(home))
        mp.delenv("QRUN_DB", raising=False)
        first = run_qrun("demo", timeout=900)
        compared = json.loads(run_qrun("compare", "--format", "json", check=True).stdout) if first.returncode == 0 \
            else []
        yield first, compared, home


@pytest.mark.slow
def test_qrun_demo_end_to_end_then_again_without_new_work(demo_run, monkeypatch):
    from qrun.demo.build import DEMO_VERSION

    first, compared, home = demo_run
    monkeypatch.setenv("QRUN_HOME", str(home))
    monkeypatch.delenv("QRUN_DB", raising=False)
    assert first.returncode == 0, first.stderr
    assert first.stderr.startswith("qrun demo: trains a tiny model"), first.stderr  # says what and how long
    assert "GPTQ and round-to-nearest at 8, 4 and 2 bits" in first.stderr.splitlines()[0]
    assert "not a fraud detector" in first.stderr
    assert _foreign_lines(first.stderr) == [], first.stderr  # no Ray, torch or GPTQModel notices...
    logs = list((home / "logs").glob("run-*.log"))
    assert len(logs) == 1 and "Started a local Ray instance" in logs[0].read_text()  # ...but to its log
    table = _table_rows(first.stdout)
    assert set(table) == set(VARIANTS), first.stdout
    assert {r["variant"]: r["bits"] for r in compared} == VARIANTS
    assert all(r["model"].endswith(f"qrun-demo-v{DEMO_VERSION}") and r["mode"] == "score" for r in compared)
    assert all(r["eval_samples"] == 200 for r in compared)
    assert re.search(r"^qrun demo: w\d+g\d+ is the smallest variant within a point of the baseline's F1",
                     first.stderr, re.M), first.stderr
    jobs = json.loads(run_qrun("status", "--json", check=True).stdout)
    assert sorted(j["kind"] for j in jobs) == ["eval"] * 7 + ["quantize"] * 6
    assert all(j["status"] == "succeeded" for j in jobs)

    second = run_qrun("demo", timeout=300)
    assert second.returncode == 0, second.stderr
    assert "already queued or done" in second.stderr
    assert _table_rows(second.stdout) == table
    assert len(json.loads(run_qrun("status", "--json", check=True).stdout)) == 13


@pytest.mark.slow
def test_no_one_time_kernel_build_is_counted_as_a_job_s_time(demo_run, monkeypatch):
    """GPTQModel's CPU kernels exist before the first job starts (built by the demo on its own line, or
    already there): no job's time includes a build, as the first 4-bit job's 29.5 s against 3.5 s did."""
    from datetime import datetime

    from qrun.workers.warmup import CPU_KERNELS, _cpu_flags, cpu_kernels_to_build, kernel_cache_dir

    first, _, home = demo_run
    assert first.returncode == 0, first.stderr
    assert cpu_kernels_to_build() == []
    monkeypatch.setenv("QRUN_HOME", str(home))
    jobs = json.loads(run_qrun("status", "--all", "--json", check=True).stdout)
    first_start = min(datetime.fromisoformat(j["started_at"].replace("Z", "+00:00")).timestamp()
                      for j in jobs if j["kind"] == "quantize")
    usable = [name for name, flag in CPU_KERNELS.items() if flag is None or flag in _cpu_flags()]
    built = [so.stat().st_mtime for name in usable for so in kernel_cache_dir(name).glob("*/*.so")]
    assert built and max(built) < first_start, (built, first_start)


@pytest.mark.slow
def test_demo_comparison_shows_where_quality_falls(demo_run):
    """The story the demo tells: one variant within a point of the baseline's F1, one
    clearly below -- the model's outlier channels cost round-to-nearest what GPTQ's calibration keeps."""
    _, compared, _ = demo_run
    base = next(r["f1"] for r in compared if r["variant"] == "baseline")
    variants = [r["f1"] for r in compared if r["variant"] != "baseline"]
    assert any(f1 >= base - 0.01 for f1 in variants), compared
    assert any(f1 < base - 0.01 for f1 in variants), compared


def test_demo_sweep_adds_only_what_is_missing(db, tiny_qwen2, tmp_path):
    """The demo's sweep is `qrun submit`'s (GPTQ and RTN at 8, 4, 2 bits, evals, one baseline): a second
    plan adds nothing, and after a failed eval only that eval again, on the variant already quantized."""
    from qrun.demo_run import demo_request
    from qrun.db import queue
    from qrun.demo.dataset import generate_rows, write_jsonl
    from qrun.sweeps import plan_jobs

    data = write_jsonl(generate_rows(20, seed=1), tmp_path / "rows.jsonl")
    request = demo_request(tiny_qwen2, data, data)
    plan = plan_jobs(db, request)
    assert sorted((job.kind, job.label) for job in plan.jobs if job.kind == "quantize") == [
        ("quantize", label) for label in ("rtn-w2g128", "rtn-w4g128", "rtn-w8g128", "w2g128", "w4g128", "w8g128")]
    assert [job.kind for job in plan.jobs].count("eval") == 7
    queue.submit_jobs(db, plan.specs)
    assert plan_jobs(db, request).jobs == []
    for expected, outcome in (("eval", "succeed"), ("quantize", "succeed"), ("eval", "fail")):
        job = queue.claim_job(db, "w", None)
        assert job.kind == expected
        if outcome == "succeed":
            queue.finish_job(db, job.id, "w", {})
        else:
            queue.fail_job(db, job.id, "w", "boom")
    again = plan_jobs(db, request).jobs
    assert [(job.kind, job.spec.depends_on) for job in again] == [("eval", job.depends_on)]


# ---------------------------------------------------------------- what the demo prints


def _row(variant, bits, f1, size_pct, flips=(0, 0)):
    method = None if bits == 16 else "rtn" if variant.startswith("rtn-") else "gptq"
    return {"variant": variant, "bits": bits, "group_size": 128 if bits < 16 else None, "method": method, "f1": f1,
            "size_pct": size_pct, "flips_fraud_to_not": flips[0], "flips_not_to_fraud": flips[1]}


def test_trade_off_sentence_is_read_from_the_results():
    from qrun.demo_run import trade_off_sentence

    base = _row("baseline", 16, 0.990, 100.0)
    # a smaller variant below the one kept: what the next step down costs
    rows = [base, _row("w8g128", 8, 0.990, 73.5), _row("w4g128", 4, 0.982, 59.4),
            _row("rtn-w4g128", 4, 0.950, 59.4), _row("w2g128", 2, 0.900, 52.3, flips=(14, 3))]
    assert trade_off_sentence(rows) == (
        "w4g128 is the smallest variant within a point of the baseline's F1 (0.982 vs 0.990, 59% of the "
        "baseline's size); the next one down, w2g128, 52% of the baseline's size, costs 9.0 points of F1 "
        "(0.900, 17 answers flipped).")
    rows[2]["f1"] = 0.970  # now 4 bits costs 2 points: 8 bits is the last within one
    assert trade_off_sentence(rows).startswith("w8g128 is the smallest variant within a point")
    assert "the next one down, w4g128, 59% of the baseline's size, costs 2.0 points" in trade_off_sentence(rows)
    # nothing smaller: the same size without calibration is what the pick is measured against
    demo = [base, _row("rtn-w8g128", 8, 0.990, 73.5), _row("w8g128", 8, 0.985, 73.5),
            _row("rtn-w4g128", 4, 0.895, 59.4, flips=(17, 0)), _row("w4g128", 4, 0.990, 59.4),
            _row("rtn-w2g128", 2, 0.864, 52.3, flips=(22, 0)), _row("w2g128", 2, 0.990, 52.3)]
    assert trade_off_sentence(demo) == (
        "w2g128 is the smallest variant within a point of the baseline's F1 (0.990 vs 0.990, 52% of the "
        "baseline's size); round-to-nearest at that size, rtn-w2g128, costs 12.6 points of F1 (0.864, 22 "
        "answers flipped): that is what GPTQ's calibration buys.")
    # every variant within
    flat = [base, _row("w8g128", 8, 0.990, 73.5), _row("rtn-w2g128", 2, 0.990, 52.3), _row("w2g128", 2, 0.995, 52.3)]
    assert trade_off_sentence(flat) == (
        "w2g128 is the smallest variant within a point of the baseline's F1 (0.995 vs 0.990, 52% of the "
        "baseline's size), and the smallest in this sweep: no variant here loses more than a point.")
    # the smallest is within, a larger one is not: the sentence does not claim that none loses
    flat.append(_row("rtn-w4g128", 4, 0.895, 59.4, flips=(17, 0)))
    assert trade_off_sentence(flat).endswith(
        "and the smallest in this sweep; rtn-w4g128 costs 9.5 points of F1 (0.895, 17 answers flipped).")
    # every variant out
    assert trade_off_sentence([_row("baseline", 16, 0.9, 100.0), _row("rtn-w8g128", 8, 0.4, 73.5),
                               _row("w8g128", 8, 0.5, 73.5), _row("w4g128", 4, 0.3, 59.4)]) == (
        "Every variant costs more than a point of F1: w8g128 already costs 40.0 points of F1 (0.500).")
    assert trade_off_sentence([base]) is None
    assert trade_off_sentence([_row("w8g128", 8, 0.990, 73.5)]) is None


def test_ray_notices_go_to_the_run_log_not_the_terminal(tmp_path):
    """Ray's start-up lines (its token notice) and its driver's "(raylet)" printer: into the file given."""
    import subprocess
    import sys

    script = tmp_path / "start.py"
    script.write_text(
        "import sys\n"
        "from qrun.runner.run import ray_notices_to, start_ray, stop_ray\n"
        "import ray._private.worker as w\n"
        "with open(sys.argv[1], 'w') as log, ray_notices_to(log):\n"
        "    start_ray(None, None, 1)\n"
        "    w.print_to_stdstream({'lines': ['a raylet message'], 'pid': 'raylet', 'is_err': False}, False)\n"
        "    stop_ray()\n"
        "print('done')\n")
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run.log")], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n" and result.stderr == "", (result.stdout, result.stderr)
    log = (tmp_path / "run.log").read_text()
    assert "a raylet message" in log and "Started a local Ray instance" in log, log
