"""What `qrun compare` computes: one row per variant of a source model -- what each quantization cost
in accuracy, size and time, next to the unquantized baseline.

`comparison_rows` assembles the rows from the job table (and the predictions artifacts). Only
succeeded eval jobs give numbers; of several evals of the same variant on the same data in the same
mode, the newest wins. Score and generate results are never mixed in one group: their numbers are not
comparable. Within a group the baseline comes first, then the variants from the largest on disk to
the smallest, of whatever method (gptq, awq, rtn, fp8, gguf, bnb-nf4); last, marked `evaluated: false`
with the reason, the variants the group lacks: an eval that failed, was cancelled or has not run, and
a quantize job of the group's sweeps with no eval on its data.

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
from dataclasses import dataclass
from pathlib import Path

from qrun.db.errors import BadInput
from qrun.db.states import Kind, Status
from qrun.variants import variant_key, variant_label
from qrun.workers.methods import DEFAULT_METHOD
from qrun.workers.params import BASELINE, QuantizeParams

# Metrics shown with their delta from the baseline (variant minus baseline). precision, recall, f1 and auc
# are a two-class task's; macro_f1 and weighted_f1 any classification's; match a generation task's.
COMPARED = ("precision", "recall", "f1", "accuracy", "invalid", "auc", "perplexity", "macro_f1", "weighted_f1", "match")
DTYPE_BITS = {"float32": 32, "float64": 64, "bfloat16": 16, "float16": 16}
# The qualities --metric takes (each row has them where its eval measured them); lower is better for these.
METRICS = ("f1", "precision", "recall", "accuracy", "perplexity")
LOWER_IS_BETTER = frozenset({"perplexity"})
METRIC_NAMES = {"f1": "F1", "macro_f1": "macro F1"}
# What the library's --max-drop also reads: where a group has no F1 (a task of more than two classes, a
# generation task), `f1` reads these in turn (quality_of).
QUALITIES = METRICS + ("macro_f1", "match")
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


def _in_sweep(job, sweep: set[int]) -> bool:
    """Whether the job is one of a sweep's, given as the set of its job ids (queue.sweep_members: those its
    submits added and the equal jobs they used instead, a teammate's too)."""
    return job.id in sweep


def _variant_of(quant: dict, params: dict):
    """What tells variants apart: every quantization parameter (gguf q4_0 and q4_k_m are both 4 bits:
    the quant type too), or for an eval without a quantize job its stored variant."""
    return variant_key(quant) + (quant.get("gguf_type"),) if "bits" in quant else params.get("variant", BASELINE)


def _eval_key(job, by_id: dict) -> tuple:
    """(source model, data, mode, variant) of an eval job: evals with equal keys measure the same thing."""
    params = job.params or {}
    return job.model, params.get("data"), _mode(params), _variant_of(_quant_params(job, by_id), params)


def _selected(job, model: str | None, data: str | None) -> bool:
    """An eval job within the --model and --data filters."""
    return (not model or _same_path(model, job.model)) and (not data or _same_path(data, (job.params or {}).get("data")))


def latest_evals(db, model: str | None = None, data: str | None = None, sweep: str | None = None) -> list:
    """Succeeded eval jobs, the newest per (source model, data, mode, variant), a variant being keyed by
    every quantization parameter (evals of w4g128 at damp 0.01 and at 0.05 are two variants). With
    a sweep, the evals of its variants and the baselines they are compared with."""
    from qrun.db import queue

    members = set(queue.sweep_members(db, [sweep])) if sweep else None
    return [] if members == set() else _latest_evals(queue.list_jobs(db, plain=True), model, data, members)


