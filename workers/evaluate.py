"""The eval job: classify labeled dialogs under their task and, optionally, measure perplexity.

The task (workers.tasks) says the labels and the answer of each: by default the seeds' two, answered
`{"is_fraud": true}` / `{"is_fraud": false}`. Two classification modes:
- score (default): for each dialog, the chat prompt followed by each label's answer goes through
  the model in batched forward passes; the answer whose tokens have the highest summed
  log-probability wins (ties: the first label of the task), and for two classes
  logp(positive) - logp(negative) is the sample's score for ROC-AUC. Deterministic.
- generate: greedy decoding of up to max_new_tokens; the answer is parsed back to a label by the
  task, and one that names no label is "invalid", never silently a class (the seed counted those
  as "not fraud").
A generation task (a reference answer per row and a scorer) is generated and scored against the
references: the share that match is the metric `match`.

Batches are left-padded with explicit position ids, so a sample's result does not depend on the
other samples in its batch. Progress is reported per batch: that is where cancellation reaches us.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qrun.db import queue
from qrun.db.errors import BadInput
from qrun.db.session import artifacts_root
from qrun.workers import artifacts
from qrun.workers.datasets import Sample, load_eval, load_samples
from qrun.workers.methods import Artifact, marlin_loads
from qrun.workers.metrics import class_metrics, classification_metrics, generation_metrics
from qrun.workers.params import EVAL_MODES, EvalParams
from qrun.workers.tasks import DEFAULT_TASK, INVALID, Task, label_text

log = logging.getLogger("qrun.evaluate")

PPL_MAX_WINDOW = 512


# ---------------------------------------------------------------- the model


def resolve_model_dir(db, job) -> Path:
    """The directory to evaluate: the job's model, or the model its upstream quantize job published."""
    if not EvalParams.from_dict(job.params).from_upstream:
        return Path(job.model)
    if job.depends_on is None:
        raise BadInput(f"eval job {job.id} evaluates its upstream job's model but has no upstream job")
    records = queue.artifacts_of(db, [job.depends_on])[job.depends_on]
    model = next((a for a in records if a.kind == "model"), None)
    if model is None:
        raise BadInput(f"upstream job {job.depends_on} recorded no model artifact: retry job {job.depends_on}")
    path = Path(model.path)
    if not path.is_dir():
        here = socket.gethostname()
        if model.node and model.node != here:  # a cluster whose QRUN_HOME is not shared
            raise BadInput(f"model artifact {path} of job {job.depends_on} was written on node {model.node} and "
                           f"cannot be read on node {here}: mount the shared QRUN_HOME at the same path on "
                           "every node")
        raise BadInput(f"model artifact {path} of job {job.depends_on} is gone: retry job {job.depends_on}")
    return path


def is_gptq_dir(model_dir: Path) -> bool:
    """A GPTQModel checkpoint (gptq, and awq, rtn, fp8 written by GPTQModel)."""
    return (Path(model_dir) / "quantize_config.json").is_file()


def gguf_file_of(model_dir: Path) -> str | None:
    """The .gguf file of a GGUF artifact (qrun's quantize writes one: model.gguf), or None."""
    found = sorted(p.name for p in Path(model_dir).glob("*.gguf"))
    return found[0] if found else None


def is_bitsandbytes_dir(model_dir: Path) -> bool:
    """A transformers checkpoint saved in bitsandbytes' 4- or 8-bit form (bnb-nf4)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") or {}
    return str(quant.get("quant_method", "")).lower() == "bitsandbytes" and not is_gptq_dir(model_dir)


def artifact_format(model_dir: Path) -> Artifact:
    """How an artifact is stored, and so loaded: a .gguf file, GPTQModel's checkpoint, bitsandbytes'
    form, or plain weights (workers.methods.Artifact; its value: "gguf", "gptqmodel", ...)."""
    if gguf_file_of(model_dir):
        return Artifact.GGUF
    if is_gptq_dir(model_dir):
        return Artifact.GPTQMODEL
    if is_bitsandbytes_dir(model_dir):
        return Artifact.BITSANDBYTES
    return Artifact.TRANSFORMERS


def safetensors_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def weights_bytes(model_dir: Path) -> int:
    """The model's weights on disk: its safetensors files, or its .gguf file."""
    return safetensors_bytes(model_dir) + sum(p.stat().st_size for p in Path(model_dir).glob("*.gguf"))


