"""Reading labeled dialogs and calibration text in the forms the seeds use.

Accepted files:
- JSONL, one object a line, or one JSON array of objects (the anti_fraud alpaca file is named
  .jsonl but is a pretty-printed array);
- rows `{input, label, instruction}`, alpaca `{instruction, input, output}`, chat
  `{messages: [{role, content}, ...]}`, or `{text}`;
- any other file is plain text, one sample per blank-line-separated paragraph.
Errors name the file and the line. What an eval file's labels and answers mean is its task
(workers.tasks: the seeds' by default, the data's labels, an answer template, a task file beside it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from qrun.db.errors import BadInput
from qrun.workers import tasks
from qrun.workers.tasks import Task

DEFAULT_INSTRUCTION = (
    "\n下面是一段对话文本, 请分析对话内容是否有诈骗风险，以json格式输出你的判断结果(is_fraud: true/false)。\n"
)
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class Sample:
    """One dialog: the chat messages up to the answer, the answer text and, when known, the label."""

    id: str
    messages: tuple[dict, ...]  # system + user turns (no assistant answer)
    answer: str | None  # the reference answer text, if any
    label: tasks.Label | None  # true/false, a whole number or a string (workers.tasks.label_value)
    text: str | None = None  # plain-text samples (perplexity, calibration)


def _is_json_file(path: Path, head: str) -> bool:
    return path.suffix.lower() in (".jsonl", ".json") or head.startswith(("{", "["))


def require_file(path: str | Path, what: str = "data file") -> Path:
    """`path` as a Path, or BadInput naming `what` when it is missing or not a regular file."""
    if not str(path).strip():
        raise BadInput(f"{what} '' is an empty path: give the file's path")
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{what} {path} does not exist: check the path")
    if not path.is_file():
        raise BadInput(f"{what} {path} is not a file: pass a JSONL, JSON or text file")
    return path


def read_text(path: Path) -> str:
    """The file's text, or BadInput: unreadable, not UTF-8, binary (NUL bytes) or empty.

    A UTF-8 byte-order mark (as Windows editors write) is dropped rather than refused.
    """
    try:
        content = path.read_text(encoding="utf-8-sig")
    except PermissionError as exc:
        raise BadInput(f"data file {path} is not readable: check its permissions") from exc
    except UnicodeDecodeError as exc:
        raise BadInput(f"data file {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from exc
    except OSError as exc:
        raise BadInput(f"data file {path} cannot be read ({exc.strerror or exc}): check the file") from exc
    if "\x00" in content:  # valid UTF-8, but no text file holds NUL: a binary file under a text name
        raise BadInput(f"data file {path} holds NUL bytes (at character {content.index(chr(0))}): "
                       "is it a binary file? give JSONL, JSON or text")
    if not content.strip():
        raise BadInput(f"data file {path} is empty: give it one JSON object a line, or paragraphs of text")
    return content


def _parse_json(text: str):
    """json.loads, with nesting too deep for the parser reported as the ValueError it is."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def read_rows(path: str | Path) -> list[tuple[int, dict | str]]:
    """(line number, row) pairs. JSON rows are dicts; plain-text paragraphs are strings."""
    path = require_file(path)
    content = read_text(path)
    head = content.lstrip()[:1]
    if not _is_json_file(path, head):
        paragraphs = re.split(r"\n\s*\n", content)
        return [(i + 1, p.strip()) for i, p in enumerate(paragraphs) if p.strip()]
    if head == "[":
        try:
            rows = _parse_json(content)
        except ValueError as exc:
            raise BadInput(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
        if not isinstance(rows, list):  # e.g. "[1] [2]" fails above; a lone array is the only other case
            raise BadInput(f"{path}: expected a JSON array of objects")
        _check_objects(path, [(i + 1, r) for i, r in enumerate(rows)], what="item")
        return [(i + 1, r) for i, r in enumerate(rows)]
    out = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, _parse_json(line)))
        except ValueError as exc:
            raise BadInput(f"{path}:{lineno}: not valid JSON ({exc.msg}): fix or remove the line") from exc
    _check_objects(path, out, what="line")
    return out


def _check_objects(path: Path, rows, what: str) -> None:
    for n, row in rows:
        if not isinstance(row, dict):
            raise BadInput(f"{path}:{what} {n}: expected a JSON object, found {json_type_name(row)}")