def _latest_evals(jobs: list, model: str | None, data: str | None, sweep: set[int] | None) -> list:
    by_id = {j.id: j for j in jobs}
    newest: dict[tuple, object] = {}
    for job in jobs:  # ordered by id: a later job replaces an earlier one
        if job.kind == Kind.EVAL.value and job.status == Status.SUCCEEDED.value and _selected(job, model, data):
            newest[_eval_key(job, by_id)] = job
    chosen = list(newest.values())
    if sweep:
        swept = [j for j in chosen if _in_sweep(j, sweep) or _in_sweep(by_id.get(j.depends_on, j), sweep)]
        keys = {(j.model, (j.params or {}).get("data"), _mode(j.params or {})) for j in swept}
        baselines = [j for j in chosen if (j.params or {}).get("variant", BASELINE) == BASELINE and not j.depends_on
                     and (j.model, (j.params or {}).get("data"), _mode(j.params or {})) in keys]
        chosen = sorted({j.id: j for j in swept + baselines}.values(), key=lambda j: j.id)  # rows: not hashable
    return chosen


# ---------------------------------------------------------------- the variants a group lacks


def _first_line(error: str | None) -> str:
    return (error or "").strip().splitlines()[0][:200] if (error or "").strip() else ""


def _status_text(step: str, job) -> str:
    """`eval failed: <its error's first line>`, `quantize cancelled`, `eval queued`, ..."""
    line = _first_line(job.error) if job.status == Status.FAILED.value else ""
    return f"{step} {job.status}" + (f": {line}" if line else "")


def _eval_reason(job, upstream) -> str:
    """Why an eval that did not succeed left its variant out: the quantize job's failure where that was
    the cause (the eval then failed as "upstream job N failed"), else the eval's own state."""
    if upstream is not None and upstream.status in (Status.FAILED.value, Status.CANCELLED.value):
        return _status_text("quantize", upstream)
    return _status_text("eval", job)


def _quantize_reason(job) -> str:
    """Why a quantize job of the group's sweeps has no row: it has no eval on the group's data."""
    return "not evaluated" if job.status == Status.SUCCEEDED.value else f"not evaluated ({_status_text('quantize', job)})"


@dataclass(frozen=True)
class Unevaluated:
    """A variant of a comparison group with no succeeded eval. eval_job: its newest eval, which failed,
    was cancelled or has not run (None: it has no eval on the group's data); quantize_job: the job that
    made the variant (None for a baseline or an artifact); like: an eval of the group (its data)."""

    eval_job: object | None
    quantize_job: object | None
    reason: str
    like: object


def unevaluated(jobs: list, chosen: list, model: str | None = None, data: str | None = None,
                sweep: set[int] | None = None) -> list[Unevaluated]:
    """The variants that compare would show but cannot: per (source model, data, mode, variant) with no
    succeeded eval among `chosen`, the newest eval that failed, was cancelled or has not run yet; and
    each quantize job of a sweep that the group's evals belong to (with a sweep given: of that sweep)
    that has no eval on the group's data at all."""
    by_id = {j.id: j for j in jobs}
    done = {_eval_key(j, by_id) for j in chosen}
    pending: dict[tuple, object] = {}
    for job in jobs:  # ordered by id: the newest attempt at a variant speaks for it
        if job.kind != Kind.EVAL.value or job.status == Status.SUCCEEDED.value or not _selected(job, model, data):
            continue
        if sweep and not (_in_sweep(job, sweep) or _in_sweep(by_id.get(job.depends_on, job), sweep)):
            continue
        if _eval_key(job, by_id) not in done:
            pending[_eval_key(job, by_id)] = job
    out = [Unevaluated(job, by_id.get(job.depends_on), _eval_reason(job, by_id.get(job.depends_on)), job)
           for job in pending.values()]
    seen = done | set(pending)
    for group, (sweeps, like) in _groups_of(chosen + list(pending.values()), by_id).items():
        unseen: dict[tuple, object] = {}
        for job in jobs:
            in_scope = job.sweep in sweeps and (not sweep or _in_sweep(job, sweep))
            if job.kind == Kind.QUANTIZE.value and job.model == group[0] and in_scope:
                key = group + (_variant_of(job.params or {}, {}),)
                if key not in seen:
                    unseen[key] = job
        out += [Unevaluated(None, job, _quantize_reason(job), like) for job in unseen.values()]
    return out


