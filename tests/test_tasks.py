"""Tasks beyond the seeds' two labels: labels of any type and number read from the data, answer
templates and task files, answers read back, generation tasks and their scorers, bad input at submit
and eval, compare's per-class columns, and docs/TASKS.md's worked example run as written."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from helpers import REPO, drain_here, finish_job, invoke_main
from qrun.comparison import comparison_rows
from qrun.db import queue
from qrun.db.errors import BadInput
from qrun.db.states import Kind
from qrun.workers import tasks
from qrun.workers.datasets import check_eval_data, load_eval

INSTRUCTION = "Classify the review."


def write_rows(path: Path, *rows: dict) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def reviews(path: Path, labels=("positive", "neutral", "negative", "positive")) -> Path:
    return write_rows(path, *({"id": f"r{i}", "input": f"review {i}", "label": label, "instruction": INSTRUCTION}
                              for i, label in enumerate(labels)))


# ---------------------------------------------------------------- labels and answers


@pytest.mark.parametrize("raw, value, text", [
    (True, True, "true"), ("True", True, "true"), (" false ", False, "false"), (3, 3, "3"), ("3", 3, "3"),
    (2.0, 2, "2"), ("spam", "spam", "spam"), (" ham ", "ham", "ham"),
])
def test_a_label_is_known_by_its_text(raw, value, text):
    assert tasks.label_value(raw) == value and type(tasks.label_value(raw)) is type(value)
    assert tasks.label_text(tasks.label_value(raw)) == text


@pytest.mark.parametrize("raw", [None, 1.5, [1], {"a": 1}])
def test_what_cannot_be_a_label(raw):
    with pytest.raises(ValueError):
        tasks.label_value(raw)


def test_labels_from_the_data_of_any_type_and_number(tmp_path):
    strings = load_eval(reviews(tmp_path / "s.jsonl"))
    assert strings.task.labels == ("negative", "neutral", "positive")  # sorted: the data's order does not matter
    assert strings.task.answers == strings.task.labels  # no template: the label's own text
    assert strings.task.positive is None and strings.missing == ()
    assert [s.label for s in strings.samples] == ["positive", "neutral", "negative", "positive"]
    # the seeds' instruction asks for is_fraud: it is not given to another task's rows that lack one
    bare = write_rows(tmp_path / "bare.jsonl", {"input": "x", "label": "a"}, {"input": "y", "label": "b"})
    assert load_eval(bare).samples[0].messages[1]["content"] == "x"

    numbers = load_eval(write_rows(tmp_path / "n.jsonl", *({"input": f"x{i}", "label": i % 3} for i in range(6))),
                        template="Rating: {label}")
    assert numbers.task.labels == ("0", "1", "2") and numbers.task.answers == ("Rating: 0", "Rating: 1", "Rating: 2")
    assert [s.label for s in numbers.samples][:3] == [0, 1, 2]

    two = load_eval(write_rows(tmp_path / "two.jsonl", {"input": "a", "label": "spam"}, {"input": "b", "label": "ham"}))
    assert (two.task.labels, two.task.positive, two.task.negative) == (("ham", "spam"), "spam", "ham")


def test_the_seeds_task_is_the_default(tmp_path):
    only_true = load_eval(write_rows(tmp_path / "t.jsonl", {"input": "a", "label": True},
                                     {"input": "b", "label": "TRUE"}))
    assert only_true.task == tasks.DEFAULT_TASK and only_true.missing == ("false",)
    assert only_true.samples[0].answer == '{"is_fraud": true}'
    alpaca = load_eval(write_rows(tmp_path / "a.jsonl", {"input": "a", "output": '{"is_fraud": false}'}))
    assert alpaca.task == tasks.DEFAULT_TASK and alpaca.samples[0].label is False


@pytest.mark.parametrize("text, label", [
    ('{"is_fraud": true}', "true"), ('```json\n{"is_fraud": false}\n```', "false"), ('{"is_fraud": "true"}', "true"),
    ("is_fraud: True", "true"), ("IS_FRAUD = FALSE", "false"), ('{"a": 1} {"is_fraud": true}', "true"),
    ('{"is_fraud": 1}', None), ("maybe", None), ("", None), ('{"x": {"is_fraud": false}}', "false"),
])
def test_the_seeds_answers_read_back_as_before(text, label):
    assert tasks.DEFAULT_TASK.parse(text) == label


def test_answers_of_a_json_template_read_back():
    task = tasks.closed_task(None, '{"sentiment": "{label}"}', ["positive", "negative", "neutral"], "here")
    assert task.answer("neutral") == '{"sentiment": "neutral"}'
    assert task.parse('Sure! {"sentiment": "negative", "why": "broke"}') == "negative"
    assert task.parse("sentiment: Positive") == "positive"
    assert task.parse('{"sentiment": "angry"}') is None  # names no label: invalid, never a class
    assert task.parse('{"mood": "neutral"}') is None


def test_plain_answers_read_back():
    task = tasks.closed_task(None, None, ["positive", "negative", "neutral"], "here")
    assert task.parse("Positive.") == "positive"
    assert task.parse("neutral\nbecause it says nothing") == "neutral"
    assert task.parse("I would say it is negative overall") == "negative"
    assert task.parse("positive or negative") is None  # two labels named: neither
    assert task.parse("nonnegative") is None  # whole words only


def test_labels_read_from_answers_through_a_template(tmp_path):
    data = write_rows(tmp_path / "chat.jsonl",
                      {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "Label: cat"}]},
                      {"input": "b", "output": "Label:  dog"})
    loaded = load_eval(data, template="Label: {label}")
    assert loaded.task.labels == ("cat", "dog") and [s.label for s in loaded.samples] == ["cat", "dog"]
    with pytest.raises(BadInput, match=r"chat.jsonl:2: no label: the answer 'dog' does not read as the answer "):
        load_eval(write_rows(tmp_path / "chat.jsonl", {"input": "a", "output": "Label: cat"},
                             {"input": "b", "output": "dog"}), template="Label: {label}")


# ---------------------------------------------------------------- task files


def test_a_task_file_names_labels_answers_and_positive(tmp_path):
    data = write_rows(tmp_path / "mail.jsonl", {"input": "a", "label": "spam"}, {"input": "b", "label": "ham"},
                      {"input": "c", "output": "This is not spam."})
    (tmp_path / "mail.task.json").write_text(json.dumps(
        {"labels": {"spam": "This is spam.", "ham": "This is not spam.", "phish": "This is phishing."}}))
    spec = check_eval_data(data)
    assert spec == {"labels": ["spam", "ham", "phish"],
                    "answers": ["This is spam.", "This is not spam.", "This is phishing."]}
    loaded = load_eval(data, spec)
    assert loaded.task.labels == ("spam", "ham", "phish") and loaded.missing == ("phish",)
    assert [s.label for s in loaded.samples] == ["spam", "ham", "ham"]  # the third row's answer read back
    assert loaded.samples[0].answer == "This is spam."

    (tmp_path / "mail.task.json").write_text(json.dumps({"labels": ["spam", "ham"], "positive": "ham"}))
    assert load_eval(data, check_eval_data(data)).task.positive == "ham"


@pytest.mark.parametrize("content, names", [
    ('{"labels": ["a", "b"],', ("is not valid JSON", "line 1")),
    ('["a", "b"]', ("must be a JSON object",)),
    ('{"label": ["a", "b"]}', ("unknown key 'label'", "labels, answer_template")),
    ('{"labels": ["a"]}', ("names 1 label(s)", "two or more")),
    ('{"labels": ["a", "A ", "a"]}', ("label 'a' is given twice",)),
    ('{"labels": ["a", "invalid"]}', ("'invalid' is how qrun names an answer that names no label",)),
    ('{"labels": ["a", "' + "x" * 25 + '"]}', ("longer than 24 characters",)),
    ('{"labels": {"a": "Yes", "b": "yes"}}', ("labels 'a' and 'b' have the same answer",)),
    ('{"labels": ["a", "b"], "positive": "c"}', ("'positive' 'c' is not one of its labels",)),
    ('{"labels": ["a", "b"], "answer_template": "no placeholder"}', ("has no {label}",)),
    ('{"scorer": "fuzzy"}', ("'scorer' 'fuzzy' is not one of exact, normalized, json_field, regex",)),
    ('{"scorer": "regex", "pattern": "("}', ("'pattern' is not a regular expression",)),
    ('{"scorer": "json_field"}', ("json_field needs 'field'",)),
    ('{"scorer": "exact", "labels": ["a", "b"]}', ("a task is one or the other",)),
])
def test_a_bad_task_file_is_refused(tmp_path, content, names):
    data = reviews(tmp_path / "reviews.jsonl")
    (tmp_path / "reviews.task.json").write_text(content)
    with pytest.raises(BadInput) as refused:
        check_eval_data(data)
    assert str(tmp_path / "reviews.task.json") in str(refused.value)
    for name in names:
        assert name in str(refused.value)


def test_data_that_does_not_fit_its_task_is_refused(tmp_path):
    data = reviews(tmp_path / "reviews.jsonl", labels=("positive", "negative", "mixed"))
    (tmp_path / "reviews.task.json").write_text('{"labels": ["negative", "neutral", "positive"]}')
    with pytest.raises(BadInput, match=re.escape(f"{data}:3: label 'mixed' is not one of the task's labels (negative, "
                                                 "neutral, positive, as reviews.task.json names them)")):
        check_eval_data(data)
    with pytest.raises(BadInput, match="has no {label}"):
        check_eval_data(data, template='{"sentiment": "x"}')
    (tmp_path / "reviews.task.json").write_text('{"answer_template": "{label}!"}')
    with pytest.raises(BadInput, match="--answer-template and .*reviews.task.json both give the answers: keep one"):
        check_eval_data(data, template="{label}")
    one = write_rows(tmp_path / "one.jsonl", {"input": "a", "label": "spam"})
    with pytest.raises(BadInput, match=r"one.jsonl:1: 'label' must be true or false, or name two or more classes: "
                                       r"found 'spam', the only label"):
        check_eval_data(one)


# ---------------------------------------------------------------- generation tasks


@pytest.mark.parametrize("spec, output, reference, extracted, match", [
    ({"scorer": "exact"}, " Paris \n", "Paris", "Paris", True),
    ({"scorer": "exact"}, "paris", "Paris", "paris", False),
    ({"scorer": "normalized"}, "  PARIS. ", "Paris", "paris", True),
    ({"scorer": "json_field", "field": "city"}, 'Answer: {"city": "Paris", "n": 1}', '{"city": "Paris"}',
     '"Paris"', True),
    ({"scorer": "json_field", "field": "city"}, "Paris", '{"city": "Paris"}', None, False),
    ({"scorer": "regex", "pattern": r"answer is (\w+)"}, "I think the answer is 42.", "42", "42", True),
    ({"scorer": "regex", "pattern": r"answer is (\w+)"}, "no idea", "42", None, False),
])
def test_generation_scorers(spec, output, reference, extracted, match):
    from qrun.workers.datasets import Sample
    from qrun.workers.evaluate import generation_row

    task = tasks.generation_task(spec)
    row = generation_row(task, Sample("1", (), reference, None), output)
    assert (row["prediction"], row["match"]) == (extracted if extracted is not None else "invalid", match)


def test_a_generation_task_needs_references_and_generate_mode(tmp_path):
    data = write_rows(tmp_path / "qa.jsonl", {"input": "Capital of France?", "output": '{"city": "Paris"}'},
                      {"input": "Capital of Spain?", "output": '{"city": "Madrid"}'})
    (tmp_path / "qa.task.json").write_text('{"scorer": "json_field", "field": "city"}')
    assert check_eval_data(data, mode="generate") == {"scorer": "json_field", "field": "city"}
    with pytest.raises(BadInput, match="is a generation task .*scorer json_field.*: evaluate it with --mode generate"):
        check_eval_data(data, mode="score", mode_option="--mode")
    write_rows(data, {"input": "Capital of France?", "output": "Paris"})
    with pytest.raises(BadInput, match=r"qa.jsonl:1: the reference answer 'Paris' has no JSON field 'city'"):
        check_eval_data(data, mode="generate")
    write_rows(data, {"input": "Capital of France?"})
    with pytest.raises(BadInput, match=r"qa.jsonl:1: no reference answer"):
        check_eval_data(data, mode="generate")


# ---------------------------------------------------------------- submit and eval refuse bad input


def _refused(result, *names: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    for name in names:
        assert name in lines[0], lines[0]


@pytest.mark.parametrize("command", ["submit", "eval"])
def test_bad_tasks_are_refused_before_anything_is_written(qrun_home, tiny_qwen2, tmp_path, command):
    data = reviews(tmp_path / "reviews.jsonl", labels=("positive", "negative", "mixed"))
    option = ("submit", "--bits", "4", "--eval") if command == "submit" else ("eval", "--data")
    args = (option[0], "--model", str(tiny_qwen2), *option[1:], str(data))
    _refused(invoke_main(*args, "--answer-template", "yes"), "--answer-template 'yes' has no {label}")
    (tmp_path / "reviews.task.json").write_text('{"labels": ["negative", "neutral", "positive"]}')
    _refused(invoke_main(*args), f"{data}:3: label 'mixed' is not one of the task's labels")
    (tmp_path / "reviews.task.json").write_text('{"labels": ')
    _refused(invoke_main(*args), "task file", "reviews.task.json is not valid JSON")
    assert not (qrun_home / "qrun.db").exists()  # refused before the table was opened
    _refused(invoke_main(option[0], "--model", str(tiny_qwen2), "--answer-template", "{label}",
                         *(("--bits", "4") if command == "submit" else ("--ppl", str(data)))),
             "--answer-template applies to")


def test_the_task_is_stored_with_the_job_and_the_seeds_task_stores_nothing_new(db, tiny_qwen2, tmp_path):
    import qrun

    seeds = write_rows(tmp_path / "seeds.jsonl", {"input": "a", "label": True}, {"input": "b", "label": False})
    job = qrun.evaluate(str(tiny_qwen2), data=str(seeds), db=db.url)
    assert set(queue.get_job(db, job).params) == {"data", "mode", "max_new_tokens", "ppl_data", "batch_size",
                                                  "variant", "trust_remote_code"}
    data = reviews(tmp_path / "reviews.jsonl")
    (tmp_path / "reviews.task.json").write_text('{"labels": ["negative", "neutral", "positive"]}')
    job = qrun.evaluate(str(tiny_qwen2), data=str(data), answer_template='{"sentiment": "{label}"}', db=db.url)
    params = queue.get_job(db, job).params
    assert params["task"] == {"labels": ["negative", "neutral", "positive"]}
    assert params["answer_template"] == '{"sentiment": "{label}"}'


# ---------------------------------------------------------------- compare


def _eval_job(db, tmp_path, model: Path, data: Path, variant: str, metrics: dict, predictions: dict) -> int:
    spec = queue.JobSpec(kind=Kind.EVAL, model=str(model), params={"data": str(data), "mode": "score",
                                                                    "variant": variant, "ppl_data": None})
    path = tmp_path / f"{variant}.predictions.jsonl"
    path.write_text("".join(json.dumps({"id": k, "label": None, "prediction": v, "score": None}) + "\n"
                            for k, v in predictions.items()))
    record = queue.ArtifactRecord("predictions", str(path), path.stat().st_size, "0" * 64)
    return finish_job(db, spec, metrics, [record])


def _class_run(labels: list[str], answers: list[str | None]) -> dict:
    from qrun.workers.metrics import class_metrics

    return class_metrics(labels, answers, ["negative", "neutral", "positive"]) | {"model_size_bytes": 1e6}


def test_compare_shows_macro_f1_the_class_that_lost_most_and_the_answers_changed(db, tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    data = tmp_path / "reviews.jsonl"
    truth = ["negative", "neutral", "positive", "positive"]
    _eval_job(db, tmp_path, model, data, "baseline", _class_run(truth, truth),
              dict(zip("abcd", truth)))
    variant = ["negative", "positive", "positive", None]
    _eval_job(db, tmp_path, model, data, "w4g128", _class_run(truth, variant) | {"model_size_bytes": 5e5},
              {"a": "negative", "b": "positive", "c": "positive", "d": "invalid"})
    base, w4 = comparison_rows(db, max_drop=0.1)
    assert (base["classes"], base["positive"], base["macro_f1"]) == (["negative", "neutral", "positive"], None, 1.0)
    assert w4["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert w4["macro_f1_delta"] == pytest.approx(w4["macro_f1"] - 1)
    assert (w4["lost_most"], w4["lost_most_f1_delta"]) == ("neutral", -1.0)
    assert w4["answers_changed"] == {"neutral->positive": 1, "positive->invalid": 1}
    assert (w4["flips_fraud_to_not"], w4["flips_not_to_fraud"], w4["f1"]) == (None, None, None)
    assert "macro F1" in w4["max_drop_answer"]  # --max-drop reads macro F1 where a group has no F1

    out = invoke_main("compare", "--wide")
    assert out.exit_code == 0, out.output
    header, *rows = [line for line in out.output.splitlines() if line.startswith(("variant", "baseline", "w4g128"))]
    assert "macro F1" in header and "lost most" in header and "changed" in header and "match" not in header
    assert "0.556 (-0.444)" in rows[1] and "neutral -1.000" in rows[1] and "neutral->positive 1" in rows[1]
    csv_out = invoke_main("compare", "--format", "csv").output
    assert '"{""neutral->positive"": 1, ""positive->invalid"": 1}"' in csv_out


def test_compare_of_a_two_class_task_flips_from_its_positive_class(db, tmp_path):
    from qrun.workers.metrics import class_metrics, classification_metrics

    data = tmp_path / "mail.jsonl"
    truth = ["spam", "ham", "spam", "ham"]

    def metrics(answers):
        binary = classification_metrics([t == "spam" for t in truth], [a == "spam" for a in answers])
        return binary | class_metrics(truth, answers, ["ham", "spam"])

    _eval_job(db, tmp_path, tmp_path, data, "baseline", metrics(truth), dict(zip("abcd", truth)))
    answers = ["ham", "ham", "spam", "spam"]
    _eval_job(db, tmp_path, tmp_path, data, "w4g128", metrics(answers), dict(zip("abcd", answers)))
    base, w4 = comparison_rows(db)
    assert (w4["positive"], w4["flips_fraud_to_not"], w4["flips_not_to_fraud"]) == ("spam", 1, 1)
    assert w4["answers_changed"] == {"ham->spam": 1, "spam->ham": 1} and w4["lost_most"] in ("ham", "spam")


# ---------------------------------------------------------------- the documented example


def _documented_example() -> tuple[dict[str, str], list[str]]:
    """docs/TASKS.md's worked example: its files (```json file=NAME blocks) and its commands (```sh example)."""
    text = (REPO / "docs" / "TASKS.md").read_text(encoding="utf-8")
    files = dict(re.findall(r"```\w+ file=(\S+)\n(.*?)```", text, re.DOTALL))
    (commands,) = re.findall(r"```sh example\n(.*?)```", text, re.DOTALL)
    return files, [line for line in commands.splitlines() if line.startswith("qrun ")]


