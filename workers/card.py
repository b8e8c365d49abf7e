"""The model card of a quantized artifact: README.md in Hugging Face's model-card form.

The quantize job writes the manifest (artifacts.MANIFEST: the method, its settings, the source model,
sizes, times, machine, library versions, each file's sha256) and the card drawn from it. When an eval of
the model finishes, or the baseline eval that the model's evals are measured against, the card is drawn
again with the eval's metrics, their deltas from the baseline and the agreement of the two predictions
files, from the job table. The card is not in the manifest's list nor in the table's weights sha256:
rewriting it changes no recorded digest.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from qrun.db import queue
from qrun.db.states import Kind, Status
from qrun.workers import artifacts, methods
from qrun.workers.params import BASELINE, EvalParams, QuantizeParams

MANIFEST_VERSION = 1
PLACEHOLDER_PATH = "path/to/this/directory"
# The eval metrics a card shows, with their delta from the baseline's (variant minus baseline).
CARD_METRICS = (("f1", "F1"), ("precision", "precision"), ("recall", "recall"), ("accuracy", "accuracy"),
                ("auc", "AUC"), ("perplexity", "perplexity"))
# Hugging Face's tags for each way a method stores its weights.
FORMAT_TAGS = {"gptq": ("gptq",), "awq": ("awq",), "rtn": ("gptq",), "fp8": ("fp8", "compressed-tensors"),
               "gguf": ("gguf",), "bnb-nf4": ("bitsandbytes", "nf4")}


# ---------------------------------------------------------------- what the quantize job knows


def machine(device: str) -> str:
    """The device a job ran on, in words: the GPU's name, or the CPU's model and core count."""
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores"


def versions(method: methods.Method) -> dict[str, str]:
    """The versions of the libraries that made and read this artifact."""
    names = ["qrun-quant", "torch", "transformers"]
    names += ["gptqmodel"] if method.gptqmodel_config else ["bitsandbytes"]
    names += ["compressed-tensors"] if method.rewrite_as else []
    names += ["gguf"] if method.artifact is methods.Artifact.GGUF else []
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def settings_of(params: QuantizeParams) -> dict:
    """The settings that made the model (the stored params less what says nothing about the model)."""
    quiet = ("trust_remote_code", "allow_pickle", "needs_gpu", "min_compute_capability", "method")
    return {key: value for key, value in params.to_dict().items() if key not in quiet}


def base_model_id(model_dir: str) -> str:
    """The source model as Hugging Face names it: the repo id of a hub cache snapshot
    (…/models--Qwen--Qwen2.5-1.5B/snapshots/<rev>), else the directory's name."""
    path = Path(model_dir).resolve()
    for part in path.parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return path.name


def quantize_facts(params: QuantizeParams, model_dir: str, out_dir: Path, metrics: dict, device: str) -> dict:
    """What the manifest records of a quantize job, from its params, output and metrics."""
    method = params.spec
    source_bytes = artifacts.weights_bytes(Path(model_dir))
    weights_bytes = artifacts.weights_bytes(out_dir)
    return {
        "qrun_manifest": MANIFEST_VERSION,
        "method": method.name, "variant": params.label(), "settings": settings_of(params),
        "source_model": str(Path(model_dir).resolve()), "base_model": base_model_id(model_dir),
        "source_bytes": source_bytes, "weights_bytes": weights_bytes,
        "size_pct": round(100 * weights_bytes / source_bytes, 1) if source_bytes else None,
        "quantize_s": _rounded(metrics.get("quantize_s")), "wall_s": _rounded(metrics.get("wall_s")),
        "machine": machine(device), "host": socket.gethostname(),
        "quantized_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions(method),
        "weights": sorted(p.name for pattern in artifacts.WEIGHT_PATTERNS for p in out_dir.glob(pattern)),
    }


def _rounded(value, digits: int = 2):
    return None if value is None else round(float(value), digits)


def write_new_card(params: QuantizeParams, model_dir: str, out_dir: Path, metrics: dict, device: str) -> None:
    """The manifest and the first card (no eval yet) of a freshly quantized model in `out_dir`."""
    manifest = artifacts.write_manifest(out_dir, quantize_facts(params, model_dir, out_dir, metrics, device))
    (out_dir / artifacts.CARD).write_text(render(manifest, []), encoding="utf-8")


# ---------------------------------------------------------------- the card


def render(manifest: dict, evals: list[dict]) -> str:
    """The card's text: YAML metadata, what was made and how, how to load it, how it scored."""
    return "\n".join([*front_matter(manifest), "", *summary(manifest), "", *loading(manifest), "",
                      *evaluation(evals), ""])


