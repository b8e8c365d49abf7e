"""The quantization methods a sweep can hold, and everything that differs between them: the one place
that knows a method by its name.

Plain Python, no torch: `qrun submit` checks a sweep with this table before anything is queued, the
queue routes jobs by what it says a method needs (a GPU, a compute capability), the quantize job
builds what the table names (a GPTQModel config, or transformers' bitsandbytes loading), the eval
job loads the artifact by its format, and a worker waits for the kernels a method's jobs use.

A job's params carry the method as `method` (absent: GPTQ, as every job before methods existed) and,
for GGUF, its quant type as `gguf_type` (workers.params reads and writes them). A method that needs a
GPU puts `needs_gpu: true` (and, where it needs newer GPUs, `min_compute_capability`) into the params:
a CPU worker never claims such a job (db.queue.runnable_by). With GPTQModel 7.7 and bitsandbytes 0.50
every method here runs on a CPU too (slowly where a GPU kernel would help); the requirement stays for
a method that cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from qrun.db.errors import BadInput

DEFAULT_METHOD = "gptq"  # the method of params that name none: stored without "method", labelled without prefix

# The settings a method may take, beyond its bit width (workers.params.FIELD_SETTINGS: the params of each).
GROUP_SIZE = "group_size"  # columns sharing one scale
DESC_ACT = "desc_act"  # GPTQ's activation order
SYM = "sym"  # symmetric or not, as an option of the sweep
DAMP = "damp"  # GPTQ's Hessian dampening
CALIBRATION = "calibration"  # reads calibration data (calib, calib_samples, calib_max_len, batch_size)
QUANT_TYPE = "quant_type"  # named types of its own (GGUF's q4_k_m, ...) instead of bits and groups


class Artifact(StrEnum):
    """How a quantized model is stored, and so how an eval loads it (workers.evaluate.artifact_format)."""

    GPTQMODEL = "gptqmodel"  # GPTQModel's checkpoint (quantize_config.json): GPTQModel.load
    GGUF = "gguf"  # one llama.cpp .gguf file: transformers' GGUF loader
    BITSANDBYTES = "bitsandbytes"  # transformers' checkpoint in bitsandbytes' form: from_pretrained
    TRANSFORMERS = "transformers"  # transformers' own form: plain weights, or a quantization_config it reads (fp8)


COMPRESSED_TENSORS = "compressed-tensors"  # a Method.rewrite_as: compressed-tensors' format (workers/fp8_format.py)

# GGUF quant types qrun makes, with their bit width; the default type for each width of --bits.
GGUF_TYPES = {"q4_0": 4, "q4_k_s": 4, "q4_k_m": 4, "q5_k_s": 5, "q5_k_m": 5, "q6_k": 6, "q8_0": 8}
GGUF_DEFAULT_TYPE = {4: "q4_k_m", 5: "q5_k_m", 6: "q6_k", 8: "q8_0"}
# The model classes whose GGUF file qrun writes, with their Hugging Face model_type and llama.cpp
# architecture (llama.cpp's tensor names differ per architecture; Llama's q/k rows would also need permuting).
GGUF_ARCHITECTURES = {"Qwen2ForCausalLM": ("qwen2", "QWEN2")}


@dataclass(frozen=True)
class Client:
    """A library users load an artifact with, as the artifact's model card shows it. `code` is Python that
    binds `model` and `tokenizer` from the directory `path` ({gguf_file}: a GGUF artifact's file);
    tested: tests/test_artifact_loading.py runs it on every method's artifact and checks that it scores
    as qrun's eval recorded (the others are formats the library documents as its own, not run here)."""

    name: str
    needs: str  # what to pip install for it
    code: str
    tested: bool = True


TRANSFORMERS_CODE = ('from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                     'model = AutoModelForCausalLM.from_pretrained(path)  # on a GPU: device_map="cuda"\n'
                     'tokenizer = AutoTokenizer.from_pretrained(path)')
TRANSFORMERS_GGUF_CODE = ('from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                          'model = AutoModelForCausalLM.from_pretrained(path, gguf_file="{gguf_file}")  # dequantized\n'
                          'tokenizer = AutoTokenizer.from_pretrained(path)')
GPTQMODEL_CODE = ('from gptqmodel import GPTQModel\n\n'
                  'quantized = GPTQModel.load(path)\n'
                  'model, tokenizer = quantized.model, quantized.tokenizer  # a transformers model, its tokenizer')
VLLM_CODE = 'from vllm import LLM\n\nllm = LLM(model=path)'
LLAMA_CPP_CODE = 'llama-cli -m {gguf_file}  # llama.cpp, in this directory; Ollama: FROM ./{gguf_file}'
# GPTQ's and AWQ's checkpoint format (gptq, rtn, awq): transformers reads it through optimum and GPTQModel.
GPTQ_FORMAT_CLIENTS = (Client("transformers", "qrun-quant (transformers, optimum, gptqmodel)", TRANSFORMERS_CODE),
                       Client("GPTQModel", "gptqmodel", GPTQMODEL_CODE),
                       Client("vLLM", "vllm", VLLM_CODE, tested=False))

# The checkpoints GPTQModel's Marlin kernel loads: these widths and group sizes, symmetric.
MARLIN_BITS = (4, 8)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)


