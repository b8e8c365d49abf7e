"""What an eval asks of the model: its task. Plain Python, no torch.

A classification task is a set of labels, each with the answer text the model should give for it:
score mode compares the likelihood of every answer after the prompt, generate mode parses the
generated text back to a label (an answer that names no label is invalid, never a class). A
generation task instead has a reference answer per row and a scorer that says whether the
generated answer matches it.

Where the task comes from (docs/TASKS.md):
- the seeds' task by default: labels true and false, answered `{"is_fraud": true}` / `{"is_fraud": false}`;
- the data's labels (booleans, whole numbers or strings, two or more), each answered by an answer
  template (`--answer-template '{"sentiment": "{label}"}'`) or, with none, by the label's own text;
- a task file beside the data (`data.jsonl` -> `data.task.json`): the labels and their answers, the
  positive class of a two-class task, or a generation task's scorer. Submit reads it and stores it in
  the eval job's params, so the job does not depend on the file staying as it was.

Labels are compared by their text (`true`, `3`, `spam`): JSON's true, the string "True" and the
task file's key "true" are one label. A label's value in predictions files is its canonical JSON
value (true, 3, "spam").
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qrun.db.errors import BadInput

PLACEHOLDER = "{label}"
DEFAULT_TEMPLATE = '{"is_fraud": {label}}'  # the seeds' answers, for labels true and false
PLAIN_TEMPLATE = PLACEHOLDER  # labels other than true/false, with no template: the label's own text
TASK_SUFFIX = ".task.json"
INVALID = "invalid"  # the prediction of an answer that names no class: no label may be called so
# Per-class metrics are stored as `f1[label]` and the confusion matrix as `confusion[a->b]`: the
# table's metric names hold 64 characters, so a label holds at most this many.
MAX_LABEL_CHARS = 24
SCORERS = ("exact", "normalized", "json_field", "regex")
TASK_KEYS = ("labels", "answer_template", "positive", "scorer", "field", "pattern")
PUNCTUATION = string.punctuation + "。，、！？；：“”‘’（）《》…"

Label = bool | int | str


# ---------------------------------------------------------------- labels


def label_value(raw) -> Label:
    """A label as given (JSON true, 3, "spam", "True", "3") -> its canonical value (True, 3, "spam").
    ValueError with the reason where it cannot be a label."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if not isinstance(raw, str):
        kind = "null" if raw is None else "a number" if isinstance(raw, float) else f"a {type(raw).__name__}"
        raise ValueError(f"found {kind}")
    text = raw.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def label_text(value: Label) -> str:
    """The text a label is known by: `true`, `3`, `spam`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_label_text(text: str) -> str | None:
    """Why `text` cannot name a class (empty, too long, reserved, not printable), or None."""
    if not text:
        return "is empty"
    if text == INVALID:
        return f"'{INVALID}' is how qrun names an answer that names no label"
    if len(text) > MAX_LABEL_CHARS:
        return f"is longer than {MAX_LABEL_CHARS} characters (the metrics' names carry it)"
    if not text.isprintable() or "->" in text:
        return "holds a control character or '->' (the confusion matrix's separator)"
    return None


def sort_key(text: str) -> tuple:
    """Labels read from data come in this order: false before true, numbers by value, then strings."""
    value = label_value(text)
    if isinstance(value, bool):
        return (0, int(value), "")
    if isinstance(value, int):
        return (1, value, "")
    return (2, 0, value)


def default_positive(labels: Sequence[str]) -> str | None:
    """The positive class of a two-class task that names none: true, else 1, else the second label."""
    if len(labels) != 2:
        return None
    for candidate in ("true", "1"):
        if candidate in labels:
            return candidate
    return labels[1]


# ---------------------------------------------------------------- answers


def check_template(template: str, where: str = "--answer-template") -> str:
    """The template, or BadInput where it does not say where the label goes."""
    if not isinstance(template, str) or PLACEHOLDER not in template:
        raise BadInput(f"{where} {template!r} has no {PLACEHOLDER}: write where the label goes, "
                       f"like '{DEFAULT_TEMPLATE}'")
    return template


def fill(template: str, label: str) -> str:
    return template.replace(PLACEHOLDER, label)


def default_template(labels: Iterable[str]) -> str:
    """The seeds' template for labels true and false; the label's own text for any other."""
    return DEFAULT_TEMPLATE if set(labels) <= {"true", "false"} else PLAIN_TEMPLATE


def default_answer(value: Label) -> str:
    """The answer to a label when nothing says otherwise (calibration and perplexity text)."""
    text = label_text(value)
    return fill(default_template([text]), text)


def template_pattern(template: str) -> re.Pattern:
    """A regular expression that reads the label back out of an answer written by `template`
    (whitespace between tokens may differ)."""
    def literal(part: str) -> str:
        return r"\s*".join(re.escape(piece) for piece in re.split(r"\s+", part)) if part.strip() else r"\s*"

    parts = template.split(PLACEHOLDER)
    body = literal(parts[0]) + "".join(
        ("(?P<label>.+?)" if n == 1 else "(?P=label)") + literal(part) for n, part in enumerate(parts[1:], 1))
    return re.compile(r"\s*" + body + r"\s*", re.DOTALL)


def normalize(text: str) -> str:
    """Unicode-normalized, case-folded, whitespace collapsed, punctuation and quotes trimmed at the ends."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.strip(PUNCTUATION + " ")


