"""What one submit adds: its inputs checked, its sweep expanded into jobs, and the jobs that already
exist offered instead of added again.

No torch here: `workers.inputs` and `workers.datasets` read model directories and files with plain
Python, so bad input is refused before the database is opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from qrun.db.errors import BadInput
from qrun.db.queue import JobSpec, check_priority
from qrun.db.states import Kind
from qrun.variants import variant_labels
from qrun.workers import methods
from qrun.workers.params import BASELINE, EVAL_MODES, EvalParams, QuantizeParams, params_of

# A sweep name must not read as a sweep id, which `--sweep` also takes.
SWEEP_ID_PATTERN = re.compile(r"[0-9a-f]{8}")
MAX_NAME_LENGTH = 64


# ---------------------------------------------------------------- checking the inputs


def as_values(value, option: str, kind: type) -> tuple:
    """A repeatable option given as one value or several (the API takes both), each of `kind`."""
    values = tuple(value) if isinstance(value, (list, tuple, set, frozenset)) else (value,)
    ok, what = ((int,), "a whole number") if kind is int else ((int, float), "a number")
    if not values or any(isinstance(v, bool) or not isinstance(v, ok) for v in values):
        raise BadInput(f"{option} {value!r} must be {what} or a list of them, like [4, 8]")
    return values


def check_file(path: str | None, what: str) -> str | None:
    """The absolute path of an optional input file, checked now so that no job gets a missing one."""
    from qrun.workers.datasets import require_file

    return None if path is None else str(require_file(path, what).resolve())


def check_sweep_name(name: str | None) -> str | None:
    """The sweep's name if it is one (1 to 64 printable characters, not like a sweep id), else BadInput."""
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise BadInput(f"--name {name!r} must be 1 to {MAX_NAME_LENGTH} printable characters, like --name damp-sweep")
    if SWEEP_ID_PATTERN.fullmatch(name):
        raise BadInput(f"--name {name!r} looks like a sweep id (8 hex characters): choose a name with other letters")
    return name


def validate_eval_inputs(data: str | None, ppl: str | None, max_new_tokens: int, batch_size: int,
                         batch_option: str = "eval_batch_size", max_positions: int = 0,
                         answer_template: str | None = None, mode: str = EvalParams.mode,
                         mode_option: str = "--eval-mode") -> dict | None:
    """Every eval input, checked by the library functions that the job itself reads them with; the task
    file beside the data as the job's params store it (None where there is none: workers.tasks).
    batch_option: the batch size's option as this command spells it (underscores for dashes).
    max_positions: the model's context, which no eval sample may exceed by far (0: not stated)."""
    from qrun.workers.datasets import check_eval_data, check_perplexity_file
    from qrun.workers.inputs import check_job_counts, check_sample_lengths

    task = None
    if data:
        task = check_eval_data(data, answer_template, mode, mode_option)
        check_sample_lengths(data, "eval file", max_positions)
    if ppl:
        check_perplexity_file(ppl)
    check_job_counts(max_new_tokens=max_new_tokens, **{batch_option: batch_size})
    return task


@dataclass(frozen=True)
class SubmitOptions:
    """The options of one submit (`qrun submit`, `qrun.submit`), as given: a repeatable option is one
    value or a list. Every default is the job params' own (workers.params); check_submission checks them."""

    model: str
    bits: int | list[int] | None = None
    method: str | list[str] = methods.DEFAULT_METHOD
    gguf_type: str | list[str] | None = None  # gguf: its types (None: the default type of each width of bits)
    group_size: int | list[int] | None = None  # None: the params' default where a method has groups
    desc_act: bool = QuantizeParams.desc_act
    sym: bool = QuantizeParams.sym
    damp: float | list[float] = QuantizeParams.damp_percent
    calib: str | None = None  # None: the eval file, else built-in text
    calib_samples: int = QuantizeParams.calib_samples
    calib_max_len: int = QuantizeParams.calib_max_len
    batch_size: int = QuantizeParams.batch_size
    eval: str | None = None
    eval_mode: str = EvalParams.mode
    answer_template: str | None = EvalParams.answer_template  # the answer to each label (workers.tasks)
    eval_ppl: str | None = None
    max_new_tokens: int = EvalParams.max_new_tokens
    eval_batch_size: int = EvalParams.batch_size
    priority: int = JobSpec.priority
    max_attempts: int = JobSpec.max_attempts
    trust_remote_code: bool = QuantizeParams.trust_remote_code
    allow_pickle: bool = QuantizeParams.allow_pickle
    gpus_per_job: int = QuantizeParams.gpus
    name: str | None = None
    rerun: bool = False
    dry_run: bool = False


