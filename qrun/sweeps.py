"""What one submit adds: its inputs checked, its sweep expanded into jobs, and the jobs that already
exist offered instead of added again.

No torch here: `workers.inputs` and `workers.datasets` read model directories and files with plain
Python, so bad input is refused before the database is opened.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from qrun.db.errors import BadInput
from qrun.db.queue import JobSpec
from qrun.db.states import Kind
from qrun.variants import variant_labels
from qrun.workers import methods

EVAL_MODES = ("score", "generate")
BASELINE = "baseline"
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
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise BadInput(f"--name {name!r} must be 1 to {MAX_NAME_LENGTH} printable characters, like --name damp-sweep")
    if SWEEP_ID_PATTERN.fullmatch(name):
        raise BadInput(f"--name {name!r} looks like a sweep id (8 hex characters): choose a name with other letters")
    return name


def eval_params(data: str | None, mode: str, max_new_tokens: int, ppl: str | None, batch_size: int,
                variant: str, trust_remote_code: bool) -> dict:
    return {"data": data, "mode": mode, "max_new_tokens": max_new_tokens, "ppl_data": ppl,
            "batch_size": batch_size, "variant": variant, "trust_remote_code": trust_remote_code}


def validate_eval_inputs(data: str | None, ppl: str | None, max_new_tokens: int, batch_size: int,
                         batch_option: str = "eval_batch_size") -> None:
    """Every eval input, checked by the library functions that the job itself reads them with.
    batch_option: the batch size's option as this command spells it (underscores for dashes)."""
    from qrun.workers.datasets import check_eval_file, check_perplexity_file
    from qrun.workers.inputs import check_job_counts

    if data:
        check_eval_file(data)
    if ppl:
        check_perplexity_file(ppl)
    check_job_counts(max_new_tokens=max_new_tokens, **{batch_option: batch_size})


@dataclass
class SweepRequest:
    """A submit's inputs, checked: the model's resolved path, one params dict per sweep point (in the
    order of the options, repeats dropped), and the eval's arguments (None: no eval)."""

    model: str
    points: list[dict]
    eval_args: dict | None
    priority: int = 0
    max_attempts: int = 3
    gpus: int = 1  # GPUs of one node each job holds


def check_submission(model, bits=None, *, method="gptq", gguf_type=None, group_size=None, desc_act=False, sym=True,
                     damp=0.01, calib=None, calib_samples=128, calib_max_len=1024, batch_size=16, eval=None,
                     eval_mode="score", eval_ppl=None, max_new_tokens=32, eval_batch_size=8, priority=0,
                     max_attempts=3, trust_remote_code=False, allow_pickle=False, gpus_per_job=1) -> SweepRequest:
    """Every input of a submit checked (model, methods, settings, files), and the sweep expanded: BadInput
    naming the first bad one. Nothing is opened or written.

    The sweep is methods × bits × group sizes × damps, each method taking the part that applies to it
    (workers.methods): AWQ only 4 bits, GGUF its quant types, damp only GPTQ. group_size None: 128
    where a method takes groups."""
    from qrun.workers.datasets import check_calibration_file
    from qrun.workers.inputs import (check_calibration_settings, check_gpus_per_job, check_job_counts,
                                     check_priority, check_quantizable, inspect_model)

    chosen = [methods.check_method(m) for m in dict.fromkeys(as_names(method, "--method"))]
    gguf_types = tuple(methods.check_gguf_type(t) for t in as_names(gguf_type, "--gguf-type")) if gguf_type else ()
    if gguf_types and not any(m.name == "gguf" for m in chosen):
        raise BadInput("--gguf-type applies to --method gguf only: add --method gguf")
    bits = as_values(bits, "--bits", int) if bits not in (None, (), []) else ()
    explicit_group = group_size not in (None, (), [])
    group_size = as_values(group_size, "--group-size", int) if explicit_group else (128,)
    damp = as_values(damp, "--damp", float)
    _check_options_apply(chosen, explicit_group, desc_act, sym, calib, damp)
    if eval_mode not in EVAL_MODES:
        raise BadInput(f"--eval-mode {eval_mode!r} is not one of {', '.join(EVAL_MODES)}")
    if eval_mode != "score" and eval is None:
        raise BadInput(f"--eval-mode {eval_mode} applies to the eval jobs of --eval FILE: add --eval")
    info = inspect_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    check_quantizable(info)
    check_calibration_settings(calib_samples, calib_max_len)
    check_job_counts(batch_size=batch_size, max_attempts=max_attempts)
    check_priority(priority)
    check_gpus_per_job(gpus_per_job)
    calib = check_file(calib, "calibration file")
    eval_data = check_file(eval, "eval file")
    eval_ppl = check_file(eval_ppl, "perplexity file")
    if calib:
        check_calibration_file(calib, min_samples=min(calib_samples, 4))
    validate_eval_inputs(eval_data, eval_ppl, max_new_tokens, eval_batch_size)
    common = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    calibration = {"calib": calib or eval_data, "calib_samples": calib_samples, "calib_max_len": calib_max_len,
                   "batch_size": batch_size}
    points = []
    for chosen_method in chosen:
        for point in methods.points_of_method(chosen_method, bits, gguf_types, alone=len(chosen) == 1):
            points += _method_points(info, chosen_method, point, group_size, desc_act, sym, damp, calibration, common)
    eval_args = None
    if eval_data or eval_ppl:
        eval_args = dict(data=eval_data, mode=eval_mode, max_new_tokens=max_new_tokens, ppl=eval_ppl,
                         batch_size=eval_batch_size, trust_remote_code=trust_remote_code)
    return SweepRequest(info.path, list({_key(p): p for p in points}.values()), eval_args, priority,
                        max_attempts, gpus_per_job)


