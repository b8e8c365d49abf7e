"""Checks on a job's inputs that need no torch: model directories and quantization settings.

The CLI runs these before anything is written, so bad input never leaves a half-made job.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qrun.db.errors import BadInput
from qrun.workers.calibration import MIN_CALIB_TOKENS
from qrun.workers.datasets import json_type_name

# Architectures qrun has run end to end (GPTQModel supports more; widen this list as they are tested).
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2MoeForCausalLM",
}
SUPPORTED_BITS = (2, 3, 4, 8)
# The group sizes GPTQModel 7.7's kernels pack (TorchLinear.SUPPORTS_GROUP_SIZE); any other size
# quantizes and then fails when the layer is packed, at the end of the job.
SUPPORTED_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Sizes in config.json that shape the model: each, when present, must be a positive integer.
SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "moe_intermediate_size", "shared_expert_intermediate_size",
               "max_position_embeddings")
REQUIRED_SIZE_FIELDS = ("num_hidden_layers", "hidden_size")
# Input widths of the quantized linear layers: a group size must divide each one present.
WIDTH_FIELDS = {"hidden size": "hidden_size", "intermediate size": "intermediate_size",
                "MoE intermediate size": "moe_intermediate_size",
                "shared-expert intermediate size": "shared_expert_intermediate_size"}
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors library refuses larger headers too
MAX_ATTEMPTS_LIMIT = 100
# Decoder layers and the token embedding as every architecture qrun supports names them (multimodal
# models put `language_model.` in between); weights named otherwise (remote code) are not checked.
LAYER_NAME = re.compile(r"model\.(?:language_model\.)?layers\.(\d+)\.")
EMBEDDING_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight")
# Tokenizer files that transformers reads as JSON objects.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "added_tokens.json")
# A sample is refused when its characters are more than CONTEXT_FACTOR times the model's context at
# CHARS_PER_TOKEN characters a token: far past what the model reads, whatever its tokenizer (about 4
# characters a token in English, 1.5 in Chinese). Shorter ones over the context are scored with a warning.
CONTEXT_FACTOR = 8
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    has_safetensors: bool
    needs_remote_code: bool
    widths: tuple[tuple[str, int], ...] = ()  # (name, input width) of the quantized layers
    quantized: bool = False  # already a GPTQ (or other quantized) checkpoint
    max_positions: int = 0  # max_position_embeddings: the context in tokens (0: not stated)


def read_model_config(model_dir: Path) -> dict:
    check_link(model_dir, f"model directory {model_dir}")
    if not model_dir.exists():
        raise BadInput(f"model directory {model_dir} does not exist: pass a local model directory "
                       "(qrun downloads nothing)")
    if not model_dir.is_dir():
        raise BadInput(f"model {model_dir} is not a directory: pass the directory holding config.json")
    if not os.access(model_dir, os.R_OK | os.X_OK):  # else is_file() below raises PermissionError
        raise BadInput(f"model directory {model_dir} is not readable: check its permissions (chmod a+rx)")
    for entry in sorted(model_dir.iterdir()):
        check_link(entry, f"model directory {model_dir}: {entry.name}")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise BadInput(f"model directory {model_dir} has no config.json: is it a Hugging Face model directory?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise BadInput(f"model config {config_file} is not readable: check its permissions") from exc
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadInput(f"model config {config_file} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadInput(f"model config {config_file} is not valid JSON: nested too deeply") from exc
    if not isinstance(config, dict):
        raise BadInput(f"model config {config_file} must be a JSON object ({{...}}), found {json_type_name(config)}: "
                       "is it a Hugging Face config.json?")
    return config


def check_link(path: Path, what: str) -> None:
    """BadInput naming `what` when `path` is a symbolic link that leads nowhere: a loop, or a missing
    target. Python's is_file() and exists() call both "not there", which named the wrong cause."""
    if not path.is_symlink():
        return
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInput(f"{what} is a symlink loop ({path} -> {os.readlink(path)} leads back to itself): "
                           "point the link at the real file or directory") from exc
        if exc.errno == errno.ENOENT:
            raise BadInput(f"{what} is a symlink to {os.readlink(path)}, which does not exist: "
                           "fix the link or copy the file in") from exc
        raise BadInput(f"{what} is a symlink that cannot be followed ({exc.strerror}): fix the link") from exc


