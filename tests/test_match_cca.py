"""Tests of CCA Merge (accord.match.cca) against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from accord.errors import MergeError
from accord.match import match
from accord.match.cca import cca_map, spd_roots, tied_polar
from accord.spec import FeatureSpace, Spec
from accord.statistics import SpaceStatistics, Statistics
from test_match import features, one_space, permuted_pair, space_statistics, states, statistics


def random_pair(size: int = 7, seed: int = 0, samples: int = 400) -> Statistics:
    """Two models with partly shared, randomly mixed features."""
    x = features(samples, size, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    mixing = torch.randn(size, size, generator=generator, dtype=torch.float64)
    y = torch.tanh(x @ mixing) + 0.3 * features(samples, size, seed + 1)
    return statistics({"h": [x, y]})


def blocks(stats: Statistics) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    space = stats.spaces["h"]
    return tuple(space.covariance(i, j).numpy() for i, j in [(0, 0), (1, 1), (0, 1)])


def cca_transform(stats: Statistics, **options: float | None) -> tuple[torch.Tensor, ...]:
    alignment = match("cca", one_space(stats.spaces["h"].size), stats, states(2), **options)
    transform = alignment.transforms[1]["h"]
    report = alignment.report["h"]["models"][1]
    correlations = torch.tensor(report["canonical_correlations"], dtype=torch.float64)
    return transform.matrix, transform.inverse, correlations


def test_cca_matches_an_independent_scipy_computation() -> None:
    stats = random_pair()
    sxx, syy, sxy = blocks(stats)
    size = sxx.shape[0]
    ridge = 0.1
    g_x, g_y = ridge * np.trace(sxx) / size, ridge * np.trace(syy) / size
    x_root = scipy.linalg.sqrtm(sxx + g_x * np.eye(size)).real
    y_root = scipy.linalg.sqrtm(syy + g_y * np.eye(size)).real
    k = np.linalg.solve(x_root, sxy) @ np.linalg.inv(y_root)
    u, s, vh = np.linalg.svd(k)
    expected = x_root @ u @ vh @ np.linalg.inv(y_root)
    matrix, _, correlations = cca_transform(stats, ridge=ridge)
    np.testing.assert_allclose(matrix.numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(correlations.numpy(), s, atol=1e-10)
    assert torch.all(correlations[:-1] >= correlations[1:])
    assert torch.all((correlations > 0) & (correlations < 1))


@pytest.mark.parametrize("seed", range(3))
def test_inverse_formula_inverts_the_map(seed: int) -> None:
    matrix, inverse, _ = cca_transform(random_pair(seed=seed))
    eye = torch.eye(matrix.shape[0], dtype=torch.float64)
    torch.testing.assert_close(matrix @ inverse, eye, atol=1e-8, rtol=0)
    torch.testing.assert_close(inverse @ matrix, eye, atol=1e-8, rtol=0)


def _procrustes(sxy: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(sxy)
    return u @ vh


def test_huge_absolute_ridge_gives_orthogonal_procrustes() -> None:
    stats = random_pair()
    _, _, sxy = blocks(stats)
    matrix, _, _ = cca_transform(stats, absolute_ridge=1e12)
    np.testing.assert_allclose(matrix.numpy(), _procrustes(sxy), atol=1e-5)


def test_huge_relative_ridge_gives_procrustes_scaled_by_the_feature_scales() -> None:
    stats = random_pair()
    sxx, syy, sxy = blocks(stats)
    matrix, _, _ = cca_transform(stats, ridge=1e9)
    scale = np.sqrt(np.trace(sxx) / np.trace(syy))  # sqrt(g_x / g_y)
    np.testing.assert_allclose(matrix.numpy(), scale * _procrustes(sxy), atol=1e-5)


def test_cca_recovers_a_linear_map_of_the_features() -> None:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2000, 6, generator=generator, dtype=torch.float64) * torch.arange(1, 7)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    a = q * torch.linspace(0.5, 2.0, 6, dtype=torch.float64)  # invertible, cond 4
    stats = statistics({"h": [x, x @ a.T]})  # y = A x for every sample
    for options in ({"absolute_ridge": 1e-12}, {"ridge": 1e-13}):
        matrix, inverse, correlations = cca_transform(stats, **options)
        torch.testing.assert_close(matrix, torch.linalg.inv(a), atol=1e-6, rtol=0)
        torch.testing.assert_close(inverse, a, atol=1e-6, rtol=0)
        torch.testing.assert_close(correlations, torch.ones(6, dtype=torch.float64))


def test_exact_permutation_gives_exactly_that_permutation() -> None:
    stats, perm = permuted_pair(9, 2)
    matrix, inverse, _ = cca_transform(stats)
    expected = torch.zeros(9, 9, dtype=torch.float64)
    expected[torch.arange(9), torch.argsort(perm)] = 1.0
    torch.testing.assert_close(matrix, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(inverse, expected.T, atol=1e-10, rtol=0)


def test_relative_ridge_is_invariant_to_the_activation_scale() -> None:
    x, y = features(300, 5, 3), features(300, 5, 4)
    base, _, _ = cca_transform(statistics({"h": [x, y]}))
    scaled, _, _ = cca_transform(statistics({"h": [10.0 * x, 10.0 * y]}))
    torch.testing.assert_close(scaled, base, atol=1e-10, rtol=1e-10)
    y_scaled, _, _ = cca_transform(statistics({"h": [x, 4.0 * y]}))
    torch.testing.assert_close(y_scaled, base / 4.0, atol=1e-10, rtol=1e-10)


def test_orthogonal_spaces_get_procrustes() -> None:
    stats = random_pair()
    spec = Spec([FeatureSpace("h", 7, maps="orthogonal")])
    alignment = match("cca", spec, stats, states(2))
    transform = alignment.transforms[1]["h"]
    np.testing.assert_allclose(transform.matrix.numpy(), _procrustes(blocks(stats)[2]), atol=1e-12)
    torch.testing.assert_close(transform.inverse, transform.matrix.T)
    assert alignment.report["h"]["method"] == "procrustes"
    assert "procrustes" in alignment.report["h"]["notes"][0]


def test_grouped_cca_solves_each_block() -> None:
    stats = random_pair(size=8)
    spec = Spec([FeatureSpace("h", 8, groups=2, maps="linear")])
    matrix = match("cca", spec, stats, states(2)).transforms[1]["h"].matrix
    whole = stats.spaces["h"]
    for part in (slice(0, 4), slice(4, 8)):
        blocks_ = {pair: block[part, part] for pair, block in whole.blocks.items()}
        sub = SpaceStatistics(whole.count, whole.mean[:, part], blocks_)
        expected, _, _ = cca_transform(Statistics({"h": sub}, num_models=2))
        torch.testing.assert_close(matrix[part, part], expected)
    assert torch.all(matrix[:4, 4:] == 0) and torch.all(matrix[4:, :4] == 0)


def test_spd_roots_of_a_singular_matrix_stay_finite() -> None:
    vector = torch.tensor([[1.0], [2.0], [0.0]], dtype=torch.float64)
    root, inverse_root = spd_roots(vector @ vector.T)
    torch.testing.assert_close(root @ root, vector @ vector.T)
    assert torch.isfinite(inverse_root).all()


def test_cca_map_with_identical_blocks_is_the_identity() -> None:
    x = features(200, 4, 9)
    s = space_statistics([x]).covariance(0, 0)
    transform, inverse, correlations = cca_map(s, s, s, 0.5, 0.5)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(transform, eye)
    torch.testing.assert_close(inverse, eye)
    assert torch.all(correlations < 1)  # the ridge shrinks them


def test_negative_ridge_is_rejected() -> None:
    stats = random_pair()
    with pytest.raises(ValueError, match="ridge=-1"):
        match("cca", one_space(7), stats, states(2), ridge=-1)
    with pytest.raises(ValueError, match="absolute_ridge='x'"):
        match("cca", one_space(7), stats, states(2), absolute_ridge="x")


@pytest.mark.parametrize("options", [{"ridge": 0}, {"absolute_ridge": 0.0}])
def test_a_zero_ridge_is_rejected_with_the_remedy(options: dict) -> None:
    name = next(iter(options))
    with pytest.raises(MergeError, match=rf"{name}=0.*give {name} > 0"):
        match("cca", one_space(7), random_pair(), states(2), **options)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_ridge_is_rejected(value: float) -> None:
    with pytest.raises(MergeError, match="must be a finite number"):
        match("cca", one_space(7), random_pair(), states(2), ridge=value)


def test_a_blown_up_solve_names_the_space_and_the_remedy() -> None:
    # Model 0 has two nearly duplicated features: with a negligible ridge its covariance is
    # almost singular and the map's inverse explodes.
    x = features(400, 5, 1)
    x = torch.cat([x, x[:, :2] + 1e-9 * features(400, 2, 2)], dim=1)
    stats = statistics({"h": [x, features(400, 7, 3)]})
    with pytest.raises(MergeError, match=r"space 'h'.*ill-conditioned.*raise the ridge"):
        match("cca", one_space(7), stats, states(2), absolute_ridge=1e-30)
    match("cca", one_space(7), stats, states(2))  # the default ridge copes


def test_tied_polar_resolves_only_the_undetermined_directions() -> None:
    generator = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    singular = torch.tensor([1.0, 0.7, 0.2, 0.0, 0.0], dtype=torch.float64)
    matrix = u @ torch.diag(singular) @ v.T
    target, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    rotation, s = tied_polar(matrix, lambda: target)
    torch.testing.assert_close(s, singular, atol=1e-12, rtol=0)
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(5, dtype=torch.float64))
    # the determined part is the polar factor's, untouched by the target
    torch.testing.assert_close(rotation @ v[:, :3], u[:, :3])
    # the undetermined part is the rotation between the null spaces closest to the target
    u0, v0 = u[:, 3:], v[:, 3:]
    a, _, bh = torch.linalg.svd(u0.T @ target @ v0)
    torch.testing.assert_close(u0.T @ rotation @ v0, a @ bh)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    live=st.integers(2, 10),
    dead=st.integers(0, 3),
    duplicated=st.integers(0, 3),
    weak=st.integers(0, 2),
)
def test_permuted_twins_with_degenerate_features_give_the_permutation(
    seed: int, live: int, dead: int, duplicated: int, weak: int
) -> None:
    """Dead, duplicated and nearly constant features leave CCA's pairing undetermined; the
    twin's permutation must still come back, within float32 rounding of the statistics."""
    generator = torch.Generator().manual_seed(seed)
    x = features(6 * live + 60, live, seed)
    rows = x.shape[0]
    columns = [x]
    columns.append(torch.zeros(rows, dead, dtype=torch.float64))
    picks = torch.randint(0, live, (duplicated,), generator=generator)
    columns.append(x[:, picks] * torch.rand(duplicated, generator=generator, dtype=torch.float64))
    sparse = torch.zeros(rows, weak, dtype=torch.float64)
    sparse[:3] = 1e-7 * torch.rand(3, weak, generator=generator, dtype=torch.float64)
    columns.append(sparse)
    x = torch.cat(columns, dim=1)
    size = x.shape[1]
    perm = torch.randperm(size, generator=generator)
    # the twin's activations carry float32 rounding, as a model's forward pass does
    y = x[:, perm].float().double()
    transform = match("cca", one_space(size), statistics({"h": [x, y]}), states(2))
    matrix = transform.transforms[1]["h"].matrix
    expected = torch.zeros(size, size, dtype=torch.float64)
    expected[torch.arange(size), torch.argsort(perm)] = 1.0
    varying = torch.diagonal(statistics({"h": [x]}).spaces["h"].covariance(0, 0)) > 0
    # constant features are paired one to one in some order; every other one is recovered
    torch.testing.assert_close(matrix[varying], expected[varying], atol=1e-5, rtol=0)


