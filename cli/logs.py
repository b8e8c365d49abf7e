"""`qrun logs`: a job's history (every transition, local time with its offset) and its log, as a
person reads it.

A job's log is what the libraries wrote to a terminal that was a file: progress bars redraw one
line with carriage returns (tqdm, GPTQModel's bars), some write every update as a new line, and
colors come as escape codes. `LogCollapser` keeps what a terminal would have ended up showing:
the last state of each line and of each bar. It works on the log as it is read, so `--follow`
prints the same lines as a later `qrun logs`. `--raw` prints the file as written.
"""

from __future__ import annotations

import codecs
import re
import sys
import time
from pathlib import Path

import click

from qrun.cli.common import local_time, open_db, parse_job_ids
from qrun.db.states import Status

FINISHED = (Status.SUCCEEDED.value, Status.FAILED.value, Status.CANCELLED.value)
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")  # colors, cursor moves, line erases
# What makes a line a progress bar: tqdm's "43%|", a run of block characters, a "[3/12]" counter.
BAR = re.compile(r"\d+(\.\d+)?%\||[█▉▊▋▌▍▎▏░▒▓]{3,}|\[\d+/\d+\]|\| \d+:\d\d:\d\d")
# Two states of one bar differ only in numbers, bar glyphs and spacing.
BAR_NOISE = re.compile(r"[\d.,:%/<>?]+|[█▉▊▋▌▍▎▏░▒▓#=\-]+|\s+|it/s|s/it")
FOLLOW_POLL_S = 0.5


def last_redraw(line: str) -> str:
    """What a terminal shows of a line that was redrawn with carriage returns: its last state."""
    segments = [s.rstrip() for s in ESCAPE.sub("", line).split("\r")]
    return next((s for s in reversed(segments) if s), "")


def is_bar(line: str) -> bool:
    return bool(BAR.search(line))


def bar_key(line: str) -> str:
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
    collapser = LogCollapser()
    return collapser.feed(text) + collapser.close()


def event_line(ev) -> str:
    detail = f" ({ev.detail})" if ev.detail else ""
    line = f"# {local_time(ev.at)} {ev.transition}: {ev.from_status or '-'} -> {ev.to_status}{detail}"
    return line.replace("\n", "\n#   ")  # a traceback in a detail stays a comment


def error_lines(job, events) -> list[str]:
    """The job's whole error, unless an event already said it (a failure's event carries it)."""
    if not job.error or any(ev.detail == job.error for ev in events):
        return []
    return ["# error: " + job.error.replace("\n", "\n#   ")]


def exit_code(job) -> int:
    return 0 if job.status == Status.SUCCEEDED.value else 1


class LogReader:
    """Reads a growing log from where it left off (bytes: a character split between reads is kept)."""

    def __init__(self, raw: bool):
        self.offset = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.collapser = None if raw else LogCollapser()

    def read(self, path: str | None, final: bool = False) -> list[str] | str:
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


def _emit(chunk) -> None:
    if isinstance(chunk, str):
        sys.stdout.write(chunk)
    elif chunk:
        sys.stdout.write("\n".join(chunk) + "\n")
    sys.stdout.flush()


def show_once(db, job, tail_lines: int | None, raw: bool) -> None:
    from qrun.db import queue

    events = queue.events_of(db, job.id)
    _emit([event_line(ev) for ev in events])
    if not job.log_path or not Path(job.log_path).exists():
        click.echo(f"# job {job.id} has no log yet (it has not started)", err=True)
    elif raw:
        sys.stdout.buffer.write(Path(job.log_path).read_bytes())
        sys.stdout.flush()
    else:
        lines = collapse(Path(job.log_path).read_bytes().decode("utf-8", errors="replace"))
        _emit(lines[-tail_lines:] if tail_lines else lines)
    _emit(error_lines(job, events))


def follow(db, job_id: int, raw: bool, poll_s: float = FOLLOW_POLL_S) -> int:
    """Print the history and log as they grow until the job finishes; its outcome as exit code."""
    from qrun.db import queue

    reader, printed = LogReader(raw), 0
    while True:
        job = queue.get_job(db, job_id)  # the state first: once finished, the log read after is complete
        events = queue.events_of(db, job_id)
        _emit([event_line(ev) for ev in events[printed:]])
        printed = len(events)
        done = job.status in FINISHED
        _emit(reader.read(job.log_path, final=done))
        if done:
            _emit(error_lines(job, events))
            return exit_code(job)
        time.sleep(poll_s)


@click.command()
@click.argument("job_id")
@click.option("--tail", "tail_lines", type=int, default=None, help="Only the last N lines of the log.")
@click.option("-f", "--follow", "follow_", is_flag=True,
              help="Keep printing as the job goes on; exit when it finishes (1 if it failed or was cancelled).")
@click.option("--raw", is_flag=True, help="The log as written, progress-bar redraws and escape codes included.")
@click.pass_context
def logs(ctx, job_id, tail_lines, follow_, raw):
    """Print a job's history and its log (GPTQModel's output, tracebacks), progress bars collapsed
    to their last state."""
    from qrun.db import queue

    (jid,) = parse_job_ids((job_id,))
    if tail_lines is not None and tail_lines <= 0:
        from qrun.db.errors import BadInput

        raise BadInput(f"--tail {tail_lines} must be positive")
    db = open_db(ctx, create=False)
    job = queue.get_job(db, jid)
    if follow_:
        ctx.exit(follow(db, jid, raw))
    show_once(db, job, tail_lines, raw)


COMMANDS = [logs]