def read_architecture(config: dict, config_file: Path) -> str:
    """The model class named first in `architectures`, or "" when none is named.

    A string instead of a list is refused, not read: transformers and GPTQModel index the field
    (architectures[0]), so "Qwen2ForCausalLM" would reach the job as the class "Q".
    """
    architectures = config.get("architectures")
    if architectures is None:
        return ""
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise BadInput(f"model config {config_file}: 'architectures' must be a list of class names, like "
                       f'["Qwen2ForCausalLM"], found {json.dumps(architectures)[:80]}')
    return architectures[0] if architectures else ""


def read_sizes(config: dict, config_file: Path, *, required: tuple[str, ...] = REQUIRED_SIZE_FIELDS) -> dict[str, int]:
    """The model's shape from config.json (text_config for multimodal models), every size a positive integer.

    `required`: the sizes that must be there (models with their own code may name them otherwise).
    """
    text = config.get("text_config")
    text = config if text is None else text
    if not isinstance(text, dict):
        raise BadInput(f"model config {config_file}: 'text_config' must be a JSON object, found {json_type_name(text)}")
    sizes = {}
    for name in SIZE_FIELDS:
        if name not in text:
            if name in required:
                raise BadInput(f"model config {config_file} has no {name}: is it a complete Hugging Face config.json?")
            continue
        value = text[name]
        # bool is an int in Python, and JSON's 12.0 is a float: neither is a layer count.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BadInput(f"model config {config_file}: {name} must be a positive integer, found "
                           f"{json.dumps(value)[:40]}: fix config.json")
        sizes[name] = value
    return sizes


def check_safetensors_file(path: Path) -> dict:
    """The header of `path` ({tensor name: {dtype, shape, data_offsets}}), or BadInput unless it is a
    whole safetensors file, judged by its header alone (no tensor is read).

    Layout: 8 bytes (little-endian header length N), N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}, then the data, which must reach the
    largest `end`. A 0-byte, cut-off or foreign file would otherwise pass submit and fail the job.
    """
    fix = "re-download or re-save the model"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            declared = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
            if declared is None or declared > min(size - 8, SAFETENSORS_MAX_HEADER):
                header_bytes = None
            else:
                header_bytes = f.read(declared)
    except PermissionError as exc:
        raise BadInput(f"weights file {path} is not readable: check its permissions") from exc
    except OSError as exc:
        raise BadInput(f"weights file {path} cannot be read ({exc.strerror or exc}): {fix}") from exc
    if declared is None:
        raise BadInput(f"weights file {path} is {size} bytes, too short for a safetensors header: {fix}")
    if header_bytes is None:
        raise BadInput(f"weights file {path} is not a safetensors file or is truncated: its header claims "
                       f"{declared} bytes, the file has {size}: {fix}")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"weights file {path} has a header that is not JSON: is it a safetensors file? {fix}") from exc
    if not isinstance(header, dict):
        raise BadInput(f"weights file {path} has a header that is {json_type_name(header)}, not an object: {fix}")
    data_end = _safetensors_data_end(header, path)
    if 8 + declared + data_end > size:
        raise BadInput(f"weights file {path} is truncated: its header describes {8 + declared + data_end} bytes, "
                       f"the file has {size}: {fix}")
    return header


def _safetensors_data_end(header: dict, path: Path) -> int:
    """Where the last tensor's data ends, relative to the end of the header."""
    end = 0
    tensors = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = (isinstance(offsets, list) and len(offsets) == 2
                 and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                 and offsets[0] <= offsets[1])
        if not valid:
            raise BadInput(f"weights file {path}: tensor {name[:60]!r} has no valid data_offsets in the header: "
                           "the file is damaged, re-download or re-save the model")
        end = max(end, offsets[1])
        tensors += 1
    if not tensors:
        raise BadInput(f"weights file {path} holds no tensors: re-download or re-save the model")
    return end


