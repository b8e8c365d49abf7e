"""The demo model: a tiny Qwen2-architecture classifier of synthetic dialogs, trained here on the CPU.

`build_demo(home)` generates the demo dataset, trains a small causal LM from scratch on the
chat-templated prompt and its answer (`{"is_fraud": true}` or `... false}`), and keeps training
until the held-out accuracy -- scored as qrun's eval does, by comparing the log-probabilities of
the two answers -- reaches the target. Then it gives the model the outlier channels of real LLMs
(`make_outlier_channels`, a change that keeps the function it computes), so that quantization costs
what it costs them: round-to-nearest loses answers, calibrated GPTQ keeps them. Everything lands
in $QRUN_HOME/demo/ (written to a temporary directory, then renamed), and a later call reuses it.

It is a demo model trained on synthetic data, not a fraud detector.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qrun.db.errors import QrunError
from qrun.demo.dataset import generate_splits, write_jsonl
from qrun.workers.artifacts import share_with_group

DEMO_VERSION = 3  # bump when the data or the model changes, so stale caches are rebuilt
SEED = 20240819
SPLITS = {"train": 1600, "valid": 120, "eval": 200}
CALIB_ROWS = 128  # taken from the training split: calibration data should look like training data
TARGET_ACCURACY = 0.9
MODEL_SHAPE = dict(hidden=128, intermediate=512, layers=2, heads=4, kv_heads=2, max_positions=512)
VOCAB_SIZE = 3000
MAX_TOKENS = 384
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WARMUP_STEPS = 10
MAX_STEPS = 400
VALIDATE_EVERY = 20
STOP_ACCURACY = 0.97  # on the validation split; the eval split is scored once, at the end
# Outlier channels (make_outlier_channels): per decoder layer and per norm, the channels that matter
# most for the answer, scaled up by OUTLIER_SCALE, with the columns that read them scaled down.
OUTLIER_CHANNELS = 8  # of 128: 4-bit round-to-nearest then loses ~12 points of F1, GPTQ none; 12 lose ~40
OUTLIER_SCALE = 30.0
IMPORTANCE_ROWS = 64  # of the validation split (never the eval split) that rank the channels
TIME_BUDGET_S = 180.0  # ~20 s on an idle 2-core CPU; the margin is for a busy one. Past it: fail clearly
DISCLAIMER = ("qrun demo: this is a tiny model trained in seconds on synthetic dialogs, to show the queue at work. "
              "It is not a fraud detector.")


class DemoBuildError(QrunError):
    """The demo model did not reach its target accuracy."""


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    model: Path
    train: Path
    eval: Path
    calib: Path
    manifest: Path

    @classmethod
    def under(cls, root: Path) -> "DemoPaths":
        root = Path(root)
        # The version in the model's name keeps jobs of an older demo model from passing for this one's.
        return cls(root=root, model=root / f"qrun-demo-v{DEMO_VERSION}", train=root / "train.jsonl", eval=root / "eval.jsonl",
                   calib=root / "calib.jsonl", manifest=root / "demo.json")

    def is_complete(self) -> bool:
        """Written by this version of the demo, with every file in place."""
        try:
            manifest = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return False
        files = [self.train, self.eval, self.calib, self.model / "config.json", self.model / "model.safetensors",
                 self.model / "tokenizer.json"]
        return manifest.get("version") == DEMO_VERSION and all(f.is_file() for f in files)

    def info(self) -> dict:
        return json.loads(self.manifest.read_text())


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_demo(home: Path, seed: int = SEED) -> DemoPaths:
    """The demo model and its data under `home`/demo, built on the first call and reused after."""
    paths = DemoPaths.under(Path(home) / "demo")
    if paths.is_complete():
        return paths
    say(DISCLAIMER)
    staging = DemoPaths.under(paths.root.with_name(f".demo-staging-{os.getpid()}"))
    shutil.rmtree(staging.root, ignore_errors=True)
    staging.root.mkdir(parents=True)
    try:
        _build_into(staging, seed)
        if paths.is_complete():  # another `qrun demo` finished the same build first
            return paths
        if paths.root.exists():  # an incomplete or outdated build
            shutil.rmtree(paths.root)
        share_with_group(staging.root)  # the team's, like artifacts: save_pretrained writes 0600 weights
        staging.root.rename(paths.root)
    except OSError:
        if not paths.is_complete():
            raise
    finally:
        shutil.rmtree(staging.root, ignore_errors=True)
    return paths


def _build_into(paths: DemoPaths, seed: int) -> None:
    import torch

    started = time.perf_counter()
    splits = generate_splits(seed, SPLITS)
    write_jsonl(splits["train"], paths.train)
    write_jsonl(splits["eval"], paths.eval)
    write_jsonl(random.Random(seed).sample(splits["train"], CALIB_ROWS), paths.calib)
    torch.manual_seed(seed)
    tokenizer, model = _new_model(splits["train"], paths.model)
    data = {name: encode_rows(rows, tokenizer) for name, rows in splits.items()}
    say(f"qrun demo: training a {_count_params(model) / 1e6:.1f}M-parameter Qwen2-architecture model on "
        f"{len(data['train'])} synthetic dialogs (CPU)...")
    history = train(model, data["train"], data["valid"], deadline=started + TIME_BUDGET_S)
    outliers = make_outlier_channels(model, data["valid"][:IMPORTANCE_ROWS])
    # Saved in bfloat16, as real checkpoints are; scored after the same rounding, as qrun's eval sees it.
    with torch.no_grad():
        for param in model.parameters():  # parameters only: buffers such as RoPE's are recomputed on load
            param.copy_(param.to(torch.bfloat16))
    accuracy = score_accuracy(model, data["eval"])
    valid_accuracy = score_accuracy(model, data["valid"])  # as training left it: the outlier step changes nothing
    build_s = time.perf_counter() - started
    if accuracy < TARGET_ACCURACY:
        raise DemoBuildError(
            f"the demo model reached only {accuracy:.3f} held-out accuracy (target {TARGET_ACCURACY}) after "
            f"{history[-1]['step']} training steps in {build_s:.0f}s; nothing was kept: if the machine was busy, "
            "run `qrun demo` again when it is idle")
    _save_model(model, tokenizer, paths.model, accuracy)
    paths.manifest.write_text(json.dumps({
        "version": DEMO_VERSION, "seed": seed, "eval_accuracy": accuracy, "valid_accuracy": valid_accuracy,
        "build_s": round(build_s, 1), "training": history, "outliers": outliers,
        "rows": {name: len(rows) for name, rows in splits.items()}, "calib_rows": CALIB_ROWS,
        "note": DISCLAIMER,
    }, indent=2, ensure_ascii=False))
    say(f"qrun demo: model ready in {build_s:.0f}s, held-out accuracy {accuracy:.3f} on {len(data['eval'])} dialogs")


def _new_model(train_rows: list[dict], model_dir: Path):
    from transformers import AutoModelForCausalLM

    from qrun.workers.tiny import tiny_config

    tokenizer = demo_tokenizer(train_rows, model_dir)
    config = tiny_config("qwen2", vocab_size=len(tokenizer), **MODEL_SHAPE)
    model = AutoModelForCausalLM.from_config(config)
    return tokenizer, model


def demo_tokenizer(train_rows: list[dict], model_dir: Path):
    """The tokenizer the model is trained with, which is the one saved with it: as qrun's eval loads it
    from `model_dir` (left there, beside a Qwen2 config.json).

    transformers loads a Qwen2 model's tokenizer as its Qwen2Tokenizer, whose pre-tokenizer (digits one
    by one) is not the plain byte-level one that workers.tiny trains: "226" was one token in training
    and three in every eval. So the BPE is trained, loaded back as the eval loads it, trained again
    within that pipeline (its merges then fit the pieces it will see), and loaded back once more."""
    from transformers import AutoTokenizer

    from qrun.workers.tiny import tiny_config, train_tokenizer

    texts = _tokenizer_texts(train_rows)
    tiny_config("qwen2", vocab_size=VOCAB_SIZE, **MODEL_SHAPE).save_pretrained(model_dir)  # what picks the class
    train_tokenizer(texts, vocab_size=VOCAB_SIZE).save_pretrained(model_dir)
    loaded = AutoTokenizer.from_pretrained(model_dir)
    loaded.train_new_from_iterator(texts, VOCAB_SIZE, show_progress=False).save_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(model_dir)


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- encoding


def prompt_text(row: dict, tokenizer) -> str:
    """The chat-templated prompt of a row up to the assistant's turn, built as qrun's eval builds it."""
    from qrun.workers.datasets import to_sample

    sample = to_sample(Path("demo"), 0, row)
    return tokenizer.apply_chat_template(list(sample.messages), tokenize=False, add_generation_prompt=True)


def _tokenizer_texts(rows: list[dict]) -> list[str]:
    """What the tokenizer learns from: every prompt part and answer, as often as training sees them."""
    from qrun.workers.datasets import SYSTEM_PROMPT, answer_text

    return [f"{SYSTEM_PROMPT}\n{row['instruction']}\n{row['input']}\n{answer_text(row['label'])}" for row in rows]


@dataclass
class Encoded:
    prompt: list[int]
    answers: tuple[list[int], list[int]]  # token ids of the "false" and the "true" answer
    label: bool
    decisive: int  # index of the first answer token where the two answers differ


def encode_rows(rows: list[dict], tokenizer) -> list[Encoded]:
    from qrun.workers.datasets import answer_text

    answers = tuple(tokenizer(answer_text(v), add_special_tokens=False)["input_ids"] for v in (False, True))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    decisive = next(i for i, (f, t) in enumerate(zip(*answers)) if f != t)
    out = []
    for row in rows:
        prompt = tokenizer(prompt_text(row, tokenizer), add_special_tokens=False)["input_ids"]
        prompt = prompt[-(MAX_TOKENS - max(map(len, answers)) - 1):]  # the answer must fit; keep the dialog's end
        out.append(Encoded(prompt=prompt, answers=(answers[0] + [end], answers[1] + [end]),
                           label=bool(row["label"]), decisive=decisive))
    return out


def _batch(items: list[tuple[list[int], int]], pad_id: int):
    """Right-padded input ids and their attention mask."""
    import torch

    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (ids, _) in enumerate(items):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    return input_ids, mask


def _answer_logprobs(model, items: list[tuple[list[int], int]], pad_id: int):
    """Per row: log-probabilities of its tokens from answer_start on (a list of 1-D tensors).

    Only the hidden states that predict answer tokens go through the output layer: the prompt
    needs no logits, which makes training several times cheaper.
    """
    import torch

    input_ids, mask = _batch(items, pad_id)
    hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    rows, cols, targets, sizes = [], [], [], []
    for i, (ids, start) in enumerate(items):
        positions = list(range(start - 1, len(ids) - 1))
        rows += [i] * len(positions)
        cols += positions
        targets += ids[start:]
        sizes.append(len(positions))
    logits = model.lm_head(hidden[rows, cols])
    token_logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(targets)[:, None])[:, 0]
    return list(torch.split(token_logprobs, sizes))


# ---------------------------------------------------------------- training and scoring


def _batches(data: list[Encoded], rng: random.Random) -> list[list[Encoded]]:
    """Batches of similar length (less padding), in random order."""
    order = sorted(data, key=lambda e: len(e.prompt) + rng.random())
    batches = [order[i:i + BATCH_SIZE] for i in range(0, len(order), BATCH_SIZE)]
    rng.shuffle(batches)
    return batches


def train(model, train_data: list[Encoded], valid_data: list[Encoded], deadline: float) -> list[dict]:
    """Train on the answer tokens until validation accuracy is near perfect, or steps or time run out.

    The loss is the mean over all answer tokens plus, once more, the token that carries the label
    (" true" / " false"): the format tokens are learnt in a few steps, and without the extra weight
    the label's gradient is too diluted for the model to leave chance within the time budget.
    """
    import torch

    pad_id = model.config.pad_token_id or 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * max(0.1, 1 - step / MAX_STEPS))
    rng = random.Random(0)
    history: list[dict] = []
    losses: list[float] = []
    step = 0
    while step < MAX_STEPS:
        for batch in _batches(train_data, rng):
            model.train()
            items = [(e.prompt + e.answers[e.label], len(e.prompt)) for e in batch]
            logprobs = _answer_logprobs(model, items, pad_id)
            label_logprobs = torch.stack([lp[e.decisive] for lp, e in zip(logprobs, batch)])
            loss = -(torch.cat(logprobs).mean() + label_logprobs.mean())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if step % VALIDATE_EVERY and step < MAX_STEPS:
                continue
            accuracy = score_accuracy(model, valid_data)
            history.append({"step": step, "loss": round(sum(losses) / len(losses), 4), "valid_accuracy": accuracy})
            losses = []
            say(f"qrun demo:   step {step}: answer loss {history[-1]['loss']:.3f}, validation accuracy {accuracy:.3f}")
            if accuracy >= STOP_ACCURACY or step >= MAX_STEPS or time.perf_counter() > deadline:
                return history
    return history


def score_accuracy(model, data: list[Encoded]) -> float:
    """Share of rows whose true answer is likelier than the other one (score mode, as qrun's eval)."""
    import torch

    pad_id = model.config.pad_token_id or 0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), 64):
            chunk = data[i:i + 64]
            items = [(e.prompt + e.answers[v][:-1], len(e.prompt)) for e in chunk for v in (False, True)]
            totals = [lp.sum().item() for lp in _answer_logprobs(model, items, pad_id)]
            for j, e in enumerate(chunk):
                says_true = totals[2 * j + 1] > totals[2 * j]
                correct += says_true == e.label
    return correct / len(data)


