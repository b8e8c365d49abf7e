"""`qrun compare`: one row per variant of a source model -- what each quantization cost in accuracy,
size and time, next to the unquantized baseline. The rows come from the library (qrun.compare,
qrun.comparison); this module formats them as a table, markdown, CSV or JSON, and --plot draws them
(qrun.plotting).
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import click

from qrun.cli.common import print_json, stderr_line
from qrun.cli.table import REQUIRED, Column, Output, display_width, output_settings, render, shorten, split_columns
from qrun.comparison import (CELL_NAMES, METRICS, MISSING_HEADING, check_max_drop, evaluated_rows, group_title, groups,
                             metric_name, missing_texts, row_cells, shown_cells)
from qrun.plotting import check_plot_path, write_plot

FORMATS = ("table", "json", "csv", "markdown")


# ---------------------------------------------------------------- formatting


# What stays on a narrow screen: the variant and its key numbers never go (too narrow even for those:
# one block per variant); the others leave in order of priority.
TABLE_COLUMNS = tuple(Column(name, keep=keep, right=name != "variant") for name, keep in (
    ("variant", REQUIRED), ("bits", REQUIRED), ("method", 65), ("size MB", 30), ("size %", 70), ("quant s", 20),
    ("precision", REQUIRED), ("recall", REQUIRED), ("F1", REQUIRED), ("macro F1", 58), ("lost most", 25),
    ("accuracy", 60), ("invalid", 15), ("AUC", 50), ("perplexity", 40), ("match", 45), ("agree", 55),
    ("fraud->not", 10), ("not->fraud", 10))) + (Column("changed", keep=12, right=True, shrink=16, cap=48),)


def _fitted_title(group: list[dict], width: int | None) -> str:
    """The group's title with whole paths where they fit, else with the model's and data's names."""
    title = group_title(group)
    if width is None or display_width(title) <= width:
        return title
    first = group[0]
    short = {**first, "model": Path(first["model"]).name, "data": first["data"] and Path(first["data"]).name,
             "ppl_data": first["ppl_data"] and Path(first["ppl_data"]).name}
    return shorten(group_title([short]), width)


def table_lines(rows: list[dict], out: Output, columns: list[str] | None = None) -> list[str]:
    """Each group's title, table, the variants missing from it and the --max-drop sentence, fitted to out's width."""
    lines: list[str] = []
    for group in groups(rows):
        if lines:
            lines.append("")
        lines.append(_fitted_title(group, out.width))
        shown = CELL_NAMES if columns else shown_cells(group)  # named columns are shown, filled or not
        cells = [row_cells(row, shown) for row in evaluated_rows(group)]
        if cells:
            lines += render([c for c in TABLE_COLUMNS if c.name in shown], cells, out, wide=True, names=columns)
        lines += _missing_lines(group, out.width)
        lines += _answer_lines(group, out.width)
    return lines


def _missing_lines(group: list[dict], width: int | None) -> list[str]:
    """The variants without a succeeded eval and why, one line each, cut to the width."""
    texts = missing_texts(group)
    if not texts:
        return []
    return ["", MISSING_HEADING] + ["  " + (shorten(text, width - 2) if width else text) for text in texts]


def _answer_lines(group: list[dict], width: int | None) -> list[str]:
    """The group's --max-drop sentence under its table, wrapped to the width (none without --max-drop)."""
    sentence = group[0].get("max_drop_answer")
    if not sentence:
        return []
    if not width:
        return ["", sentence]
    glued = sentence.replace(" MB", "\u00a0MB").replace(" GB", "\u00a0GB").replace(" kB", "\u00a0kB")
    return [""] + [line.replace("\u00a0", " ") for line in textwrap.wrap(glued, width, break_on_hyphens=False)]


def print_table(rows: list[dict], columns: list[str] | None = None, wide: bool = False) -> None:
    """The rows as tables, one per group, to the terminal's width (wide: every column)."""
    out = output_settings()
    click.echo("\n".join(table_lines(rows, Output(None, out.color) if wide else out, columns=columns)))