def mostly_dead_twins(live: int = 4, dead: int = 4) -> tuple[Statistics, torch.Tensor]:
    """Model 0: ``live`` features and ``dead`` nearly dead ones (firing weakly on 2 samples
    each); model 1: the same features permuted, the live ones with a little noise of their own
    (so that CCA's map is dense, not a permutation)."""
    generator = torch.Generator().manual_seed(3)
    x = features(300, live, 5)
    sparse = torch.zeros(x.shape[0], dead, dtype=torch.float64)
    for c in range(dead):
        sparse[2 * c : 2 * c + 2, c] = 0.01 * (1 + torch.rand(2, generator=generator))
    x = torch.cat([x, sparse], dim=1)
    noise = torch.cat([0.2 * features(300, live, 6), torch.zeros_like(sparse)], dim=1)
    perm = torch.randperm(live + dead, generator=generator)
    return statistics({"h": [x, (x + noise)[:, perm]]}), perm


def test_dead_fallback_permutes_a_space_of_mostly_dead_features() -> None:
    stats, perm = mostly_dead_twins()
    size = perm.numel()
    expected = torch.zeros(size, size, dtype=torch.float64)
    expected[torch.arange(size), torch.argsort(perm)] = 1.0
    for options in ({"dead_fallback": 0.5}, {"dead_fallback": 0.3}):
        alignment = match("cca", one_space(size), stats, states(2), **options)
        report = alignment.report["h"]
        matrix = alignment.transforms[1]["h"].matrix
        torch.testing.assert_close(matrix, expected, atol=0, rtol=0)
        assert report["method"] == "permutation"
        assert "50% of the features are nearly dead" in report["notes"][0]
    # half the features are nearly dead: a higher threshold, or none, keeps the dense CCA map
    for options in ({"dead_fallback": 0.6}, {}):  # off by default
        alignment = match("cca", one_space(size), stats, states(2), **options)
        matrix = alignment.transforms[1]["h"].matrix
        assert alignment.report["h"]["method"] == "cca"
        assert float((matrix - expected).abs().max()) > 0.01


