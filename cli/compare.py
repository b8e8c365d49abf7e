"""`qrun compare`: one row per variant of a source model -- what each quantization cost in
accuracy, size and time, next to the unquantized baseline.

`comparison_rows` assembles the rows from the job table (and the predictions artifacts); the
command only formats them. Only succeeded eval jobs count; of several evals of the same variant
on the same data in the same mode, the newest wins. Score and generate results are never mixed in
one group: their numbers are not comparable.
"""

from __future__ import annotations

import csv
import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import click

from qrun.cli.common import open_db, print_json, stderr_line
from qrun.cli.table import REQUIRED, Column, Output, display_width, output_settings, render, shorten
from qrun.db.errors import BadInput
from qrun.variants import variant_key, variant_label

FORMATS = ("table", "json", "csv", "markdown")
# Metrics shown with their delta from the baseline (variant minus baseline).
COMPARED = ("precision", "recall", "f1", "accuracy", "invalid", "auc", "perplexity")
DTYPE_BITS = {"float32": 32, "float64": 64, "bfloat16": 16, "float16": 16}
BASELINE = "baseline"


# ---------------------------------------------------------------- assembling the rows


def _same_path(given: str, stored: str | None) -> bool:
    """A filter matches the stored (resolved) path, or just its file or directory name."""
    if stored is None:
        return False
    return str(Path(given).expanduser().resolve()) == stored or given == Path(stored).name


# The quantization parameters each row carries (the CSV's and JSON's columns); qrun.variants decides
# which of them make a different variant and how labels name them.
VARIANT_KEYS = (("bits", None), ("group_size", 128), ("desc_act", False), ("sym", True), ("damp_percent", 0.01),
                ("calib", None), ("calib_samples", 128), ("calib_max_len", 1024), ("method", "gptq"))


def _quant_params(job, upstreams: dict) -> dict:
    """The quantize parameters behind an eval: its upstream job's (empty for the baseline or an artifact)."""
    upstream = upstreams.get(job.depends_on)
    return dict(upstream.params or {}) if upstream is not None and upstream.kind == "quantize" else {}


def _in_sweep(job, sweep: str) -> bool:
    return sweep in (getattr(job, "sweep", None), getattr(job, "sweep_name", None))


def latest_evals(db, model: str | None = None, data: str | None = None, sweep: str | None = None) -> list:
    """Succeeded eval jobs, the newest per (source model, data, mode, variant), a variant being keyed by
    every quantization parameter (evals of w4g128 at damp 0.01 and at 0.05 are two variants). With
    a sweep, the evals of its variants and the baselines they are compared with."""
    from qrun.db import queue

    jobs = queue.list_jobs(db, plain=True)
    by_id = {j.id: j for j in jobs}
    newest: dict[tuple, object] = {}
    for job in jobs:  # ordered by id: a later job replaces an earlier one
        params = job.params or {}
        if job.kind != "eval" or job.status != "succeeded":
            continue
        if model and not _same_path(model, job.model):
            continue
        if data and not _same_path(data, params.get("data")):
            continue
        quant = _quant_params(job, by_id)
        variant = variant_key(quant) if "bits" in quant else params.get("variant", BASELINE)
        newest[(job.model, params.get("data"), _mode(params), variant)] = job
    chosen = list(newest.values())
    if sweep:
        swept = [j for j in chosen if _in_sweep(j, sweep) or _in_sweep(by_id.get(j.depends_on, j), sweep)]
        groups = {(j.model, (j.params or {}).get("data"), _mode(j.params or {})) for j in swept}
        baselines = [j for j in chosen if (j.params or {}).get("variant", BASELINE) == BASELINE and not j.depends_on
                     and (j.model, (j.params or {}).get("data"), _mode(j.params or {})) in groups]
        chosen = sorted({j.id: j for j in swept + baselines}.values(), key=lambda j: j.id)  # rows: not hashable
    return chosen


def unique_labels(rows: list[dict]) -> None:
    """Label the quantized rows of one group by qrun.variants.variant_label within the group: a
    parameter that differs between them (damp, calibration) is named in each label, w4g128·d0.05."""
    quantized = [(row, _params_of(row)) for row in rows if row["quantize_job_id"] is not None and row["bits"]]
    among = [params for _, params in quantized]
    for row, params in quantized:
        row["variant"] = variant_label(params, among)


def _params_of(row: dict) -> dict:
    """The quantization parameters a row carries, as a quantize job's params (unset ones left out)."""
    return {name: row[name] for name, _ in VARIANT_KEYS if row.get(name) is not None}


