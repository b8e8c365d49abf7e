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
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{what} {path} does not exist: check the path")
    if not path.is_file():
        raise BadInput(f"{what} {path} is not a file: pass a JSONL, JSON or text file")
    return path


def read_rows(path: str | Path) -> list[tuple[int, dict | str]]:
    """(line number, row) pairs. JSON rows are dicts; plain-text paragraphs are strings."""
    path = require_file(path)
    try:
        content = path.read_text(encoding="utf-8")
    except PermissionError as exc:
        raise BadInput(f"data file {path} is not readable: check its permissions") from exc
    except UnicodeDecodeError as exc:
        raise BadInput(f"data file {path} is not UTF-8 text (byte {exc.start})") from exc
    head = content.lstrip()[:1]
    if not content.strip():
        raise BadInput(f"data file {path} is empty: give it one JSON object a line, or paragraphs of text")
    if not _is_json_file(path, head):
        paragraphs = re.split(r"\n\s*\n", content)
        return [(i + 1, p.strip()) for i, p in enumerate(paragraphs) if p.strip()]
    if head == "[":
        try:
            rows = json.loads(content)
        except ValueError as exc:
            raise BadInput(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
        _check_objects(path, [(i + 1, r) for i, r in enumerate(rows)], what="item")
        return [(i + 1, r) for i, r in enumerate(rows)]
    out = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except ValueError as exc:
            raise BadInput(f"{path}:{lineno}: not valid JSON ({exc.msg}): fix or remove the line") from exc
    _check_objects(path, out, what="line")
    return out


def _check_objects(path: Path, rows, what: str) -> None:
    for n, row in rows:
        if not isinstance(row, dict):
            raise BadInput(f"{path}:{what} {n}: expected a JSON object, found {type(row).__name__}")


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
    sid = str(row.get("id", sid))
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise BadInput(f"{path}:{lineno}: 'messages' must be a list of {{role, content}} objects")
        answer = next((m.get("content") for m in reversed(messages) if m["role"] == "assistant"), None)
        prompt = tuple(m for m in messages if m["role"] != "assistant")
        return Sample(id=sid, messages=prompt, answer=answer, label=parse_answer(answer))
    if "input" in row:
        instruction = row.get("instruction") or DEFAULT_INSTRUCTION
        messages = ({"role": "system", "content": SYSTEM_PROMPT}, _user_message(instruction, str(row["input"])))
        if "label" in row:
            label = row["label"]
            if isinstance(label, str) and label.lower() in ("true", "false"):
                label = label.lower() == "true"
            if not isinstance(label, bool):
                raise BadInput(f"{path}:{lineno}: 'label' must be true or false, found {row['label']!r}")
            return Sample(id=sid, messages=messages, answer=answer_text(label), label=label)
        answer = row.get("output")
        return Sample(id=sid, messages=messages, answer=answer, label=parse_answer(answer))
    if "text" in row:
        return Sample(id=sid, messages=(), answer=None, label=None, text=str(row["text"]))
    raise BadInput(
        f"{path}:{lineno}: row has none of the fields qrun reads (input, messages, text): "
        f"found {', '.join(sorted(row)) or 'no fields'}"
    )


def load_samples(path: str | Path) -> list[Sample]:
    path = Path(path)
    return [to_sample(path, n, row) for n, row in read_rows(path)]


def load_labeled(path: str | Path) -> list[Sample]:
    """Samples for classification: every row must carry a label."""
    path = Path(path)
    samples = []
    for n, row in read_rows(path):
        sample = to_sample(path, n, row)
        if sample.label is None:
            raise BadInput(
                f"{path}:{n}: no label: give 'label': true/false, or an answer like {{\"is_fraud\": true}}"
            )
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