def inspect_model(path: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool | None = False,
                  allow_gguf: bool = False) -> ModelInfo:
    """Everything a quantize or eval job needs to know about a model directory, or BadInput.
    allow_pickle=None: pickle weights are refused with no mention of --allow-pickle (a command without it).
    allow_gguf: a llama.cpp `.gguf` file counts as the weights (an artifact of `--method gguf`, which
    `qrun eval` can load; nothing quantizes from one)."""
    if not str(path).strip():
        raise BadInput("model directory '' is an empty path: give the directory holding config.json")
    model_dir = Path(path)
    config = read_model_config(model_dir)
    config_file = model_dir / "config.json"
    arch = read_architecture(config, config_file)
    needs_remote_code = "auto_map" in config
    sizes = read_sizes(config, config_file, required=() if needs_remote_code else REQUIRED_SIZE_FIELDS)
    if needs_remote_code and not trust_remote_code:
        raise BadInput(
            f"model {model_dir} ships its own code (auto_map in config.json): review it, then pass "
            "--trust-remote-code to run it"
        )
    if arch not in SUPPORTED_ARCHITECTURES and not needs_remote_code:
        raise BadInput(
            f"model {model_dir} has architecture {arch or 'unknown'!s}, which qrun does not support: "
            f"use one of {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    weights = sorted(p for p in model_dir.iterdir() if p.is_file())
    has_safetensors = any(p.suffix == ".safetensors" for p in weights)
    has_pickle = any(p.suffix in PICKLE_SUFFIXES for p in weights)
    has_gguf = allow_gguf and any(p.suffix == ".gguf" for p in weights)
    if not has_safetensors and not has_pickle and not has_gguf:
        raise BadInput(f"model directory {model_dir} holds no weights (*.safetensors"
                       + (" or a .gguf file)" if allow_gguf else ")"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise BadInput(
            f"model {model_dir} has only pickle weights (.bin), which can run code when loaded: convert them "
            "to safetensors" + (", or pass --allow-pickle if you trust the source" if allow_pickle is False else "")
        )
    tensors = {}  # name -> (file, header entry), over every safetensors file
    for weights_file in (p for p in weights if p.suffix == ".safetensors"):
        header = check_safetensors_file(weights_file)
        tensors |= {name: (weights_file, entry) for name, entry in header.items() if name != "__metadata__"}
    check_layers_against_weights(config_file, sizes.get("num_hidden_layers"), tensors)
    check_vocab_against_embedding(config_file, sizes.get("vocab_size"), tensors)
    check_shard_index(model_dir)
    if not has_gguf:  # a .gguf file carries its own tokenizer
        check_tokenizer_files(model_dir, weights)
    return ModelInfo(
        path=str(model_dir.resolve()),
        architecture=arch,
        num_layers=sizes.get("num_hidden_layers", 0),
        hidden_size=sizes.get("hidden_size", 0),
        intermediate_size=sizes.get("intermediate_size", 0),
        has_safetensors=has_safetensors,
        needs_remote_code=needs_remote_code,
        widths=tuple((label, sizes[name]) for label, name in WIDTH_FIELDS.items() if name in sizes),
        quantized="quantization_config" in config or (model_dir / "quantize_config.json").is_file() or has_gguf,
        max_positions=sizes.get("max_position_embeddings", 0),
    )


def check_layers_against_weights(config_file: Path, num_layers: int | None, tensors: dict) -> None:
    """BadInput when config.json asks for decoder layers that the weights do not hold, judged by the
    tensors' names (model.layers.N.*): a copied config of a larger model, or weights cut short, would
    otherwise fail in the job (or allocate a billion layers). Extra layers (a multi-token head) pass."""
    present = {int(match.group(1)) for match in map(LAYER_NAME.match, tensors) if match}
    if not present or num_layers is None:
        return
    if num_layers > len(present) or any(i not in present for i in range(num_layers)):
        held = f"layers 0 to {max(present)}" if len(present) == max(present) + 1 else \
            f"layers {', '.join(map(str, sorted(present)[:8]))}" + (", ..." if len(present) > 8 else "")
        raise BadInput(f"model config {config_file}: num_hidden_layers is {num_layers}, but the weights hold "
                       f"{len(present)} decoder layers ({held}): fix num_hidden_layers, or re-download the "
                       "weights if they are incomplete")


def check_vocab_against_embedding(config_file: Path, vocab_size: int | None, tensors: dict) -> None:
    """BadInput when config.json's vocab_size is not the token embedding's row count (its shape in the
    safetensors header): transformers refuses the weights when it loads them, in the job."""
    name = next((n for n in EMBEDDING_NAMES if n in tensors), None)
    if name is None or vocab_size is None:
        return
    path, entry = tensors[name]
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(n, int) for n in shape):
        raise BadInput(f"weights file {path}: the embedding {name} has shape {json.dumps(shape)[:40]}, not "
                       "[vocab, hidden]: the file is damaged, re-download or re-save the model")
    if shape[0] != vocab_size:
        raise BadInput(f"model config {config_file}: vocab_size is {vocab_size}, but the embedding {name} in "
                       f"{path.name} has {shape[0]} rows: set vocab_size to {shape[0]}, or use the config the "
                       "weights were saved with")


def check_sample_lengths(path: str | Path, what: str, max_positions: int) -> None:
    """BadInput naming the line of the first sample (eval or calibration) longer than CONTEXT_FACTOR times
    the model's context (max_positions tokens, at CHARS_PER_TOKEN characters a token): such a sample
    only fails inside the job, where its size reads as running out of memory. 0: no context stated."""
    from qrun.workers.datasets import read_rows, to_sample

    if not max_positions:
        return
    limit = CONTEXT_FACTOR * CHARS_PER_TOKEN * max_positions
    path = Path(path)
    for lineno, row in read_rows(path):
        sample = to_sample(path, lineno, row)
        length = sum(len(m["content"]) for m in sample.messages) + len(sample.answer or "") + len(sample.text or "")
        if length > limit:
            raise BadInput(f"{what} {path}:{lineno}: a sample of {length:,} characters is over {CONTEXT_FACTOR} times "
                           f"the model's context of {max_positions} tokens (max_position_embeddings): shorten or "
                           "split it")


def _is_tokenizer_file(path: Path) -> bool:
    name = path.name
    return (name.startswith(("tokenizer", "vocab", "spiece")) or name == "merges.txt"
            or path.suffix in (".tiktoken", ".model")) and name != "tokenizer_config.json"


def check_tokenizer_files(model_dir: Path, files: list[Path]) -> None:
    """A model directory must carry its tokenizer: every job reads it (calibration, prompts), and a
    quantized artifact without one could not be evaluated. Its files must be readable."""
    tokenizer_files = [p for p in files if _is_tokenizer_file(p)]
    if not tokenizer_files:
        raise BadInput(f"model {model_dir} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json): copy "
                       "the tokenizer files of the model it was trained from into it")
    for path in tokenizer_files:
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as exc:
            raise BadInput(f"model {model_dir}: tokenizer file {path.name} cannot be read ({exc.strerror})") from exc
    for path in (p for p in files if p.name in TOKENIZER_JSON_FILES):
        check_json_object(path, "tokenizer file")


def check_json_object(path: Path, what: str) -> None:
    """BadInput unless `path` holds one JSON object: transformers reads these files as dicts, and
    anything else fails the job with a KeyError or an AttributeError."""
    fix = "copy it again from the model it came from"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise BadInput(f"{what} {path} is not readable: check its permissions") from exc
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadInput(f"{what} {path} is not valid JSON: {fix}") from exc
    if not isinstance(value, dict):
        raise BadInput(f"{what} {path} must be a JSON object ({{...}}), found {json_type_name(value)}: {fix}")


def quantized_variant(model_dir: str | Path) -> str:
    """The variant label (workers.params.QuantizeParams.label) of a quantized model directory, read from its
    files: a llama.cpp .gguf file (its file type), GPTQModel's quantize_config.json (gptq, awq, fp8; rtn is
    GPTQ's format with a weight-only record), transformers' quantization_config (bnb-nf4); "baseline" for
    an unquantized model."""
    from qrun.workers import methods
    from qrun.workers.params import BASELINE, QuantizeParams

    model_dir = Path(model_dir)
    gguf_files = sorted(model_dir.glob("*.gguf"))
    if gguf_files:
        return methods.with_artifact(methods.Artifact.GGUF).typed_name(gguf_file_type(gguf_files[0]))
    config = read_quantize_config(model_dir)
    if config is not None:
        method = methods.checkpoint_method(config) or methods.METHODS[methods.DEFAULT_METHOD]
        settings = {key: config[key] for key in ("bits", "group_size", "desc_act", "sym") if key in config}
        return QuantizeParams.from_dict(settings | {"method": method.name}).label()
    method = methods.hf_quantized_method(read_model_config(model_dir).get("quantization_config") or {})
    return BASELINE if method is None else method.variant_name()


def gguf_file_type(path: Path) -> str:
    """The quant type a .gguf file names (general.file_type), as --gguf-type spells it: q4_k_m, q8_0."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).get_field("general.file_type")
        file_type = gguf.LlamaFileType(int(field.parts[field.data[0]][0]))
    except Exception as exc:  # noqa: BLE001 -- a truncated or foreign file: say which
        raise BadInput(f"GGUF file {path} names no quant type that qrun reads ({exc})") from exc
    return file_type.name.removeprefix("MOSTLY_").lower()


def check_quantizable(info: ModelInfo) -> None:
    """A quantized checkpoint (a qrun artifact, a GPTQ download) cannot be quantized again."""
    if info.quantized:
        raise BadInput(f"model {info.path} is already quantized (quantization_config in config.json): "
                       "quantize the original model, or evaluate this one with `qrun eval`")


def read_quantize_config(model_dir: str | Path) -> dict | None:
    """A quantized model's quantize_config.json ({bits, group_size, ...}), None if there is none, or BadInput."""
    path = Path(model_dir) / "quantize_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise BadInput(f"quantize config {path} is not readable: check its permissions") from exc
    except (OSError, ValueError, RecursionError) as exc:
        raise BadInput(f"quantize config {path} is not valid JSON: re-save the quantized model") from exc
    bits = config.get("bits") if isinstance(config, dict) else None
    group_size = config.get("group_size", 128) if isinstance(config, dict) else None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (bits, group_size)):
        raise BadInput(f"quantize config {path} must be an object with integer bits and group_size: "
                       "re-save the quantized model")
    return config


def check_shard_index(model_dir: Path) -> None:
    """A sharded model's index (model.safetensors.index.json) must parse and every shard it names exist."""
    index_file = model_dir / "model.safetensors.index.json"
    if not index_file.is_file():
        return
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise BadInput(f"shard index {index_file} is not readable: check its permissions") from exc
    except (OSError, ValueError, RecursionError) as exc:
        raise BadInput(f"shard index {index_file} is not valid JSON: re-download or re-save the model") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BadInput(f"shard index {index_file} has no weight_map of tensor -> file names: "
                       "re-download or re-save the model")
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or not (model_dir / shard).is_file():
            raise BadInput(f"shard index {index_file} names {shard[:80]!r}, which is not in {model_dir}: "
                           "the model is incomplete, re-download it")


def check_quantize_settings(info: ModelInfo, bits: int, group_size: int, damp: float,
                            bits_of: tuple[int, ...] = SUPPORTED_BITS) -> None:
    """BadInput unless GPTQModel can quantize this model with these settings and load the result back.
    bits_of: the widths the method takes (GPTQ's by default)."""
    if bits not in bits_of:
        raise BadInput(f"--bits {bits} is not supported: use one of {', '.join(map(str, bits_of))}")
    if group_size != -1 and group_size <= 0:
        raise BadInput(f"--group-size {group_size} must be positive, or -1 for one group per column")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise BadInput(f"--group-size {group_size} is not supported by GPTQModel's kernels: use one of "
                       f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
    if group_size != -1:
        for name, width in info.widths or (("hidden size", info.hidden_size),
                                           ("intermediate size", info.intermediate_size)):
            if width and width % group_size:
                raise BadInput(
                    f"--group-size {group_size} does not divide the model's {name} {width}: "
                    "pick a divisor such as 32, 64 or 128, or -1"
                )
    if not 0 < damp < 1:
        raise BadInput(f"--damp {damp} must lie between 0 and 1 (0.01 is the usual start)")


def check_calibration_settings(calib_samples: int, calib_max_len: int) -> None:
    """Counts that make a calibration set: positive, and samples long enough for GPTQModel to keep."""
    check_job_counts(calib_samples=calib_samples, calib_max_len=calib_max_len)
    if calib_max_len < MIN_CALIB_TOKENS:
        raise BadInput(f"--calib-max-len {calib_max_len} is below {MIN_CALIB_TOKENS}: samples shorter than "
                       f"{MIN_CALIB_TOKENS} tokens are dropped, so none would be left; use 256 or more")


def check_job_counts(**counts: int) -> None:
    """Each count (keyword: the option's name without dashes, underscores for dashes) must be positive."""
    for key, value in counts.items():
        option = "--" + key.replace("_", "-")
        if value <= 0:
            raise BadInput(f"{option} {value} must be positive")
        if key == "max_attempts" and value > MAX_ATTEMPTS_LIMIT:
            raise BadInput(f"{option} {value} is more than {MAX_ATTEMPTS_LIMIT}: a job that fails that often "
                           "will not succeed; use a small number like 3")


MAX_GPUS_PER_JOB = 64  # more GPUs than any one machine has: a typo


def check_gpus_per_job(gpus: int) -> None:
    """A job holds 1..64 GPUs of one node (several: a model too big for one card)."""
    if not 1 <= gpus <= MAX_GPUS_PER_JOB:
        raise BadInput(f"--gpus-per-job {gpus} must lie between 1 and {MAX_GPUS_PER_JOB} "
                       "(GPUs of one node a job holds)")


def config_dtype(model_dir: str | Path) -> str | None:
    """The dtype a model's config.json names ("bfloat16", "float16", ...; transformers 4 wrote it as
    torch_dtype, 5 as dtype), None where it names none or cannot be read."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = (config.get("torch_dtype") or config.get("dtype")) if isinstance(config, dict) else None
    return str(dtype).removeprefix("torch.") if dtype else None
