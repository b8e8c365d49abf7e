"""What `qrun compare` computes: one row per variant of a source model -- what each quantization cost
in accuracy, size and time, next to the unquantized baseline.

`comparison_rows` assembles the rows from the job table (and the predictions artifacts). Only
succeeded eval jobs count; of several evals of the same variant on the same data in the same mode,
the newest wins. Score and generate results are never mixed in one group: their numbers are not
comparable. Within a group the baseline comes first, then the variants from the largest on disk to
the smallest, of whatever method (gptq, awq, rtn, fp8, gguf, bnb-nf4).

`smallest_within` and `describe_smallest` answer the question a sweep is for -- which variant is the
smallest that keeps F1 (or another metric) within a given drop of the baseline's -- as plain data and
as the sentence `qrun compare --max-drop` and the demo print.
"""

from __future__ import annotations

import json
import math
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from qrun.db.errors import BadInput
from qrun.db.states import Kind, Status
from qrun.variants import variant_key, variant_label
from qrun.workers.methods import DEFAULT_METHOD
from qrun.workers.params import BASELINE, QuantizeParams

# Metrics shown with their delta from the baseline (variant minus baseline).
COMPARED = ("precision", "recall", "f1", "accuracy", "invalid", "auc", "perplexity")
DTYPE_BITS = {"float32": 32, "float64": 64, "bfloat16": 16, "float16": 16}
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


# The quantization parameters each row carries (the CSV's and JSON's columns), as a quantize job stores
# them; qrun.variants decides which of them make a different variant and how labels name them.
VARIANT_KEYS = ("bits", "group_size", "desc_act", "sym", "damp_percent", "calib", "calib_samples", "calib_max_len",
                "method", "gguf_type")


def _quant_params(job, upstreams: dict) -> dict:
    """The quantize parameters behind an eval: its upstream job's (empty for the baseline or an artifact)."""
    upstream = upstreams.get(job.depends_on)
    return dict(upstream.params or {}) if upstream is not None and upstream.kind == Kind.QUANTIZE.value else {}


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
        if job.kind != Kind.EVAL.value or job.status != Status.SUCCEEDED.value:
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

    group = params.get("group_size", QuantizeParams.group_size)
    try:
        own = label(params)
        extras = variant_label(params, among).split("·")[1:]
    except KeyError:
        return f"{params['method']}-w{params['bits']}" + ("gall" if group == -1 else f"g{group}")
    return "·".join([own, *extras])


def _params_of(row: dict) -> dict:
    """The quantization parameters a row carries, as a quantize job's params (unset ones left out)."""
    return {name: row[name] for name in VARIANT_KEYS if row.get(name) is not None}


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


def stderr_line(line: str) -> None:
    """One line on standard error: the library's default for the lines it says (warnings, a run's progress)."""
    print(line, file=sys.stderr, flush=True)


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


def read_predictions_artifact(artifact, warn: Callable[[str], None] = stderr_line) -> dict[str, object] | None:
    """read_predictions of an artifact row; where it cannot be read, the warning also names the node
    that wrote it if that is another machine (a cluster whose QRUN_HOME is not shared)."""
    if artifact is None:
        return None
    here = socket.gethostname()
    elsewhere = f" (written on node {artifact.node}, read on {here})" if artifact.node and artifact.node != here else ""
    return read_predictions(artifact.path, warn=lambda line: warn(line + elsewhere))


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
    quant = {k: upstream.params[k] for k in VARIANT_KEYS if k in (upstream.params or {})} if upstream else {}
    if variant == BASELINE:
        bits, group_size = _source_bits(job.model), None
    else:
        bits, group_size = _quantized_bits(job, upstream)
        if upstream is not None and upstream.kind == Kind.QUANTIZE.value:
            quant["method"] = quant.get("method") or DEFAULT_METHOD  # absent: a GPTQ job, as before methods
    size = metrics.get("model_size_bytes")
    row = {
        "model": job.model, "data": params.get("data"), "ppl_data": params.get("ppl_data"),
        "mode": _mode(params),
        "variant": variant, "bits": bits, "group_size": group_size,
        **{name: quant.get(name) for name in VARIANT_KEYS if name not in ("bits", "group_size")},
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
                    metric: str = "f1", max_drop: float | None = None,
                    warn: Callable[[str], None] = stderr_line) -> list[dict]:
    """The comparison, as plain dicts: grouped by (source model, data, mode), baseline first, then the
    variants by size on disk, largest first. With max_drop, each row also says whether its `metric`
    is within max_drop of the baseline's, which row is the smallest that is, and the group's sentence.
    warn(line): told of each predictions file that cannot be read (its agreement columns stay empty)."""
    from qrun.db import queue

    jobs = latest_evals(db, model, data, sweep)
    upstream_ids = sorted({j.depends_on for j in jobs if j.depends_on is not None})
    upstreams = {j.id: j for j in queue.list_jobs(db, upstream_ids)} if upstream_ids else {}
    metrics = queue.metrics_of(db, [j.id for j in jobs] + upstream_ids)
    artifacts = queue.artifacts_of(db, [j.id for j in jobs])
    predictions = {j.id: read_predictions_artifact(next((a for a in artifacts[j.id] if a.kind == "predictions"), None),
                                                   warn)
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


def check_max_drop(max_drop: float | None) -> None:
    """A drop is a number of 0 or more: refused before anything is read."""
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise BadInput(f"--max-drop {max_drop:g}: give a drop of 0 or more (0.01 = one point of F1)")


def groups(rows: list[dict]) -> list[list[dict]]:
    """The rows of each comparison group (source model, data, mode), in their order."""
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault((row.get("model"), row.get("data"), row.get("mode")), []).append(row)
    return list(out.values())


def metric_name(metric: str) -> str:
    """The metric as the sentences and the plot name it: F1 for f1."""
    return METRIC_NAMES.get(metric, metric)


def _one_group(rows: list[dict]) -> list[dict]:
    parts = groups(rows)
    if len(parts) > 1:
        raise ValueError(f"rows of {len(parts)} comparison groups: pass one group's rows "
                         "(qrun.comparison.groups(rows) splits them)")
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
    chosen = chosen_rows(rows, metric, max_drop)
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


def chosen_rows(rows: list[dict], metric: str, max_drop: float) -> tuple[dict, dict | None, dict | None] | None:
    """(baseline row, the pick, the next smaller) of smallest_within, as the group's own rows (the plot
    marks them); None without a baseline."""
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
    chosen = chosen_rows(group, metric, max_drop)
    base, pick = chosen[:2] if chosen else (None, None)
    sentence = describe_smallest(group, metric, max_drop)
    for row in group:
        if base is not None and row.get(metric) is not None:
            row["within_max_drop"] = within_drop(row, base, metric, max_drop)
        row["smallest_within"] = row is pick
        row["max_drop_answer"] = sentence



# ---------------------------------------------------------------- the rows as text


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


# The text of each column of compare's table (and its markdown), in order.
CELLS = (
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
CELL_NAMES = tuple(name for name, _ in CELLS)


def row_cells(row: dict) -> list[str]:
    """A row's text in each of CELL_NAMES: `0.905 (-0.007)` beside its baseline, `-` where unmeasured."""
    return [cell(row) for _, cell in CELLS]


def group_title(group: list[dict]) -> str:
    """What a comparison group is: its source model and its data (or perplexity text)."""
    first = group[0]
    what = f"data {first['data']} ({first['mode']})" if first["data"] else f"perplexity on {first['ppl_data']}"
    return f"{first['model']} -- {what}"
