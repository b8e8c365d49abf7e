"""The quantize job: one method per job (workers.methods), each through the library its users use.

- gptq, awq: GPTQModel, calibrated, layer by layer, with progress reported between layers.
- rtn, fp8: GPTQModel's weight-only path (RTNConfig: GPTQ-format int weights, no calibration;
  FP8Config: float8_e4m3fn weights with one scale per output row, then rewritten as compressed-tensors'
  FP8, which transformers and vLLM read: workers/fp8_format.py).
- gguf: GPTQModel's GGUF quantizer (GGUFConfig), its blocks then written into one llama.cpp `.gguf`
  file (the `gguf` package's writer) beside the tokenizer; GPTQModel's own checkpoint is not kept.
- bnb-nf4: transformers' BitsAndBytesConfig (NF4, double quantization), as QLoRA loads a model,
  saved with save_pretrained (safetensors that transformers loads back as 4-bit). GPTQModel's own
  bitsandbytes checkpoint uses other tensor names and neither transformers nor GPTQModel 7.7 loads it.

Every artifact ends with its manifest and model card (workers/card.py).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

from qrun.db.errors import BadInput
from qrun.workers import card, fp8_format, methods
from qrun.workers.calibration import MIN_CALIB_TOKENS, calibration_texts, tokenize_calibration
from qrun.workers.engine import DEFAULT_ENGINE, Engine, gptq_speedups, gptqmodel_options, stage_times
from qrun.workers.params import QuantizeParams

log = logging.getLogger("qrun.quantize")

# progress(layers_done, layers_total, module_now) -- raises to stop the job between layers.
Progress = Callable[[int, int, str | None], None]


class _LayerProgress:
    """GPTQModel's layer and subset callbacks, turned into progress(done, total, module)."""

    def __init__(self, total: int, progress: Progress):
        self.total = total
        self.progress = progress
        self.module: str | None = None

    def subset_event(self, *, stage, layer_idx, module_names, **_):
        if stage == "quant_start":
            self.module = f"layer {layer_idx}: {', '.join(module_names)}"
            self.progress(layer_idx, self.total, self.module)

    def layer_complete(self, *, layer_idx, submodule_finalized):
        if submodule_finalized:
            self.progress(layer_idx + 1, self.total, None)


def _layer_losses(quant_log: Path, in_memory: list | None) -> list[float]:
    rows = in_memory or []
    if not rows and quant_log.exists():
        with quant_log.open() as f:
            rows = list(csv.DictReader(f))
    losses = []
    for row in rows:
        value = str(row.get("loss", "nan"))
        try:  # the weight-only path writes "rtn: 0.0018997" (its method, then the mean absolute error)
            losses.append(float(value.rsplit(":", 1)[-1]))
        except (TypeError, ValueError):
            pass
    return [x for x in losses if x == x]  # drop NaN


def act_group_aware_option(params: QuantizeParams) -> dict:
    """GPTQModel's act_group_aware setting for these params, where its default cannot work.

    GPTQModel 7.7 turns act_group_aware on by default for GPTQ, and that ordering needs groups:
    with group_size -1 (one group per column) every job failed at its first module ("act_group_aware=True
    requires group_size > 0"). With desc_act it is switched off anyway (with a warning); say so
    explicitly. Otherwise GPTQModel's default stands.
    """
    if params.group_size == -1 or params.desc_act:
        return {"act_group_aware": False}
    return {}


def check_device(params: QuantizeParams, device: str) -> None:
    """A method the table says needs a GPU (or a newer one) fails at once, in one line, elsewhere.
    The queue routes such jobs to GPU workers only; this is the worker's own guard."""
    import torch

    method = params.spec
    if not method.needs_gpu and method.min_compute_capability is None:
        return
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise BadInput(f"--method {method.name} needs a CUDA GPU and this worker runs on {device}: "
                       "run it on a GPU worker")
    if method.min_compute_capability is not None:
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if major + minor / 10 < method.min_compute_capability:
            gpu = torch.cuda.get_device_name(torch.device(device))
            raise BadInput(f"--method {method.name} needs a GPU of compute capability "
                           f"{method.min_compute_capability:g} or more; {gpu} has {major}.{minor}")