def strict_equal(a, b) -> bool:
    """JSON values equal and of one type: the string "true" is not the boolean true, 1 is not true."""
    return type(a) is type(b) and a == b


def first_json_object(text: str) -> dict | None:
    """The first JSON object in the text (in code fences or followed by more text), or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------- the task


@dataclass(frozen=True)
class Task:
    """A classification task (labels, each with its answer) or a generation task (a scorer)."""

    labels: tuple[str, ...] = ()  # label texts, in the task's order
    answers: tuple[str, ...] = ()  # the answer text of each label
    positive: str | None = None  # two classes: the class precision, recall, F1 and AUC are of
    scorer: str | None = None  # a generation task: exact, normalized, json_field, regex
    field: str | None = None  # json_field: the field compared
    pattern: str | None = None  # regex: what is compared (its first group, else the whole match)

    @property
    def is_generation(self) -> bool:
        return self.scorer is not None

    @property
    def negative(self) -> str | None:
        """The other class of a two-class task."""
        if self.positive is None:
            return None
        return next(label for label in self.labels if label != self.positive)

    def answer(self, label: str) -> str:
        return self.answers[self.labels.index(label)]

    @staticmethod
    def value(label: str) -> Label:
        """The label as predictions files write it: true, 3, "spam"."""
        return label_value(label)

    def describe(self) -> str:
        """The task in a few words, for the job's log."""
        if self.is_generation:
            extra = self.field or self.pattern
            return f"generation, scored by {self.scorer}" + (f" ({extra})" if extra else "")
        return f"{len(self.labels)} classes: " + ", ".join(
            f"{label} -> {self.answer(label)!r}" for label in self.labels)

    # ------------------------------------------------ generated answers back to labels

    def parse(self, text: str | None) -> str | None:
        """The label a generated (or reference) answer names, or None where it names none or several."""
        if not text:
            return None
        objects = [_json_object(a) for a in self.answers]
        if all(o is not None for o in objects):
            return self._parse_json(text, objects)
        return self._parse_plain(text)

    def _label_keys(self, objects: list[dict]) -> list[str]:
        """The keys of the answers' JSON objects whose values tell the labels apart."""
        keys = sorted({k for o in objects for k in o})
        return [k for k in keys if len({json.dumps(o.get(k), sort_keys=True) for o in objects}) > 1]

    def _parse_json(self, text: str, objects: list[dict]) -> str | None:
        """JSON answers: the first object in the text whose label fields match one answer's; else,
        where one field holds the label, `"field": value` written loosely (`is_fraud: True`)."""
        keys = self._label_keys(objects)
        match = re.search(r"\{[^{}]*\}", text)
        if match:
            found = _json_object(match.group(0))
            if found is not None:
                hits = [label for label, o in zip(self.labels, objects)
                        if all(k in found and strict_equal(found[k], o.get(k)) for k in keys)]
                if len(hits) == 1:
                    return hits[0]
        if len(keys) != 1:
            return None
        key = keys[0]
        texts = {label: label_text(o[key]) if isinstance(o[key], (bool, int)) else str(o[key])
                 for label, o in zip(self.labels, objects)}
        choices = "|".join(re.escape(t) for t in sorted(texts.values(), key=len, reverse=True))
        loose = re.search(rf'"?{re.escape(key)}"?\s*[:=]\s*"?({choices})', text, re.IGNORECASE)
        if loose:
            said = loose.group(1).lower()
            return next(label for label, t in texts.items() if t.lower() == said)
        return None

    def _parse_plain(self, text: str) -> str | None:
        """Plain answers: the whole text, else its first line, is one answer; else exactly one answer
        occurs in it as whole words."""
        answers = {label: normalize(self.answer(label)) for label in self.labels}
        for candidate in (normalize(text), normalize(next((ln for ln in text.splitlines() if ln.strip()), ""))):
            hits = [label for label, answer in answers.items() if answer and answer == candidate]
            if len(hits) == 1:
                return hits[0]
        said = normalize(text)
        hits = [label for label, answer in answers.items()
                if answer and re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", said)]
        return hits[0] if len(hits) == 1 else None

    # ------------------------------------------------ generation: answers against references

    def extract(self, text: str | None) -> str | None:
        """What the scorer compares of an answer: its stripped text (exact), its normalized text, the
        JSON field (as JSON), the pattern's group; None where the answer has no such part."""
        if text is None:
            return None
        if self.scorer == "exact":
            return text.strip()
        if self.scorer == "normalized":
            return normalize(text)
        if self.scorer == "json_field":
            found = first_json_object(text)
            if found is None or self.field not in found:
                return None
            return json.dumps(found[self.field], ensure_ascii=False, sort_keys=True)
        match = re.search(self.pattern, text)
        if match is None:
            return None
        return (match.group(1) if match.re.groups else match.group(0)).strip()

    def reference(self, text: str) -> str | None:
        """What the scorer compares of a reference answer: as extract, a regex falling back to the
        whole reference (a reference may be just the answer the pattern picks out of generated text)."""
        extracted = self.extract(text)
        if extracted is None and self.scorer == "regex":
            return text.strip()
        return extracted

    def to_spec(self) -> dict:
        """The task as stored beside the data's rows: what a reader of predictions needs to know."""
        if self.is_generation:
            return {k: v for k, v in (("scorer", self.scorer), ("field", self.field), ("pattern", self.pattern)) if v}
        return {"labels": list(self.labels), "answers": list(self.answers), "positive": self.positive}


DEFAULT_TASK = Task(labels=("false", "true"), answers=(fill(DEFAULT_TEMPLATE, "false"), fill(DEFAULT_TEMPLATE, "true")),
                    positive="true")


# ---------------------------------------------------------------- the task file


def task_file_of(data: str | Path) -> Path:
    """The task file beside a data file: `dialogs.jsonl` -> `dialogs.task.json`."""
    data = Path(data)
    stem = data.name[:-len(data.suffix)] if data.suffix else data.name
    return data.with_name(stem + TASK_SUFFIX)


def read_task_file(data: str | Path) -> dict | None:
    """The task file beside `data`, checked and in its stored form (task_spec); None where there is none."""
    path = task_file_of(data)
    if not path.exists():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"task file {path} cannot be read ({getattr(exc, 'strerror', None) or exc}): check the file") \
            from exc
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        where = f"line {exc.lineno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise BadInput(f"task file {path} is not valid JSON ({where}): fix it, or remove it to use the "
                       "data's own labels") from exc
    return task_spec(raw, str(path))


