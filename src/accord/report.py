"""The Markdown report of one merge (``report.md`` beside ``report.json``) and its figures.

:func:`merge_figures` draws what a merge report can show from its JSON alone (canonical
correlation spectra of a CCA alignment, NP Merge's loss curve) plus NP Merge's coefficient
histograms when the learned coefficients are passed; :func:`write_merge_report` writes the
Markdown that links them. Both write atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from accord._io import write_text
from accord._table import format_table
from accord.figures import (
    SPECTRA_TITLE,
    canonical_correlation_spectra,
    coefficient_histograms,
    loss_curve,
)
from accord.registry import COMBINERS

# Score names of the matchers' reports, most telling first; the first one present is shown.
SCORE_KEYS = (
    "mean_canonical_correlation",
    "mean_correlation",
    "cosine_similarity",
    "mean_merge_score",
    "mean_squared_distance",
)
# Titles of the figures a combiner's report gives (its name, "_", the kind).
COMBINER_FIGURES = {"loss": "training loss", "histogram": "learned coefficients"}
REPORT_FILE = "report.md"


def space_score(entry: Mapping[str, Any]) -> tuple[str, float] | None:
    """``(name, value)`` of one space's alignment score, averaged over the aligned models."""
    scored = [entry, *entry.get("models", {}).values()]
    for key in SCORE_KEYS:
        values = [
            float(s[key])
            for s in scored
            if isinstance(s.get(key), int | float) and not isinstance(s.get(key), bool)
        ]
        if values:
            return key, sum(values) / len(values)
    return None


def merge_figures(
    directory: str | os.PathLike[str],
    report: Mapping[str, Any],
    coefficients: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Path]:
    """Draw the figures of one merge report into ``directory``; name → path of those drawn.

    ``spectra.png`` when the report has canonical correlations (CCA, and NP Merge aligned by
    CCA); ``<combiner>-loss.png`` when the combiner's own report has a loss curve (NP Merge);
    ``<combiner>-coefficients.png`` when learned ``coefficients``
    (:attr:`accord.combine.NPMergeResult.coefficients`) are given.
    """
    root = Path(directory)
    figures: dict[str, Path] = {}
    spectra = root / "spectra.png"
    if canonical_correlation_spectra(report.get("spaces", {}), spectra):
        figures["spectra"] = spectra
    combiner = str(report.get("combine", ""))
    losses = report.get(combiner, {}).get("losses")
    if losses:
        loss_curve(losses, root / f"{combiner}-loss.png", _label(combiner))
        figures[f"{combiner}_loss"] = root / f"{combiner}-loss.png"
    if coefficients:
        coefficient_histograms(coefficients, root / f"{combiner}-coefficients.png")
        figures[f"{combiner}_histogram"] = root / f"{combiner}-coefficients.png"
    return figures


def _label(combiner: str) -> str:
    return COMBINERS[combiner].label if combiner in COMBINERS else combiner


def figure_title(name: str) -> str:
    """The caption of figure ``name`` of :func:`merge_figures`."""
    if name == "spectra":
        return SPECTRA_TITLE
    combiner, _, kind = name.rpartition("_")
    return f"{_label(combiner)}: {COMBINER_FIGURES[kind]}" if kind in COMBINER_FIGURES else name


def _accuracy_rows(accuracy: Mapping[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = [
        [f"base model {i}", a["val"], a["test"]] for i, a in enumerate(accuracy.get("base", []))
    ]
    if "ensemble" in accuracy:
        rows.append(["ensemble", accuracy["ensemble"]["val"], accuracy["ensemble"]["test"]])
    if "merged" in accuracy:
        rows.append(["merged", accuracy["merged"]["val"], accuracy["merged"]["test"]])
    return rows


def _space_rows(spaces: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for name, entry in spaces.items():
        score = space_score(entry)
        shown = f"{score[0]} = {score[1]:.4f}" if score else "-"
        notes = "; ".join(entry.get("notes", [])) or "-"
        rows.append([name, entry.get("method", "-"), shown, notes.replace("|", "/")])
    return rows


def _header(report: Mapping[str, Any]) -> list[str]:
    method = report.get("method", "?")
    lines = [f"# Merge report: {method}", ""]
    facts = {
        "method": method,
        "alignment": report.get("alignment"),
        "options": json.dumps(report.get("options", {}), sort_keys=True),
        "reference model": report.get("reference"),
        "repair": report.get("repair"),
        "BatchNorm under dense maps": report.get("batchnorm"),
        "models": report.get("num_models"),
        "seconds": report.get("seconds"),
    }
    lines += [f"- **{k}**: {v}" for k, v in facts.items() if v is not None]
    lines += [f"  - model {i}: `{p}`" for i, p in enumerate(report.get("models", []))]
    return lines


def _section(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    if not rows:
        return []
    return ["", f"## {title}", "", format_table(headers, rows, markdown=True)]


def write_merge_report(
    directory: str | os.PathLike[str], report: Mapping[str, Any], figures: Mapping[str, Path]
) -> Path:
    """Write ``directory/report.md``: settings, accuracies, per-space alignment, timings, figures.

    ``report`` is the merge's ``report.json`` content (a :class:`accord.MergeResult` report
    with ``accuracy``, ``models`` and ``seconds`` added by ``accord merge``); ``figures`` maps a
    name (see :func:`figure_title`) to a PNG, linked relative to ``directory``.
    """
    root = Path(directory)
    lines = _header(report)
    lines += _section(
        "Accuracy", ["model", "val acc", "test acc"], _accuracy_rows(report.get("accuracy", {}))
    )
    trials = [
        [json.dumps(t["options"], sort_keys=True), t.get("val_accuracy", t.get("error", "-"))]
        for t in report.get("tuning", [])
    ]
    lines += _section("Options tried on the validation split", ["options", "val acc"], trials)
    spaces = _space_rows(report.get("spaces", {}))
    lines += _section("Feature spaces", ["space", "method used", "score", "notes"], spaces)
    timings = [[stage, seconds] for stage, seconds in report.get("timings", {}).items()]
    lines += _section("Timings (seconds)", ["stage", "seconds"], timings)
    if figures:
        lines += ["", "## Figures"]
        for name, path in figures.items():
            title = figure_title(name)
            link = Path(os.path.relpath(Path(path), root)).as_posix()
            lines += ["", f"**{title}**", "", f"![{title}]({link})"]
    target = root / REPORT_FILE
    write_text(target, "\n".join(lines) + "\n")
    return target


__all__ = ["merge_figures", "space_score", "write_merge_report"]
