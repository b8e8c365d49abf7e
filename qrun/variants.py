"""Naming the variants of a sweep: keyed by every parameter that changes the quantized model, labelled
as shortly as the set being shown allows.

`w4g128` says bits and group size, as everywhere in qrun (other methods name themselves: `rtn-w4g128`,
`gguf-q4_k_m`, `fp8`; workers.params.QuantizeParams.label). A parameter that differs between members of
the set is added to every label (`w4g128·d0.01`, `w4g128·d0.05`), so that labels stay unique within
it; one that is the same for all is left out, however unusual its value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from qrun.workers.params import MODEL_SETTINGS, QuantizeParams


def _calib_name(path: str | None) -> str:
    return Path(path).stem if path else "builtin"


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) and math.isfinite(value) else str(value)


# How a label shows each setting beyond the base label that makes a different model (MODEL_SETTINGS).
SHOWN: dict[str, callable] = {
    "damp_percent": lambda v: f"d{_number(v)}",
    "calib": lambda v: f"cal:{_calib_name(v)}",
    "calib_samples": lambda v: f"n{v}",
    "calib_max_len": lambda v: f"len{v}",
}


def variant_key(params: dict) -> tuple:
    """Every parameter that changes the quantized model: two jobs with equal keys make the same variant."""
    return QuantizeParams.from_dict(params).variant_key()


def variant_label(params: dict, among: Iterable[dict] = ()) -> str:
    """A label for `params` unique within `among` (the set it is shown with; it may include params):
    the base label, plus each parameter that differs inside the set, e.g. `w8g128·d0.05`."""
    typed = QuantizeParams.from_dict(params)
    members = [typed, *map(QuantizeParams.from_dict, among)]
    parts = [typed.label()]
    for name in MODEL_SETTINGS:
        if not typed.takes(name):
            continue  # RTN has no calibration set, AWQ no damp: nothing to tell apart
        values = {_hashable(getattr(m, name)) for m in members if m.takes(name)}
        if len(values) > 1:
            value = getattr(typed, name)
            if name == "calib" and len({_calib_name(v) for v in values}) < len(values):
                parts.append(f"cal:{value or 'builtin'}")  # files of one name in several folders
            else:
                parts.append(SHOWN[name](value))
    return "·".join(parts)


def variant_labels(points: list[dict]) -> list[str]:
    """variant_label of each point within the whole list."""
    return [variant_label(p, points) for p in points]


def _hashable(value):
    return repr(value) if isinstance(value, (list, dict)) else value