def task_spec(raw, where: str) -> dict:
    """A task file's content checked, as stored in an eval job's params: labels (texts, in order),
    answers (where given per label), answer_template, positive, scorer, field, pattern; only those set."""
    if not isinstance(raw, dict):
        raise BadInput(f"task file {where} must be a JSON object like {{\"labels\": [\"a\", \"b\"]}}")
    unknown = sorted(set(raw) - set(TASK_KEYS))
    if unknown:
        raise BadInput(f"task file {where}: unknown key {unknown[0]!r}: use {', '.join(TASK_KEYS)}")
    spec: dict = {}
    if "labels" in raw:
        spec |= _spec_labels(raw["labels"], where)
    if "answer_template" in raw:
        if "answers" in spec:
            raise BadInput(f"task file {where} gives both answers per label and an answer_template: keep one")
        spec["answer_template"] = check_template(raw["answer_template"], f"task file {where}: answer_template")
    if "positive" in raw:
        spec["positive"] = _spec_positive(raw["positive"], spec.get("labels"), where)
    if "scorer" in raw or "field" in raw or "pattern" in raw:
        spec |= _spec_scorer(raw, where)
        if "labels" in spec or "answer_template" in spec or "positive" in spec:
            raise BadInput(f"task file {where} names a scorer (a generation task) and labels: a task is one or "
                           "the other")
    return spec