def json_type_name(value) -> str:
    """The JSON name of a parsed value's type ('a list', 'a number', ...), for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _text_field(path: Path, lineno: int, row: dict, name: str, *, optional: bool = False) -> str | None:
    """row[name] as a string, or BadInput naming the line and the field.

    Text goes to a tokenizer in the job: a number or an object there is a mistake in the file, and
    a lone surrogate (JSON's "\\ud800") cannot be encoded at all.
    """
    value = row.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise BadInput(f"{path}:{lineno}: '{name}' must be a string, found {json_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInput(f"{path}:{lineno}: '{name}' holds an invalid character ({exc.reason}): fix the text") from exc
    return value


def _messages(path: Path, lineno: int, row: dict) -> list[dict]:
    """row["messages"]: a non-empty list of {role, content} objects with string values, or BadInput."""
    messages = row["messages"]
    shape = f"{path}:{lineno}: 'messages' must be a list of {{role, content}} objects with string values"
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadInput(shape)
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadInput(shape)
        _text_field(path, lineno, m, "content")
    return messages


def parse_answer(text: str | None) -> bool | None:
    """The seeds' task: `{"is_fraud": true}` (possibly in code fences or followed by more text) -> True;
    None if unparseable."""
    label = tasks.DEFAULT_TASK.parse(text)
    return None if label is None else tasks.label_value(label)


def answer_text(label: bool) -> str:
    """The seeds' task: the answer to a label, `{"is_fraud": true}`."""
    return tasks.DEFAULT_TASK.answer(tasks.label_text(bool(label)))


def _user_message(instruction: str, text: str) -> dict:
    return {"role": "user", "content": f"{instruction}\n{text}" if instruction else text}


def row_label(path: Path, lineno: int, raw) -> tasks.Label:
    """A row's 'label' as its canonical value, or BadInput naming the line."""
    try:
        value = tasks.label_value(raw)
    except ValueError as exc:
        raise BadInput(f"{path}:{lineno}: 'label' must be true or false, a string or a whole number, {exc}") from None
    problem = tasks.check_label_text(tasks.label_text(value))
    if problem:
        raise BadInput(f"{path}:{lineno}: label {tasks.label_text(value)!r} {problem}")
    return value


def _parsed(task: Task | None, answer: str | None) -> tasks.Label | None:
    """The label a reference answer names under the task (the seeds' when none); None for a generation task."""
    if task is not None and task.is_generation:
        return None
    label = (task or tasks.DEFAULT_TASK).parse(answer)
    return None if label is None else tasks.label_value(label)


def _answer_to(task: Task | None, value: tasks.Label) -> str:
    text = tasks.label_text(value)
    if task is not None and text in task.labels:
        return task.answer(text)
    return tasks.default_answer(value)


def to_sample(path: Path, lineno: int, row: dict | str, task: Task | None = None) -> Sample:
    """One row in any accepted form -> Sample. task: what its label means and how its answer reads
    (None: the seeds' answers for true/false, a label's own text for any other)."""
    sid = str(lineno)
    if isinstance(row, str):
        return Sample(id=sid, messages=(), answer=None, label=None, text=row)
    sid = _sample_id(path, lineno, row, sid)
    if "messages" in row:
        messages = _messages(path, lineno, row)
        answer = next((m.get("content") for m in reversed(messages) if m["role"] == "assistant"), None)
        prompt = tuple(m for m in messages if m["role"] != "assistant")
        if not prompt:
            raise BadInput(f"{path}:{lineno}: 'messages' has only assistant turns: give the dialog as a system or "
                           "user turn before the answer")
        return Sample(id=sid, messages=prompt, answer=answer, label=_parsed(task, answer))
    if "input" in row:
        text = _text_field(path, lineno, row, "input")
        instruction = _text_field(path, lineno, row, "instruction", optional=True)
        if instruction is None:
            instruction = tasks.default_instruction(task, DEFAULT_INSTRUCTION)
        messages = ({"role": "system", "content": SYSTEM_PROMPT}, _user_message(instruction, text))
        answer = _text_field(path, lineno, row, "output", optional=True)
        if "label" in row and not (task is not None and task.is_generation):
            label = row_label(path, lineno, row["label"])
            return Sample(id=sid, messages=messages, answer=_answer_to(task, label), label=label)
        return Sample(id=sid, messages=messages, answer=answer, label=_parsed(task, answer))
    if "text" in row:
        return Sample(id=sid, messages=(), answer=None, label=None, text=_text_field(path, lineno, row, "text"))
    raise BadInput(
        f"{path}:{lineno}: row has none of the fields qrun reads (input, messages, text): "
        f"found {', '.join(sorted(row)) or 'no fields'}"
    )


def _sample_id(path: Path, lineno: int, row: dict, default: str) -> str:
    """The row's id (a string or a number, as the seeds write it), else its line number."""
    value = row.get("id")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadInput(f"{path}:{lineno}: 'id' must be a string or a number, found {json_type_name(value)}")
    return str(value)


def load_samples(path: str | Path) -> list[Sample]:
    """Every sample of a file (calibration, perplexity), a label row's answer written as the task file
    beside it says (workers.tasks), else as the seeds' task does for true/false and as its text for others."""
    path = Path(path)
    rows = read_rows(path)
    task = _task_beside(path, rows)
    return [to_sample(path, n, row, task) for n, row in rows]


def _task_beside(path: Path, rows) -> Task | None:
    """The classification task of a task file beside `path`, over the labels it or the rows name; None
    where there is none (or it is a generation task, or the rows' labels do not make a task)."""
    spec = tasks.read_task_file(path)
    if not spec or spec.get("scorer"):
        return None
    labels = []
    for _, row in rows:
        try:
            labels.append(tasks.label_text(tasks.label_value(row["label"])))
        except (TypeError, KeyError, ValueError):
            continue
    try:
        return tasks.closed_task(spec, None, labels, str(path))
    except BadInput:
        return None


@dataclass(frozen=True)
class EvalData:
    """An eval file read under its task: the task, its samples, and the task's classes with no row."""

    task: Task
    samples: list[Sample]
    missing: tuple[str, ...] = ()


def load_eval(path: str | Path, spec: dict | None = None, template: str | None = None) -> EvalData:
    """The eval file's samples under its task: spec, a task file's content as stored (workers.tasks.task_spec);
    template, an answer template. A classification row must carry a label of the task (in 'label', or
    as an answer the task reads back); a generation row a reference answer. BadInput names the line."""
    path = Path(path)
    rows = read_rows(path)
    if spec and spec.get("scorer"):
        task = tasks.generation_task(spec)
        samples = _unique_ids(path, [(n, _reference_sample(path, n, row, task)) for n, row in rows])
        return EvalData(task, samples)
    task = _classification_task(path, rows, spec, template)
    numbered = []
    for n, row in rows:
        sample = to_sample(path, n, row, task)
        if sample.label is None:
            first = task.positive or task.labels[0]
            order = [first] + [label for label in task.labels if label != first]
            raise BadInput(f"{path}:{n}: no label: give 'label': {'/'.join(order)}, or an answer like "
                           f"{task.answer(first)}")
        if tasks.label_text(sample.label) not in task.labels:
            raise BadInput(f"{path}:{n}: label {tasks.label_text(sample.label)!r} is not one of the task's labels "
                           f"({', '.join(task.labels)}, as {tasks.task_file_of(path).name} names them)")
        numbered.append((n, sample))
    samples = _unique_ids(path, numbered)
    present = {tasks.label_text(s.label) for s in samples}
    return EvalData(task, samples, tuple(label for label in task.labels if label not in present))


def _classification_task(path: Path, rows, spec: dict | None, template: str | None) -> Task:
    """The task file's labels; else the labels the rows give (true and false: the seeds' task); else,
    with an answer template, the labels its answers name; else the seeds' task."""
    if spec and "labels" in spec:
        return tasks.closed_task(spec, template, spec["labels"], str(tasks.task_file_of(path)))
    first_line: dict[str, int] = {}
    references: list[tuple[int, str]] = []
    for n, row in rows:
        if not isinstance(row, dict):
            continue
        if "input" in row and "label" in row:
            first_line.setdefault(tasks.label_text(row_label(path, n, row["label"])), n)
        elif isinstance(row.get("output"), str) and "input" in row:
            references.append((n, row["output"]))
        elif isinstance(row.get("messages"), list):
            answer = next((m.get("content") for m in reversed(row["messages"])
                           if isinstance(m, dict) and m.get("role") == "assistant"), None)
            if isinstance(answer, str):
                references.append((n, answer))
    template = template or (spec or {}).get("answer_template")
    if not first_line and template and references:
        first_line = _labels_by_template(path, template, references)
    where = f"{path}:{min(first_line.values())}" if first_line else str(path)
    return tasks.closed_task(spec, template, first_line, where)


def _labels_by_template(path: Path, template: str, references: list[tuple[int, str]]) -> dict[str, int]:
    """The labels that reference answers written by `template` name, each with its first line."""
    pattern = tasks.template_pattern(template)
    found: dict[str, int] = {}
    for n, answer in references:
        match = pattern.fullmatch(answer)
        if match is None:
            raise BadInput(f"{path}:{n}: no label: the answer {answer[:60]!r} does not read as the answer "
                           f"template {template!r}")
        found.setdefault(tasks.label_text(row_label(path, n, match.group("label").strip().strip('"'))), n)
    return found


def _reference_sample(path: Path, n: int, row, task: Task) -> Sample:
    """A generation row: its prompt and reference answer, which the task's scorer must be able to read."""
    sample = to_sample(path, n, row, task)
    if sample.text is not None or not sample.answer:
        raise BadInput(f"{path}:{n}: no reference answer: give 'output' (or an assistant turn in 'messages') for "
                       f"the {task.scorer} scorer")
    if task.reference(sample.answer) is None:
        raise BadInput(f"{path}:{n}: the reference answer {sample.answer[:60]!r} has no JSON field {task.field!r}")
    return sample


def _unique_ids(path: Path, numbered: list[tuple[int, Sample]]) -> list[Sample]:
    """The samples, or BadInput where two share an id (compare matches a variant's predictions to the
    baseline's by id)."""
    first_line_of: dict[str, int] = {}
    for n, sample in numbered:
        if sample.id in first_line_of:
            raise BadInput(f"{path}:{n}: id {sample.id!r} is also the id of line {first_line_of[sample.id]}: give each "
                           "sample its own id, or none (the line number is used)")
        first_line_of[sample.id] = n
    return [sample for _, sample in numbered]


def load_labeled(path: str | Path, spec: dict | None = None, template: str | None = None) -> list[Sample]:
    """Samples for classification: every row must carry a label (load_eval's samples)."""
    return load_eval(path, spec, template).samples


def check_calibration_file(path: str | Path, min_samples: int) -> int:
    """Count usable calibration samples, or BadInput naming the file."""
    samples = load_samples(path)
    if len(samples) < min_samples:
        raise BadInput(
            f"calibration file {path} has {len(samples)} samples, fewer than the {min_samples} needed: "
            "add samples or lower --calib-samples"
        )
    return len(samples)


def check_eval_file(path: str | Path, spec: dict | None = None, template: str | None = None) -> int:
    """Count the samples of an eval file under its task, or BadInput naming the file (and the line)."""
    samples = load_eval(path, spec, template).samples
    if not samples:
        raise BadInput(f"eval file {path} has no samples: give it one labeled dialog a line")
    return len(samples)


def check_eval_data(path: str | Path, template: str | None = None, mode: str = "score",
                    mode_option: str = "--eval-mode") -> dict | None:
    """An eval file and its task checked as the job will read them: the answer template, the task file
    beside the file (its content returned, for the job's params; None where there is none), every row.
    mode_option: the mode's option as the command spells it."""
    if template is not None:
        tasks.check_template(template)
    spec = tasks.read_task_file(path)
    tasks.check_task_sources(spec, template, str(tasks.task_file_of(path)))
    check_eval_file(path, spec, template)
    if spec and spec.get("scorer") and mode != "generate":
        raise BadInput(f"eval file {path} is a generation task (its task file names scorer {spec['scorer']}): "
                       f"evaluate it with {mode_option} generate")
    return spec


def check_perplexity_file(path: str | Path) -> int:
    """Count the text samples of a perplexity file, or BadInput naming the file."""
    samples = load_samples(path)
    if not samples:
        raise BadInput(f"perplexity file {path} has no text: give it paragraphs of text or {{\"text\": ...}} lines")
    return len(samples)
