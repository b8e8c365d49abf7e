"""A job's history (every transition, local time with its offset) and its log, as a person reads it.

A job's log is what the libraries wrote to a terminal that was a file: progress bars redraw one
line with carriage returns (tqdm, GPTQModel's bars), some write every update as a new line, and
colors come as escape codes. `LogCollapser` keeps what a terminal would have ended up showing:
the last state of each line and of each bar. It works on the log as it is read, so following a
job gives the same lines as reading it later. raw: the file as written.
"""

from __future__ import annotations

import codecs
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qrun.db.errors import BadInput
from qrun.db.states import FINISHED, Status
from qrun.views import local_time

ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")  # colors, cursor moves, line erases
# What makes a line a progress bar: tqdm's "43%|", a run of block characters, a "[3/12]" counter.
BAR = re.compile(r"\d+(\.\d+)?%\||[█▉▊▋▌▍▎▏░▒▓]{3,}|\[\d+/\d+\]|\| \d+:\d\d:\d\d")
# Two states of one bar differ only in numbers, bar glyphs and spacing.
BAR_NOISE = re.compile(r"[\d.,:%/<>?]+|[█▉▊▋▌▍▎▏░▒▓#=\-]+|\s+|it/s|s/it")
FOLLOW_POLL_S = 0.5


# ---------------------------------------------------------------- progress bars


def last_redraw(line: str) -> str:
    """What a terminal shows of a line that was redrawn with carriage returns: its last state."""
    segments = [s.rstrip() for s in ESCAPE.sub("", line).split("\r")]
    return next((s for s in reversed(segments) if s), "")


def is_bar(line: str) -> bool:
    """Whether the line is a state of a progress bar."""
    return bool(BAR.search(line))


def bar_key(line: str) -> str:
    """What every state of one bar has in common: its text without numbers and glyphs."""
    return BAR_NOISE.sub("", line)


class LogCollapser:
    """Feed it the log as it comes; it returns the finished lines, progress bars collapsed.

    A run of bar lines is held back until a line that is not a bar (or close()) ends it, and then
    only the last state of each bar in the run is given, in the order they last changed. A bar
    repainted unchanged later on (multi-bar displays repaint every bar around each log line) is
    not given again."""

    def __init__(self):
        self.partial = ""  # after the last newline: the line is not finished yet
        self.bars: list[str] = []
        self.shown: dict[str, str] = {}  # bar key -> the state last given

    def feed(self, text: str) -> list[str]:
        *lines, self.partial = (self.partial + text).split("\n")
        return [out for line in lines for out in self._line(last_redraw(line))]

    def close(self) -> list[str]:
        lines = self._line(last_redraw(self.partial)) if self.partial else []
        self.partial = ""
        return lines + self._end_bars()

    def _line(self, line: str) -> list[str]:
        if is_bar(line):
            key = bar_key(line)
            self.bars = [b for b in self.bars if bar_key(b) != key] + [line]
            return []
        return self._end_bars() + [line]

    def _end_bars(self) -> list[str]:
        bars = [b for b in self.bars if self.shown.get(bar_key(b)) != b]
        self.shown.update((bar_key(b), b) for b in bars)
        self.bars = []
        return bars


def collapse(text: str) -> list[str]:
    """A whole log's lines, progress bars collapsed."""
    collapser = LogCollapser()
    return collapser.feed(text) + collapser.close()


# ---------------------------------------------------------------- history and outcome


def event_line(ev) -> str:
    """One transition as a comment line: `# <local time> claim: queued -> running (detail)`."""
    detail = f" ({ev.detail})" if ev.detail else ""
    line = f"# {local_time(ev.at)} {ev.transition}: {ev.from_status or '-'} -> {ev.to_status}{detail}"
    return line.replace("\n", "\n#   ")  # a traceback in a detail stays a comment


def error_lines(job, events) -> list[str]:
    """The job's whole error, unless an event already said it (a failure's event carries it)."""
    if not job.error or any(ev.detail == job.error for ev in events):
        return []
    return ["# error: " + job.error.replace("\n", "\n#   ")]


def exit_code(job) -> int:
    """`qrun logs --follow`'s exit status: 0 if the job succeeded, 1 if it failed or was cancelled."""
    return 0 if job.status == Status.SUCCEEDED.value else 1