def _groups_of(evals: list, by_id: dict) -> dict[tuple, tuple[set[str], object]]:
    """(source model, data, mode) -> the sweeps of its eval jobs and of their quantize jobs, and one of its evals."""
    out: dict[tuple, tuple[set[str], object]] = {}
    for job in evals:
        sweeps, _ = out.setdefault(_eval_key(job, by_id)[:3], (set(), job))
        for member in (job, by_id.get(job.depends_on)):
            if member is not None and getattr(member, "sweep", None):
                sweeps.add(member.sweep)
    return out


def _missing_row(missing: Unevaluated) -> dict:
    """A row of compare's columns for a variant with no succeeded eval: its parameters, no numbers,
    `evaluated` false, the state of its eval and the reason."""
    from types import SimpleNamespace

    job, upstream = missing.eval_job, missing.quantize_job
    if job is None:  # the eval-side fields as an eval of this quantize job on the group's data would have them
        job = SimpleNamespace(id=None, model=upstream.model, depends_on=upstream.id, status=None, sweep=upstream.sweep,
                              params={**(missing.like.params or {}), "variant": ""})  # labelled by unique_labels
    return _base_row(job, {}, upstream, {}) | {"evaluated": False, "eval_status": job.status,
                                               "missing_reason": missing.reason}


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


def agreement(baseline: dict | None, variant: dict | None, positive=True, negative=False,
              classes: bool = True) -> dict[str, float | int | dict | None]:
    """Share of samples predicted identically; for a two-class task how many flipped each way, from the
    positive class (the seeds' true: fraud) to the other and back (invalid is neither class; None for
    other tasks: positive None); and, for a classification (classes), the answers changed per pair of
    classes, `{"spam->ham": 2, "ham->invalid": 1}`, most first."""
    common = sorted(set(baseline or {}) & set(variant or {}))
    if not common:
        return {"agreement": None, "flips_fraud_to_not": None, "flips_not_to_fraud": None, "answers_changed": None}
    pairs = [(baseline[i], variant[i]) for i in common]
    two = positive is not None
    return {
        "agreement": sum(a == b for a, b in pairs) / len(pairs),
        "flips_fraud_to_not": sum(_same(a, positive) and _same(b, negative) for a, b in pairs) if two else None,
        "flips_not_to_fraud": sum(_same(a, negative) and _same(b, positive) for a, b in pairs) if two else None,
        "answers_changed": _changes(pairs) if classes else None,
    }


def _same(a, b) -> bool:
    """One label: equal and of one type (true is not 1)."""
    return type(a) is type(b) and a == b


def _changes(pairs: list[tuple]) -> dict[str, int]:
    """{"a->b": rows answered a by the baseline and b by the variant}, most first."""
    from qrun.workers.tasks import label_text

    def text(answer) -> str:
        return label_text(answer) if isinstance(answer, (bool, int)) else str(answer)

    counts: dict[str, int] = {}
    for a, b in pairs:
        if not _same(a, b):
            key = f"{text(a)}->{text(b)}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _task_of(metrics: dict, params: dict) -> tuple[list[str] | None, str | None]:
    """(the classes an eval recorded per-class metrics of, the positive class of a two-class task). An eval
    that recorded none is of the seeds' task (true: fraud) unless it was a generation task (match)."""
    from qrun.workers.metrics import class_scores
    from qrun.workers.tasks import positive_of

    classes = list(class_scores(metrics)) or None
    if classes is not None:
        return classes, positive_of(params.get("task"), classes)
    seeds = "accuracy" in metrics and "match" not in metrics  # a classification from before tasks
    return None, "true" if seeds else None


