"""What `qrun compare --plot` draws: a comparison's quality against size on disk, one panel per group."""

from __future__ import annotations

import os
from pathlib import Path

from qrun.comparison import BASELINE, LOWER_IS_BETTER, chosen_rows, groups, metric_name, within_drop
from qrun.db.errors import BadInput


def plot_points(group: list[dict], metric: str = "f1", max_drop: float | None = None) -> list[dict]:
    """What --plot draws for one comparison group: one point per row that has the metric and a size,
    {variant, size_mb, value, baseline, pareto, within, pick}, by size. `pareto`: no other point is at
    least as small and at least as good (better in one); `within`: inside the max_drop band (None
    without max_drop or baseline); `pick`: smallest_within's answer."""
    rows = [r for r in group if r.get(metric) is not None and r.get("size_bytes") is not None]
    chosen = chosen_rows(group, metric, max_drop) if max_drop is not None else None
    base, pick = chosen[:2] if chosen else (None, None)
    sign = -1 if metric in LOWER_IS_BETTER else 1
    points = []
    for row in sorted(rows, key=lambda r: (r["size_bytes"], -sign * r[metric])):
        dominated = any(o is not row and o["size_bytes"] <= row["size_bytes"] and sign * o[metric] >= sign * row[metric]
                        and (o["size_bytes"], sign * o[metric]) != (row["size_bytes"], sign * row[metric])
                        for o in rows)
        points.append({"variant": row["variant"], "size_mb": row["size_bytes"] / 1e6, "value": row[metric],
                       "baseline": row["variant"] == BASELINE, "pareto": not dominated,
                       "within": within_drop(row, base, metric, max_drop) if base is not None else None,
                       "pick": row is pick})
    return points


def _short_title(group: list[dict]) -> str:
    first = group[0]
    what = Path(first["data"]).name + f" ({first['mode']})" if first.get("data") else \
        f"perplexity on {Path(first.get('ppl_data') or '?').name}"
    return f"{Path(first['model']).name} -- {what}"


def draw_plot(rows: list[dict], metric: str = "f1", max_drop: float | None = None):
    """The figure (one panel per comparison group with points) and the points drawn, per panel:
    quality against size on disk, one labelled point per variant, the baseline a star, the Pareto
    front a step line, the max_drop band shaded. Matplotlib with the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(g, plot_points(g, metric, max_drop)) for g in groups(rows)]
    panels = [(g, pts) for g, pts in panels if pts]
    name = metric_name(metric)
    fig, axes = plt.subplots(max(len(panels), 1), 1, figsize=(8, 4.5 * max(len(panels), 1)), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, f"no variant has {name} and a size on disk", ha="center", va="center")
        axes[0][0].set_axis_off()
    for (group, points), (ax,) in zip(panels, axes):
        _draw_panel(ax, group, points, metric, max_drop)
    fig.tight_layout()
    return fig, [pts for _, pts in panels]


def _draw_panel(ax, group: list[dict], points: list[dict], metric: str, max_drop: float | None) -> None:
    name = metric_name(metric)
    lower = metric in LOWER_IS_BETTER
    plain = [p for p in points if not p["baseline"]]
    ax.scatter([p["size_mb"] for p in plain], [p["value"] for p in plain], color="tab:blue", zorder=3,
               label="variant")
    base = next((p for p in points if p["baseline"]), None)
    if base is not None:
        ax.scatter([base["size_mb"]], [base["value"]], marker="*", s=200, color="black", zorder=4, label="baseline")
        if max_drop is not None:
            edge = base["value"] + max_drop if lower else base["value"] - max_drop
            ax.axhspan(min(edge, base["value"]), max(edge, base["value"]), color="tab:green", alpha=0.15,
                       label=f"within {max_drop:g} {name} of the baseline")
    for p in points:
        if p["pick"]:
            ax.scatter([p["size_mb"]], [p["value"]], s=220, facecolors="none", edgecolors="tab:green",
                       linewidths=2, zorder=5, label="smallest within")
        ax.annotate(p["variant"], (p["size_mb"], p["value"]), textcoords="offset points", xytext=(5, 5),
                    fontsize="small")
    front = [p for p in points if p["pareto"]]
    ax.step([p["size_mb"] for p in front], [p["value"] for p in front], where="post", color="tab:orange",
            alpha=0.8, zorder=2, label="Pareto front")
    sizes = [p["size_mb"] for p in points]
    if min(sizes) > 0 and max(sizes) / min(sizes) > 10:
        ax.set_xscale("log")
    if lower:
        ax.invert_yaxis()  # better is up, as for the scores
    ax.set(xlabel="size on disk (MB)", ylabel=name + (" (lower is better)" if lower else ""),
           title=_short_title(group))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


PLOT_FORMATS = (".png", ".svg", ".pdf")  # what matplotlib writes without extra packages


def check_plot_path(plot_file: str) -> Path:
    """--plot's file, checked before anything is printed: a new or existing file of a known format in
    a directory the user can write."""
    path = Path(plot_file)
    if not plot_file.strip():
        raise BadInput("--plot '': give a file name, like sizes.png")
    if path.is_dir():
        raise BadInput(f"--plot {plot_file} is a directory: give a file name, like {path / 'sizes.png'}")
    if path.suffix.lower() not in PLOT_FORMATS:
        raise BadInput(f"--plot {plot_file}: give a {', '.join(PLOT_FORMATS[:-1])} or {PLOT_FORMATS[-1]} file")
    if not path.parent.is_dir():
        raise BadInput(f"--plot {plot_file}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BadInput(f"--plot {plot_file}: you may not write there: give a path in a directory you can write")
    return path


def write_plot(rows: list[dict], path: Path, metric: str = "f1", max_drop: float | None = None) -> list[list[dict]]:
    """draw_plot into a PNG, SVG or PDF (by the file's suffix), whole or not at all; returns the points
    drawn, per panel."""
    import matplotlib.pyplot as plt

    fig, points = draw_plot(rows, metric, max_drop)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        fig.savefig(partial, format=path.suffix.lower().lstrip("."), dpi=120)
        partial.replace(path)
    finally:
        plt.close(fig)
        partial.unlink(missing_ok=True)
    return points