def front_matter(manifest: dict) -> list[str]:
    method = methods.METHODS[manifest["method"]]
    bits = manifest["settings"].get("bits")
    tags = ["qrun", "quantized", *FORMAT_TAGS.get(method.name, (method.name,))] + ([f"{bits}-bit"] if bits else [])
    return ["---", f"base_model: {json.dumps(manifest['base_model'])}", "base_model_relation: quantized",
            "library_name: transformers", "pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in tags],
            "---"]


def _megabytes(n) -> str:
    return "?" if n is None else f"{n / 1e6:.2f} MB"


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{key} {json.dumps(value)}" for key, value in settings.items()) or "none"


def summary(manifest: dict) -> list[str]:
    method = methods.METHODS[manifest["method"]]
    size = f"{_megabytes(manifest.get('weights_bytes'))} of weights"
    if manifest.get("size_pct") is not None:
        size += f", {manifest['size_pct']}% of the source's {_megabytes(manifest.get('source_bytes'))}"
    took = f"{manifest.get('quantize_s')} s quantizing, {manifest.get('wall_s')} s with loading and saving"
    made_with = ", ".join(f"{name} {version}" for name, version in manifest.get("versions", {}).items())
    return [f"# {Path(manifest['source_model']).name} · {manifest['variant']}", "",
            f"{method.title} quantization of `{manifest['base_model']}`, made by qrun.", "",
            "| | |", "| --- | --- |",
            f"| method | {method.about} (`{method.name}`) |",
            f"| settings | {_settings_text(manifest['settings'])} |",
            f"| source model | `{manifest['source_model']}` |",
            f"| size | {size} |",
            f"| quantize time | {took} |",
            f"| machine | {manifest.get('machine')} on {manifest.get('host')}, {manifest.get('quantized_at')} |",
            f"| made with | {made_with} |",
            f"| weights | {', '.join(f'`{w}`' for w in manifest.get('weights', []))}; the sha256 of every file "
            f"but this card is in `{artifacts.MANIFEST}` |"]


def loading(manifest: dict) -> list[str]:
    method = methods.METHODS[manifest["method"]]
    gguf_file = next((w for w in manifest.get("weights", []) if w.endswith(".gguf")), "model.gguf")
    lines = ["## Load it"]
    for client in method.clients:
        code = client.code.format(gguf_file=gguf_file)
        shell = not code.lstrip().startswith(("from ", "import "))
        checked = "" if client.tested else " (its own format, not run by qrun's tests)"
        lines += ["", f"### {client.name}{checked}", "", f"Needs: {client.needs}.", "",
                  "```" + ("sh" if shell else "python")]
        lines += [code] if shell else [f'path = "{PLACEHOLDER_PATH}"', "", code]
        lines += ["```"]
    return lines


