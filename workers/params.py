"""A job's parameters, typed: what a quantize or an eval job stores in its `params`, with every
default written once, here.

`to_dict()` is the stored form, key for key and in the same order as every qrun has written it:
`equivalent_job` finds an equal job by comparing these dicts, and `qrun status --json` shows them as
stored. A method's params hold only the settings it takes (workers.methods: GPTQ has no "method",
RTN no damp, FP8 no group), its requirements (needs_gpu, ...) and "gpus" only for more than one GPU.
`from_dict()` reads a stored row back, one written by an older qrun too: a missing key (or None)
takes its default, an unknown key is ignored. Plain Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from qrun.db.states import Kind
from qrun.workers import methods

BASELINE = "baseline"  # the variant of the unquantized model, as its eval job and comparisons name it
EVAL_MODES = ("score", "generate")

# The method setting (workers.methods) each quantize field belongs to; fields of none belong to every method.
FIELD_SETTINGS = {
    "gguf_type": methods.QUANT_TYPE, "group_size": methods.GROUP_SIZE, "desc_act": methods.DESC_ACT,
    "sym": methods.SYM, "damp_percent": methods.DAMP, "true_sequential": methods.DESC_ACT,
    "static_groups": methods.DESC_ACT, "calib": methods.CALIBRATION, "calib_samples": methods.CALIBRATION,
    "calib_max_len": methods.CALIBRATION, "batch_size": methods.CALIBRATION,
}
# Beyond the label (bits, group, desc_act, sym, quant type), the settings that make a different model.
MODEL_SETTINGS = ("damp_percent", "calib", "calib_samples", "calib_max_len")


def _known_values(cls, data: dict) -> dict:
    """The entries of a stored dict that are fields of `cls` and not None (None: take the default)."""
    known = {f.name for f in fields(cls)}
    return {key: value for key, value in (data or {}).items() if key in known and value is not None}


def gpus_param(gpus: int) -> dict:
    """The params' entry for a job's GPUs: none for one (so equal jobs of before stay equal)."""
    return {"gpus": gpus} if gpus > 1 else {}


@dataclass(frozen=True)
class QuantizeParams:
    """A quantize job's settings (each method reads those it takes: FIELD_SETTINGS)."""

    bits: int
    method: str = methods.DEFAULT_METHOD  # workers.methods; None given: GPTQ
    gguf_type: str | None = None  # gguf only: q4_k_m, q8_0, ... (None: the default type of `bits`)
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True  # GPTQModel's; no option sets it, stored only where not the default
    static_groups: bool = False  # likewise
    calib: str | None = None  # None: the eval file where there is one (qrun submit), else built-in text
    calib_samples: int = 128
    calib_max_len: int = 1024
    batch_size: int = 16  # bench: 82 s at 1 vs 41 s at 16 on an H100, same layer loss
    trust_remote_code: bool = False
    allow_pickle: bool = False
    gpus: int = 1  # GPUs of one node the job holds

    def __post_init__(self):
        if self.method is None:  # as stored by jobs from before methods existed
            object.__setattr__(self, "method", methods.DEFAULT_METHOD)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizeParams":
        """A stored row's params, typed."""
        return cls(**_known_values(cls, data))

    @classmethod
    def for_method(cls, method: str, bits: int, **settings) -> "QuantizeParams":
        """Params of `method` from a sweep's settings: one the method does not take keeps its default,
        so that its label and texts say what its stored params say (AWQ in a --desc-act sweep: no -act)."""
        bare = cls(bits=bits, method=method)
        return cls(bits=bits, method=method, **{name: value for name, value in settings.items() if bare.takes(name)})

    @property
    def spec(self) -> methods.Method:
        """The method's entry in workers.methods.METHODS."""
        return methods.METHODS[self.method]

    def takes(self, name: str) -> bool:
        """Whether the method reads the field `name` (damp_percent: GPTQ's; calibration: calibrated ones)."""
        setting = FIELD_SETTINGS.get(name)
        return setting is None or setting in self.spec.takes

    @property
    def quant_type(self) -> str | None:
        """GGUF: the type the job writes (the one given, else its width's default), checked; else None."""
        given = self.spec.quant_type(self.bits, self.gguf_type)
        return None if given is None else methods.check_gguf_type(given)

    def requirements(self) -> dict:
        """needs_gpu / min_compute_capability: what a worker must have to run this method's jobs."""
        return methods.requirements(self.spec)

    def to_dict(self) -> dict:
        """The params as stored (see the module's docstring)."""
        spec = self.spec
        stored: dict = {"bits": self.bits}
        for name in ("group_size", "desc_act", "sym", "damp_percent"):
            if self.takes(name):
                stored[name] = getattr(self, name)
        if not spec.implicit:
            stored["method"] = self.method
        stored |= self.requirements()
        if spec.quant_types:
            stored["gguf_type"] = self.quant_type
        for name in ("true_sequential", "static_groups"):
            if self.takes(name) and getattr(self, name) != _default(QuantizeParams, name):
                stored[name] = getattr(self, name)
        if spec.calibrated:
            stored |= {name: getattr(self, name) for name in ("calib", "calib_samples", "calib_max_len", "batch_size")}
        return stored | {"trust_remote_code": self.trust_remote_code, "allow_pickle": self.allow_pickle} | gpus_param(
            self.gpus)

    def label(self) -> str:
        """Short name of the variant, as in tables and artifact names: w4g128, w8g128-act-asym,
        awq-w4g128, rtn-w8g128, fp8, gguf-q4_k_m, bnb-nf4 (workers.methods.Method.variant_name)."""
        return self.spec.variant_name(self.bits, self.group_size, self.desc_act, self.sym, self.gguf_type)

    def status_label(self) -> str:
        """`qrun status`'s few words: the label, and damp where it is not the default."""
        text = self.label()
        if self.damp_percent == _default(QuantizeParams, "damp_percent"):
            return text
        return f"{text} damp={self.damp_percent}"

    def plan_text(self) -> str:
        """A dry run's PARAMS: the settings that tell the jobs of a sweep apart."""
        if not self.spec.grouped:  # fp8, gguf, bnb-nf4
            return f"method={self.method} " + (f"type={self.gguf_type}" if self.gguf_type is not None
                                               else f"bits={self.bits}")
        text = f"method={self.method} bits={self.bits} group={self.group_size}"
        if self.takes("damp_percent"):
            text += f" damp={self.damp_percent:g}"
        text += (" desc_act" if self.desc_act else "") + ("" if self.sym else " asym")
        if self.spec.calibrated:
            calib = Path(self.calib).name if self.calib else "built-in text"
            text += f" calib={calib}×{self.calib_samples}"
        return text

    def variant_key(self) -> tuple:
        """Every setting that changes the quantized model: two jobs with equal keys make the same variant."""
        return (self.method, self.gguf_type, self.bits, self.group_size, bool(self.desc_act), bool(self.sym)) + tuple(
            getattr(self, name) if self.takes(name) else None for name in MODEL_SETTINGS)


