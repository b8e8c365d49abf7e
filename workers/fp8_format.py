"""FP8 as compressed-tensors stores it: GPTQModel's FP8 checkpoint rewritten so that transformers (with
the compressed-tensors package) and vLLM load it.

GPTQModel writes each quantized linear layer as `weight` (float8_e4m3fn) and `weight_scale_inv` (one
float32 per output row; the weight is `weight / weight_scale_inv`), and names the format
`quant_method: fp8`, which transformers reads as its own 128x128-block format and fails to load.
compressed-tensors' `float-quantized` format with a `channel` strategy holds the same numbers as
`weight` and `weight_scale` (shape [rows, 1]; the weight is `weight * weight_scale`): vLLM runs it as
its W8A16 FP8 scheme, transformers dequantizes it on the first forward pass. The layers left in full
precision (lm_head, anything GPTQModel skipped) are listed under `ignore`.
"""

from __future__ import annotations

import json
from pathlib import Path

SCALE_INV = ".weight_scale_inv"
SCALE = ".weight_scale"
INDEX = "model.safetensors.index.json"  # sharded checkpoints: tensor name -> file
GPTQMODEL_FILES = ("quantize_config.json",)  # GPTQModel's own description of the format, no longer true


def quantization_config(ignore: list[str]) -> dict:
    """config.json's quantization_config: FP8 e4m3 weights with a static scale per output channel,
    activations unquantized, built with compressed-tensors' own classes (what its loaders parse)."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus)

    weights = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                quant_method="compressed-tensors", format="float-quantized",
                                quantization_status=QuantizationStatus.COMPRESSED, ignore=sorted(ignore))
    return config.model_dump()


def unquantized_linears(model) -> list[str]:
    """Names of the linear layers GPTQModel left in full precision (still torch's nn.Linear)."""
    import torch

    return [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]


def rewrite_tensors(path: Path) -> dict[str, str]:
    """Rewrite one safetensors file in place: each `weight_scale_inv` becomes `weight_scale`, its
    reciprocal as a column; the other tensors as they are. Returns {old name: new name} of renamed ones."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors, renamed = {}, {}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        for key in f.keys():
            tensor = f.get_tensor(key)
            if key.endswith(SCALE_INV):
                new = key[: -len(SCALE_INV)] + SCALE
                tensors[new] = torch.reciprocal(tensor.to(torch.float32)).reshape(-1, 1).contiguous()
                renamed[key] = new
            else:
                tensors[key] = tensor
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})
    tmp.replace(path)
    return renamed


def rename_in_index(directory: Path, renamed: dict[str, str]) -> None:
    index_path = directory / INDEX
    if not index_path.is_file():
        return
    index = json.loads(index_path.read_text())
    index["weight_map"] = {renamed.get(k, k): v for k, v in index.get("weight_map", {}).items()}
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def to_compressed_tensors(directory: Path, ignore: list[str]) -> None:
    """Turn GPTQModel's FP8 checkpoint in `directory` into compressed-tensors' FP8, in place (a staging
    directory: nothing is published before this finished). ignore: the linear layers not quantized."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"GPTQModel wrote no safetensors into {directory}")
    renamed: dict[str, str] = {}
    for path in files:
        renamed |= rewrite_tensors(path)
    if not renamed:
        raise RuntimeError(f"no FP8 weight scales ({SCALE_INV}) in {directory}: not GPTQModel's FP8 checkpoint")
    rename_in_index(directory, renamed)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config(ignore)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for name in GPTQMODEL_FILES:
        (directory / name).unlink(missing_ok=True)