def quantize_model(params: QuantizeParams, model_dir: str, out_dir: Path, device: str, num_layers: int,
                   progress: Progress, offload_dir: Path | None = None,
                   engine: Engine = DEFAULT_ENGINE) -> dict[str, float]:
    """Quantize model_dir into out_dir (which must exist) with the job's method; return the job's metrics.

    offload_dir: where GPTQModel parks finished modules, if it offloads (workers.engine decides;
    default: a temporary directory of its own). engine: how GPTQModel is driven (speed, not result).
    """
    import torch

    check_device(params, device)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if params.spec.gptqmodel_config is None:
        metrics = _quantize_bnb_nf4(params, model_dir, out_dir, device, num_layers, progress)
    else:
        metrics = _quantize_gptqmodel(params, model_dir, out_dir, device, num_layers, progress, offload_dir, engine)
    metrics["wall_s"] = time.perf_counter() - started
    metrics["bits"] = params.bits
    if params.spec.grouped:
        metrics["group_size"] = params.group_size
    if on_gpu:
        metrics["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    # The worker process's peak resident memory so far (Linux counts KiB): this job's, unless an
    # earlier job in the same worker took more.
    metrics["process_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    card.write_new_card(params, model_dir, out_dir, metrics, device)
    return metrics


def gptqmodel_config(params: QuantizeParams, engine_options: dict | None = None):
    """GPTQModel's quantize config for the job's method: the class the method table names, given the
    settings the method takes (bnb-nf4 goes through transformers instead). engine_options: where
    GPTQModel keeps finished modules and activations (workers.engine)."""
    from gptqmodel.quantization import config as configs

    method = params.spec
    if method.gptqmodel_config is None:
        raise ValueError(f"method {method.name!r} is not quantized through GPTQModel")
    return getattr(configs, method.gptqmodel_config)(**config_settings(params), **(engine_options or {}))


def config_settings(params: QuantizeParams) -> dict:
    """The keywords of a method's GPTQModel config: bits, group and symmetry where it has groups (gptq,
    awq: GEMM format, rtn: GPTQ format); GPTQ's column order and dampening; a quant type's name in
    place of bits (gguf); none for fp8 (e4m3 weights, one scale per output row, no activation scales)."""
    takes = params.spec.takes
    settings: dict = {}
    if methods.GROUP_SIZE in takes:
        settings |= {"bits": params.bits, "group_size": params.group_size, "sym": params.sym}
    if methods.DESC_ACT in takes:
        settings |= {"desc_act": params.desc_act, "true_sequential": params.true_sequential,
                     "static_groups": params.static_groups, **act_group_aware_option(params)}
    if methods.DAMP in takes:
        settings["damp_percent"] = params.damp_percent
    if methods.QUANT_TYPE in takes:
        settings["bits"] = params.quant_type
    return settings


def _quantize_gptqmodel(params: QuantizeParams, model_dir: str, out_dir: Path, device: str, num_layers: int,
                        progress: Progress, offload_dir: Path | None, engine: Engine) -> dict[str, float]:
    from gptqmodel import GPTQModel
    from transformers import AutoTokenizer

    method = params.spec
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=params.trust_remote_code)
    if tokenizer.pad_token is None:  # GPTQModel pads batches; a missing pad token breaks batch_size > 1
        tokenizer.pad_token = tokenizer.eos_token
    calibration = None
    if method.calibrated:
        samples, fallback = calibration_texts(params.calib, params.calib_samples)
        if fallback:
            log.warning("no calibration file given: using qrun's built-in generic text; in-domain data is better")
        calibration = tokenize_calibration(samples, tokenizer, params.calib_max_len)
        if not calibration:
            raise ValueError(f"calibration data {params.calib or '(built-in)'} has no sample of "
                             f"{MIN_CALIB_TOKENS} tokens or more")
    config = gptqmodel_config(params, gptqmodel_options(engine, model_dir, device, calibration, offload_dir))
    progress(0, num_layers, "loading model")
    load_start = time.perf_counter()
    model = GPTQModel.load(model_dir, config, device=device, trust_remote_code=params.trust_remote_code)
    load_s = time.perf_counter() - load_start
    # Calibrated methods report each layer; GPTQModel's weight-only path (rtn, fp8, gguf) calls no
    # callback: its whole pass is one step (seconds), and a cancel reaches it before saving.
    callbacks = _LayerProgress(num_layers, progress)
    model.layer_callback = callbacks
    model.subset_callback = callbacks
    if not method.calibrated:
        progress(0, num_layers, f"{method.name}: all layers")
    quant_start = time.perf_counter()
    speedups = gptq_speedups(engine) if method.engine_speedups else contextlib.nullcontext()
    with speedups:
        model.quantize(calibration, batch_size=params.batch_size, tokenizer=tokenizer)
    quantize_s = time.perf_counter() - quant_start
    progress(num_layers, num_layers, "saving")
    save_start = time.perf_counter()
    if method.artifact is methods.Artifact.GGUF:
        checkpoint = out_dir / ".gptqmodel-gguf"  # GPTQModel's GGUF blocks, repacked into one .gguf file
        model.save(str(checkpoint))
        tokenizer.save_pretrained(str(checkpoint))
        write_gguf_file(checkpoint, out_dir / GGUF_FILE, params.quant_type, Path(model_dir).name)
        copy_hf_config(checkpoint, out_dir)
        losses = _layer_losses(checkpoint / "quant_log.csv", getattr(model, "quant_log", None))
        shutil.rmtree(checkpoint)
    else:
        model.save(str(out_dir))
        losses = _layer_losses(out_dir / "quant_log.csv", getattr(model, "quant_log", None))
        if method.rewrite_as == methods.COMPRESSED_TENSORS:
            fp8_format.to_compressed_tensors(out_dir, fp8_format.unquantized_linears(model.model))
    tokenizer.save_pretrained(str(out_dir))
    save_s = time.perf_counter() - save_start
    metrics = {"load_s": load_s, "quantize_s": quantize_s, "save_s": save_s,
               # rtn/fp8/gguf: mean absolute weight error per module (GPTQModel's quant log); gptq/awq: layer loss
               "loss_mean": sum(losses) / len(losses) if losses else None,
               "loss_max": max(losses) if losses else None, **stage_times(model)}
    if calibration is not None:
        metrics["calib_samples"] = len(calibration)
        metrics["calib_tokens"] = sum(len(r["input_ids"]) for r in calibration)
    return metrics


def _quantize_bnb_nf4(params: QuantizeParams, model_dir: str, out_dir: Path, device: str, num_layers: int,
                      progress: Progress) -> dict[str, float]:
    """NF4 with double quantization, bf16 compute: transformers' BitsAndBytesConfig quantizes while
    loading (as QLoRA and seed 002 load a model); save_pretrained keeps the 4-bit weights and their
    quantization state as safetensors, and the config that makes from_pretrained load them as 4-bit."""
    import torch

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise BadInput("--method bnb-nf4 needs the bitsandbytes package on the worker: "
                       "pip install 'qrun-quant[bnb]'") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=params.trust_remote_code)
    progress(0, num_layers, "loading model (bitsandbytes quantizes while loading)")
    load_start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb_nf4_config(), dtype=torch.bfloat16,
        device_map={"": device}, trust_remote_code=params.trust_remote_code)
    quantize_s = time.perf_counter() - load_start  # loading is the quantization
    progress(num_layers, num_layers, "saving")
    save_start = time.perf_counter()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    save_s = time.perf_counter() - save_start
    del model
    return {"load_s": quantize_s, "quantize_s": quantize_s, "save_s": save_s}