def _spec_labels(labels, where: str) -> dict:
    if isinstance(labels, dict):
        texts, answers = list(labels), list(labels.values())
        if not all(isinstance(a, str) and a.strip() for a in answers):
            raise BadInput(f"task file {where}: each label's answer must be a non-empty string, like "
                           "{\"spam\": \"This is spam.\"}")
    elif isinstance(labels, list):
        texts, answers = labels, None
    else:
        raise BadInput(f"task file {where}: 'labels' must be a list of labels or an object label -> answer")
    out = []
    for raw in texts:
        try:
            text = label_text(label_value(raw))
        except ValueError as exc:
            raise BadInput(f"task file {where}: a label must be true or false, a string or a whole number: {exc}") \
                from None
        problem = check_label_text(text)
        if problem:
            raise BadInput(f"task file {where}: label {text!r} {problem}")
        if text in out:
            raise BadInput(f"task file {where}: label {text!r} is given twice")
        out.append(text)
    if len(out) < 2:
        raise BadInput(f"task file {where}: 'labels' names {len(out)} label(s): a task needs two or more")
    if answers is not None:
        _check_distinct(out, answers, f"task file {where}")
        return {"labels": out, "answers": answers}
    return {"labels": out}


def _spec_positive(raw, labels: list[str] | None, where: str) -> str:
    try:
        text = label_text(label_value(raw))
    except ValueError as exc:
        raise BadInput(f"task file {where}: 'positive' must be one of the labels: {exc}") from None
    if labels is not None and text not in labels:
        raise BadInput(f"task file {where}: 'positive' {text!r} is not one of its labels ({', '.join(labels)})")
    if labels is not None and len(labels) != 2:
        raise BadInput(f"task file {where}: 'positive' applies to a task of two labels, not {len(labels)}")
    return text


def _spec_scorer(raw: dict, where: str) -> dict:
    scorer = raw.get("scorer")
    if scorer not in SCORERS:
        raise BadInput(f"task file {where}: 'scorer' {scorer!r} is not one of {', '.join(SCORERS)}")
    spec = {"scorer": scorer}
    if scorer == "json_field":
        if not isinstance(raw.get("field"), str) or not raw["field"]:
            raise BadInput(f"task file {where}: scorer json_field needs 'field', the name of the field compared")
        spec["field"] = raw["field"]
    elif "field" in raw:
        raise BadInput(f"task file {where}: 'field' applies to scorer json_field only")
    if scorer == "regex":
        pattern = raw.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise BadInput(f"task file {where}: scorer regex needs 'pattern', a regular expression")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise BadInput(f"task file {where}: 'pattern' is not a regular expression ({exc})") from None
        spec["pattern"] = pattern
    elif "pattern" in raw:
        raise BadInput(f"task file {where}: 'pattern' applies to scorer regex only")
    return spec