def _mode(params: dict) -> str | None:
    """Classification mode; None for a perplexity-only eval."""
    return params.get("mode", "score") if params.get("data") else None


def _source_bits(model_dir: str) -> int:
    """Bits per weight of an unquantized model, from the dtype in its config (16 if unstated)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return 16
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return DTYPE_BITS.get(dtype.removeprefix("torch."), 16)


def _quantized_bits(job, upstream) -> tuple[int | None, int | None]:
    """(bits, group size) of an evaluated variant: its quantize job's, else its quantize_config.json."""
    params = upstream.params if upstream is not None else {}
    if "bits" not in params:
        try:
            params = json.loads((Path(job.model) / "quantize_config.json").read_text())
        except (OSError, ValueError):
            return None, None
    return params.get("bits"), params.get("group_size")


def read_predictions(path: str | None, warn: Callable[[str], None] = stderr_line) -> dict[str, object] | None:
    """id -> prediction (True, False or "invalid") from a predictions artifact.

    An unreadable one gives None (its agreement columns show `-`) and one warning line naming the
    file and why: a silent `-` looked like "no predictions", not like a permission or a lost file.
    """
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return {str(r["id"]): r["prediction"] for r in map(json.loads, filter(str.strip, f))}
    except OSError as exc:
        reason = exc.strerror or str(exc)
    except ValueError as exc:  # UnicodeDecodeError included
        reason = f"not JSONL ({str(exc).splitlines()[0][:80]})"
    except (KeyError, TypeError):
        reason = "a row lacks its id or prediction"
    warn(f"cannot read predictions {path}: {reason}")
    return None


def read_predictions_artifact(artifact) -> dict[str, object] | None:
    """read_predictions of an artifact row; where it cannot be read, the warning also names the node
    that wrote it if that is another machine (a cluster whose QRUN_HOME is not shared)."""
    if artifact is None:
        return None
    here = socket.gethostname()
    elsewhere = f" (written on node {artifact.node}, read on {here})" if artifact.node and artifact.node != here else ""
    return read_predictions(artifact.path, warn=lambda line: stderr_line(line + elsewhere))


def agreement(baseline: dict | None, variant: dict | None) -> dict[str, float | int | None]:
    """Share of samples predicted identically, and how many flipped each way (invalid is neither class)."""
    common = sorted(set(baseline or {}) & set(variant or {}))
    if not common:
        return {"agreement": None, "flips_fraud_to_not": None, "flips_not_to_fraud": None}
    pairs = [(baseline[i], variant[i]) for i in common]
    return {
        "agreement": sum(a == b for a, b in pairs) / len(pairs),
        "flips_fraud_to_not": sum(a is True and b is False for a, b in pairs),
        "flips_not_to_fraud": sum(a is False and b is True for a, b in pairs),
    }


def _count(value):
    """Counts are stored as floats like every metric; show them as the integers they are."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _base_row(job, metrics: dict, upstream, upstream_metrics: dict) -> dict:
    metrics = metrics | {k: _count(metrics[k]) for k in ("model_size_bytes", "invalid", "eval_samples")
                         if k in metrics}
    params = job.params or {}
    variant = params.get("variant", BASELINE)
    quant = {k: upstream.params[k] for k, _ in VARIANT_KEYS if k in (upstream.params or {})} if upstream else {}
    if variant == BASELINE:
        bits, group_size = _source_bits(job.model), None
    else:
        bits, group_size = _quantized_bits(job, upstream)
    size = metrics.get("model_size_bytes")
    row = {
        "model": job.model, "data": params.get("data"), "ppl_data": params.get("ppl_data"),
        "mode": _mode(params),
        "variant": variant, "bits": bits, "group_size": group_size,
        **{name: quant.get(name) for name, _ in VARIANT_KEYS if name not in ("bits", "group_size")},
        "sweep": getattr(upstream if upstream is not None else job, "sweep", None), "job_id": job.id,
        "quantize_job_id": upstream.id if upstream is not None else None,
        "size_bytes": size, "size_mb": size / 1e6 if size is not None else None, "size_pct": None,
        "quantize_s": upstream_metrics.get("quantize_s"),
    }
    for name in COMPARED:
        row[name] = metrics.get(name)
        row[f"{name}_delta"] = None
    row |= {"agreement": None, "flips_fraud_to_not": None, "flips_not_to_fraud": None,
            "eval_samples": metrics.get("eval_samples"), "samples_per_s": metrics.get("samples_per_s")}
    return row


def _against_baseline(rows: list[dict], predictions: dict[int, dict | None]) -> None:
    """Fill in the deltas, size share and agreement of each row against its group's baseline row."""
    base = rows[0] if rows and rows[0]["variant"] == BASELINE else None
    if base is None:
        return
    for row in rows:
        for name in COMPARED:
            if row[name] is not None and base[name] is not None:
                row[f"{name}_delta"] = row[name] - base[name]
        if row["size_bytes"] is not None and base["size_bytes"]:
            row["size_pct"] = 100.0 * row["size_bytes"] / base["size_bytes"]
        row |= agreement(predictions[base["job_id"]], predictions[row["job_id"]])


