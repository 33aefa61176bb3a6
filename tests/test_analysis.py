"""Layer similarity: linear CKA and mean CCA against independent computations, and the files."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import accord
from accord.analysis import (
    CAVEATS,
    add_analyze_parser,
    canonical_correlations,
    cka_attack,
    compare_layers,
    linear_cka,
    mean_cca,
    plot_cka_attack,
    write_similarity,
)


@pytest.fixture
def features() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(300, 8, generator=generator, dtype=torch.float64)


def _gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from the centred Gram matrices (Kornblith et al., eq. 3): an independent route."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def test_cka_is_one_under_an_orthogonal_map_and_isotropic_scaling(features) -> None:
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert linear_cka(features, 2.5 * features @ q) == pytest.approx(1.0, abs=1e-12)


def test_general_invertible_map_lowers_cka_but_not_cca(features) -> None:
    # A badly conditioned invertible map: same information, other linear coordinates.
    a = (
        torch.diag(torch.logspace(0, 2, 8, dtype=torch.float64))
        @ torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    )
    mapped = features @ a
    assert linear_cka(features, mapped) < 0.9
    assert mean_cca(features, mapped, ridge=0.0) == pytest.approx(1.0, abs=1e-10)
    # the default small ridge costs little: λ/(λ + g) on the weakest directions
    assert mean_cca(features, mapped) == pytest.approx(1.0, abs=1e-3)


def test_cka_matches_the_gram_matrix_formula(features) -> None:
    other = torch.tanh(features[:, :5] @ torch.randn(5, 6, dtype=torch.float64)) + 0.3
    expected = _gram_cka(features.numpy(), other.numpy())
    assert linear_cka(features, other) == pytest.approx(expected, rel=1e-10)
    assert 0.0 < expected < 1.0


def test_canonical_correlations_match_qr_of_both_sides(features) -> None:
    noise = torch.randn(300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    other = features[:, :5] + 0.5 * noise
    centred = [m - m.mean(0) for m in (features.numpy(), other.numpy())]
    qx, qy = (np.linalg.qr(m)[0] for m in centred)
    expected = np.linalg.svd(qx.T @ qy, compute_uv=False)
    got = canonical_correlations(features, other, ridge=0.0).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_constant_features_are_dropped_not_counted(features) -> None:
    padded = torch.cat([features, torch.zeros(300, 3, dtype=torch.float64)], dim=1)
    assert canonical_correlations(padded, features).numel() == 8
    assert mean_cca(torch.zeros(300, 4), features) == 0.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[accord.Checkpoint]:
    request = accord.ModelSetRequest(
        arch="mlp",
        dataset="digits",
        seeds=(0, 1),
        model={"width": 16, "depth": 2},
        train=accord.TrainConfig(epochs=1, batch_size=64),
    )
    return accord.train_model_set(request, tmp_path_factory.mktemp("store"), progress=False)


def test_a_model_matches_itself_and_the_heatmaps_are_written(checkpoints, tmp_path) -> None:
    data = accord.load_dataset("digits")
    model = checkpoints[0].model
    similarity = compare_layers(model, model, data.val, samples=120, ridge=0.0, progress=False)
    assert similarity.layers_a == ["layers_2", "layers_4", "logits"]
    for _, _, cca, cka in similarity.diagonal():
        assert cca == pytest.approx(1.0, abs=1e-8) and cka == pytest.approx(1.0, abs=1e-9)
    paths = write_similarity(similarity, tmp_path, ("a", "a"), "digits")
    for kind in ("cca", "cka"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["markdown"].read_text()
    assert "| layers_2 " in text and CAVEATS in text


def test_analyze_command_prints_the_diagonal_and_writes_files(
    checkpoints, tmp_path: Path, capsys
) -> None:
    parser = argparse.ArgumentParser()
    add_analyze_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "analysis"
    args = parser.parse_args(
        [
            "analyze",
            *(str(c.path) for c in checkpoints),
            "--samples",
            "120",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "linear CKA" in printed and "Caveats" in printed
    assert {p.name for p in out.iterdir()} == {
        "cca.png",
        "cka.png",
        "similarity.md",
        "similarity.json",
    }


@pytest.mark.parametrize("target", [0.3, 0.75])
def test_cka_attack_reaches_the_target_with_the_same_function(
    checkpoints, target, tmp_path
) -> None:
    data = accord.load_dataset("digits")
    report, attacked = cka_attack(checkpoints[0].model, data.val, "layers.3", target, samples=200)
    assert report.cka_before == pytest.approx(1.0, abs=1e-12)
    assert report.cka_after == pytest.approx(target, abs=1e-3)
    assert report.max_relative_logit_change < 1e-5
    assert report.accuracy_after == report.accuracy_before
    assert report.mean_cca_after == pytest.approx(1.0, abs=1e-6)
    assert report.condition_number > 1.0
    # the returned model is the re-coordinated one: same logits, other layer coordinates
    inputs = data.val.images[:8].double()
    logits, observed = attacked(inputs)
    expected = copy.deepcopy(checkpoints[0].model).double()(inputs)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    assert observed[report.node].shape == (8, 16)
    path = tmp_path / "attack.png"
    plot_cka_attack(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cka_attack_names_an_unreachable_target_and_a_wrong_space(checkpoints) -> None:
    data = accord.load_dataset("digits")
    with pytest.raises(ValueError, match=r"target CKA 1e-06 is out of reach for space 'layers.1'"):
        cka_attack(checkpoints[0].model, data.val, "layers.1", 1e-6, samples=100)
    with pytest.raises(
        ValueError, match=r"space 'output'.*choose one of \['layers.1', 'layers.3'\]"
    ):
        cka_attack(checkpoints[0].model, data.val, "output", 0.5, samples=100)