def bnb_nf4_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


# ---------------------------------------------------------------- GGUF: GPTQModel's blocks in a llama.cpp file

GGUF_FILE = "model.gguf"

# qrun's --gguf-type -> (the ggml tensor type of the quantized linear layers, llama.cpp's file type name).
# GPTQModel 7.7 packs every linear layer of a type in that type's blocks (q4_k_m: Q4_K everywhere;
# llama-quantize would give some layers Q6_K); embeddings stay F16, norms and biases F32.
GGUF_TENSOR_TYPES = {
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_k_s": ("Q4_K", "MOSTLY_Q4_K_S"), "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q5_k_s": ("Q5_K", "MOSTLY_Q5_K_S"), "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
}
# Hugging Face model_type -> llama.cpp architecture (the tensor names and metadata keys transformers'
# GGUF loader and llama.cpp expect), of the classes workers.methods.GGUF_ARCHITECTURES lists. Others are
# refused: their tensors need converting (llama's q/k rows are permuted in llama.cpp's layout).
GGUF_ARCHS = dict(methods.GGUF_ARCHITECTURES.values())


def copy_hf_config(checkpoint: Path, out_dir: Path) -> None:
    """config.json (less GPTQModel's quantization_config: the weights are in the .gguf file) and
    generation_config.json beside the .gguf file, for tools that read a model directory's config."""
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if (checkpoint / "generation_config.json").is_file():
        shutil.copyfile(checkpoint / "generation_config.json", out_dir / "generation_config.json")


