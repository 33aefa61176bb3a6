"""The figures of a merge's report: canonical-correlation spectra, NP Merge's coefficient
histograms and loss curve.

Every figure is drawn on a bare ``matplotlib.figure.Figure`` (no pyplot state, no display;
matplotlib is imported when a figure is drawn) and written atomically as a PNG.
:func:`accord.report.merge_figures` chooses which to draw for a report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from accord._io import write_with

SPECTRA_TITLE = "Canonical correlations per feature space (descending)"
MAX_PANELS = 24  # of the coefficient histograms; the tensors past them share the last panel


def canonical_correlation_spectra(
    spaces: Mapping[str, Any], path: str | os.PathLike[str], title: str = ""
) -> bool:
    """One line per (space, aligned model): its canonical correlations in descending order.

    The x axis is the index divided by the space's width, so narrow and wide layers share it;
    colour runs from the first space (dark) to the last (light). Returns False, writing
    nothing, when no space has canonical correlations (e.g. the method was not CCA).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    curves = [
        (name, model, scores["canonical_correlations"])
        for name, entry in spaces.items()
        for model, scores in entry.get("models", {}).items()
        if scores.get("canonical_correlations")
    ]
    if not curves:
        return False
    names = list(dict.fromkeys(name for name, _, _ in curves))
    colours = colormaps["viridis"]
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.subplots()
    labelled: set[str] = set()
    for name, _model, values in curves:
        shade = names.index(name) / max(1, len(names) - 1)
        xs = [(k + 0.5) / len(values) for k in range(len(values))]
        label = None if name in labelled else name  # one legend entry per space
        labelled.add(name)
        ax.plot(xs, values, color=colours(0.9 * shade), linewidth=1.2, label=label)
    ax.set_xlabel("canonical direction (fraction of the space's width)")
    ax.set_ylabel("canonical correlation")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or SPECTRA_TITLE, fontsize=10)
    ax.legend(fontsize=6, ncol=2 if len(names) > 8 else 1, loc="lower left")
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return True


def coefficient_histograms(
    coefficients: Mapping[str, torch.Tensor], path: str | Path, bins: int = 50
) -> None:
    """One histogram per parameter tensor of the learned weights, written as a PNG.

    Two models: the weight of model 0 (model 1's is 1 minus it); more: each model's weight,
    overlaid. After ``MAX_PANELS − 1`` tensors the rest share one panel.
    """
    from matplotlib.figure import Figure

    names = list(coefficients)
    groups = [[n] for n in names[: MAX_PANELS - 1]]
    if len(names) > MAX_PANELS - 1:
        groups.append(names[MAX_PANELS - 1 :])
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    # no layout engine: with two dozen panels it costs more than all the drawing
    figure = Figure(figsize=(3.2 * cols, 2.4 * rows))
    grid = {"hspace": 0.6, "wspace": 0.3}
    axes = figure.subplots(rows, cols, squeeze=False, sharex=True, gridspec_kw=grid).ravel()
    for ax, group in zip(axes, groups, strict=False):
        stacked = torch.cat([coefficients[n].flatten(1) for n in group], 1).double()
        for index, weights in enumerate(stacked[:1] if len(stacked) == 2 else stacked):
            counts, edges = torch.histogram(weights, bins=bins, range=(0.0, 1.0))
            ax.stairs(counts.numpy(), edges.numpy(), fill=True, alpha=0.5, label=f"model {index}")
        title = group[0] if len(group) == 1 else f"{len(group)} other tensors"
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.locator_params(axis="y", nbins=3)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    figure.supxlabel("learned weight")
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))


def loss_curve(losses: Sequence[float], path: str | Path, title: str = "NP Merge") -> None:
    """The training loss per step, written as a PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.2), layout="constrained")
    ax = figure.subplots()
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
