"""`qrun compare`: one row per variant of a source model -- what each quantization cost in
accuracy, size and time, next to the unquantized baseline.

`comparison_rows` assembles the rows from the job table (and the predictions artifacts); the
command only formats them. Only succeeded eval jobs count; of several evals of the same variant
on the same data in the same mode, the newest wins. Score and generate results are never mixed in
one group: their numbers are not comparable. Within a group the baseline comes first, then the
variants from the largest on disk to the smallest, of whatever method (gptq, awq, rtn, fp8, gguf,
bnb-nf4).

`smallest_within` and `describe_smallest` answer the question a sweep is for -- which variant is the
smallest that keeps F1 (or another metric) within a given drop of the baseline's -- as plain data and
as the sentence `qrun compare --max-drop` and the demo print; `plot_points` is what `--plot` draws.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import click

from qrun.cli.common import open_db, print_json, stderr_line
from qrun.cli.table import REQUIRED, Column, Output, display_width, output_settings, render, shorten, split_columns
from qrun.db.errors import BadInput
from qrun.variants import variant_key, variant_label
from qrun.workers.methods import DEFAULT_METHOD

FORMATS = ("table", "json", "csv", "markdown")
# Metrics shown with their delta from the baseline (variant minus baseline).
COMPARED = ("precision", "recall", "f1", "accuracy", "invalid", "auc", "perplexity")
DTYPE_BITS = {"float32": 32, "float64": 64, "bfloat16": 16, "float16": 16}
BASELINE = "baseline"
# The qualities --metric takes (each row has them where its eval measured them); lower is better for these.
METRICS = ("f1", "precision", "recall", "accuracy", "perplexity")
LOWER_IS_BETTER = frozenset({"perplexity"})
METRIC_NAMES = {"f1": "F1"}
TOLERANCE = 1e-9  # 0.912 - 0.902 is 0.0100000000000000009: still within a drop of 0.01


# ---------------------------------------------------------------- assembling the rows


def _same_path(given: str, stored: str | None) -> bool:
    """A filter matches the stored (resolved) path, or just its file or directory name."""
    if stored is None:
        return False
    return str(Path(given).expanduser().resolve()) == stored or given == Path(stored).name


# The quantization parameters each row carries (the CSV's and JSON's columns); qrun.variants decides
# which of them make a different variant and how labels name them.
VARIANT_KEYS = (("bits", None), ("group_size", 128), ("desc_act", False), ("sym", True), ("damp_percent", 0.01),
                ("calib", None), ("calib_samples", 128), ("calib_max_len", 1024), ("method", "gptq"),
                ("gguf_type", None))


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
        # gguf q4_0 and q4_k_m are both 4 bits: the quant type tells them apart
        variant = variant_key(quant) + (quant.get("gguf_type"),) if "bits" in quant else params.get("variant", BASELINE)
        newest[(job.model, params.get("data"), _mode(params), variant)] = job
    chosen = list(newest.values())
    if sweep:
        swept = [j for j in chosen if _in_sweep(j, sweep) or _in_sweep(by_id.get(j.depends_on, j), sweep)]
        keys = {(j.model, (j.params or {}).get("data"), _mode(j.params or {})) for j in swept}
        baselines = [j for j in chosen if (j.params or {}).get("variant", BASELINE) == BASELINE and not j.depends_on
                     and (j.model, (j.params or {}).get("data"), _mode(j.params or {})) in keys]
        chosen = sorted({j.id: j for j in swept + baselines}.values(), key=lambda j: j.id)  # rows: not hashable
    return chosen


def unique_labels(rows: list[dict]) -> None:
    """Label the quantized rows of one group by their method's label (workers.methods.label: w4g128,
    awq-w4g128, fp8, gguf-q4_k_m), plus each parameter that differs between rows of the same method
    (qrun.variants.variant_label within them: w4g128·d0.01 beside w4g128·d0.05)."""
    quantized = [(row, _params_of(row)) for row in rows if row["quantize_job_id"] is not None and row["bits"]]
    for row, params in quantized:
        among = [p for _, p in quantized if p.get("method") == params.get("method")]
        row["variant"] = _label(params, among)


def _label(params: dict, among: list[dict]) -> str:
    """variant_label within rows of one method, led by the method's own label (workers.methods.label);
    a method this qrun does not know (a newer qrun's job) is named before its bits: `hqq-w4g64`."""
    from qrun.workers.methods import label

    group = params.get("group_size", 128)
    try:
        own = label(params)
        extras = variant_label(params, among).split("·")[1:]
    except KeyError:
        return f"{params['method']}-w{params['bits']}" + ("gall" if group == -1 else f"g{group}")
    return "·".join([own, *extras])


def _params_of(row: dict) -> dict:
    """The quantization parameters a row carries, as a quantize job's params (unset ones left out)."""
    return {name: row[name] for name, _ in VARIANT_KEYS if row.get(name) is not None}


def _mode(params: dict) -> str | None:
    """Classification mode; None for a perplexity-only eval."""
    return params.get("mode", "score") if params.get("data") else None


def _source_bits(model_dir: str) -> int:
    """Bits per weight of an unquantized model, from the dtype in its config (16 if unstated)."""
    from qrun.workers.inputs import config_dtype

    return DTYPE_BITS.get(config_dtype(model_dir) or "bfloat16", 16)


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
        if upstream is not None and upstream.kind == "quantize":
            quant["method"] = quant.get("method") or DEFAULT_METHOD  # absent: a GPTQ job, as before methods
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
            "eval_samples": metrics.get("eval_samples"), "samples_per_s": metrics.get("samples_per_s"),
            "within_max_drop": None, "smallest_within": None, "max_drop_answer": None}
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
    """Baseline first, then by size on disk, largest first (rows of unknown size last), then bits."""
    size = row["size_bytes"]
    return (row["variant"] != BASELINE, size is None, -(size or 0), -(row["bits"] or 0), row["variant"])