def print_markdown(rows: list[dict]) -> None:
    """The table's cells as one markdown table per group, under a heading."""
    lines: list[str] = []
    for group in groups(rows):
        shown = shown_cells(group)
        lines += [f"### {group_title(group)}", "", "| " + " | ".join(shown) + " |",
                  "|" + "|".join("---" if name == "variant" else "---:" for name in shown) + "|"]
        lines += ["| " + " | ".join(row_cells(row, shown)) + " |" for row in evaluated_rows(group)]
        lines.append("")
        if missing_texts(group):
            lines += [MISSING_HEADING[0].upper() + MISSING_HEADING[1:], ""]
            lines += [f"- {text}" for text in missing_texts(group)] + [""]
        if group[0].get("max_drop_answer"):
            lines += [group[0]["max_drop_answer"], ""]
    click.echo("\n".join(lines).rstrip("\n"))


def print_csv(rows: list[dict]) -> None:
    """Every field of every row, one CSV line each."""
    if not rows:
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    # per-class values (classes, class_f1, answers_changed) as JSON text
    writer.writerows({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v
                      for k, v in row.items()} for row in rows)


@click.command()
@click.option("--model", default=None, metavar="M", help="Only this source model (directory, or its name).")
@click.option("--data", default=None, metavar="D", help="Only evals on this data file (path, or its name).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="Output format; json, csv and markdown carry the same numbers as the table.")
@click.option("--sweep", default=None, metavar="S",
              help="Only the variants of this sweep (id or name), with their baseline.")
@click.option("--wide", is_flag=True, help="Every column, however wide the terminal.")
@click.option("--columns", "columns", metavar="a,b,c",
              help="Table columns, in this order (variant,bits,method,size MB,...; default: what fits the width).")
@click.option("--metric", type=click.Choice(METRICS), default="f1", show_default=True,
              help="The quality --max-drop and --plot read. Perplexity: lower is better, so a drop is a rise.")
@click.option("--max-drop", "max_drop", type=float, default=None, metavar="D",
              help="Name the smallest variant whose --metric is at most D worse than the baseline's "
                   "(0.01 = one point of F1; for perplexity, at most D higher), under each group's table.")
@click.option("--plot", "plot_file", default=None, metavar="FILE.png",
              help="Also draw --metric against size on disk into a PNG (or .svg, .pdf): one labelled point per "
                   "variant, the baseline, the Pareto front, the --max-drop band.")
@click.pass_context
def compare(ctx, model, data, fmt, sweep, wide, columns, metric, max_drop, plot_file):
    """Compare the variants of each evaluated model with its unquantized baseline: method, size,
    quantization time, precision, recall, F1, accuracy, invalid answers, AUC and perplexity (with
    deltas from the baseline), and how many per-sample predictions changed. Baseline first, then the
    variants from the largest on disk to the smallest; under each table, the variants whose eval failed
    or has not run, with the reason."""
    import qrun

    check_max_drop(max_drop)
    plot_path = check_plot_path(plot_file) if plot_file is not None else None
    names = split_columns(columns)
    if names:
        render(TABLE_COLUMNS, [], output_settings(), names=names)  # an unknown column: bad input, nothing opened
    rows = qrun.compare(model, data, sweep, metric=metric, max_drop=max_drop, warn=stderr_line,
                        db=ctx.obj.get("db_url"))
    if not rows:
        what = " ".join(f for f in (f"for model {model}" if model else "", f"on data {data}" if data else "",
                                    f"in sweep {sweep}" if sweep else "") if f)
        stderr_line(f"No succeeded eval jobs {what}".rstrip() + ": add some with `qrun submit ... --eval FILE`.")
        if fmt == "json":
            print_json([])
        return
    if fmt == "table":
        print_table(rows, names, wide)
    else:
        {"json": print_json, "csv": print_csv, "markdown": print_markdown}[fmt](rows)
    if plot_path is not None:
        drawn = write_plot(rows, plot_path, metric, max_drop)
        count = sum(map(len, drawn))
        stderr_line(f"wrote {plot_path}" + ("" if count else f" (no variant has {metric_name(metric)} and a size)"))


COMMANDS = [compare]
