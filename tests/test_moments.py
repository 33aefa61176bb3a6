"""The shared streaming moments (accord.statistics.moments) that REPAIR and the LLM activation
matching accumulate with: known values from two-pass formulas, batches adding up, pooling over
observation points, and features far from zero."""

from __future__ import annotations

import pytest
import torch

from accord.errors import StatisticsError
from accord.statistics.moments import Moments


def _two_pass_comoment(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)).T @ (y - y.mean(0))


def test_batches_add_up_to_the_two_pass_moments() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=generator, dtype=torch.float64) * 3 + 2
    moments = Moments(full=[(0, 0)])
    for part in x.split([1, 120, 179]):  # a first batch of one sample: its mean is the shift
        moments.add(part)
    torch.testing.assert_close(moments.mean(), x.mean(0))
    torch.testing.assert_close(moments.std(), x.std(0, correction=0))
    torch.testing.assert_close(moments.covariance(), torch.cov(x.T, correction=0))
    torch.testing.assert_close(moments.comoment(), _two_pass_comoment(x, x))


def test_features_far_from_zero_keep_their_variance() -> None:
    # E[x²] − μ² in float64 loses everything here (x² ≈ 1e18, its rounding ≈ 1e2 ≫ Var = 1);
    # the shifted sums keep it
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(2000, 3, generator=generator, dtype=torch.float64)
    moments = Moments()
    for part in (1e9 + noise).split(500):
        moments.add(part)
    torch.testing.assert_close(moments.std(), noise.std(0, correction=0), rtol=1e-6, atol=0)
    torch.testing.assert_close(moments.mean() - 1e9, noise.mean(0), rtol=0, atol=1e-6)


def test_two_streams_pool_their_comoments_over_points() -> None:
    generator = torch.Generator().manual_seed(2)
    points = {}
    moments = Moments(streams=2, full=[(0, 1)])
    for point, offset in enumerate((0.0, 50.0, -7.0)):  # each point about its own mean
        x = torch.randn(64, 3, generator=generator, dtype=torch.float64) + offset
        y = x @ torch.randn(3, 2, generator=generator, dtype=torch.float64) - offset
        points[point] = (x, y)
        for xs, ys in zip(x.split(16), y.split(16), strict=True):
            moments.add(xs, ys.float(), point=point)  # any dtype, accumulated in float64
    expected = sum(_two_pass_comoment(x, y.float().double()) for x, y in points.values())
    torch.testing.assert_close(moments.comoment(0, 1), expected)
    squares = sum(_two_pass_comoment(x, x).diagonal() for x, _ in points.values())
    torch.testing.assert_close(moments.squared_deviations(0), squares)
    torch.testing.assert_close(moments.mean(1, point=1), points[1][1].float().double().mean(0))
    assert moments.count == 3 * 64


def test_a_constant_feature_has_zero_spread_not_a_negative_one() -> None:
    moments = Moments()
    moments.add(torch.full((5, 2), 0.1))
    moments.add(torch.full((7, 2), 0.1))
    assert torch.equal(moments.std(), torch.zeros(2, dtype=torch.float64))


def test_bad_use_says_what_is_wrong() -> None:
    with pytest.raises(StatisticsError, match="no samples"):
        Moments().std()
    with pytest.raises(StatisticsError, match="one \\(samples, features\\) tensor per stream"):
        Moments(streams=2).add(torch.ones(3, 2))
    with pytest.raises(StatisticsError, match="the same samples"):
        Moments(streams=2).add(torch.ones(3, 2), torch.ones(4, 2))
    moments = Moments()
    moments.add(torch.ones(3, 2))
    with pytest.raises(KeyError, match="full=\\[\\(0, 0\\)\\]"):
        moments.covariance()


def test_an_empty_batch_adds_nothing() -> None:
    moments = Moments()
    moments.add(torch.empty(0, 2))
    moments.add(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    torch.testing.assert_close(moments.mean(), torch.tensor([2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(moments.std(), torch.tensor([1.0, 2.0], dtype=torch.float64))