# ---------------------------------------------------------------- outlier channels


def _norm_inputs(layer) -> dict[str, tuple]:
    """Each RMSNorm of a Qwen2 decoder layer and the linears that read its output."""
    attn, mlp = layer.self_attn, layer.mlp
    return {"input_layernorm": (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
            "post_attention_layernorm": (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))}


def _margin_sum(model, data: list[Encoded]):
    """Sum over rows of log p(the right answer) - log p(the other one): what score mode decides by."""
    import torch

    items = [(e.prompt + e.answers[v][:-1], len(e.prompt)) for e in data for v in (False, True)]
    totals = torch.stack([lp.sum() for lp in _answer_logprobs(model, items, model.config.pad_token_id or 0)])
    signs = torch.tensor([1.0 if e.label else -1.0 for e in data])
    return ((totals[1::2] - totals[0::2]) * signs).sum()


def channel_importance(model, data: list[Encoded]) -> list[dict]:
    """Per layer and norm: d margin / d norm weight x norm weight for each channel, the margin summed
    over `data` -- to first order, the margin lost if the channel were zeroed, which is what rounding its
    tiny columns to nothing does. Signed: a channel whose loss would raise the margin is not one the
    answer leans on."""
    import torch

    model.eval()
    norms = [norm.weight for layer in model.model.layers for norm, _ in _norm_inputs(layer).values()]
    grads = [torch.zeros_like(w) for w in norms]
    for i in range(0, len(data), 16):
        for total, grad in zip(grads, torch.autograd.grad(_margin_sum(model, data[i:i + 16]), norms)):
            total += grad
    scores = iter([grad * w.detach() for grad, w in zip(grads, norms)])
    return [{name: next(scores) for name in _norm_inputs(layer)} for layer in model.model.layers]


