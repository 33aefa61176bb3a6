"""The benchmarks' figures: accuracy versus the number of models, and interpolation curves.

Every figure is drawn on a bare ``matplotlib.figure.Figure`` (no pyplot state, no display)
and written atomically as a PNG at 100 dpi.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from accord._io import write_with
from accord.bench._common import by_panel, cell, row_names

# Line styles of the reference rows, so that they stand apart from the merge methods.
_REFERENCE_STYLE = {
    "ensemble": {"color": "black", "linestyle": "--"},
    "base": {"color": "grey", "linestyle": ":"},
}


def _save(figure: Any, path: str | os.PathLike[str]) -> None:
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def accuracy_versus_models(
    results: Sequence[Mapping[str, Any]],
    labels: Mapping[str, str],
    path: str | os.PathLike[str],
    title: str,
) -> None:
    """One panel per (architecture, setting): mean test accuracy (± std over model sets)
    of every row against N, the number of models merged."""
    from matplotlib.figure import Figure

    panels = by_panel(results)
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    figure = Figure(figsize=(4.6 * cols + 1.8, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, ((arch, setting), chosen) in zip(axes, panels, strict=False):
        for name in row_names(chosen):
            present = [(r["num_models"], cell(r, name)) for r in chosen]
            sizes, cells = zip(*((n, c) for n, c in present if c["mean"] is not None), strict=True)
            ax.errorbar(
                sizes,
                [c["mean"] for c in cells],
                yerr=[c["std"] for c in cells],
                label=labels.get(name, name),
                marker="o",
                markersize=3,
                capsize=2,
                **_REFERENCE_STYLE.get(name, {}),
            )
        ax.set_xticks([r["num_models"] for r in chosen])
        ax.set_xlabel("models merged (N)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{arch}, {setting}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right center", fontsize=7)
    figure.suptitle(title, fontsize=10)
    _save(figure, path)


def interpolation_figure(
    curves: Mapping[str, Mapping[str, Any]],
    merged: Mapping[str, float],
    path: str | os.PathLike[str],
    title: str,
) -> None:
    """Test accuracy and loss along the linear path from model 0 (α = 0) to model 1 (α = 1).

    ``curves[name]`` has ``alphas``, ``accuracy`` and ``loss``; ``merged[name]`` is the test
    accuracy of that method's merged model, drawn at α = 0.5 for comparison.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.0, 3.4), layout="constrained")
    accuracy_ax, loss_ax = figure.subplots(1, 2)
    for index, (name, curve) in enumerate(curves.items()):
        colour = f"C{index}"
        accuracy_ax.plot(curve["alphas"], curve["accuracy"], marker="o", ms=3, color=colour)
        loss_ax.plot(curve["alphas"], curve["loss"], marker="o", ms=3, color=colour, label=name)
        if name in merged:
            accuracy_ax.plot([0.5], [merged[name]], marker="*", ms=11, color=colour)
    accuracy_ax.set_ylabel("test accuracy")
    loss_ax.set_ylabel("test loss")
    for ax in (accuracy_ax, loss_ax):
        ax.set_xlabel("α  (0: model 0, 1: model 1 aligned to model 0)")
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7)
    accuracy_ax.set_title("★: the merged model of that method", fontsize=8)
    figure.suptitle(title, fontsize=10)
    _save(figure, path)


def partial_figure(
    points: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str
) -> None:
    """Mean test accuracy (± std over model sets) of partial merges against the parameters
    they keep, each point labelled with k, the number of feature spaces merged."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = figure.subplots()
    kept = [p["parameters"] for p in points]
    means = [p["test"]["mean"] for p in points]
    spread = [p["test"]["std"] or 0.0 for p in points]
    ax.errorbar(kept, means, yerr=spread, marker="o", ms=4, capsize=2)
    for point, x, y in zip(points, kept, means, strict=True):
        ax.annotate(
            f"k={point['stop_at']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlabel("parameters kept (k = 0: the ensemble; k = all: one merged model)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9)
    _save(figure, path)