def test_dead_below_pairs_nearly_dead_features_one_to_one_outside_the_solve() -> None:
    live, dead = 4, 4
    stats, perm = mostly_dead_twins(live, dead)
    size = live + dead
    expected = torch.zeros(size, size, dtype=torch.float64)
    expected[torch.arange(size), torch.argsort(perm)] = 1.0
    alignment = match("cca", one_space(size), stats, states(2), dead_below=0.05)
    matrix, inverse = alignment.transforms[1]["h"].matrix, alignment.transforms[1]["h"].inverse
    nearly_dead = torch.arange(live, size)
    # each nearly dead feature goes to its twin alone, and no live feature reads or writes it
    torch.testing.assert_close(matrix[nearly_dead], expected[nearly_dead], atol=0, rtol=0)
    dead_columns = torch.argsort(perm)[nearly_dead]
    assert float(matrix[:live][:, dead_columns].abs().max()) == 0.0
    torch.testing.assert_close(
        matrix @ inverse, torch.eye(size, dtype=torch.float64), atol=1e-8, rtol=0
    )
    # the live features keep CCA's dense map
    assert float((matrix[:live] - expected[:live]).abs().max()) > 0.01
    assert alignment.report["h"]["method"] == "cca"
    assert "4 features with variance below 0.05×mean" in alignment.report["h"]["notes"][0]