def _order(row: dict) -> tuple:
    return (row["variant"] != BASELINE, -(row["bits"] or 0), row["variant"])


def comparison_rows(db, model: str | None = None, data: str | None = None, sweep: str | None = None) -> list[dict]:
    """The comparison, as plain dicts: grouped by (source model, data, mode), baseline first, then bits desc."""
    from qrun.db import queue

    jobs = latest_evals(db, model, data, sweep)
    upstream_ids = sorted({j.depends_on for j in jobs if j.depends_on is not None})
    upstreams = {j.id: j for j in queue.list_jobs(db, upstream_ids)} if upstream_ids else {}
    metrics = queue.metrics_of(db, [j.id for j in jobs] + upstream_ids)
    artifacts = queue.artifacts_of(db, [j.id for j in jobs])
    predictions = {j.id: read_predictions_artifact(next((a for a in artifacts[j.id] if a.kind == "predictions"), None))
                   for j in jobs}
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        upstream = upstreams.get(job.depends_on)
        row = _base_row(job, metrics[job.id], upstream, metrics.get(job.depends_on, {}) if upstream else {})
        groups.setdefault((row["model"], row["data"] or "", row["mode"] or ""), []).append(row)
    rows: list[dict] = []
    for key in sorted(groups):
        unique_labels(groups[key])
        group = sorted(groups[key], key=_order)
        _against_baseline(group, predictions)
        rows.extend(group)
    return rows


# ---------------------------------------------------------------- formatting


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and digits == 0:
        return str(int(value))
    return f"{value:.{digits}f}"


def _with_delta(row: dict, name: str, digits: int = 3) -> str:
    text = _num(row[name], digits)
    delta = row[f"{name}_delta"]
    if row["variant"] == BASELINE or delta is None:
        return text
    return f"{text} ({delta:+.{digits}f})"


COLUMNS = (
    ("variant", lambda r: r["variant"]),
    ("bits", lambda r: _num(r["bits"], 0)),
    ("size MB", lambda r: _num(r["size_mb"], 2)),
    ("size %", lambda r: _num(r["size_pct"], 1)),
    ("quant s", lambda r: _num(r["quantize_s"], 1)),
    ("precision", lambda r: _with_delta(r, "precision")),
    ("recall", lambda r: _with_delta(r, "recall")),
    ("F1", lambda r: _with_delta(r, "f1")),
    ("accuracy", lambda r: _with_delta(r, "accuracy")),
    ("invalid", lambda r: _with_delta(r, "invalid", 0)),
    ("AUC", lambda r: _with_delta(r, "auc")),
    ("perplexity", lambda r: _with_delta(r, "perplexity", 2)),
    ("agree", lambda r: _num(r["agreement"] * 100 if r["agreement"] is not None else None, 1)),
    ("fraud->not", lambda r: _num(r["flips_fraud_to_not"], 0)),
    ("not->fraud", lambda r: _num(r["flips_not_to_fraud"], 0)),
)
# What stays on a narrow screen: the variant and its key numbers never go (too narrow even for those:
# one block per variant); the others leave in order of priority.
TABLE_COLUMNS = tuple(Column(name, keep=keep, right=name != "variant") for name, keep in (
    ("variant", REQUIRED), ("bits", REQUIRED), ("size MB", 30), ("size %", 70), ("quant s", 20),
    ("precision", REQUIRED), ("recall", REQUIRED), ("F1", REQUIRED), ("accuracy", 60), ("invalid", 15),
    ("AUC", 50), ("perplexity", 40), ("agree", 55), ("fraud->not", 10), ("not->fraud", 10)))