def _value(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_delta(result: dict, name: str) -> str:
    value = result["metrics"].get(name)
    text = _value(value)
    base = (result.get("baseline_metrics") or {}).get(name)
    if value is not None and base is not None:
        text += f" ({value - base:+.3f})"
    return text


def evaluation(evals: list[dict]) -> list[str]:
    lines = ["## Evaluation", ""]
    if not evals:
        return lines + ["Not evaluated yet: `qrun submit --eval DATA` (or `qrun eval`) measures it against the "
                        "source model; this card is rewritten when that eval finishes."]
    names = [(key, title) for key, title in CARD_METRICS if any(key in e["metrics"] for e in evals)]
    lines += ["Each metric with its change from the unquantized source model on the same data (variant minus "
              "baseline); agreement: the share of rows where both predict the same class.", "",
              "| " + " | ".join(["data", "mode", "rows", *(t for _, t in names), "agreement", "fraud→not",
                                  "not→fraud"]) + " |",
              "| --- " * (len(names) + 6) + "|"]
    for e in evals:
        agree = e.get("agreement")
        cells = [f"`{Path(e['data']).name}`" if e.get("data") else "–", e.get("mode") or "–",
                 str(int(e["metrics"]["eval_samples"])) if "eval_samples" in e["metrics"] else "–",
                 *[_with_delta(e, key) for key, _ in names],
                 "–" if agree is None else f"{100 * agree:.1f}%",
                 str(e.get("flips_fraud_to_not", "–")), str(e.get("flips_not_to_fraud", "–"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- eval job {e['job']}" + (f" against baseline eval job {e['baseline_job']}"
                                                  if e.get("baseline_job") else ", no baseline eval yet")
                     for e in evals]
    return lines


# ---------------------------------------------------------------- after an eval


def _succeeded_evals(jobs: list) -> list:
    return [j for j in jobs if j.kind == Kind.EVAL.value and j.status == Status.SUCCEEDED.value]


def _measures(job) -> tuple:
    """What an eval measured: its data, perplexity text and mode (evals with equal ones compare)."""
    params = EvalParams.from_dict(job.params or {})
    return params.data, params.ppl_data, params.mode


def _is_baseline(job) -> bool:
    params = EvalParams.from_dict(job.params or {})
    return job.depends_on is None and not params.from_upstream and params.variant == BASELINE


def _newest(jobs: list) -> list:
    """The newest eval per thing measured."""
    newest: dict[tuple, object] = {}
    for job in sorted(jobs, key=lambda j: j.id):
        newest[_measures(job)] = job
    return list(newest.values())


def read_predictions(db, job_id: int) -> dict | None:
    """{row id: prediction} of an eval job's predictions file, or None."""
    record = next((a for a in queue.artifacts_of(db, [job_id])[job_id] if a.kind == "predictions"), None)
    if record is None:
        return None
    try:
        with open(record.path, encoding="utf-8") as f:
            return {row["id"]: row["prediction"] for row in map(json.loads, filter(str.strip, f))}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def agreement(baseline: dict | None, variant: dict | None) -> dict:
    """Share of common rows predicted alike, and the flips each way (fraud: True)."""
    if not baseline or not variant:
        return {}
    common = [key for key in variant if key in baseline]
    if not common:
        return {}
    return {"agreement": sum(baseline[k] == variant[k] for k in common) / len(common),
            "flips_fraud_to_not": sum(baseline[k] is True and variant[k] is False for k in common),
            "flips_not_to_fraud": sum(baseline[k] is False and variant[k] is True for k in common)}


def eval_results(db, jobs: list, quantize_job_id: int, source_model: str) -> list[dict]:
    """The newest succeeded eval of the model per thing measured, with its baseline's metrics and the
    agreement of their predictions."""
    evals = _succeeded_evals(jobs)
    mine = _newest([j for j in evals if j.depends_on == quantize_job_id])
    baselines = {_measures(j): j for j in _newest([j for j in evals if _is_baseline(j) and j.model == source_model])}
    results = []
    for job in mine:
        base = baselines.get(_measures(job))
        ids = [job.id] + ([base.id] if base else [])
        metrics = queue.metrics_of(db, ids)
        data, _, mode = _measures(job)
        result = {"job": job.id, "data": data, "mode": mode, "metrics": metrics[job.id],
                  "baseline_job": base.id if base else None,
                  "baseline_metrics": metrics[base.id] if base else None}
        if base is not None and data:
            result |= agreement(read_predictions(db, base.id), read_predictions(db, job.id))
        results.append(result)
    return results


def refresh_card(db, quantize_job, directory: Path, jobs: list | None = None) -> bool:
    """Draw the card of the artifact in `directory` again from its manifest and the table's evals of it.
    False where it has no manifest (an artifact from before cards)."""
    manifest = artifacts.read_manifest(directory)
    if manifest is None:
        return False
    jobs = jobs if jobs is not None else queue.list_jobs(db, plain=True)
    evals = eval_results(db, jobs, quantize_job.id, quantize_job.model)
    artifacts.write_shared_text(directory / artifacts.CARD, render(manifest, evals))
    return True


def _quantize_jobs_measured_by(jobs: list, eval_job) -> list:
    """The quantize jobs whose cards this eval's result changes: its own upstream job; for a baseline
    eval, every quantize job of the same source model with a succeeded eval of the same measure."""
    by_id = {j.id: j for j in jobs}
    if eval_job.depends_on is not None:
        upstream = by_id.get(eval_job.depends_on)
        return [upstream] if upstream is not None and upstream.kind == Kind.QUANTIZE.value else []
    if not _is_baseline(eval_job):
        return []
    measured = {j.depends_on for j in _succeeded_evals(jobs)
                if j.depends_on is not None and j.model == eval_job.model and _measures(j) == _measures(eval_job)}
    return [by_id[i] for i in sorted(measured) if i in by_id and by_id[i].kind == Kind.QUANTIZE.value]


def refresh_after_eval(db, eval_job) -> list[Path]:
    """Rewrite the cards an eval that just succeeded changes; the directories rewritten. Never raises: the
    eval's outcome is recorded already, and a card that could not be drawn is said in the job's log."""
    started = time.perf_counter()
    done: list[Path] = []
    try:
        jobs = queue.list_jobs(db, plain=True)
        for job in _quantize_jobs_measured_by(jobs, eval_job):
            record = next((a for a in queue.artifacts_of(db, [job.id])[job.id] if a.kind == "model"), None)
            if record is not None and Path(record.path).is_dir() and refresh_card(db, job, Path(record.path), jobs):
                done.append(Path(record.path))
    except Exception as exc:  # noqa: BLE001 -- a card is a courtesy; the eval's result stands
        print(f"=== warning: could not rewrite the model card after eval job {eval_job.id}: {exc}", flush=True)
    if done:
        print(f"=== model card rewritten in {len(done)} artifact(s) ({time.perf_counter() - started:.2f}s)",
              flush=True)
    return done