def _lost_most(row: dict, base: dict) -> tuple[str | None, float | None]:
    """The class whose F1 fell most from the baseline's, and by how much (None where none fell)."""
    mine, theirs = row.get("class_f1") or {}, base.get("class_f1") or {}
    drops = [(mine[c] - theirs[c], c) for c in mine if c in theirs and mine[c] < theirs[c]]
    if not drops:
        return None, None
    delta, label = min(drops)
    return label, delta


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
    classes, positive = _task_of(metrics, params)
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
            "classes": classes, "positive": positive, "class_f1": _class_f1(metrics),
            "lost_most": None, "lost_most_f1_delta": None, "answers_changed": None,
            "eval_samples": metrics.get("eval_samples"), "samples_per_s": metrics.get("samples_per_s"),
            "within_max_drop": None, "smallest_within": None, "max_drop_answer": None,
            "evaluated": True, "eval_status": job.status, "missing_reason": None}
    return row


def _class_f1(metrics: dict) -> dict[str, float] | None:
    from qrun.workers.metrics import class_scores

    return {label: scores["f1"] for label, scores in class_scores(metrics).items() if "f1" in scores} or None


def _compared_values(row: dict) -> tuple:
    """agreement's positive and negative class values and whether answers are classes, for this row's task."""
    from qrun.workers.tasks import label_value

    classes, positive = row["classes"], row["positive"]
    if positive is None:
        return None, None, row["match"] is None
    negative = next((c for c in classes if c != positive), None) if classes else "false"
    return label_value(positive), label_value(negative), True


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
        row |= agreement(predictions[base["job_id"]], predictions[row["job_id"]], *_compared_values(row))
        row["lost_most"], row["lost_most_f1_delta"] = _lost_most(row, base)


def _order(row: dict) -> tuple:
    """Baseline first, then by size on disk, largest first (rows of unknown size last), then bits."""
    size = row["size_bytes"]
    return (row["variant"] != BASELINE, size is None, -(size or 0), -(row["bits"] or 0), row["variant"])


def comparison_rows(db, model: str | None = None, data: str | None = None, sweep: str | None = None, *,
                    metric: str = "f1", max_drop: float | None = None,
                    warn: Callable[[str], None] = stderr_line) -> list[dict]:
    """The comparison, as plain dicts: grouped by (source model, data, mode), baseline first, then the
    variants by size on disk, largest first, then the variants without a succeeded eval (evaluated
    false, missing_reason saying why: `unevaluated`). With max_drop, each row also says whether its
    `metric` is within max_drop of the baseline's, which row is the smallest that is, and the group's
    sentence. warn(line): told of each predictions file that cannot be read (its agreement columns stay
    empty). A sweep that matches no job is BadInput."""
    from qrun.db import queue

    if sweep:  # from here on the ids of its jobs; BadInput naming it when it has none
        sweep = {j.id for j in queue.jobs_of_sweep(db, sweep)}
    every_job = queue.list_jobs(db, plain=True)
    jobs = _latest_evals(every_job, model, data, sweep)
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
        by_group.setdefault(_group_key(row), []).append(row)
    for missing in unevaluated(every_job, jobs, model, data, sweep):
        row = _missing_row(missing)
        by_group.setdefault(_group_key(row), []).append(row)
    rows: list[dict] = []
    for key in sorted(by_group):
        unique_labels(by_group[key])
        group = sorted((r for r in by_group[key] if r["evaluated"]), key=_order)
        _against_baseline(group, predictions)
        group += sorted((r for r in by_group[key] if not r["evaluated"]),
                        key=lambda r: (r["variant"] != BASELINE, r["quantize_job_id"] or 0, r["job_id"] or 0))
        if max_drop is not None:
            mark_smallest(group, quality_of(group, metric), max_drop)
        rows.extend(group)
    return rows


def _group_key(row: dict) -> tuple:
    return row["model"], row["data"] or "", row["mode"] or ""


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