@dataclass(frozen=True)
class Method:
    name: str  # as --method spells it
    bits: tuple[int, ...]  # the bit widths it quantizes to
    takes: frozenset[str]  # the settings it takes: GROUP_SIZE, DESC_ACT, SYM, DAMP, CALIBRATION, QUANT_TYPE
    title: str = ""  # as a sentence names it: "GPTQ", "round-to-nearest"
    needs_gpu: bool = False  # a CPU worker never claims it
    min_compute_capability: float | None = None  # e.g. FP8's tensor cores: 8.9 (Ada, Hopper)
    about: str = ""
    # How it is quantized: the GPTQModel config class built from the settings it takes, or None for
    # transformers' BitsAndBytesConfig applied while loading (workers.quantize).
    gptqmodel_config: str | None = None
    engine_speedups: bool = False  # qrun's replacements for GPTQModel's GPTQ apply (workers.engine)
    artifact: Artifact = Artifact.GPTQMODEL
    # How its checkpoint names it: quant_method in GPTQModel's quantize_config.json, and whether that
    # file records a weight-only pass (RTN is written in GPTQ's format, its pass recorded in meta.weight_only).
    checkpoint_name: str | None = None
    weight_only: bool = False
    # transformers' quantization_config in config.json that marks its artifact (bitsandbytes' NF4).
    hf_quantization: tuple[tuple[str, str], ...] = ()
    kernels: tuple[str, ...] = ()  # GPU kernels its quantize jobs load (workers.warmup builds them first)
    marlin: bool = False  # its checkpoints load with Marlin where their layout fits (marlin_loads)
    quant_types: dict[str, int] = field(default_factory=dict, hash=False)  # its named types -> bit width
    default_types: dict[int, str] = field(default_factory=dict, hash=False)  # the type of each width of --bits
    # The model classes it can write (None: every class qrun quantizes), and its files as messages name them.
    architectures: tuple[str, ...] | None = None
    writes: str = ""
    # GPTQModel's checkpoint rewritten after saving into a format more clients read (fp8: compressed-tensors).
    rewrite_as: str | None = None
    clients: tuple[Client, ...] = ()  # how its users load its artifact (the model card's code)

    @property
    def grouped(self) -> bool:
        """Takes --group-size (and is labelled by bits and group: w4g128)."""
        return GROUP_SIZE in self.takes

    @property
    def calibrated(self) -> bool:
        """Reads calibration data."""
        return CALIBRATION in self.takes

    @property
    def implicit(self) -> bool:
        """The method of params that name none: its params carry no "method", its labels no prefix."""
        return self.name == DEFAULT_METHOD

    @property
    def fixed_width(self) -> bool:
        """One width and nothing to choose (fp8, bnb-nf4): one variant, whatever the sweep's --bits."""
        return len(self.bits) == 1 and not self.grouped and not self.quant_types

    def quant_type(self, bits: int, given: str | None) -> str | None:
        """The quant type a job of this method writes: the one given, else the default of its width."""
        if not self.quant_types:
            return None
        return given or self.default_types[bits]

    def typed_name(self, quant_type: str) -> str:
        """The label of a variant named by its quant type: gguf-q4_k_m."""
        return f"{self.name}-{quant_type}"

    def variant_name(self, bits: int | None = None, group_size: int | None = None, desc_act: bool = False,
                     sym: bool = True, quant_type: str | None = None) -> str:
        """A variant's short name, as in tables and artifact names: GPTQ keeps its historic w4g128;
        other grouped methods prefix their name (awq-w4g128, rtn-w8g128); a method with quant types is
        named by its type (gguf-q4_k_m), the others by themselves (fp8, bnb-nf4)."""
        if self.quant_types:
            return self.typed_name(self.quant_type(bits, quant_type))
        if not self.grouped:
            return self.name
        text = f"w{bits}" + ("gall" if group_size == -1 else f"g{group_size}")
        text += ("-act" if desc_act else "") + ("" if sym else "-asym")
        return text if self.implicit else f"{self.name}-{text}"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("gptq", (2, 3, 4, 8), frozenset({GROUP_SIZE, DESC_ACT, SYM, DAMP, CALIBRATION}), title="GPTQ",
           about="GPTQ (GPTQModel): second-order, layer by layer, calibrated",
           gptqmodel_config="QuantizeConfig", engine_speedups=True, checkpoint_name="gptq", kernels=("gptq_cuda",),
           marlin=True, clients=GPTQ_FORMAT_CLIENTS),
    # GEMM format: what AutoAWQ, transformers and vLLM read.
    Method("awq", (4,), frozenset({GROUP_SIZE, CALIBRATION}), title="AWQ",
           about="AWQ (GPTQModel): activation-aware scales, calibrated; 4 bits",
           gptqmodel_config="AWQConfig", checkpoint_name="awq", kernels=("awq",), marlin=True,
           clients=GPTQ_FORMAT_CLIENTS),
    # GPTQ's format, so every GPTQ loader (and qrun's GPTQ eval path) reads it.
    Method("rtn", (2, 3, 4, 8), frozenset({GROUP_SIZE, SYM}), title="round-to-nearest",
           about="round-to-nearest: no calibration, the floor that calibration must beat",
           gptqmodel_config="RTNConfig", checkpoint_name="gptq", weight_only=True, marlin=True,
           clients=GPTQ_FORMAT_CLIENTS),
    # FP8 with one scale per output row, quantized by GPTQModel and written as compressed-tensors' FP8
    # (per-channel scales), the form transformers (with compressed-tensors) and vLLM read: transformers
    # reads GPTQModel's own `quant_method: fp8` as its 128x128-block format and fails. checkpoint_name
    # still reads artifacts written in GPTQModel's form.
    Method("fp8", (8,), frozenset(), title="FP8",
           about="FP8 e4m3 weights, a scale per row (GPTQModel), stored as compressed-tensors' FP8",
           gptqmodel_config="FP8Config", checkpoint_name="fp8", artifact=Artifact.TRANSFORMERS,
           hf_quantization=(("quant_method", "compressed-tensors"), ("format", "float-quantized")),
           rewrite_as=COMPRESSED_TENSORS,
           clients=(Client("transformers", "qrun-quant (transformers, compressed-tensors)", TRANSFORMERS_CODE),
                    Client("vLLM", "vllm", VLLM_CODE, tested=False))),
    # GPTQModel's GGUF blocks, repacked into one llama.cpp file (GPTQModel's own checkpoint is not kept).
    Method("gguf", (4, 5, 6, 8), frozenset({QUANT_TYPE}), title="GGUF",
           about="GGUF (llama.cpp, Ollama): its own quant types, --gguf-type q4_k_m, q8_0, ...",
           gptqmodel_config="GGUFConfig", artifact=Artifact.GGUF, quant_types=GGUF_TYPES,
           default_types=GGUF_DEFAULT_TYPE, architectures=tuple(GGUF_ARCHITECTURES), writes="llama.cpp files",
           clients=(Client("transformers", "qrun-quant (transformers, gguf)", TRANSFORMERS_GGUF_CODE),
                    Client("llama.cpp", "llama.cpp or Ollama", LLAMA_CPP_CODE, tested=False))),
    # bitsandbytes has had CPU kernels since 0.46: NF4 quantizes and runs on a CPU worker too.
    Method("bnb-nf4", (4,), frozenset(), title="bitsandbytes NF4",
           about="bitsandbytes NF4 with double quantization (QLoRA's loading, seed 002)",
           artifact=Artifact.BITSANDBYTES,
           hf_quantization=(("quant_method", "bitsandbytes"), ("bnb_4bit_quant_type", "nf4")),
           clients=(Client("transformers", "qrun-quant[bnb] (transformers, bitsandbytes)", TRANSFORMERS_CODE),)),
)}