def comparison_rows(db, model: str | None = None, data: str | None = None, sweep: str | None = None, *,
                    metric: str = "f1", max_drop: float | None = None) -> list[dict]:
    """The comparison, as plain dicts: grouped by (source model, data, mode), baseline first, then the
    variants by size on disk, largest first. With max_drop, each row also says whether its `metric`
    is within max_drop of the baseline's, which row is the smallest that is, and the group's sentence."""
    from qrun.db import queue

    jobs = latest_evals(db, model, data, sweep)
    upstream_ids = sorted({j.depends_on for j in jobs if j.depends_on is not None})
    upstreams = {j.id: j for j in queue.list_jobs(db, upstream_ids)} if upstream_ids else {}
    metrics = queue.metrics_of(db, [j.id for j in jobs] + upstream_ids)
    artifacts = queue.artifacts_of(db, [j.id for j in jobs])
    predictions = {j.id: read_predictions_artifact(next((a for a in artifacts[j.id] if a.kind == "predictions"), None))
                   for j in jobs}
    by_group: dict[tuple, list[dict]] = {}
    for job in jobs:
        upstream = upstreams.get(job.depends_on)
        row = _base_row(job, metrics[job.id], upstream, metrics.get(job.depends_on, {}) if upstream else {})
        by_group.setdefault((row["model"], row["data"] or "", row["mode"] or ""), []).append(row)
    rows: list[dict] = []
    for key in sorted(by_group):
        unique_labels(by_group[key])
        group = sorted(by_group[key], key=_order)
        _against_baseline(group, predictions)
        if max_drop is not None:
            mark_smallest(group, metric, max_drop)
        rows.extend(group)
    return rows


# ---------------------------------------------------------------- the smallest variant within a drop


def groups(rows: list[dict]) -> list[list[dict]]:
    """The rows of each comparison group (source model, data, mode), in their order."""
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault((row.get("model"), row.get("data"), row.get("mode")), []).append(row)
    return list(out.values())



def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def _one_group(rows: list[dict]) -> list[dict]:
    parts = groups(rows)
    if len(parts) > 1:
        raise ValueError(f"rows of {len(parts)} comparison groups: pass one group's rows "
                         "(qrun.cli.compare.groups(rows) splits them)")
    return rows


def _size_key(rows: list[dict]) -> str:
    """Rows are ranked by bytes on disk; by their share of the baseline where no row has its bytes."""
    return "size_bytes" if any(r.get("size_bytes") is not None for r in rows) else "size_pct"


def _summary(row: dict, metric: str, base: float) -> dict:
    value = row[metric]
    return {"variant": row.get("variant"), "method": row.get("method"), "job_id": row.get("job_id"),
            "value": value, "delta": value - base, "size_bytes": row.get("size_bytes"),
            "size_pct": row.get("size_pct")}


