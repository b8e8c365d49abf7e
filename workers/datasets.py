"""Reading labeled dialogs and calibration text in the forms the seeds use.

Accepted files:
- JSONL, one object a line, or one JSON array of objects (the anti_fraud alpaca file is named
  .jsonl but is a pretty-printed array);
- rows `{input, label, instruction}`, alpaca `{instruction, input, output}`, chat
  `{messages: [{role, content}, ...]}`, or `{text}`;
- any other file is plain text, one sample per blank-line-separated paragraph.
Errors name the file and the line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from qrun.db.errors import BadInput

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
    label: bool | None
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
    """`{"is_fraud": true}` (possibly in code fences or followed by more text) -> True; None if unparseable."""
    if not text:
        return None
    match = re.search(r"\{[^{}]*\}", text)
    if match:
        try:
            value = json.loads(match.group(0)).get("is_fraud")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, bool):
            return value
    match = re.search(r'"?is_fraud"?\s*[:=]\s*"?(true|false)', text, re.IGNORECASE)
    if match:
        return match.group(1).lower() == "true"
    return None


def answer_text(label: bool) -> str:
    return json.dumps({"is_fraud": bool(label)})


def _user_message(instruction: str, text: str) -> dict:
    return {"role": "user", "content": f"{instruction}\n{text}" if instruction else text}


def to_sample(path: Path, lineno: int, row: dict | str) -> Sample:
    """One row in any accepted form -> Sample."""
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
        return Sample(id=sid, messages=prompt, answer=answer, label=parse_answer(answer))
    if "input" in row:
        text = _text_field(path, lineno, row, "input")
        instruction = _text_field(path, lineno, row, "instruction", optional=True) or DEFAULT_INSTRUCTION
        messages = ({"role": "system", "content": SYSTEM_PROMPT}, _user_message(instruction, text))
        if "label" in row:
            label = row["label"]
            if isinstance(label, str) and label.lower() in ("true", "false"):
                label = label.lower() == "true"
            if not isinstance(label, bool):
                raise BadInput(f"{path}:{lineno}: 'label' must be true or false, found {row['label']!r}")
            return Sample(id=sid, messages=messages, answer=answer_text(label), label=label)
        answer = _text_field(path, lineno, row, "output", optional=True)
        return Sample(id=sid, messages=messages, answer=answer, label=parse_answer(answer))
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
    path = Path(path)
    return [to_sample(path, n, row) for n, row in read_rows(path)]


def load_labeled(path: str | Path) -> list[Sample]:
    """Samples for classification: every row must carry a label."""
    path = Path(path)
    samples = []
    first_line_of: dict[str, int] = {}  # compare matches a variant's predictions to the baseline's by id
    for n, row in read_rows(path):
        sample = to_sample(path, n, row)
        if sample.label is None:
            raise BadInput(
                f"{path}:{n}: no label: give 'label': true/false, or an answer like {{\"is_fraud\": true}}"
            )
        if sample.id in first_line_of:
            raise BadInput(f"{path}:{n}: id {sample.id!r} is also the id of line {first_line_of[sample.id]}: give each "
                           "sample its own id, or none (the line number is used)")
        first_line_of[sample.id] = n
        samples.append(sample)
    return samples


def check_calibration_file(path: str | Path, min_samples: int) -> int:
    """Count usable calibration samples, or BadInput naming the file."""
    samples = load_samples(path)
    if len(samples) < min_samples:
        raise BadInput(
            f"calibration file {path} has {len(samples)} samples, fewer than the {min_samples} needed: "
            "add samples or lower --calib-samples"
        )
    return len(samples)


def check_eval_file(path: str | Path) -> int:
    """Count the labeled samples of an eval file, or BadInput naming the file (and the line)."""
    samples = load_labeled(path)
    if not samples:
        raise BadInput(f"eval file {path} has no samples: give it one labeled dialog a line")
    return len(samples)


def check_perplexity_file(path: str | Path) -> int:
    """Count the text samples of a perplexity file, or BadInput naming the file."""
    samples = load_samples(path)
    if not samples:
        raise BadInput(f"perplexity file {path} has no text: give it paragraphs of text or {{\"text\": ...}} lines")
    return len(samples)
