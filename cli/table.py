"""One renderer for qrun's tables (status, compare, the live views): plain text that fits a width.

Rows are lists of plain strings. Given a width (COLUMNS, or the terminal's), the table keeps the
columns that matter most and drops the others, and cuts only the columns marked `shrink` (a model
name, an error) at a word boundary with an ellipsis; where even the columns it must keep do not
fit, each row becomes a block of `name  value` lines (the stacked layout). Without a width (piped
output) every default column is printed whole. Cells are separated by two spaces and no line ends
in a space. Pure Python on purpose: rich takes seconds to lay out 10,000 rows, this milliseconds.
"""

from __future__ import annotations

import os
import shutil
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import click

GAP = "  "
ELLIPSIS = "…"
REQUIRED = 100  # a column with this priority is never dropped to make room


@dataclass(frozen=True)
class Column:
    name: str
    keep: int = 0  # priority when narrow: lower ones are dropped first; REQUIRED never
    right: bool = False  # numbers are right-justified
    shrink: int = 0  # may be cut down to this many cells (0: never cut, drop the column instead)
    cap: int = 0  # without a width limit, still cut at this many cells (0: never)
    wide: bool = False  # shown only with --wide or --columns
    whole: bool = False  # cut only once every column that matters less is dropped (a sentence, a progress)


@dataclass(frozen=True)
class Output:
    """Where a table goes: its width (None: unlimited, as when piped) and whether it may use color."""

    width: int | None
    color: bool


def output_settings(stream=None) -> Output:
    """Width from COLUMNS, else the terminal's; none when piped. Color only on a terminal and
    never with NO_COLOR set (https://no-color.org: any non-empty value)."""
    stream = stream or sys.stdout
    tty = stream.isatty()
    width = None
    if os.environ.get("COLUMNS", "").strip().isdigit():
        width = int(os.environ["COLUMNS"])
    elif tty:
        width = shutil.get_terminal_size().columns
    color = tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    return Output(width=max(width, 20) if width else None, color=color)


def display_width(text: str) -> int:
    """Terminal cells the text takes (a CJK character takes two)."""
    if text.isascii():
        return len(text)
    from rich.cells import cell_len

    return cell_len(text)