def smallest_within(rows: list[dict], metric: str = "f1", max_drop: float = 0.01) -> dict | None:
    """The smallest variant on disk whose `metric` is at most `max_drop` worse than the baseline's
    (0.01: one point of F1; for perplexity, lower is better, so worse means higher), in the rows of one
    comparison group (ValueError for rows of several: split them with `groups`). Rows without the
    metric or a size are skipped. None when the group has no baseline row with the metric.

    A dict: metric, max_drop, lower_is_better, baseline (its value), threshold (the worst value
    allowed), pick (the variant, or None when none is within) and next_smaller (the largest variant
    smaller than the pick -- what the next step down costs; with no pick, the largest variant), each
    of those two {variant, method, job_id, value, delta, size_bytes, size_pct}."""
    chosen = _choose(rows, metric, max_drop)
    if chosen is None:
        return None
    base, pick, below = chosen
    value = base[metric]
    return {"metric": metric, "max_drop": max_drop, "lower_is_better": metric in LOWER_IS_BETTER,
            "baseline": value, "threshold": value + max_drop if metric in LOWER_IS_BETTER else value - max_drop,
            "pick": _summary(pick, metric, value) if pick else None,
            "next_smaller": _summary(below, metric, value) if below else None}


def within_drop(row: dict, base: dict, metric: str, max_drop: float) -> bool:
    """Whether `row`'s metric is at most `max_drop` worse than `base`'s (perplexity: higher is worse)."""
    drop = base[metric] - row[metric] if metric not in LOWER_IS_BETTER else row[metric] - base[metric]
    return drop <= max_drop + TOLERANCE