@dataclass
class SweepRequest:
    """A submit's inputs, checked: the model's resolved path, one quantize job's params per sweep point
    (in the order of the options, repeats dropped), and the eval jobs' params (None: no eval; their
    variant is set per job)."""

    model: str
    points: list[QuantizeParams]
    evaluation: EvalParams | None
    priority: int = JobSpec.priority
    max_attempts: int = JobSpec.max_attempts
    gpus: int = QuantizeParams.gpus  # GPUs of one node each job holds
    name: str | None = None  # the sweep's name


def check_submission(options: SubmitOptions | str, **keywords) -> SweepRequest:
    """Every input of a submit checked (model, methods, settings, files, the sweep's name), and the sweep
    expanded: BadInput naming the first bad one. Nothing is opened or written. options: SubmitOptions,
    or the model, with SubmitOptions' other fields as keywords.

    The sweep is methods × bits × group sizes × damps, each method taking the part that applies to it
    (workers.methods): AWQ only 4 bits, GGUF its quant types, damp only GPTQ."""
    from qrun.workers.datasets import check_calibration_file
    from qrun.workers.inputs import (check_calibration_settings, check_gpus_per_job, check_job_counts,
                                     check_quantizable, check_sample_lengths, inspect_model)

    o = options if isinstance(options, SubmitOptions) else SubmitOptions(options, **keywords)
    chosen = [methods.check_method(m) for m in dict.fromkeys(as_names(o.method, "--method"))]
    gguf_types = tuple(methods.check_gguf_type(t) for t in as_names(o.gguf_type, "--gguf-type")) if o.gguf_type else ()
    if gguf_types and not any(m.quant_types for m in chosen):
        raise BadInput("--gguf-type applies to --method gguf only: add --method gguf")
    bits = as_values(o.bits, "--bits", int) if o.bits not in (None, (), []) else ()
    explicit_group = o.group_size not in (None, (), [])
    group_sizes = as_values(o.group_size, "--group-size", int) if explicit_group else (QuantizeParams.group_size,)
    damps = as_values(o.damp, "--damp", float)
    _check_options_apply(chosen, o)
    check_eval_mode(o.eval_mode, "--eval-mode")
    if o.eval_mode != EvalParams.mode and o.eval is None:
        raise BadInput(f"--eval-mode {o.eval_mode} applies to the eval jobs of --eval FILE: add --eval")
    if o.answer_template is not None and o.eval is None:
        raise BadInput("--answer-template applies to the eval jobs of --eval FILE: add --eval")
    info = inspect_model(o.model, trust_remote_code=o.trust_remote_code, allow_pickle=o.allow_pickle)
    check_quantizable(info)
    check_calibration_settings(o.calib_samples, o.calib_max_len)
    check_job_counts(batch_size=o.batch_size, max_attempts=o.max_attempts)
    check_priority(o.priority)
    check_gpus_per_job(o.gpus_per_job)
    calib = check_file(o.calib, "calibration file")
    eval_data = check_file(o.eval, "eval file")
    eval_ppl = check_file(o.eval_ppl, "perplexity file")
    if calib:
        check_calibration_file(calib, min_samples=min(o.calib_samples, 4))
        check_sample_lengths(calib, "calibration file", info.max_positions)
    task = validate_eval_inputs(eval_data, eval_ppl, o.max_new_tokens, o.eval_batch_size,
                                max_positions=info.max_positions, answer_template=o.answer_template, mode=o.eval_mode)
    settings = dict(desc_act=o.desc_act, sym=o.sym, calib=calib or eval_data, calib_samples=o.calib_samples,
                    calib_max_len=o.calib_max_len, batch_size=o.batch_size, trust_remote_code=o.trust_remote_code,
                    allow_pickle=o.allow_pickle, gpus=o.gpus_per_job)
    points = []
    for method in chosen:
        for point in methods.points_of_method(method, bits, gguf_types, alone=len(chosen) == 1):
            points += _method_points(info, method, point, group_sizes, damps, settings)
    evaluation = None
    if eval_data or eval_ppl:
        evaluation = EvalParams(data=eval_data, mode=o.eval_mode, max_new_tokens=o.max_new_tokens, ppl_data=eval_ppl,
                                batch_size=o.eval_batch_size, trust_remote_code=o.trust_remote_code,
                                gpus=o.gpus_per_job, answer_template=o.answer_template, task=task)
    unique = list({_key(p.to_dict()): p for p in points}.values())
    return SweepRequest(info.path, unique, evaluation, o.priority, o.max_attempts, o.gpus_per_job,
                        check_sweep_name(o.name))