def gptq_backend(model_dir: Path, device: str) -> str:
    """The GPTQModel kernel to load a checkpoint with: "marlin" on a GPU where its format allows, else "auto".

    Left to itself, GPTQModel picks Machete on Hopper GPUs for 4-bit, group-128 weights, and Machete
    downloads CUTLASS from GitHub on first use: on a server without internet the eval fails with
    "Temporary failure in name resolution". GPTQMODEL_CUTLASS_DIR (a local CUTLASS) restores the choice.
    """
    if not device.startswith("cuda") or os.environ.get("GPTQMODEL_CUTLASS_DIR"):
        return "auto"
    try:
        config = json.loads((Path(model_dir) / "quantize_config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    return "marlin" if marlin_loads(config) else "auto"


def _load_gptq(model_dir: Path, device: str, trust_remote_code: bool):
    from gptqmodel import GPTQModel

    backend = gptq_backend(model_dir, device)
    try:
        return GPTQModel.load(str(model_dir), device=device, backend=backend, trust_remote_code=trust_remote_code)
    except (ValueError, NotImplementedError, TypeError) as exc:
        if backend == "auto":
            raise
        # Marlin also has shape limits (a tiny model's layers may be too narrow): let GPTQModel choose.
        log.warning("loading %s with the %s kernel failed (%s); letting GPTQModel choose", model_dir, backend, exc)
        return GPTQModel.load(str(model_dir), device=device, trust_remote_code=trust_remote_code)


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise BadInput("this model is stored in bitsandbytes' 4-bit form: the worker needs the bitsandbytes "
                       "package (pip install 'qrun-quant[bnb]')") from exc


def gpu_device_map(device: str):
    """Where a model's weights go: the worker's GPU, or spread over all it holds ("auto") when a job
    was given several (`--gpus-per-job`: a model too big for one card)."""
    import torch

    return "auto" if torch.cuda.device_count() > 1 else device


def load_model(model_dir: Path, device: str, trust_remote_code: bool):
    """(Hugging Face causal LM in eval mode on `device`, tokenizer).

    On a GPU the weights are loaded straight onto the device: a GPTQ model loaded on the CPU and
    moved afterwards fails with "Found modules on cpu/disk ... exllama" (the seed's int4 error).
    """
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    kind = artifact_format(model_dir)
    if kind is Artifact.GPTQMODEL:
        model = _load_gptq(model_dir, device, trust_remote_code).model
    else:
        from transformers import AutoModelForCausalLM

        on_gpu = device.startswith("cuda")
        dtype = torch.float32
        if on_gpu:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        extra: dict = {}
        if kind is Artifact.GGUF:
            # transformers' GGUF loader: reads the llama.cpp file and dequantizes its blocks to `dtype`
            extra["gguf_file"] = gguf_file_of(model_dir)
        elif kind is Artifact.BITSANDBYTES:
            # the 4-bit weights load as bitsandbytes' Linear4bit (the config.json's quantization_config);
            # the other tensors in bf16, the compute dtype they were quantized for
            _require_bitsandbytes()
            dtype = torch.bfloat16
        device_map = gpu_device_map(device) if on_gpu else ({"": "cpu"} if kind is Artifact.BITSANDBYTES else None)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code,
                                                     device_map=device_map, **extra)
    model.eval()
    return model, tokenizer


def pad_id(tokenizer) -> int:
    """Any id will do under the attention mask; a tokenizer without a pad token borrows eos."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def max_positions(model) -> int | None:
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "max_position_embeddings", None)


def left_pad(sequences: Sequence[list[int]], pad: int, device: str):
    """(input_ids, attention_mask, position_ids) with the padding on the left.

    Position ids are counted from each sequence's first real token, so a left-padded sequence
    sees the same positions as it would alone.
    """
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _accepts(model, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- prompts


def render_prompt(tokenizer, messages: Sequence[dict], answer: str | None = None) -> str:
    """The chat-templated prompt; with `answer`, the whole dialog including the assistant's reply."""
    chat = list(messages) + ([{"role": "assistant", "content": answer}] if answer is not None else [])
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=answer is None)
    # No template (a base model): plain turns, so the comparison still runs, if less faithfully.
    text = "\n".join(str(m.get("content", "")) for m in chat)
    return text if answer is not None else text + "\n"


