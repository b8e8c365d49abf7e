"""Naming the variants of a sweep: keyed by every parameter that changes the quantized model, labelled
as shortly as the set being shown allows.

`w4g128` says bits and group size, as everywhere in qrun (other methods name themselves: `rtn-w4g128`,
`gguf-q4_k_m`, `fp8`; workers.methods.label). A parameter that differs between members of
the set is added to every label (`w4g128·d0.01`, `w4g128·d0.05`), so that labels stay unique within
it; one that is the same for all is left out, however unusual its value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from qrun.workers.methods import label as base_label  # w4g128, rtn-w4g128, gguf-q8_0, ...
from qrun.workers.methods import method_of


def _calib_name(path: str | None) -> str:
    return Path(path).stem if path else "builtin"


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) and math.isfinite(value) else str(value)


# The parameters beyond base_label that make a different model, each with how a label shows it.
EXTRA_KEYS: tuple[tuple[str, object, callable], ...] = (
    ("damp_percent", 0.01, lambda v: f"d{_number(v)}"),
    ("calib", None, lambda v: f"cal:{_calib_name(v)}"),
    ("calib_samples", 128, lambda v: f"n{v}"),
    ("calib_max_len", 1024, lambda v: f"len{v}"),
)


def variant_key(params: dict) -> tuple:
    """Every parameter that changes the quantized model: two jobs with equal keys make the same variant."""
    return (params.get("method") or "gptq", params.get("gguf_type"), params["bits"], params.get("group_size", 128),
            bool(params.get("desc_act", False)), bool(params.get("sym", True))) + tuple(
        params.get(name, default) if _takes(params, name) else None for name, default, _ in EXTRA_KEYS)


def variant_label(params: dict, among: Iterable[dict] = ()) -> str:
    """A label for `params` unique within `among` (the set it is shown with; it may include params):
    the base label, plus each parameter that differs inside the set, e.g. `w8g128·d0.05`."""
    members = [params, *among]
    parts = [base_label(params)]
    for name, default, show in EXTRA_KEYS:
        if not _takes(params, name):
            continue  # RTN has no calibration set, AWQ no damp: nothing to tell apart
        values = {_hashable(m.get(name, default)) for m in members if _takes(m, name)}
        if len(values) > 1:
            value = params.get(name, default)
            if name == "calib" and len({_calib_name(v) for v in values}) < len(values):
                parts.append(f"cal:{value or 'builtin'}")  # files of one name in several folders
            else:
                parts.append(show(value))
    return "·".join(parts)


def _takes(params: dict, name: str) -> bool:
    """Whether the method of `params` has the setting `name` (damp: GPTQ's; calibration: calibrated ones)."""
    method = method_of(params)
    return method.name == "gptq" if name == "damp_percent" else method.calibrated


def variant_labels(points: list[dict]) -> list[str]:
    """variant_label of each point within the whole list."""
    return [variant_label(p, points) for p in points]


def _hashable(value):
    return repr(value) if isinstance(value, (list, dict)) else value