def as_names(value, option: str) -> tuple[str, ...]:
    """A repeatable text option given as one value or several."""
    values = tuple(value) if isinstance(value, (list, tuple, set, frozenset)) else (value,)
    if not values or any(not isinstance(v, str) or not v for v in values):
        raise BadInput(f"{option} {value!r} must be a name or a list of names, like ['gptq', 'rtn']")
    return values


def check_eval_mode(mode: str, option: str) -> None:
    """BadInput unless `mode` is an eval mode. option: as the command spells it (--eval-mode, --mode)."""
    if mode not in EVAL_MODES:
        raise BadInput(f"{option} {mode!r} is not one of {', '.join(EVAL_MODES)}")


# The submit options that set a quantize job's field (workers.params.FIELD_SETTINGS says which method
# setting each belongs to), as the command spells them when given: sym is given as --no-sym.
METHOD_OPTIONS = {"group_size": ("--group-size", "group_size"), "desc_act": ("--desc-act", "desc_act"),
                  "sym": ("--no-sym", "sym"), "damp": ("--damp", "damp_percent"), "calib": ("--calib", "calib"),
                  "calib_samples": ("--calib-samples", "calib_samples"),
                  "calib_max_len": ("--calib-max-len", "calib_max_len"), "batch_size": ("--batch-size", "batch_size")}
# Why a method setting is not taken, as the refusal says it.
NOT_TAKEN = {
    methods.GROUP_SIZE: "{option} does not apply to --method {names} (they have their own block layout)",
    methods.DESC_ACT: "{option} is GPTQ's activation order: it does not apply to --method {names}",
    methods.SYM: "{option} does not apply to --method {names}",
    methods.DAMP: "{option} is GPTQ's Hessian dampening: it does not apply to --method {names}",
    methods.CALIBRATION: "{option} does not apply to --method {names}: they use no calibration data",
}


def _given(options: SubmitOptions, name: str) -> bool:
    """Whether a submit option was given a value other than its default (one value or a list of them)."""
    value = getattr(options, name)
    default = SubmitOptions.__dataclass_fields__[name].default
    values = tuple(value) if isinstance(value, (list, tuple, set, frozenset)) else (value,)
    return values not in ((), (None,), (default,))


def _check_options_apply(chosen: list, options: SubmitOptions) -> None:
    """An option that no method of the sweep takes (workers.methods: each method's `takes`) is refused,
    not silently ignored: one rule for every option that sets a method's field."""
    from qrun.workers.params import FIELD_SETTINGS

    for name, (option, field_name) in METHOD_OPTIONS.items():
        setting = FIELD_SETTINGS[field_name]
        if _given(options, name) and not any(setting in m.takes for m in chosen):
            raise BadInput(NOT_TAKEN[setting].format(option=option, names=", ".join(m.name for m in chosen)))