def _choose(rows: list[dict], metric: str, max_drop: float) -> tuple[dict, dict | None, dict | None] | None:
    """(baseline row, the pick, the next smaller) of smallest_within, or None without a baseline."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    rows = _one_group(rows)
    base = next((r for r in rows if r.get("variant") == BASELINE and r.get(metric) is not None), None)
    if base is None:
        return None
    size = _size_key(rows)
    sign = -1 if metric in LOWER_IS_BETTER else 1  # sign * value: higher is better
    variants = [r for r in rows if r.get("variant") != BASELINE and r.get(metric) is not None
                and r.get(size) is not None]
    inside = [r for r in variants if within_drop(r, base, metric, max_drop)]
    # the smallest; of equal sizes the better one, then the fewer bits, then the label
    pick = min(inside, key=lambda r: (r[size], -sign * r[metric], r.get("bits") or 0, str(r.get("variant"))),
               default=None)
    smaller = [r for r in variants if pick is None or r[size] < pick[size]]
    below = max(smaller, key=lambda r: (r[size], sign * r[metric]), default=None)
    return base, pick, below


def _value(metric: str, value: float) -> str:
    return f"{value:.{2 if metric == 'perplexity' else 3}f}"


def _signed(metric: str, delta: float) -> str:
    return f"{delta:+.{2 if metric == 'perplexity' else 3}f}".replace("-", "−")


def _size_text(summary: dict) -> str:
    """`1.1 MB (27% of baseline)`, as far as the sizes are known."""
    parts = []
    if summary["size_bytes"] is not None:
        mb = summary["size_bytes"] / 1e6
        parts.append(f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb:.1f} MB" if mb >= 0.1 else f"{mb * 1000:.0f} kB")
    if summary["size_pct"] is not None:
        pct = f"{summary['size_pct']:.0f}% of baseline"
        parts.append(f"({pct})" if parts else pct)
    return " ".join(parts)


def _variant_text(summary: dict, metric: str, delta: bool) -> str:
    size = _size_text(summary)
    value = f"{metric_name(metric)} {_value(metric, summary['value'])}"
    if delta:
        value += f" ({_signed(metric, summary['delta'])})"
    return f"{summary['variant']} — " + (f"{size}, {value}" if size else value)


def describe_smallest(rows: list[dict], metric: str = "f1", max_drop: float = 0.01) -> str:
    """smallest_within as one sentence, for one comparison group's rows, e.g. `smallest within 0.01 F1
    of the baseline (0.912): w4g128 — 1.1 MB (27% of baseline), F1 0.905; next smaller: rtn-w4g128
    — 0.9 MB (22% of baseline), F1 0.871 (−0.041)`. Says so where there is no baseline."""
    name = metric_name(metric)
    answer = smallest_within(rows, metric, max_drop)
    if answer is None:
        if not any(r.get(metric) is not None for r in rows):
            return f"no row has {name}: nothing to hold against a drop of {max_drop:g}"
        return (f"no baseline {name} to measure a drop from: evaluate the unquantized model on the same "
                "data (qrun submit --eval, or qrun eval --model on the source model)")
    what = f"within {max_drop:g} {name} of the baseline ({_value(metric, answer['baseline'])}" + (
        ", lower is better)" if answer["lower_is_better"] else ")")
    pick, below = answer["pick"], answer["next_smaller"]
    if pick is None and below is None:
        return (f"no variant here has {name} and a size: nothing to compare with the baseline "
                f"({_value(metric, answer['baseline'])})")
    if pick is None:
        return f"no variant {what}; the largest: {_variant_text(below, metric, delta=True)}"
    text = f"smallest {what}: {_variant_text(pick, metric, delta=False)}"
    if below is None:
        return text + "; nothing here is smaller"
    return text + f"; next smaller: {_variant_text(below, metric, delta=True)}"


def mark_smallest(group: list[dict], metric: str, max_drop: float) -> None:
    """Fill one group's within_max_drop, smallest_within and max_drop_answer (the JSON's fields)."""
    chosen = _choose(group, metric, max_drop)
    base, pick = chosen[:2] if chosen else (None, None)
    sentence = describe_smallest(group, metric, max_drop)
    for row in group:
        if base is not None and row.get(metric) is not None:
            row["within_max_drop"] = within_drop(row, base, metric, max_drop)
        row["smallest_within"] = row is pick
        row["max_drop_answer"] = sentence


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
    ("method", lambda r: r.get("method") or "-"),
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
    ("variant", REQUIRED), ("bits", REQUIRED), ("method", 65), ("size MB", 30), ("size %", 70), ("quant s", 20),
    ("precision", REQUIRED), ("recall", REQUIRED), ("F1", REQUIRED), ("accuracy", 60), ("invalid", 15),
    ("AUC", 50), ("perplexity", 40), ("agree", 55), ("fraud->not", 10), ("not->fraud", 10)))


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
    for group in groups(rows):
        if lines:
            lines.append("")
        lines.append(_fitted_title(group, out.width))
        cells = [[cell(row) for _, cell in COLUMNS] for row in group]
        lines += render(TABLE_COLUMNS, cells, out, wide=True, names=columns)
        lines += _answer_lines(group, out.width)
    return lines


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
    out = output_settings()
    click.echo("\n".join(table_lines(rows, Output(None, out.color) if wide else out, columns=columns)))


def print_markdown(rows: list[dict]) -> None:
    lines: list[str] = []
    for group in groups(rows):
        lines += [f"### {_title(group)}", "", "| " + " | ".join(name for name, _ in COLUMNS) + " |",
                  "|" + "|".join("---" if name == "variant" else "---:" for name, _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(cell(row) for _, cell in COLUMNS) + " |" for row in group]
        lines.append("")
        if group[0].get("max_drop_answer"):
            lines += [group[0]["max_drop_answer"], ""]
    click.echo("\n".join(lines).rstrip("\n"))


def print_csv(rows: list[dict]) -> None:
    if not rows:
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def plot_points(group: list[dict], metric: str = "f1", max_drop: float | None = None) -> list[dict]:
    """What --plot draws for one comparison group: one point per row that has the metric and a size,
    {variant, size_mb, value, baseline, pareto, within, pick}, by size. `pareto`: no other point is at
    least as small and at least as good (better in one); `within`: inside the max_drop band (None
    without max_drop or baseline); `pick`: smallest_within's answer."""
    rows = [r for r in group if r.get(metric) is not None and r.get("size_bytes") is not None]
    chosen = _choose(group, metric, max_drop) if max_drop is not None else None
    base, pick = chosen[:2] if chosen else (None, None)
    sign = -1 if metric in LOWER_IS_BETTER else 1
    points = []
    for row in sorted(rows, key=lambda r: (r["size_bytes"], -sign * r[metric])):
        dominated = any(o is not row and o["size_bytes"] <= row["size_bytes"] and sign * o[metric] >= sign * row[metric]
                        and (o["size_bytes"], sign * o[metric]) != (row["size_bytes"], sign * row[metric])
                        for o in rows)
        points.append({"variant": row["variant"], "size_mb": row["size_bytes"] / 1e6, "value": row[metric],
                       "baseline": row["variant"] == BASELINE, "pareto": not dominated,
                       "within": within_drop(row, base, metric, max_drop) if base is not None else None,
                       "pick": row is pick})
    return points


def _short_title(group: list[dict]) -> str:
    first = group[0]
    what = Path(first["data"]).name + f" ({first['mode']})" if first.get("data") else \
        f"perplexity on {Path(first.get('ppl_data') or '?').name}"
    return f"{Path(first['model']).name} -- {what}"


def draw_plot(rows: list[dict], metric: str = "f1", max_drop: float | None = None):
    """The figure (one panel per comparison group with points) and the points drawn, per panel:
    quality against size on disk, one labelled point per variant, the baseline a star, the Pareto
    front a step line, the max_drop band shaded. Matplotlib with the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(g, plot_points(g, metric, max_drop)) for g in groups(rows)]
    panels = [(g, pts) for g, pts in panels if pts]
    name = metric_name(metric)
    fig, axes = plt.subplots(max(len(panels), 1), 1, figsize=(8, 4.5 * max(len(panels), 1)), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, f"no variant has {name} and a size on disk", ha="center", va="center")
        axes[0][0].set_axis_off()
    for (group, points), (ax,) in zip(panels, axes):
        _draw_panel(ax, group, points, metric, max_drop)
    fig.tight_layout()
    return fig, [pts for _, pts in panels]


def _draw_panel(ax, group: list[dict], points: list[dict], metric: str, max_drop: float | None) -> None:
    name = metric_name(metric)
    lower = metric in LOWER_IS_BETTER
    plain = [p for p in points if not p["baseline"]]
    ax.scatter([p["size_mb"] for p in plain], [p["value"] for p in plain], color="tab:blue", zorder=3,
               label="variant")
    base = next((p for p in points if p["baseline"]), None)
    if base is not None:
        ax.scatter([base["size_mb"]], [base["value"]], marker="*", s=200, color="black", zorder=4, label="baseline")
        if max_drop is not None:
            edge = base["value"] + max_drop if lower else base["value"] - max_drop
            ax.axhspan(min(edge, base["value"]), max(edge, base["value"]), color="tab:green", alpha=0.15,
                       label=f"within {max_drop:g} {name} of the baseline")
    for p in points:
        if p["pick"]:
            ax.scatter([p["size_mb"]], [p["value"]], s=220, facecolors="none", edgecolors="tab:green",
                       linewidths=2, zorder=5, label="smallest within")
        ax.annotate(p["variant"], (p["size_mb"], p["value"]), textcoords="offset points", xytext=(5, 5),
                    fontsize="small")
    front = [p for p in points if p["pareto"]]
    ax.step([p["size_mb"] for p in front], [p["value"] for p in front], where="post", color="tab:orange",
            alpha=0.8, zorder=2, label="Pareto front")
    sizes = [p["size_mb"] for p in points]
    if min(sizes) > 0 and max(sizes) / min(sizes) > 10:
        ax.set_xscale("log")
    if lower:
        ax.invert_yaxis()  # better is up, as for the scores
    ax.set(xlabel="size on disk (MB)", ylabel=name + (" (lower is better)" if lower else ""),
           title=_short_title(group))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


PLOT_FORMATS = (".png", ".svg", ".pdf")  # what matplotlib writes without extra packages


def check_plot_path(plot_file: str) -> Path:
    """--plot's file, checked before anything is printed: a new or existing file of a known format in
    a directory the user can write."""
    path = Path(plot_file)
    if not plot_file.strip():
        raise BadInput("--plot '': give a file name, like sizes.png")
    if path.is_dir():
        raise BadInput(f"--plot {plot_file} is a directory: give a file name, like {path / 'sizes.png'}")
    if path.suffix.lower() not in PLOT_FORMATS:
        raise BadInput(f"--plot {plot_file}: give a {', '.join(PLOT_FORMATS[:-1])} or {PLOT_FORMATS[-1]} file")
    if not path.parent.is_dir():
        raise BadInput(f"--plot {plot_file}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BadInput(f"--plot {plot_file}: you may not write there: give a path in a directory you can write")
    return path


def write_plot(rows: list[dict], path: Path, metric: str = "f1", max_drop: float | None = None) -> list[list[dict]]:
    """draw_plot into a PNG, SVG or PDF (by the file's suffix), whole or not at all; returns the points
    drawn, per panel."""
    import matplotlib.pyplot as plt

    fig, points = draw_plot(rows, metric, max_drop)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        fig.savefig(partial, format=path.suffix.lower().lstrip("."), dpi=120)
        partial.replace(path)
    finally:
        plt.close(fig)
        partial.unlink(missing_ok=True)
    return points


@click.command()
@click.option("--model", default=None, metavar="M", help="Only this source model (directory, or its name).")
@click.option("--data", default=None, metavar="D", help="Only evals on this data file (path, or its name).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="Output format; json, csv and markdown carry the same numbers as the table.")
@click.option("--sweep", default=None, metavar="S", help="Only the variants of this sweep (id or name), with their baseline.")
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
    variants from the largest on disk to the smallest."""
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise BadInput(f"--max-drop {max_drop:g}: give a drop of 0 or more (0.01 = one point of F1)")
    plot_path = check_plot_path(plot_file) if plot_file is not None else None
    names = split_columns(columns)
    if names:
        render(TABLE_COLUMNS, [], output_settings(), names=names)  # an unknown column: bad input, nothing opened
    rows = comparison_rows(open_db(ctx, create=False), model, data, sweep, metric=metric, max_drop=max_drop)
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