def prompt_ids(tokenizer, sample: Sample) -> list[int]:
    # The template already holds the special tokens: adding them again would put a second BOS in.
    return tokenizer(render_prompt(tokenizer, sample.messages), add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- classification


def answer_logprobs(model, sequences: Sequence[list[int]], answer_lengths: Sequence[int], pad: int,
                    device: str) -> list[float]:
    """Summed log-probability of the last answer_lengths[i] tokens of each sequence, in one forward pass."""
    import torch

    ids, mask, positions = left_pad(sequences, pad, device)
    keep = max(answer_lengths) + 1  # the answers sit at the right edge: only their logits are needed
    kwargs = {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       **kwargs).logits[:, -keep:]
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = ids[:, -keep + 1:]
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        width = token_logprobs.shape[1]
        columns = torch.arange(width, device=token_logprobs.device)
        lengths = torch.tensor(list(answer_lengths), device=token_logprobs.device)
        in_answer = columns.unsqueeze(0) >= (width - lengths).unsqueeze(1)
        sums = (token_logprobs * in_answer).sum(dim=1)
    return [float(x) for x in sums.cpu()]


def candidate_logprobs(model, tokenizer, prompts: Sequence[list[int]], answers: Sequence[str],
                       device: str) -> list[list[float]]:
    """Per prompt, the summed log-probability of each answer after it. Forward passes of at most twice
    as many sequences as prompts (two answers: one pass, as for the seeds' task)."""
    candidates = [tokenizer(answer, add_special_tokens=False)["input_ids"] for answer in answers]
    pairs = [(prompt + c, len(c)) for prompt in prompts for c in candidates]
    per_pass = max(2 * len(prompts), len(candidates))
    logps: list[float] = []
    for start in range(0, len(pairs), per_pass):
        chunk = pairs[start:start + per_pass]
        logps += answer_logprobs(model, [p for p, _ in chunk], [n for _, n in chunk], pad_id(tokenizer), device)
    n = len(candidates)
    return [logps[i * n:(i + 1) * n] for i in range(len(prompts))]


def score_batch(model, tokenizer, prompts: Sequence[list[int]], device: str,
                task: Task = DEFAULT_TASK) -> list[tuple[object, float | None]]:
    """(predicted label's value, score) per prompt: the label whose answer is likeliest (ties: the first
    of the task's labels); the score is logp(positive) - logp(negative) for two classes, else None."""
    out = []
    for logps in candidate_logprobs(model, tokenizer, prompts, task.answers, device):
        best = max(range(len(logps)), key=lambda i: (logps[i], -i))
        score = None
        if task.positive is not None:
            score = logps[task.labels.index(task.positive)] - logps[task.labels.index(task.negative)]
        out.append((task.value(task.labels[best]), score))
    return out


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate_batch(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, device: str) -> list[str]:
    """Greedy answers, decoded without special tokens."""
    import torch

    pad = pad_id(tokenizer)
    ids, mask, _ = left_pad(prompts, pad, device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                             eos_token_id=_eos_ids(model, tokenizer) or None)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sample indices in batches of similar length (less padding), longest first (OOM shows early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------- perplexity


def ppl_texts(tokenizer, samples: Sequence[Sample]) -> list[str]:
    """Plain text as is; a dialog rendered with the chat template, answer included."""
    return [s.text if s.text is not None else render_prompt(tokenizer, s.messages, s.answer or "")
            for s in samples]


def ppl_windows(n_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) of each sliding window, stride window/2.

    Every token but the first is scored exactly once, each with at least window/2 tokens of
    context once the text is that long.
    """
    stride = max(window // 2, 1)
    windows, scored_until = [], 1
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + window, n_tokens)
        if end > scored_until:
            windows.append((begin, end, scored_until))
            scored_until = end
        if end == n_tokens:
            break
    return windows


def window_nll(model, ids: list[int], windows: Sequence[tuple[int, int, int]], pad: int,
               device: str) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) over a batch of windows, padded on the right."""
    import torch

    rows = [ids[begin:end] for begin, end, _ in windows]
    width = max(len(r) for r in rows)
    batch = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        batch[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    batch, mask = batch.to(device), mask.to(device)
    total, count = 0.0, 0
    with torch.inference_mode():
        logits = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
        for i, (begin, end, first) in enumerate(windows):
            # logits at position t predict token t+1: tokens first..end-1 come from positions first-1..end-2
            predicted = logits[i, first - begin - 1:end - begin - 1].float()
            target = batch[i, first - begin:end - begin]
            total += float(torch.nn.functional.cross_entropy(predicted, target, reduction="sum"))
            count += end - first
    return total, count


# ---------------------------------------------------------------- the job


def create_shared_file(directory: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file with a unique name in `directory`, opened for writing: (fd, path).

    Unlike tempfile.mkstemp (always 0600, so a teammate's `qrun compare` could not read the
    predictions), the mode is 0666 less the umask, as for any file: 0664 under the workers' group
    umask 002, like the artifacts and logs beside it.
    """
    for _ in range(100):
        path = directory / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


def write_predictions(rows: Sequence[dict], path: Path, job_id: int) -> queue.ArtifactRecord:
    """Write JSONL atomically: a temporary file beside `path`, renamed over it when complete."""
    fd, tmp = create_shared_file(path.parent, artifacts.staging_prefix(job_id), ".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return queue.ArtifactRecord(kind="predictions", path=str(path), bytes=path.stat().st_size,
                                sha256=artifacts.file_sha256(path))


@dataclass
class _Plan:
    """The eval's work, counted up front so progress runs from 0 to one total."""

    task: Task
    missing: tuple[str, ...]  # the task's classes with no row in the data
    samples: list[Sample]
    prompts: list[list[int]]
    batches: list[list[int]]
    ppl_ids: list[int]
    ppl_batches: list[list[tuple[int, int, int]]]

    @property
    def total(self) -> int:
        return len(self.batches) + len(self.ppl_batches)


def plan_eval(params: EvalParams, model, tokenizer) -> _Plan:
    data = load_eval(params.data, params.task, params.answer_template) if params.data else None
    if data is not None and data.task.is_generation and params.mode != "generate":
        raise BadInput(f"eval file {params.data} is a generation task (scorer {data.task.scorer}): it is evaluated "
                       "in generate mode only")
    task, missing, samples = (data.task, data.missing, data.samples) if data else (DEFAULT_TASK, (), [])
    prompts = [prompt_ids(tokenizer, s) for s in samples]
    batches = batches_by_length([len(p) for p in prompts], params.batch_size)
    ppl_ids: list[int] = []
    ppl_batches: list = []
    if params.ppl_data:
        text = "\n\n".join(ppl_texts(tokenizer, load_samples(params.ppl_data)))
        ppl_ids = tokenizer(text)["input_ids"]
        if len(ppl_ids) < 2:
            raise BadInput(f"perplexity file {params.ppl_data} has fewer than 2 tokens: give it more text")
        window = max(min(max_positions(model) or PPL_MAX_WINDOW, PPL_MAX_WINDOW), 2)
        windows = ppl_windows(len(ppl_ids), window)
        ppl_batches = [windows[i:i + params.batch_size] for i in range(0, len(windows), params.batch_size)]
    return _Plan(task, missing, samples, prompts, batches, ppl_ids, ppl_batches)


def classify(plan: _Plan, params: EvalParams, model, tokenizer, device: str,
             progress: Callable[[int, int, str | None], None]) -> list[dict]:
    """One prediction row per sample, in the file's order."""
    task = plan.task
    rows: list[dict | None] = [None] * len(plan.samples)
    for done, batch in enumerate(plan.batches):
        prompts = [plan.prompts[i] for i in batch]
        if task.is_generation:
            answers = generate_batch(model, tokenizer, prompts, params.max_new_tokens, device)
            for i, text in zip(batch, answers):
                rows[i] = generation_row(task, plan.samples[i], text)
        else:
            if params.mode == "generate":
                answers = generate_batch(model, tokenizer, prompts, params.max_new_tokens, device)
                results = [(_value(task, task.parse(text)), None, text) for text in answers]
            else:
                scored = score_batch(model, tokenizer, prompts, device, task)
                results = [(predicted, margin, None) for predicted, margin in scored]
            for i, (predicted, score, text) in zip(batch, results):
                sample = plan.samples[i]
                rows[i] = {"id": sample.id, "label": sample.label,
                           "prediction": INVALID if predicted is None else predicted, "score": score}
                if text is not None:
                    rows[i]["output"] = text
        progress(done + 1, plan.total, f"{params.mode} batch {done + 1}/{len(plan.batches)}")
    return rows  # type: ignore[return-value]


def _value(task: Task, label: str | None):
    return None if label is None else task.value(label)


def generation_row(task: Task, sample: Sample, output: str) -> dict:
    """A generation task's prediction row: the answer as the scorer reads it (its `prediction`, INVALID
    where the scorer finds nothing to compare) and whether it matches the reference's."""
    answer = task.extract(output)
    return {"id": sample.id, "label": None, "prediction": INVALID if answer is None else answer, "score": None,
            "output": output, "reference": sample.answer,
            "match": answer is not None and answer == task.reference(sample.answer or "")}


def perplexity(plan: _Plan, model, tokenizer, device: str,
               progress: Callable[[int, int, str | None], None]) -> dict[str, float]:
    nll, tokens = 0.0, 0
    for done, windows in enumerate(plan.ppl_batches):
        batch_nll, batch_tokens = window_nll(model, plan.ppl_ids, windows, pad_id(tokenizer), device)
        nll, tokens = nll + batch_nll, tokens + batch_tokens
        progress(len(plan.batches) + done + 1, plan.total, f"perplexity {done + 1}/{len(plan.ppl_batches)}")
    mean = nll / tokens
    return {"perplexity": math.exp(mean) if mean < 700 else math.inf, "ppl_nll": mean, "ppl_tokens": tokens}


def over_context(prompts: Sequence[list[int]], positions: int | None) -> list[int]:
    """Lengths of the prompts that do not fit the model's context (the answer comes after them)."""
    return [len(p) for p in prompts if positions and len(p) >= positions]


def classification_summary(rows: Sequence[dict], mode: str, task: Task = DEFAULT_TASK) -> dict[str, float | None]:
    """The eval's metrics: a generation task's match; a classification's per class (workers.metrics.class_metrics),
    with the binary ones (tp, fp, tn, fn, precision, recall, f1, and auc in score mode) for two classes."""
    if task.is_generation:
        return generation_metrics([None if r["prediction"] == INVALID else r["match"] for r in rows])
    labels = [label_text(r["label"]) for r in rows]
    predictions = [None if _is_invalid(r["prediction"]) else label_text(r["prediction"]) for r in rows]
    metrics: dict[str, float | None] = {}
    if task.positive is not None:
        scores = [r["score"] for r in rows] if mode == "score" else None
        metrics |= classification_metrics([label == task.positive for label in labels],
                                          [None if p is None else p == task.positive for p in predictions], scores)
    return metrics | class_metrics(labels, predictions, task.labels)


def _is_invalid(prediction) -> bool:
    return isinstance(prediction, str) and prediction == INVALID


def predictions_path(job, variant: str) -> Path:
    name = f"{artifacts.safe_name(Path(job.model).name)}-{artifacts.safe_name(variant)}-eval-job{job.id}"
    return artifacts.inside(artifacts_root(), f"{name}.predictions.jsonl")


def run_eval(ctx) -> tuple[dict[str, float | None], list[queue.ArtifactRecord]]:
    import torch

    job = ctx.job
    params = EvalParams.from_dict(job.params or {})
    if params.mode not in EVAL_MODES:
        raise BadInput(f"eval job {job.id} has mode {params.mode!r}: use score or generate")
    if not params.data and not params.ppl_data:
        raise BadInput(f"eval job {job.id} has neither data nor ppl_data: resubmit with --eval or --eval-ppl")
    model_dir = resolve_model_dir(ctx.db, job)
    on_gpu = ctx.device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    ctx.progress(0, 1, "loading model")
    started = time.perf_counter()
    model, tokenizer = load_model(model_dir, ctx.device, params.trust_remote_code)
    metrics: dict[str, float | None] = {"load_s": time.perf_counter() - started,
                                        "model_size_bytes": weights_bytes(model_dir)}
    plan = plan_eval(params, model, tokenizer)
    print(f"=== eval {params.variant} of {model_dir}: {len(plan.samples)} samples ({params.mode}), "
          f"{len(plan.ppl_ids)} perplexity tokens", flush=True)
    if plan.samples:
        print(f"=== task: {plan.task.describe()}", flush=True)
    if plan.missing:
        print(f"=== warning: {len(plan.missing)} of the task's {len(plan.task.labels)} classes have no rows in "
              f"{params.data}: {', '.join(plan.missing)} (their recall is 0; macro F1 leaves out a class with no "
              "rows that no answer names)", flush=True)
    over = over_context(plan.prompts, max_positions(model))
    if over:
        metrics["eval_over_context"] = len(over)
        print(f"=== warning: {len(over)} of {len(plan.prompts)} prompts are longer than the model's "
              f"{max_positions(model)} positions (the longest {max(over)} tokens): they are scored as given, past "
              "what the model was trained to read", flush=True)
    records: list[queue.ArtifactRecord] = []
    if plan.samples:
        started = time.perf_counter()
        rows = classify(plan, params, model, tokenizer, ctx.device, ctx.progress)
        eval_s = time.perf_counter() - started
        metrics |= classification_summary(rows, params.mode, plan.task)
        metrics |= {"eval_samples": len(rows), "eval_s": eval_s, "samples_per_s": len(rows) / eval_s}
        records.append(write_predictions(rows, predictions_path(job, params.variant), job.id))
    if plan.ppl_batches:
        started = time.perf_counter()
        metrics |= perplexity(plan, model, tokenizer, ctx.device, ctx.progress)
        metrics["ppl_s"] = time.perf_counter() - started
    if on_gpu:
        metrics["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics, records
