"""Checks on a job's inputs that need no torch: model directories and quantization settings.

The CLI runs these before anything is written, so bad input never leaves a half-made job.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qrun.db.errors import BadInput

# Architectures qrun has run end to end (GPTQModel supports more; widen this list as they are tested).
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2MoeForCausalLM",
}
SUPPORTED_BITS = (2, 3, 4, 8)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    has_safetensors: bool
    needs_remote_code: bool


def read_model_config(model_dir: Path) -> dict:
    if not model_dir.exists():
        raise BadInput(f"model directory {model_dir} does not exist: pass a local model directory "
                       "(qrun downloads nothing)")
    if not model_dir.is_dir():
        raise BadInput(f"model {model_dir} is not a directory: pass the directory holding config.json")
    if not os.access(model_dir, os.R_OK | os.X_OK):  # else is_file() below raises PermissionError
        raise BadInput(f"model directory {model_dir} is not readable: check its permissions (chmod a+rx)")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise BadInput(f"model directory {model_dir} has no config.json: is it a Hugging Face model directory?")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise BadInput(f"model config {config_file} is not readable: check its permissions") from exc
    except (OSError, ValueError) as exc:
        raise BadInput(f"model config {config_file} is not valid JSON: {exc}") from exc


def inspect_model(path: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> ModelInfo:
    """Everything a quantize or eval job needs to know about a model directory, or BadInput."""
    model_dir = Path(path)
    config = read_model_config(model_dir)
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else ""
    needs_remote_code = "auto_map" in config
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
    weights = [p for p in model_dir.iterdir() if p.is_file()]
    has_safetensors = any(p.suffix == ".safetensors" for p in weights)
    has_pickle = any(p.suffix in PICKLE_SUFFIXES for p in weights)
    if not has_safetensors and not has_pickle:
        raise BadInput(f"model directory {model_dir} holds no weights (*.safetensors)")
    if not has_safetensors and not allow_pickle:
        raise BadInput(
            f"model {model_dir} has only pickle weights (.bin), which can run code when loaded: convert them "
            "to safetensors, or pass --allow-pickle if you trust the source"
        )
    text = config.get("text_config") or config
    return ModelInfo(
        path=str(model_dir.resolve()),
        architecture=arch,
        num_layers=int(text.get("num_hidden_layers", 0)),
        hidden_size=int(text.get("hidden_size", 0)),
        intermediate_size=int(text.get("intermediate_size", 0)),
        has_safetensors=has_safetensors,
        needs_remote_code=needs_remote_code,
    )


def check_quantize_settings(info: ModelInfo, bits: int, group_size: int, damp: float) -> None:
    if bits not in SUPPORTED_BITS:
        raise BadInput(f"--bits {bits} is not supported: use one of {', '.join(map(str, SUPPORTED_BITS))}")
    if group_size != -1 and group_size <= 0:
        raise BadInput(f"--group-size {group_size} must be positive, or -1 for one group per column")
    if group_size != -1:
        for name, width in (("hidden size", info.hidden_size), ("intermediate size", info.intermediate_size)):
            if width and width % group_size:
                raise BadInput(
                    f"--group-size {group_size} does not divide the model's {name} {width}: "
                    "pick a divisor such as 32, 64 or 128, or -1"
                )
    if not 0 < damp < 1:
        raise BadInput(f"--damp {damp} must lie between 0 and 1 (0.01 is the usual start)")