def _method_points(info, method: methods.Method, point: dict, group_sizes, damps,
                   settings: dict) -> list[QuantizeParams]:
    """The params of one method's sweep point, crossed with the options that method takes, each checked."""
    from qrun.workers.inputs import check_quantize_settings

    params = QuantizeParams.for_method(method.name, point["bits"], gguf_type=point.get("gguf_type"), **settings)
    if not method.grouped:
        methods.check_architecture(method, info.architecture)
        methods.check_widths(method, params.quant_type, info.widths or (("hidden size", info.hidden_size),
                                                                         ("intermediate size", info.intermediate_size)))
        return [params]
    out = []
    for group_size in group_sizes:
        for damp in damps if params.takes("damp_percent") else (QuantizeParams.damp_percent,):
            check_quantize_settings(info, params.bits, group_size, damp, bits_of=method.bits)
            out.append(replace(params, group_size=group_size, damp_percent=damp))
    return out


def _key(params: dict) -> str:
    import json

    return json.dumps(params, sort_keys=True)


# ---------------------------------------------------------------- checking `qrun eval`


def check_evaluation(model: str, *, data: str | None = None, ppl: str | None = None, mode: str = EvalParams.mode,
                     max_new_tokens: int = EvalParams.max_new_tokens, batch_size: int = EvalParams.batch_size,
                     priority: int = JobSpec.priority, trust_remote_code: bool = EvalParams.trust_remote_code,
                     gpus_per_job: int = EvalParams.gpus,
                     answer_template: str | None = EvalParams.answer_template) -> JobSpec:
    """Every input of an eval of an existing model or artifact directory checked, and its job: the
    variant is read from the directory's own files (workers.inputs.quantized_variant). BadInput naming
    the first bad input; nothing is opened or written."""
    from qrun.workers.inputs import check_gpus_per_job, inspect_model, quantized_variant

    if not data and not ppl:
        raise BadInput("qrun eval needs --data FILE (classification) or --ppl FILE (perplexity), or both")
    check_eval_mode(mode, "--mode")
    if answer_template is not None and not data:
        raise BadInput("--answer-template applies to the classification of --data FILE: add --data")
    info = inspect_model(model, trust_remote_code=trust_remote_code, allow_pickle=None, allow_gguf=True)
    data = check_file(data, "eval file")
    ppl = check_file(ppl, "perplexity file")
    task = validate_eval_inputs(data, ppl, max_new_tokens, batch_size, batch_option="batch_size",
                                max_positions=info.max_positions, answer_template=answer_template, mode=mode,
                                mode_option="--mode")
    check_priority(priority)
    check_gpus_per_job(gpus_per_job)
    params = EvalParams(data=data, mode=mode, max_new_tokens=max_new_tokens, ppl_data=ppl, batch_size=batch_size,
                        variant=quantized_variant(info.path), trust_remote_code=trust_remote_code, gpus=gpus_per_job,
                        answer_template=answer_template, task=task)
    return JobSpec(kind=Kind.EVAL, model=info.path, params=params.to_dict(), priority=priority)


# ---------------------------------------------------------------- planning the jobs


@dataclass
class PlannedJob:
    """A job a submit adds. label: its variant within the sweep ("baseline" for the unquantized eval)."""

    spec: JobSpec
    label: str

    @property
    def kind(self) -> str:
        return self.spec.kind.value

    @property
    def params_text(self) -> str:
        """The settings that tell the jobs of a sweep apart, in a few words (a dry run's PARAMS)."""
        return params_of(self.spec.kind, self.spec.params).plan_text()


@dataclass
class ExistingJob:
    """A job already in the table that a submit uses instead of adding its equal (no --rerun)."""

    id: int
    kind: str
    label: str
    status: str