def _groups(rows: list[dict]) -> list[list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault((row["model"], row["data"], row["mode"]), []).append(row)
    return list(out.values())


def _title(group: list[dict]) -> str:
    first = group[0]
    what = f"data {first['data']} ({first['mode']})" if first["data"] else f"perplexity on {first['ppl_data']}"
    return f"{first['model']} -- {what}"


def _fitted_title(group: list[dict], width: int | None) -> str:
    """The group's title with whole paths where they fit, else with the model's and data's names."""
    title = _title(group)
    if width is None or display_width(title) <= width:
        return title
    first = group[0]
    short = {**first, "model": Path(first["model"]).name, "data": first["data"] and Path(first["data"]).name,
             "ppl_data": first["ppl_data"] and Path(first["ppl_data"]).name}
    return shorten(_title([short]), width)


def table_lines(rows: list[dict], out: Output, wide: bool = False, columns: list[str] | None = None) -> list[str]:
    lines: list[str] = []
    for group in _groups(rows):
        if lines:
            lines.append("")
        lines.append(_fitted_title(group, out.width))
        cells = [[cell(row) for _, cell in COLUMNS] for row in group]
        lines += render(TABLE_COLUMNS, cells, out, wide=True, names=columns)
    return lines


def print_table(rows: list[dict], columns: list[str] | None = None, wide: bool = False) -> None:
    out = output_settings()
    click.echo("\n".join(table_lines(rows, Output(None, out.color) if wide else out, columns=columns)))


def print_markdown(rows: list[dict]) -> None:
    lines: list[str] = []
    for group in _groups(rows):
        lines += [f"### {_title(group)}", "", "| " + " | ".join(name for name, _ in COLUMNS) + " |",
                  "|" + "|".join("---" if name == "variant" else "---:" for name, _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(cell(row) for _, cell in COLUMNS) + " |" for row in group]
        lines.append("")
    click.echo("\n".join(lines).rstrip("\n"))


def print_csv(rows: list[dict]) -> None:
    if not rows:
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def write_plot(rows: list[dict], path: Path) -> None:
    """Precision and recall (left) and size in % of the baseline (right) against bits per weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (quality, size) = plt.subplots(1, 2, figsize=(10, 4))
    for group in _groups(rows):
        points = sorted((r for r in group if r["bits"] is not None), key=lambda r: r["bits"])
        bits = [r["bits"] for r in points]
        name = Path(group[0]["model"]).name
        for metric, marker in (("precision", "o"), ("recall", "s")):
            quality.plot(bits, [r[metric] for r in points], marker=marker, label=f"{name} {metric}")
        size.plot(bits, [r["size_pct"] for r in points], marker="o", label=name)
    quality.set(xlabel="bits per weight", ylabel="score", title="precision / recall", ylim=(-0.05, 1.05))
    size.set(xlabel="bits per weight", ylabel="% of baseline", title="size on disk")
    all_bits = sorted({r["bits"] for r in rows if r["bits"] is not None})
    for ax in (quality, size):
        ax.set_xticks(all_bits)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


@click.command()
@click.option("--model", default=None, metavar="M", help="Only this source model (directory, or its name).")
@click.option("--data", default=None, metavar="D", help="Only evals on this data file (path, or its name).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="Output format; json, csv and markdown carry the same numbers as the table.")
@click.option("--sweep", default=None, metavar="S", help="Only the variants of this sweep (id or name), with their baseline.")
@click.option("--wide", is_flag=True, help="Every column, however wide the terminal.")
@click.option("--columns", "columns", metavar="a,b,c",
              help="Table columns, in this order (variant,bits,size MB,...; default: what fits the width).")
@click.option("--plot", "plot_file", default=None, metavar="FILE.png",
              help="Also draw precision, recall and size (% of baseline) against bits into a PNG.")
@click.pass_context
def compare(ctx, model, data, fmt, sweep, wide, columns, plot_file):
    """Compare the variants of each evaluated model with its unquantized baseline: size, quantization
    time, precision, recall, F1, accuracy, invalid answers, AUC and perplexity (with deltas from
    the baseline), and how many per-sample predictions changed."""
    plot_path = Path(plot_file) if plot_file else None
    if plot_path is not None and not plot_path.parent.is_dir():
        raise BadInput(f"--plot {plot_file}: directory {plot_path.parent} does not exist")
    names = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    if names:
        render(TABLE_COLUMNS, [], output_settings(), names=names)  # an unknown column: bad input, nothing opened
    rows = comparison_rows(open_db(ctx), model, data, sweep)
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
        write_plot(rows, plot_path)
        stderr_line(f"wrote {plot_path}")


COMMANDS = [compare]