def as_names(value, option: str) -> tuple[str, ...]:
    """A repeatable text option given as one value or several."""
    values = tuple(value) if isinstance(value, (list, tuple, set, frozenset)) else (value,)
    if not values or any(not isinstance(v, str) or not v for v in values):
        raise BadInput(f"{option} {value!r} must be a name or a list of names, like ['gptq', 'rtn']")
    return values


def _check_options_apply(chosen: list, explicit_group: bool, desc_act: bool, sym: bool, calib, damp) -> None:
    """An option that no method of the sweep takes is refused, not silently ignored."""
    names = ", ".join(m.name for m in chosen)
    if explicit_group and not any(m.grouped for m in chosen):
        raise BadInput(f"--group-size does not apply to --method {names} (they have their own block layout)")
    if desc_act and not any(m.name == "gptq" for m in chosen):
        raise BadInput(f"--desc-act is GPTQ's activation order: it does not apply to --method {names}")
    if not sym and not any(m.name in ("gptq", "rtn") for m in chosen):
        raise BadInput(f"--no-sym does not apply to --method {names}")
    if calib and not any(m.calibrated for m in chosen):
        raise BadInput(f"--calib does not apply to --method {names}: they use no calibration data")
    if tuple(damp) != (0.01,) and not any(m.name == "gptq" for m in chosen):
        raise BadInput(f"--damp is GPTQ's Hessian dampening: it does not apply to --method {names}")


def _method_points(info, method, point: dict, group_sizes, desc_act, sym, damps, calibration: dict,
                   common: dict) -> list[dict]:
    """The params of one method's sweep point, crossed with the options that method takes, each checked."""
    from qrun.workers.inputs import check_quantize_settings

    extra = ({} if method.name == methods.DEFAULT_METHOD else {"method": method.name}) | methods.requirements(method)
    if method.name == "gguf":
        extra["gguf_type"] = point["gguf_type"]
    if not method.grouped:
        methods.check_architecture(point | extra, info.architecture)
        methods.check_widths(point | extra, info.widths or (("hidden size", info.hidden_size),
                                                          ("intermediate size", info.intermediate_size)))
        return [{"bits": point["bits"], **extra, **common}]
    out = []
    for g in group_sizes:
        if method.name == "gptq":
            for d in damps:
                check_quantize_settings(info, point["bits"], g, d)
                out.append({"bits": point["bits"], "group_size": g, "desc_act": desc_act, "sym": sym,
                            "damp_percent": d, **calibration, **common})
            continue
        check_quantize_settings(info, point["bits"], g, 0.01, bits_of=method.bits)
        settings = {"bits": point["bits"], "group_size": g}
        if method.name == "rtn":
            settings["sym"] = sym
        out.append(settings | extra | (calibration if method.calibrated else {}) | common)
    return out


def _key(params: dict) -> str:
    import json

    return json.dumps(params, sort_keys=True)


# ---------------------------------------------------------------- planning the jobs


@dataclass
class PlannedJob:
    """A job a submit adds. label: its variant within the sweep ("baseline" for the unquantized eval)."""

    spec: JobSpec
    label: str

    @property
    def kind(self) -> str:
        return self.spec.kind.value


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
    from qrun.workers.inputs import gpus_param

    check_priority_cap(db, request.priority)
    plan = Plan()
    model, eval_args = request.model, request.eval_args
    common = dict(model=model, priority=request.priority, max_attempts=request.max_attempts)
    gpus = gpus_param(request.gpus)
    if eval_args is not None:
        baseline = eval_params(variant=BASELINE, **eval_args) | gpus
        if _reuse(db, plan, rerun, Kind.EVAL, model, baseline, BASELINE) is None:
            plan.add(JobSpec(kind=Kind.EVAL, params=baseline, **common), BASELINE)
    for params, label in zip(request.points, variant_labels(request.points)):
        params = params | gpus
        existing = _reuse(db, plan, rerun, Kind.QUANTIZE, model, params, label)
        if existing is None:
            index = plan.add(JobSpec(kind=Kind.QUANTIZE, params=params, **common), label)
        if eval_args is None:
            continue
        # The eval's stored variant is the method's label (w4g128, rtn-w4g128, ...): what `qrun compare` groups by.
        evaluation = (eval_params(variant=methods.label(params), **eval_args) | {"from_upstream": True} | gpus
                      | methods.requirements(methods.method_of(params)))
        if existing is None:
            plan.add(JobSpec(kind=Kind.EVAL, params=evaluation, after=index, **common), label)
        elif _reuse(db, plan, rerun, Kind.EVAL, model, evaluation, label, upstream=existing) is None:
            plan.add(JobSpec(kind=Kind.EVAL, params=evaluation, depends_on=existing, **common), label)
    return plan