def test_documented_example_runs(db, qrun_home, tiny_qwen2, tmp_path, monkeypatch, capsys):
    files, commands = _documented_example()
    assert set(files) == {"reviews.jsonl", "reviews.task.json"}
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    outputs = []
    for command in commands:
        args = [str(tiny_qwen2) if a == "./my-model" else a for a in shlex.split(command)[1:]]
        if args[0] == "run":  # the queue is drained here, in this process, without Ray
            assert set(drain_here(db).values()) == {"succeeded"}
            continue
        result = invoke_main(*args)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    (job,) = queue.list_jobs(db)
    metrics = queue.metrics_of(db, [job.id])[job.id]
    for name in ("accuracy", "invalid", "macro_f1", "weighted_f1", "macro_precision", "macro_recall",
                 "f1[negative]", "f1[neutral]", "f1[positive]", "precision[neutral]", "recall[positive]"):
        assert 0 <= metrics[name] <= 1, name
    assert (metrics["classes"], metrics["support[positive]"], metrics["eval_samples"]) == (3, 2, 6)
    assert sum(v for k, v in metrics.items() if k.startswith("confusion[")) == 6
    assert "tp" not in metrics and "auc" not in metrics  # three classes: no binary metrics
    assert job.params["task"]["labels"] == ["negative", "neutral", "positive"]
    log = Path(job.log_path).read_text() + capsys.readouterr().out
    assert """3 classes: negative -> '{"sentiment": "negative"}'""" in log
    assert "macro F1" in outputs[-1].splitlines()[1]  # the compare table's header