def write_gguf_file(checkpoint: Path, target: Path, gguf_type: str, model_name: str) -> None:
    """Write GPTQModel's GGUF checkpoint (safetensors of ggml blocks) as one llama.cpp `.gguf` file:
    the model's hyperparameters and tokenizer as llama.cpp's convert_hf_to_gguf.py names them, each
    quantized linear layer's blocks as they are, the other tensors as F16 (matrices) or F32."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise BadInput(f"--method gguf writes llama.cpp files for {', '.join(GGUF_ARCHS)} models; this model is "
                       f"{model_type!r}")
    qtype_name, file_type = GGUF_TENSOR_TYPES[gguf_type]
    qtype = gguf.GGMLQuantizationType[qtype_name]
    arch = gguf.MODEL_ARCH[GGUF_ARCHS[model_type]]
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, layers)
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_gguf_tokenizer(writer, checkpoint, config["vocab_size"])
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"GPTQModel wrote no safetensors into {checkpoint}")
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                hf_name = key[: -len(".qweight")] + ".weight" if key.endswith(".qweight") else key
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise RuntimeError(f"no llama.cpp name for tensor {key} of a {model_type} model")
                if key.endswith(".qweight"):  # [out_features, bytes of a row's blocks]: ggml's own layout
                    writer.add_tensor(name, tensor.numpy().astype(np.uint8, copy=False), raw_dtype=qtype)
                elif tensor.dim() == 2:
                    writer.add_tensor(name, tensor.float().numpy().astype(np.float16))
                else:
                    writer.add_tensor(name, tensor.float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_gguf_tokenizer(writer, checkpoint: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (Qwen2's kind) as llama.cpp's `gpt2` tokenizer model: tokens in id
    order (padded to the model's vocabulary with unused [PAD] tokens), their types, merges, special ids
    and the chat template. Another kind of tokenizer is left out (the artifact still has tokenizer.json)."""
    import gguf

    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        log.warning("no tokenizer.json: the .gguf file carries no tokenizer")
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        log.warning("tokenizer of type %s: the .gguf file carries no tokenizer", model.get("type"))
        return
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special[added["id"]] = added["content"]
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    tok_config_path = checkpoint / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8")) if tok_config_path.is_file() else {}
    ids = {content: i for i, content in by_id.items()}
    for key, add in (("eos_token", writer.add_eos_token_id), ("pad_token", writer.add_pad_token_id),
                     ("bos_token", writer.add_bos_token_id)):
        value = tok_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value in ids:
            add(ids[value])
    writer.add_add_bos_token(False)
    template = checkpoint / "chat_template.jinja"
    chat_template = template.read_text(encoding="utf-8") if template.is_file() else tok_config.get("chat_template")
    if chat_template:
        writer.add_chat_template(chat_template)
