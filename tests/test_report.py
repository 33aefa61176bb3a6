"""report.md of a merge: its tables come from report.json, its figures are written and linked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import accord
from accord.report import merge_figures, space_score, write_merge_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``accord merge`` output (cca and npmerge) of two tiny MLPs on digits."""
    root = tmp_path_factory.mktemp("merge")
    request = accord.ModelSetRequest(
        arch="mlp",
        dataset="digits",
        seeds=(0, 1),
        model={"width": 16, "depth": 2},
        train=accord.TrainConfig(epochs=1, batch_size=64),
    )
    checkpoints = accord.train_model_set(request, root / "store", progress=False)
    for method in ("cca", "npmerge"):
        config = accord.MergeConfig(
            models=[str(c.path) for c in checkpoints],
            method=method,
            samples=300,
            output=str(root / method),
        )
        accord.run_merge(config, progress=False)
    return root


def test_cca_report_has_accuracies_spaces_timings_and_the_spectra(merged: Path) -> None:
    directory = merged / "cca"
    report = json.loads((directory / "report.json").read_text())
    figures = merge_figures(directory, report)
    assert set(figures) == {"spectra"}
    assert figures["spectra"].read_bytes()[:8] == PNG
    text = write_merge_report(directory, report, figures).read_text()
    assert text.startswith("# Merge report: cca")
    merged_row = next(line for line in text.splitlines() if line.startswith("| merged"))
    assert f"{report['accuracy']['merged']['test']:.4f}" in merged_row
    score = report["spaces"]["layers.1"]["models"]["1"]["mean_canonical_correlation"]
    assert f"mean_canonical_correlation = {score:.4f}" in text
    assert "| match " in text and "![" in text and "](spectra.png)" in text


def test_npmerge_report_draws_the_loss_and_given_coefficients(merged: Path) -> None:
    directory = merged / "npmerge"
    report = json.loads((directory / "report.json").read_text())
    coefficients = {"layers.0.weight": torch.rand(2, 16, 64)}
    figures = merge_figures(directory, report, coefficients)
    assert set(figures) == {"spectra", "npmerge_loss", "npmerge_histogram"}
    assert all(path.read_bytes()[:8] == PNG for path in figures.values())
    text = write_merge_report(directory, report, figures).read_text()
    assert "](npmerge-loss.png)" in text and "](npmerge-coefficients.png)" in text


def test_space_score_prefers_canonical_correlations_and_averages_models() -> None:
    entry = {
        "method": "cca",
        "models": {
            "1": {"mean_canonical_correlation": 0.5, "mean_correlation": 0.1},
            "2": {"mean_canonical_correlation": 0.7},
        },
    }
    assert space_score(entry) == ("mean_canonical_correlation", pytest.approx(0.6))
    assert space_score({"method": "zipit", "mean_merge_score": 0.3, "models": {}}) == (
        "mean_merge_score",
        0.3,
    )
    assert space_score({"method": "identity", "models": {}}) is None