def visible(text: str) -> str:
    """The text with control characters written out (\\x1b, \\n): a model directory's name is anyone's
    choice on a shared server, and an escape sequence in it must not reach the terminal, nor a newline
    split a row."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() or not unicodedata.category(char).startswith("C")
                   else char.encode("unicode_escape").decode("ascii") for char in text)


def shorten(text: str, width: int) -> str:
    """The text in at most `width` cells: cut at the last word boundary that fits, plus an ellipsis
    (mid-word only when the first word alone would throw away most of the room)."""
    if display_width(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    room = width - 1
    if text.isascii():
        cut = text[:room]
    else:
        cut, used = "", 0
        for char in text:
            used += display_width(char)
            if used > room:
                break
            cut += char
    if text[len(cut)] != " ":  # the cut fell inside a word: back up to the space before it
        space = cut.rfind(" ")
        if space >= room // 3:
            cut = cut[:space]
    return cut.rstrip(" ,;:-") + ELLIPSIS


def split_columns(value: str | None) -> list[str] | None:
    """--columns a,b,c as names; None without the option; an option that names nothing is refused."""
    if value is None:
        return None
    names = [c.strip() for c in value.split(",") if c.strip()]
    if not names:
        from qrun.db.errors import BadInput

        raise BadInput(f"--columns {value!r} names no column: give names like id,status (see --help)")
    return names


def pick_columns(columns: Sequence[Column], wide: bool = False, names: Sequence[str] | None = None) -> list[int]:
    """Indices of the columns to consider: those named (in that order), all with wide, else the defaults."""
    if names:
        lookup = {c.name.lower(): i for i, c in enumerate(columns)}
        unknown = [n for n in names if n.lower() not in lookup]
        if unknown:
            from qrun.db.errors import BadInput

            raise BadInput(f"--columns {','.join(names)}: no column {unknown[0]!r}; choose from "
                           + ",".join(c.name.lower() for c in columns))
        return [lookup[n.lower()] for n in names]
    return [i for i, c in enumerate(columns) if wide or not c.wide]


@dataclass
class Layout:
    shown: list[int]  # column indices, in order
    widths: dict[int, int]


def _natural(columns, rows, i: int) -> int:
    return max([display_width(columns[i].name)] + [display_width(row[i]) for row in rows])


def fit(columns: Sequence[Column], rows: Sequence[Sequence[str]], shown: list[int], width: int | None,
        chosen: bool = False) -> Layout | None:
    """The columns and their widths; None when even the columns that must stay do not fit (stack)."""
    natural = {i: _natural(columns, rows, i) for i in shown}
    if width is None:
        return Layout(shown, {i: min(natural[i], columns[i].cap or natural[i]) for i in shown})
    if not chosen:  # an empty column says nothing; on a narrow screen it only takes room
        shown = [i for i in shown if columns[i].keep >= REQUIRED or any(row[i] for row in rows)]

    def least(i):
        return min(natural[i], columns[i].shrink) if columns[i].shrink else natural[i]

    def needed(idx):
        return sum(least(i) for i in idx) + len(GAP) * (len(idx) - 1)

    def droppable(idx, below: int = REQUIRED):
        return [i for i in idx if not chosen and columns[i].keep < below]

    def without_least(idx, candidates):
        return [i for i in idx if i != min(candidates, key=lambda i: (columns[i].keep, -i))]

    def widths_of(idx):
        widths = {i: least(i) for i in idx}
        spare = width - needed(idx)
        short = [i for i in idx if columns[i].whole and widths[i] < natural[i]]
        while spare and short:  # room left goes to the `whole` columns first, in equal shares
            for i in short[:spare]:
                widths[i] += 1
            spare -= len(short[:spare])
            short = [i for i in short if widths[i] < natural[i]]
        for i in sorted(idx, key=lambda i: -columns[i].keep):  # then to the cut columns that matter most
            grow = min(spare, natural[i] - widths[i])
            widths[i] += grow
            spare -= grow
        return widths

    while needed(shown) > width:
        if not droppable(shown):
            return None
        shown = without_least(shown, droppable(shown))
    widths = widths_of(shown)
    while True:  # a `whole` column still cut: the columns that matter less make room, least first
        cut = [i for i in shown if columns[i].whole and widths[i] < natural[i]]
        lesser = [i for i in droppable(shown, max((columns[i].keep for i in cut), default=0)) if not columns[i].whole]
        if not lesser:
            return Layout(shown, widths)
        shown = without_least(shown, lesser)
        widths = widths_of(shown)


Style = Callable[[int, int], str | None]  # (row index, column index) -> a click color, or None


def _line(columns, layout: Layout, cells: Sequence[str], style: Callable[[int], str | None] | None) -> str:
    parts = []
    last = layout.shown[-1]
    for i in layout.shown:
        width, text = layout.widths[i], cells[i]
        used = display_width(text)
        if used > width:
            text = shorten(text, width)
            used = display_width(text)
        if i != last or columns[i].right:
            text = " " * (width - used) + text if columns[i].right else text + " " * (width - used)
        color = style(i) if style else None
        parts.append(click.style(text, fg=color) if color and used else text)
    return GAP.join(parts).rstrip()


def render(columns: Sequence[Column], rows: Sequence[Sequence[str]], out: Output, *, wide: bool = False,
           names: Sequence[str] | None = None, style: Style | None = None, header: bool = True) -> list[str]:
    """The table as lines of text, fitted to out.width (stacked where the columns that must stay
    do not fit), colored by `style` where out.color allows."""
    shown = pick_columns(columns, wide, names)
    rows = [[visible(cell) for cell in row] for row in rows]
    layout = fit(columns, rows, shown, out.width, chosen=bool(names))
    if layout is None:
        return stacked(columns, rows, shown, out)
    cell_style = style if out.color else None
    lines = [_line(columns, layout, [c.name for c in columns], None)] if header else []
    for n, row in enumerate(rows):
        lines.append(_line(columns, layout, row, (lambda i, n=n: cell_style(n, i)) if cell_style else None))
    return lines


def stacked(columns: Sequence[Column], rows: Sequence[Sequence[str]], shown: list[int], out: Output) -> list[str]:
    """One block per row, one `NAME  value` line per non-empty cell: for screens too narrow for a table."""
    label = max(display_width(columns[i].name) for i in shown)
    room = max((out.width or 80) - label - len(GAP), 1)
    lines: list[str] = []
    for row in rows:
        if lines:
            lines.append("")
        lines += [f"{columns[i].name.ljust(label)}{GAP}{shorten(row[i], room)}" for i in shown if row[i]]
    return lines
