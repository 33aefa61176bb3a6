"""Tests of joint CCA (accord.match.gcca): exact recovery, agreement with CCA Merge for two
models, and the maps' inverses."""

from __future__ import annotations

import pytest
import torch

from accord.errors import MergeError
from accord.match import match
from test_match import features, one_space, states, statistics


def _mixed(samples: int, size: int, seed: int) -> torch.Tensor:
    """Features of another model: a noisy invertible mixture of model 0's."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(size, size, generator=generator, dtype=torch.float64)
    noise = torch.randn(samples, size, generator=generator, dtype=torch.float64)
    return features(samples, size, 0) @ mixing + 0.3 * noise


@pytest.mark.parametrize("seed", range(3))
def test_three_permuted_twins_come_back_exactly(seed: int) -> None:
    size = 7
    x = features(80, size, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    perms = [torch.arange(size), torch.randperm(size, generator=generator)]
    perms.append(torch.randperm(size, generator=generator))
    stats = statistics({"h": [x[:, p] for p in perms]})
    alignment = match("gcca", one_space(size), stats, states(3))
    for perm, transforms in zip(perms, alignment.transforms, strict=True):
        # every model's features land on the same shared features, model 0's order
        back = x[:, perm] @ transforms["h"].matrix.T
        torch.testing.assert_close(back, x, atol=1e-9, rtol=0)
    assert alignment.report["h"]["method"] == "gcca"
    # identical features: every direction is shared, but for the part the ridge shrinks
    shared = torch.tensor(alignment.report["h"]["models"][0]["shared_variance"])
    assert torch.all(shared[:-1] >= shared[1:]) and torch.all((shared > 0) & (shared <= 1))
    tiny = match("gcca", one_space(size), stats, states(3), ridge=1e-9)
    assert tiny.report["h"]["models"][0]["shared_variance"] == pytest.approx([1.0] * size)


def _undetermined_twins(kind: str, count: int, seed: int) -> tuple[torch.Tensor, list]:
    """Features of which CCA determines some directions only up to rounding, and ``count``
    permuted twins of them with float32-like rounding (1e-7 relative noise).

    ``"dependent"``: two features are linear combinations of others (ReLUs that always fire,
    in a layer wider than its input), so the covariance is singular along directions that
    mix features: no feature has zero variance. ``"faint"``: three features with ~1e-7 of
    the others' variance (ReLUs that nearly never fire), far below the ridge.
    """
    size = 8
    x = features(120, size, seed)
    generator = torch.Generator().manual_seed(seed + 10)
    if kind == "dependent":
        x[:, 6], x[:, 7] = x[:, 0] + x[:, 1], x[:, 2] - 0.5 * x[:, 3]
    else:
        faint = torch.randperm(size, generator=generator)[:3]
        x[:, faint] = 3e-4 * (x[:, faint] - x[:, faint].mean(0)) + 1.0
    perms = [torch.arange(size)]
    perms += [torch.randperm(size, generator=generator) for _ in range(count - 1)]
    twins = [
        (x * (1 + 1e-7 * torch.randn(x.shape, generator=generator, dtype=torch.float64)))[:, p]
        for p in perms
    ]
    return twins, perms


@pytest.mark.parametrize("kind", ["dependent", "faint"])
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_twins_with_undetermined_directions_come_back_as_permutations(
    kind: str, count: int, seed: int
) -> None:
    """Directions of (nearly) zero variance have canonical correlations far below the ridge's
    scale: a cluster of eigenvalues at 1 in which eigh mixes the models' features, which a
    merge's ReLUs would see. The maps must still be the twins' permutations (CCA's tie-break:
    activation matching), not just agree with them on the data."""
    twins, perms = _undetermined_twins(kind, count, seed)
    size = twins[0].shape[1]
    alignment = match("gcca", one_space(size), statistics({"h": twins}), states(count))
    eye = torch.eye(size, dtype=torch.float64)
    for perm, transforms in zip(perms, alignment.transforms, strict=True):
        torch.testing.assert_close(transforms["h"].matrix @ eye[perm], eye, atol=1e-6, rtol=0)


def test_dead_features_are_paired_outside_the_solve() -> None:
    size = 6
    x = features(80, size, 3)
    x[:, 2] = 0.0
    perm = torch.tensor([5, 2, 0, 1, 4, 3])
    stats = statistics({"h": [x, x[:, perm], x]})
    alignment = match("gcca", one_space(size), stats, states(3))
    torch.testing.assert_close(x[:, perm] @ alignment.transforms[1]["h"].matrix.T, x)
    assert "1 features with zero variance" in alignment.report["h"]["notes"][0]


def test_two_models_give_pairwise_cca_exactly() -> None:
    """For N = 2 the joint solve is CCA's SVD (eigenvectors [u; v]/√2): model 0's map is the
    identity and model 1's is CCA Merge's map into model 0 (distinct canonical correlations:
    the rotation within tied ones, CCA's own ambiguity, is not exercised)."""
    size, samples = 6, 2000
    x, y = features(samples, size, 0), _mixed(samples, size, 1)
    stats = statistics({"h": [x, y]})
    joint = match("gcca", one_space(size), stats, states(2))
    pairwise = match("cca", one_space(size), stats, states(2))
    eye = torch.eye(size, dtype=torch.float64)
    torch.testing.assert_close(joint.transforms[0]["h"].matrix, eye, atol=1e-9, rtol=0)
    expected = pairwise.transforms[1]["h"].matrix
    found = joint.transforms[1]["h"].matrix
    torch.testing.assert_close(found, expected, atol=1e-9 * float(expected.abs().max()), rtol=0)


def test_two_models_break_undetermined_ties_as_pairwise_cca() -> None:
    """Where the statistics leave directions undetermined, both pair them by activation
    matching, so N = 2 is still CCA Merge's map."""
    twins, _ = _undetermined_twins("dependent", 2, 0)
    size = twins[0].shape[1]
    twins[1] = twins[1] + 0.05 * _mixed(twins[1].shape[0], size, 4)
    stats = statistics({"h": twins})
    joint = match("gcca", one_space(size), stats, states(2)).transforms[1]["h"].matrix
    pairwise = match("cca", one_space(size), stats, states(2)).transforms[1]["h"].matrix
    torch.testing.assert_close(joint, pairwise, atol=1e-7 * float(pairwise.abs().max()), rtol=0)


@pytest.mark.parametrize("count", [2, 3, 4])
def test_each_map_times_its_inverse_is_the_identity(count: int) -> None:
    size, samples = 5, 500
    acts = [features(samples, size, 0)] + [_mixed(samples, size, s) for s in range(1, count)]
    alignment = match("gcca", one_space(size), statistics({"h": acts}), states(count))
    for transforms in alignment.transforms:
        t = transforms["h"]
        eye = torch.eye(size, dtype=torch.float64)
        torch.testing.assert_close(t.matrix @ t.inverse, eye, atol=1e-9, rtol=0)
        torch.testing.assert_close(t.inverse @ t.matrix, eye, atol=1e-9, rtol=0)


def test_permutation_spaces_fall_back_to_the_star() -> None:
    size = 5
    x = features(60, size, 1)
    perm = torch.tensor([3, 0, 4, 1, 2])
    stats = statistics({"h": [x, x[:, perm], x]})
    alignment = match("gcca", one_space(size, maps="permutation"), stats, states(3))
    assert alignment.report["h"]["method"] == "permutation"
    assert torch.equal(alignment.transforms[1]["h"].permutation, torch.argsort(perm))


def test_it_needs_every_pair_of_statistics() -> None:
    size = 4
    acts = [features(60, size, s) for s in range(3)]
    stats = statistics({"h": acts}, pairs="reference")
    with pytest.raises(MergeError, match="pairs='all'"):
        match("gcca", one_space(size), stats, states(3))


def test_a_zero_ridge_is_rejected_with_the_remedy() -> None:
    stats = statistics({"h": [features(60, 4, s) for s in range(2)]})
    with pytest.raises(MergeError, match="ridge > 0"):
        match("gcca", one_space(4), stats, states(2), ridge=0.0)