def title_of(name: str | None) -> str:
    """How a sentence names the method called `name` ("round-to-nearest"); an unknown name as it is."""
    return METHODS[name].title if name in METHODS else (name or "another method")


def method_of(params: dict) -> Method:
    """The method of a job's params (GPTQ when they name none)."""
    return METHODS[params.get("method") or DEFAULT_METHOD]


def check_method(name: str) -> Method:
    """The method called `name`, or BadInput listing the ones there are."""
    if name not in METHODS:
        raise BadInput(f"--method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def check_gguf_type(name: str) -> str:
    """A --gguf-type as qrun spells it (q4_k_m), or BadInput listing the types there are."""
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
    """A variant's short name from a job's params (Method.variant_name): w4g128, awq-w4g128, gguf-q4_k_m, fp8."""
    from qrun.workers.params import QuantizeParams  # the params' defaults, defined there

    return QuantizeParams.from_dict(params).label()


def with_artifact(artifact: Artifact) -> Method:
    """The method whose artifacts are stored this way (GGUF: one method writes .gguf files)."""
    return next(m for m in METHODS.values() if m.artifact is artifact)


def checkpoint_method(config: dict) -> Method | None:
    """The method that wrote a GPTQModel quantize_config.json (None: one qrun does not make), read as
    GPTQModel reads it: `method`, else `quant_method`, else GPTQ; a weight-only pass in GPTQ's format is RTN."""
    name = str(config.get("method") or config.get("quant_method") or DEFAULT_METHOD).lower()
    weight_only = (config.get("meta") or {}).get("weight_only") is not None
    named = [m for m in METHODS.values() if m.checkpoint_name == name]
    return next((m for m in named if m.weight_only == weight_only), named[0] if named else None)


def hf_quantized_method(quantization_config: dict) -> Method | None:
    """The method whose artifact carries this transformers quantization_config (bnb-nf4), or None."""
    return next((m for m in METHODS.values() if m.hf_quantization
                 and all(quantization_config.get(key) == value for key, value in m.hf_quantization)), None)


def marlin_loads(config: dict) -> bool:
    """Whether GPTQModel's Marlin kernel loads the checkpoint of this quantize_config.json: GPTQ's and AWQ's
    formats (gptq, rtn, awq jobs) at Marlin's widths and group sizes, symmetric. FP8 has its own kernel."""
    method = checkpoint_method(config)
    return bool(method is not None and method.marlin and config.get("bits") in MARLIN_BITS
                and config.get("group_size") in MARLIN_GROUP_SIZES and config.get("sym", True))


def rehearsal_method_for_marlin() -> Method:
    """The cheapest method whose checkpoint Marlin loads: uncalibrated (RTN), to have something to load."""
    return next(m for m in METHODS.values() if m.marlin and not m.calibrated)


def points_of_method(method: Method, bits: tuple[int, ...], gguf_types: tuple[str, ...], alone: bool) -> list[dict]:
    """The sweep points one method contributes: {"method", "bits"[, "gguf_type"]} each.

    A width the method does not take is skipped when other methods share the sweep (`--method gptq
    --method awq --bits 4 --bits 8` gives AWQ only at 4 bits) and refused when it is alone or when no
    width is left for it. Fixed-width methods (fp8, bnb-nf4) give one point, whatever the sweep's bits
    (alone, a --bits other than theirs is refused); GGUF takes its types from --gguf-type, else the
    default type of each width."""
    typed = bool(method.quant_types)
    if typed and gguf_types:
        return [{"method": method.name, "bits": method.quant_types[t], "gguf_type": t}
                for t in dict.fromkeys(gguf_types)]
    fitting = [b for b in dict.fromkeys(bits) if b in method.bits]
    unfit = [b for b in bits if b not in method.bits]
    widths = ", ".join(map(str, method.bits))
    fixed = method.fixed_width
    if not bits and not fixed:
        raise BadInput(f"--method {method.name} needs --bits ({widths})" + (" or --gguf-type" if typed else ""))
    if (alone and unfit) or (not fitting and not fixed):
        by = "" if method.implicit else f" by --method {method.name}"
        raise BadInput(f"--bits {unfit[0]} is not supported{by}: use one of {widths}"
                       + (", or give --gguf-type" if typed else ""))
    if fixed:
        return [{"method": method.name, "bits": method.bits[0]}]
    if typed:
        return [{"method": method.name, "bits": b, "gguf_type": method.default_types[b]} for b in fitting]
    return [{"method": method.name, "bits": b} for b in fitting]


def check_architecture(method: Method, architecture: str) -> None:
    """BadInput when the method cannot write this model class (GGUF: Qwen2 only, for now)."""
    if method.architectures is not None and architecture not in method.architectures:
        raise BadInput(f"--method {method.name} writes {method.writes} for {', '.join(method.architectures)} models; "
                       f"this model is {architecture or 'of no named class'}")


def gguf_row_block(gguf_type: str) -> int:
    """The weights GGUF packs in one block of a row: 256 for K-quants (q4_k_m, q6_k), 32 for q4_0/q8_0."""
    return 256 if "_k" in gguf_type else 32


def check_widths(method: Method, quant_type: str | None, widths) -> None:
    """BadInput when a layer width does not fit the method's blocks. widths: (name, width) pairs."""
    if not method.quant_types:
        return
    block = gguf_row_block(quant_type)
    for name, width in widths:
        if width and width % block:
            raise BadInput(f"--gguf-type {quant_type} packs rows in blocks of {block}: the model's {name} {width} "
                           f"is not a multiple" + ("; use q4_0 or q8_0" if block == 256 else ""))