@dataclass
class Plan:
    jobs: list[PlannedJob] = field(default_factory=list)
    existing: list[ExistingJob] = field(default_factory=list)

    @property
    def specs(self) -> list[JobSpec]:
        return [job.spec for job in self.jobs]

    def add(self, spec: JobSpec, label: str) -> int:
        self.jobs.append(PlannedJob(spec, label))
        return len(self.jobs) - 1


def _reuse(db, plan: Plan, rerun: bool, kind: Kind, model: str, params: dict, label: str,
           upstream: int | None = None) -> int | None:
    """The id of an equal job already queued, running or succeeded (noted in the plan), else None."""
    from qrun.db.queue import equivalent_job

    if rerun:
        return None
    found = equivalent_job(db, kind, model, params, upstream=upstream)
    if found is None:
        return None
    plan.existing.append(ExistingJob(found.id, kind.value, label, found.status))
    return found.id


def check_priority_cap(db, priority: int, user: str | None = None) -> None:
    """BadInput when `priority` is above the cap an admin set for the submitting user (`qrun cap-priority`):
    checked while planning, so that a dry run says so too (queue.submit_jobs checks again)."""
    from qrun.db.queue import check_priority_cap as check

    check(db, priority, user)


def plan_jobs(db, request: SweepRequest, rerun: bool = False) -> Plan:
    """Quantize jobs (one per sweep point), each followed by its eval, plus the baseline eval once.
    A job equal to one already queued, running or succeeded is not added (unless rerun): the plan
    names that job instead, and a new eval of an existing variant depends on the existing job."""
    check_priority_cap(db, request.priority)
    plan = Plan()
    model, evaluation = request.model, request.evaluation
    common = dict(model=model, priority=request.priority, max_attempts=request.max_attempts)
    if evaluation is not None:
        baseline = replace(evaluation, variant=BASELINE).to_dict()
        if _reuse(db, plan, rerun, Kind.EVAL, model, baseline, BASELINE) is None:
            plan.add(JobSpec(kind=Kind.EVAL, params=baseline, **common), BASELINE)
    points = [point.to_dict() for point in request.points]
    for point, params, label in zip(request.points, points, variant_labels(points)):
        existing = _reuse(db, plan, rerun, Kind.QUANTIZE, model, params, label)
        if existing is None:
            index = plan.add(JobSpec(kind=Kind.QUANTIZE, params=params, **common), label)
        if evaluation is None:
            continue
        # The eval's stored variant is the method's label (w4g128, rtn-w4g128, ...): what `qrun compare` groups by.
        after = replace(evaluation, variant=point.label(), from_upstream=True, **point.requirements()).to_dict()
        if existing is None:
            plan.add(JobSpec(kind=Kind.EVAL, params=after, after=index, **common), label)
        elif _reuse(db, plan, rerun, Kind.EVAL, model, after, label, upstream=existing) is None:
            plan.add(JobSpec(kind=Kind.EVAL, params=after, depends_on=existing, **common), label)
    return plan


class JobId(int):
    """A job's id as `qrun eval` gives it: the new job's, or that of an equal job already in the table
    (`existing` then names it: an ExistingJob; None for a new job)."""

    existing: ExistingJob | None = None

    @classmethod
    def of(cls, job_id: int, existing: ExistingJob | None = None) -> JobId:
        out = cls(job_id)
        out.existing = existing
        return out


def add_evaluation(db, spec: JobSpec, rerun: bool = False) -> JobId:
    """Add the eval job of `qrun eval` (check_evaluation's spec), unless an equal job (same model, data,
    params) is queued, running or succeeded: then that job's id, its `existing` set (rerun: add anyway)."""
    from qrun.db import queue

    plan = Plan()
    found = _reuse(db, plan, rerun, Kind.EVAL, spec.model, spec.params, EvalParams.from_dict(spec.params).label())
    if found is not None:
        return JobId.of(found, plan.existing[0])
    return JobId.of(queue.submit_jobs(db, [spec])[0])
