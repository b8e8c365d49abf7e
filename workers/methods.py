"""The quantization methods a sweep can hold: what each takes, what it needs, what its variant is called.

Plain Python, no torch: `qrun submit` checks a sweep with this table before anything is queued, the
queue routes jobs by what it says a method needs (a GPU, a compute capability), and the quantize job
dispatches on the method's name (workers.quantize).

A job's params carry the method as `method` (absent: GPTQ, as every job before methods existed) and,
for GGUF, its quant type as `gguf_type`. A method that needs a GPU puts `needs_gpu: true` (and, where
it needs newer GPUs, `min_compute_capability`) into the params: a CPU worker never claims such a job
(db.queue.runnable_by). With GPTQModel 7.7 and bitsandbytes 0.50 every method here runs on a CPU too
(slowly where a GPU kernel would help); the requirement stays for a method that cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

from qrun.db.errors import BadInput

DEFAULT_METHOD = "gptq"


@dataclass(frozen=True)
class Method:
    name: str  # as --method spells it
    bits: tuple[int, ...]  # the bit widths it quantizes to
    grouped: bool  # takes --group-size (and --desc-act / --asym where GPTQ-like)
    calibrated: bool  # reads calibration data
    needs_gpu: bool = False  # a CPU worker never claims it
    min_compute_capability: float | None = None  # e.g. FP8's tensor cores: 8.9 (Ada, Hopper)
    about: str = ""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("gptq", (2, 3, 4, 8), grouped=True, calibrated=True,
           about="GPTQ (GPTQModel): second-order, layer by layer, calibrated"),
    Method("awq", (4,), grouped=True, calibrated=True,
           about="AWQ (GPTQModel): activation-aware scales, calibrated; 4 bits"),
    Method("rtn", (2, 3, 4, 8), grouped=True, calibrated=False,
           about="round-to-nearest: no calibration, the floor that calibration must beat"),
    # FP8 with one scale per output row: GPTQModel dequantizes before each matmul, so it runs on any
    # device (its per-tensor variant would use Hopper's FP8 matmuls, at a cost in precision).
    Method("fp8", (8,), grouped=False, calibrated=False,
           about="FP8 e4m3 weights, a scale per row (GPTQModel); dequantized per matmul on any device"),
    Method("gguf", (4, 5, 6, 8), grouped=False, calibrated=False,
           about="GGUF (llama.cpp, Ollama): its own quant types, --gguf-type q4_k_m, q8_0, ..."),
    # bitsandbytes has had CPU kernels since 0.46: NF4 quantizes and runs on a CPU worker too.
    Method("bnb-nf4", (4,), grouped=False, calibrated=False,
           about="bitsandbytes NF4 with double quantization (QLoRA's loading, seed 002)"),
)}

# GGUF quant types qrun makes, with their bit width; the default type for each width of --bits.
GGUF_TYPES = {"q4_0": 4, "q4_k_s": 4, "q4_k_m": 4, "q5_k_s": 5, "q5_k_m": 5, "q6_k": 6, "q8_0": 8}
GGUF_DEFAULT_TYPE = {4: "q4_k_m", 5: "q5_k_m", 6: "q6_k", 8: "q8_0"}


def method_of(params: dict) -> Method:
    """The method of a job's params (GPTQ when they name none)."""
    return METHODS[params.get("method") or DEFAULT_METHOD]