def make_outlier_channels(model, data: list[Encoded], channels: int = OUTLIER_CHANNELS,
                          scale: float = OUTLIER_SCALE) -> dict:
    """Give the model the outlier channels of real LLMs, keeping the function it computes.

    Real LLMs have a few hidden channels with huge activations (LLM.int8(), AWQ); the weights that
    read them are small, so a 4-bit group of 128 columns rounds them to nothing unless the method
    sees the activations (GPTQ's Hessian, AWQ's scales). A model trained in seconds has no such
    channels and shrugs off any rounding. Here, for each RMSNorm, the `channels` channels the answer
    leans on most are multiplied by `scale` in the norm's weight and the matching input columns of
    the linears after it are divided by `scale`: the same outputs, now with outlier channels.
    Returns what was done, for demo.json: the scale and the channels of each layer's norms."""
    import torch

    importance = channel_importance(model, data)
    chosen: dict[str, dict[str, list[int]]] = {}
    with torch.no_grad():
        for index, (layer, scores) in enumerate(zip(model.model.layers, importance)):
            chosen[str(index)] = {}
            for name, (norm, linears) in _norm_inputs(layer).items():
                picked = scores[name].topk(channels).indices.sort().values
                norm.weight[picked] *= scale
                for linear in linears:
                    linear.weight[:, picked] /= scale
                chosen[str(index)][name] = picked.tolist()
    return {"scale": scale, "ranked_on": f"{len(data)} validation rows", "channels": chosen}


def _save_model(model, tokenizer, out_dir: Path, accuracy: float) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" says nothing useful here
    model.to(torch.bfloat16)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        f"# qrun demo model\n\n{DISCLAIMER}\n\nQwen2 architecture, {_count_params(model) / 1e6:.1f}M parameters, "
        f"trained from scratch on qrun's synthetic dialogs (demo/dataset.py); held-out accuracy {accuracy:.3f} "
        "on the same synthetic distribution, which says nothing about real conversations.\n")