def quality_of(group: list[dict], metric: str) -> str:
    """The metric --max-drop reads in a group: `metric`, except that f1 where no row has it is the macro
    F1 of a task of more than two classes, or a generation task's match."""
    if metric != "f1" or any(r.get("f1") is not None for r in group):
        return metric
    return next((other for other in ("macro_f1", "match") if any(r.get(other) is not None for r in group)), metric)


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
    if metric not in QUALITIES:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(QUALITIES)}")
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
    text = _num(row.get(name), digits)
    delta = row.get(f"{name}_delta")
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
    ("macro F1", lambda r: _with_delta(r, "macro_f1")),
    ("lost most", lambda r: _lost_text(r)),
    ("accuracy", lambda r: _with_delta(r, "accuracy")),
    ("invalid", lambda r: _with_delta(r, "invalid", 0)),
    ("AUC", lambda r: _with_delta(r, "auc")),
    ("perplexity", lambda r: _with_delta(r, "perplexity", 2)),
    ("match", lambda r: _with_delta(r, "match")),
    ("agree", lambda r: _num(r["agreement"] * 100 if r["agreement"] is not None else None, 1)),
    ("fraud->not", lambda r: _num(r["flips_fraud_to_not"], 0)),
    ("not->fraud", lambda r: _num(r["flips_not_to_fraud"], 0)),
    ("changed", lambda r: _changed_text(r)),
)
CELL_NAMES = tuple(name for name, _ in CELLS)
# Columns a group's table shows only where one of its rows has a value there: a classification's macro F1
# and the class that lost most, a generation task's match, the answers changed of more than two classes.
OPTIONAL_CELLS = frozenset({"macro F1", "lost most", "match", "changed"})


def _lost_text(row: dict) -> str:
    """`neutral -0.250`: the class whose F1 fell most from the baseline's."""
    if row.get("lost_most") is None:
        return "-"
    return f"{row['lost_most']} {row['lost_most_f1_delta']:+.3f}"


def _changed_text(row: dict) -> str:
    """`spam->ham 2, ham->invalid 1`: the answers changed from the baseline's, per pair of classes; `-`
    for a two-class task (fraud->not and not->fraud say it) and where nothing was compared."""
    changed = row.get("answers_changed")
    if changed is None or row.get("flips_fraud_to_not") is not None:
        return "-"
    return ", ".join(f"{pair} {n}" for pair, n in changed.items()) or "0"


def row_cells(row: dict, names: tuple[str, ...] = CELL_NAMES) -> list[str]:
    """A row's text in each of `names` (CELL_NAMES): `0.905 (-0.007)` beside its baseline, `-` where
    unmeasured."""
    return [cell(row) for name, cell in CELLS if name in names]


def shown_cells(group: list[dict]) -> tuple[str, ...]:
    """The cells a group's table shows: every one but the optional ones that none of its rows fills."""
    rows = evaluated_rows(group)
    return tuple(name for name, cell in CELLS
                 if name not in OPTIONAL_CELLS or any(cell(row) != "-" for row in rows))


MISSING_HEADING = "missing from this table:"


def missing_texts(group: list[dict]) -> list[str]:
    """One text per variant of the group without a succeeded eval, with the reason: `w4g128: eval failed:
    <first line of its error>`, `gguf-q4_k_m: not evaluated` (listed under the group's table)."""
    return [f"{row['variant']}: {row['missing_reason']}" for row in group if not row.get("evaluated", True)]


def evaluated_rows(group: list[dict]) -> list[dict]:
    """The rows of a group that have numbers: the table's rows."""
    return [row for row in group if row.get("evaluated", True)]


def group_title(group: list[dict]) -> str:
    """What a comparison group is: its source model and its data (or perplexity text)."""
    first = group[0]
    what = f"data {first['data']} ({first['mode']})" if first["data"] else f"perplexity on {first['ppl_data']}"
    return f"{first['model']} -- {what}"