def check_tail(tail: int | None) -> None:
    """--tail N: BadInput unless N is positive."""
    if tail is not None and tail <= 0:
        raise BadInput(f"--tail {tail} must be positive")


def last_lines(text: str | bytes, n: int | None) -> str | bytes:
    """The last n lines of a log as written (lines end at newlines only: a bar's carriage returns stay
    inside its line); all of it when n is None."""
    newline = "\n" if isinstance(text, str) else b"\n"
    cut = len(text) - 1 if text.endswith(newline) else len(text)
    for _ in range(n or 0):
        cut = text.rfind(newline, 0, cut)
        if cut < 0:
            return text
    return text[cut + 1:] if n else text


# ---------------------------------------------------------------- reading


class LogReader:
    """Reads a growing log from where it left off (bytes: a character split between reads is kept)."""

    def __init__(self, raw: bool):
        self.offset = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.collapser = None if raw else LogCollapser()

    def read(self, path: str | None, final: bool = False) -> list[str] | str:
        """What was added since the last read: lines, or with raw the text as written."""
        data = b""
        if path and Path(path).exists():
            with open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            self.offset += len(data)
        text = self.decoder.decode(data, final=final)
        if self.collapser is None:
            return text
        return self.collapser.feed(text) + (self.collapser.close() if final else [])


@dataclass
class JobLogs:
    """A job's history and log as `qrun logs` prints them.

    history: one comment line per transition (event_line); log: the log's lines, progress bars
    collapsed (the last `tail` of them), or with raw the file's bytes as written, or None when the
    job has no log yet (it has not started); error: the job's whole error as comment lines, unless
    the history already says it; status: the job's state when read."""

    job_id: int
    status: str
    history: list[str]
    log: list[str] | bytes | None
    error: list[str]


def read_logs(db, job_id: int, tail: int | None = None, raw: bool = False) -> JobLogs:
    """The job's history and log as they are now (JobNotFound for an unknown id)."""
    from qrun.db import queue

    job = queue.get_job(db, job_id)
    events = queue.events_of(db, job.id)
    log: list[str] | bytes | None = None
    if job.log_path and Path(job.log_path).exists():
        data = Path(job.log_path).read_bytes()
        if raw:
            log = last_lines(data, tail)
        else:
            lines = collapse(data.decode("utf-8", errors="replace"))
            log = lines[-tail:] if tail else lines
    return JobLogs(job.id, job.status, [event_line(ev) for ev in events], log, error_lines(job, events))


def lines_text(lines: list[str]) -> str:
    """Lines as text to write, each ended by a newline ('' for none)."""
    return "\n".join(lines) + "\n" if lines else ""


def follow(db, job_id: int, raw: bool = False, poll_s: float = FOLLOW_POLL_S, tail: int | None = None,
           warn: Callable[[str], None] | None = None) -> Iterator[str | int]:
    """The history and log as they grow, as text to write (lines collapsed as read_logs has them, or with
    raw the log as written), until the job finishes; last, its exit_code (an int). tail: of the log
    there when following begins, only the last `tail` lines (then everything new). warn(line): told
    once, at once, while no `qrun run` serves the table (the job waits for one)."""
    from qrun.db import queue
    from qrun.waiting import no_runner_line

    reader, given, first = LogReader(raw), 0, True
    while True:
        job = queue.get_job(db, job_id)  # the state first: once finished, the log read after is complete
        events = queue.events_of(db, job_id)
        new = [event_line(ev) for ev in events[given:]]
        given = len(events)
        done = job.status in FINISHED
        if warn is not None and not done and (line := no_runner_line(db)) is not None:
            warn(line)
            warn = None  # said once
        chunk = reader.read(job.log_path, final=done)
        if first and tail:
            chunk = last_lines(chunk, tail) if isinstance(chunk, str) else chunk[-tail:]
        first = False
        texts = [lines_text(new), chunk if isinstance(chunk, str) else lines_text(chunk)]
        if done:
            texts.append(lines_text(error_lines(job, events)))
        yield from (text for text in texts if text)
        if done:
            yield exit_code(job)
            return
        time.sleep(poll_s)