def _check_distinct(labels: Sequence[str], answers: Sequence[str], where: str) -> None:
    """Two labels with one answer could never be told apart."""
    seen: dict[str, str] = {}
    for label, answer in zip(labels, answers):
        key = normalize(answer)
        if key in seen:
            raise BadInput(f"{where}: labels {seen[key]!r} and {label!r} have the same answer {answer!r}: "
                           "give each its own")
        seen[key] = label


# ---------------------------------------------------------------- building the task of a data file


def generation_task(spec: dict) -> Task:
    return Task(scorer=spec["scorer"], field=spec.get("field"), pattern=spec.get("pattern"))


def answers_of(spec: dict | None, template: str | None, labels: Sequence[str], where: str) -> tuple[str, ...]:
    """Each label's answer: the task file's per label, else the template (given, the task file's, the default)."""
    spec = spec or {}
    if "answers" in spec:
        return tuple(spec["answers"])
    template = template or spec.get("answer_template") or default_template(labels)
    answers = tuple(fill(template, label) for label in labels)
    _check_distinct(labels, answers, where)
    return answers


def task_labels(spec: dict | None, labels: Iterable[str]) -> tuple[str, ...]:
    """The task's labels in order: the task file's, else those of the data sorted (sort_key); labels
    true and false are always both (the seeds' task: both answers, whichever the data holds)."""
    spec = spec or {}
    if "labels" in spec:
        return tuple(spec["labels"])
    ordered = tuple(sorted(set(labels), key=sort_key))
    return ("false", "true") if set(ordered) <= {"true", "false"} else ordered


def positive_of(spec: dict | None, labels: Iterable[str]) -> str | None:
    """The positive class of the task over `labels` (the task file's `positive`, else default_positive);
    None unless it has two classes. What compare reads from an eval's params and per-class metrics."""
    ordered = task_labels(spec, labels)
    if len(ordered) != 2:
        return None
    return (spec or {}).get("positive") or default_positive(ordered)


def closed_task(spec: dict | None, template: str | None, labels: Iterable[str], where: str) -> Task:
    """The classification task over `labels` (the task file's, else those the data holds, in order)."""
    spec = spec or {}
    ordered = task_labels(spec, labels)
    if len(ordered) < 2:
        only = ordered[0] if ordered else "none"
        raise BadInput(f"{where}: 'label' must be true or false, or name two or more classes: found {only!r}, "
                       f"the only label; name the task's labels in a task file ({TASK_SUFFIX} beside the data)")
    answers = answers_of(spec, template, ordered, where)
    return Task(labels=ordered, answers=answers, positive=positive_of(spec, ordered))


def check_task_sources(spec: dict | None, template: str | None, where: str) -> None:
    """--answer-template and a task file that also says the answers: one place only."""
    if template is None or not spec:
        return
    if spec.get("scorer"):
        raise BadInput(f"--answer-template applies to classification, and {where} is a generation task "
                       f"(scorer {spec['scorer']}): drop the option")
    if "answers" in spec or "answer_template" in spec:
        raise BadInput(f"--answer-template and {where} both give the answers: keep one")


def default_instruction(task: Task | None, seeds_instruction: str) -> str:
    """The instruction of a row that gives none: the seeds' (it asks for is_fraud) for the seeds' task only."""
    if task is None or (task.labels == DEFAULT_TASK.labels and task.answers == DEFAULT_TASK.answers):
        return seeds_instruction
    return ""