@dataclass(frozen=True)
class EvalParams:
    """An eval job's settings: what it classifies and measures, and which model it reads."""

    data: str | None = None  # labeled dialogs to classify
    mode: str = "score"  # EVAL_MODES
    max_new_tokens: int = 32
    ppl_data: str | None = None  # text for perplexity
    batch_size: int = 8
    variant: str = BASELINE  # the variant evaluated (a label of workers.methods), as comparisons group it
    trust_remote_code: bool = False
    from_upstream: bool = False  # evaluates the model its upstream quantize job published
    gpus: int = 1
    needs_gpu: bool = False  # the upstream method's requirements (workers.methods.requirements)
    min_compute_capability: float | None = None
    answer_template: str | None = None  # the answer to each label, `{"is_fraud": {label}}` (workers.tasks)
    task: dict | None = None  # the task file beside the data, as read at submit (workers.tasks.task_spec)

    @classmethod
    def from_dict(cls, data: dict) -> "EvalParams":
        """A stored row's params, typed."""
        return cls(**_known_values(cls, data))

    def to_dict(self) -> dict:
        """The params as stored (see the module's docstring)."""
        stored = {"data": self.data, "mode": self.mode, "max_new_tokens": self.max_new_tokens,
                  "ppl_data": self.ppl_data, "batch_size": self.batch_size, "variant": self.variant,
                  "trust_remote_code": self.trust_remote_code}
        if self.from_upstream:
            stored["from_upstream"] = True
        stored |= gpus_param(self.gpus)
        if self.needs_gpu:
            stored["needs_gpu"] = True
        if self.min_compute_capability is not None:
            stored["min_compute_capability"] = self.min_compute_capability
        if self.answer_template is not None:  # only where given: the seeds' task stores what it always did
            stored["answer_template"] = self.answer_template
        if self.task is not None:
            stored["task"] = self.task
        return stored

    def label(self) -> str:
        """The variant it evaluates."""
        return self.variant

    def status_label(self) -> str:
        """`qrun status`'s few words: the variant and what is measured, `w4g128 score+ppl`."""
        what = [self.mode] if self.data else []
        what += ["ppl"] if self.ppl_data else []
        return f"{self.variant} {'+'.join(what)}"

    def plan_text(self) -> str:
        """A dry run's PARAMS: the files read and the mode."""
        what = [f"data={Path(self.data).name} ({self.mode})"] if self.data else []
        what += [f"ppl={Path(self.ppl_data).name}"] if self.ppl_data else []
        return " ".join(what)


def params_of(kind: str | Kind, params: dict) -> QuantizeParams | EvalParams:
    """A job's stored params as the typed model of its kind."""
    return QuantizeParams.from_dict(params) if Kind(kind) is Kind.QUANTIZE else EvalParams.from_dict(params)


def _default(cls, name: str):
    """The default of field `name` of a params class."""
    return cls.__dataclass_fields__[name].default