def check_method(name: str) -> Method:
    """The method called `name`, or BadInput listing the ones there are."""
    if name not in METHODS:
        raise BadInput(f"--method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def check_gguf_type(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in GGUF_TYPES:
        raise BadInput(f"--gguf-type {name!r} is not one of {', '.join(GGUF_TYPES)}")
    return key


def requirements(method: Method) -> dict:
    """What a job of this method adds to its params so that only a worker able to run it claims it."""
    needs: dict = {}
    if method.needs_gpu:
        needs["needs_gpu"] = True
    if method.min_compute_capability is not None:
        needs["min_compute_capability"] = method.min_compute_capability
    return needs


def label(params: dict) -> str:
    """A variant's short name, as in tables and artifact names: GPTQ keeps its historic w4g128;
    other grouped methods prefix their name (awq-w4g128, rtn-w8g128); the others name their type
    (fp8, gguf-q4_k_m, bnb-nf4)."""
    method = method_of(params)
    if method.name == "gguf":
        return f"gguf-{params.get('gguf_type') or GGUF_DEFAULT_TYPE[params['bits']]}"
    if not method.grouped:
        return method.name
    group = params.get("group_size", 128)
    text = f"w{params['bits']}" + ("gall" if group == -1 else f"g{group}")
    text += ("-act" if params.get("desc_act") else "") + ("" if params.get("sym", True) else "-asym")
    return text if method.name == DEFAULT_METHOD else f"{method.name}-{text}"


def points_of_method(method: Method, bits: tuple[int, ...], gguf_types: tuple[str, ...], alone: bool) -> list[dict]:
    """The sweep points one method contributes: {"method", "bits"[, "gguf_type"]} each.

    A width the method does not take is skipped when other methods share the sweep (`--method gptq
    --method awq --bits 4 --bits 8` gives AWQ only at 4 bits) and refused when it is alone or when no
    width is left for it. Fixed-width methods (fp8, bnb-nf4) give one point, whatever the sweep's bits
    (alone, a --bits other than theirs is refused); GGUF takes its types from --gguf-type, else the
    default type of each width."""
    if method.name == "gguf" and gguf_types:
        return [{"method": "gguf", "bits": GGUF_TYPES[t], "gguf_type": t} for t in dict.fromkeys(gguf_types)]
    fitting = [b for b in dict.fromkeys(bits) if b in method.bits]
    unfit = [b for b in bits if b not in method.bits]
    widths = ", ".join(map(str, method.bits))
    fixed = len(method.bits) == 1 and method.name not in ("gptq", "awq", "rtn")  # fp8, bnb-nf4: no choice
    if not bits and not fixed:
        raise BadInput(f"--method {method.name} needs --bits ({widths})"
                       + (" or --gguf-type" if method.name == "gguf" else ""))
    if (alone and unfit) or (not fitting and not fixed):
        by = "" if method.name == DEFAULT_METHOD else f" by --method {method.name}"
        raise BadInput(f"--bits {unfit[0]} is not supported{by}: use one of {widths}"
                       + (", or give --gguf-type" if method.name == "gguf" else ""))
    if fixed:
        return [{"method": method.name, "bits": method.bits[0]}]
    if method.name == "gguf":
        return [{"method": "gguf", "bits": b, "gguf_type": GGUF_DEFAULT_TYPE[b]} for b in fitting]
    return [{"method": method.name, "bits": b} for b in fitting]



# The model classes whose GGUF file qrun writes (llama.cpp's names differ per architecture; Llama's
# q/k rows would also need permuting): workers.quantize.GGUF_ARCHS is the same list by model_type.
GGUF_ARCHITECTURES = ("Qwen2ForCausalLM",)


def check_architecture(params: dict, architecture: str) -> None:
    """BadInput when the method cannot write this model class (GGUF: Qwen2 only, for now)."""
    if method_of(params).name == "gguf" and architecture not in GGUF_ARCHITECTURES:
        raise BadInput(f"--method gguf writes llama.cpp files for {', '.join(GGUF_ARCHITECTURES)} models; "
                       f"this model is {architecture or 'of no named class'}")


def check_widths(params: dict, widths) -> None:
    """BadInput when a layer width does not fit the method's blocks. widths: (name, width) pairs.
    GGUF packs each row in blocks: 256 weights for K-quants (q4_k_m, q6_k), 32 for q4_0/q8_0."""
    if method_of(params).name != "gguf":
        return
    gguf_type = params.get("gguf_type") or GGUF_DEFAULT_TYPE[params["bits"]]
    block = 256 if "_k" in gguf_type else 32
    for name, width in widths:
        if width and width % block:
            raise BadInput(f"--gguf-type {gguf_type} packs rows in blocks of {block}: the model's {name} {width} "
                           f"is not a multiple" + ("; use q4_0 or q8_0" if block == 256 else ""))
