"""`qrun demo`: its synthetic dataset, the demo model it trains, and the whole demo through the CLI."""

import json
import re

import pytest

from conftest import run_qrun

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
def demo_home(tmp_path_factory):
    from qrun.demo.build import build_demo

    home = tmp_path_factory.mktemp("demo-home")
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
def test_demo_model_is_built_once_then_reused(demo_home):
    from qrun.demo.build import build_demo

    home, paths = demo_home
    weights = paths.model / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_demo(home) == paths
    assert weights.stat().st_mtime_ns == before
    assert [p.name for p in (home / "demo").parent.iterdir()] == ["demo"]  # no staging directory left


def test_missed_target_fails_clearly_and_keeps_nothing(tmp_path, monkeypatch):
    from qrun.demo import build

    monkeypatch.setattr(build, "MAX_STEPS", 2)  # far too little training to leave chance level
    with pytest.raises(build.DemoBuildError, match=r"reached only 0\.\d+ held-out accuracy \(target 0\.9\)"):
        build.build_demo(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the whole demo


def _table_rows(stdout: str) -> dict[str, list[str]]:
    return {cells[0]: cells for cells in (line.split() for line in stdout.splitlines())
            if cells and cells[0] in ("baseline", "w4g128", "w8g128")}


@pytest.mark.slow
def test_qrun_demo_end_to_end_then_again_without_new_work(qrun_home):
    first = run_qrun("demo", timeout=900)
    assert first.returncode == 0, first.stderr
    assert "not a fraud detector" in first.stderr
    table = _table_rows(first.stdout)
    assert set(table) == {"baseline", "w4g128", "w8g128"}, first.stdout
    compared = json.loads(run_qrun("compare", "--format", "json", check=True).stdout)
    assert {r["variant"]: r["bits"] for r in compared} == {"baseline": 16, "w8g128": 8, "w4g128": 4}
    assert all(r["model"].endswith("qrun-demo-v1") and r["mode"] == "score" for r in compared)
    assert all(r["accuracy"] >= 0.9 for r in compared), compared
    assert all(r["eval_samples"] == 200 for r in compared)
    jobs = json.loads(run_qrun("status", "--json", check=True).stdout)
    assert sorted(j["kind"] for j in jobs) == ["eval"] * 3 + ["quantize"] * 2
    assert all(j["status"] == "succeeded" for j in jobs)

    second = run_qrun("demo", timeout=300)
    assert second.returncode == 0, second.stderr
    assert "already queued or done" in second.stderr
    assert _table_rows(second.stdout) == table
    assert len(json.loads(run_qrun("status", "--json", check=True).stdout)) == 5