def test_classes_without_rows_are_a_warning_in_the_job_log(db, tiny_qwen2, tmp_path, capsys):
    data = reviews(tmp_path / "reviews.jsonl", labels=("positive", "negative"))
    (tmp_path / "reviews.task.json").write_text('{"labels": ["negative", "neutral", "positive"]}')
    import qrun

    job_id = qrun.evaluate(str(tiny_qwen2), data=str(data), db=db.url)
    assert drain_here(db) == {job_id: "succeeded"}
    job = queue.get_job(db, job_id)
    log = Path(job.log_path).read_text() + capsys.readouterr().out
    assert f"warning: 1 of the task's 3 classes have no rows in {data}: neutral" in log
    assert queue.metrics_of(db, [job_id])[job_id]["support[neutral]"] == 0


def test_a_generation_task_is_scored_end_to_end_and_compared(db, tiny_qwen2, tmp_path):
    """Generated answers against references: the job records match and invalid, its predictions the output,
    the reference and whether they matched; compare shows match beside perplexity, and no class columns."""
    import qrun

    data = write_rows(tmp_path / "qa.jsonl", {"id": "q1", "input": "Say A.", "output": "A"},
                      {"id": "q2", "input": "Say B.", "output": "Answer: B"})
    (tmp_path / "qa.task.json").write_text(json.dumps({"scorer": "regex", "pattern": r"(?s)^\s*(?:Answer: )?(.+)"}))
    job_id = qrun.evaluate(str(tiny_qwen2), data=str(data), mode="generate", max_new_tokens=4, db=db.url)
    assert drain_here(db) == {job_id: "succeeded"}
    metrics = queue.metrics_of(db, [job_id])[job_id]
    assert metrics["invalid"] == 0 and metrics["eval_samples"] == 2
    assert "accuracy" not in metrics and "classes" not in metrics
    (record,) = [a for a in queue.artifacts_of(db, [job_id])[job_id] if a.kind == "predictions"]
    rows = [json.loads(line) for line in Path(record.path).read_text().splitlines()]
    assert [(r["id"], r["reference"]) for r in rows] == [("q1", "A"), ("q2", "Answer: B")]
    assert all(r["prediction"] == r["output"].strip() for r in rows)  # the pattern's group: the whole answer
    assert [r["match"] for r in rows] == [rows[0]["prediction"] == "A", rows[1]["prediction"] == "B"]
    assert metrics["match"] == sum(r["match"] for r in rows) / 2
    (row,) = comparison_rows(db)
    assert (row["match"], row["classes"], row["positive"], row["answers_changed"]) == (metrics["match"], None, None,
                                                                                       None)
    header = invoke_main("compare", "--wide").output.splitlines()[1]
    assert "match" in header and "macro F1" not in header and "changed" not in header
