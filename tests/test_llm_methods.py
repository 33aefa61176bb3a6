"""Merge methods on small tensors, against answers worked out by hand."""

from __future__ import annotations

import doctest
import importlib
import math
import pkgutil

import pytest
import torch

import accord.combine
from accord.combine import _sparse
from accord.combine._sparse import (
    disjoint_merge,
    elect_sign,
    l1_rescaled,
    magnitude_prune,
    random_prune,
    sparse_task_arithmetic,
)
from accord.combine.dare import dare
from accord.combine.linear import linear
from accord.combine.slerp import slerp
from accord.combine.task_arithmetic import task_arithmetic
from accord.combine.ties import ties


def test_linear_weighted_mean() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    torch.testing.assert_close(linear([a, b]), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(linear([a, b], [3, 1]), torch.tensor([1.5, 3.0]))
    with pytest.raises(ValueError, match="sum to 0"):
        linear([a, b], [1, -1])


def test_slerp_known_values() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # Ω = 90°, t = 1/3: sin(60°)/1 · a + sin(30°)/1 · b
    expected = torch.tensor([math.sin(math.pi / 3), 2 * math.sin(math.pi / 6)])
    torch.testing.assert_close(slerp(a, b, 1 / 3), expected)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    # parallel tensors: plain linear interpolation
    torch.testing.assert_close(slerp(a, 3 * a, 0.5), 2 * a)


def test_task_arithmetic() -> None:
    deltas = [torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0])]
    result = task_arithmetic(deltas, [1.0, 2.0], scale=0.5)
    torch.testing.assert_close(result, torch.tensor([1.0, 1.5]))


def test_magnitude_prune_keeps_top_k() -> None:
    delta = torch.tensor([[0.1, -3.0], [2.0, -0.5]])
    torch.testing.assert_close(magnitude_prune(delta, 0.5), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))
    torch.testing.assert_close(magnitude_prune(delta, 1.0), delta)
    assert int((magnitude_prune(delta, 0.25) != 0).sum()) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_magnitude_prune_matches_topk(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sparse, "_CHUNK", 64)  # several histogram passes
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for density in (0.001, 0.2, 0.77):
        indices = delta.abs().topk(round(density * 1000)).indices
        expected = torch.zeros_like(delta)
        expected[indices] = delta[indices]
        assert torch.equal(magnitude_prune(delta, density), expected)


def test_magnitude_prune_bfloat16_keeps_exactly_the_largest() -> None:
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(1)).bfloat16()  # many ties
    kept = magnitude_prune(delta, 0.3) != 0
    assert int(kept.sum()) == 300
    assert delta[kept].abs().min() >= delta[~kept].abs().max()


def test_magnitude_prune_breaks_ties_by_position_and_ignores_zeros() -> None:
    tied = torch.tensor([0.5, 1.0, -1.0, 1.0, -1.0])
    torch.testing.assert_close(magnitude_prune(tied, 0.4), torch.tensor([0.0, 1.0, -1.0, 0.0, 0.0]))
    sparse = torch.tensor([0.0, 0.0, 3.0, 0.0])
    torch.testing.assert_close(magnitude_prune(sparse, 0.5), sparse)
    assert not magnitude_prune(sparse, 0.1).any()


def test_sign_election_and_disjoint_merge_by_hand() -> None:
    stacked = torch.tensor([[2.0, -1.0, 0.0, 1.0], [-1.0, -3.0, 0.0, -1.0], [0.5, 2.0, 0.0, 0.0]])
    # column sums 1.5, -2.0, 0.0, 0.0 -> signs +, -, + (zero), + (zero)
    sign = elect_sign(stacked)
    torch.testing.assert_close(sign, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    # agreeing nonzero entries: {2, .5}, {-1, -3}, {}, {1}
    merged = disjoint_merge(stacked, sign)
    torch.testing.assert_close(merged, torch.tensor([1.25, -2.0, 0.0, 1.0]))


def test_ties_by_hand() -> None:
    deltas = [torch.tensor([4.0, -0.1, 1.0, -2.0]), torch.tensor([-1.0, 3.0, 0.2, -0.5])]
    # density 0.5 keeps 2 of 4: [4, 0, 0, -2] and [-1, 3, 0, 0]
    # signs of the sums [3, 3, 0, -2]: +, +, +, -
    # disjoint means: 4 (only +), 3, 0 (none), -2
    result = ties(deltas, density=0.5, scale=2.0)
    torch.testing.assert_close(result, torch.tensor([8.0, 6.0, 0.0, -4.0]))
    # weights scale each trimmed delta before the election: 0.5 · [4, 0, 0, -2] vs 3 · [-1, 3, 0, 0]
    # sums [-1, 9, 0, -1]: -, +, +, -; agreeing weighted entries -3 (w 3), 9 (w 3), none, -1 (w .5)
    # normalize (mergekit's): divided by the agreeing weights -> [-1, 3, 0, -2]
    weighted = ties(deltas, [0.5, 3.0], density=0.5)
    torch.testing.assert_close(weighted, torch.tensor([-1.0, 3.0, 0.0, -2.0]))
    # without normalize: the agreeing weighted sum -> [-3, 9, 0, -1]
    summed = ties(deltas, [0.5, 3.0], density=0.5, normalize=False)
    torch.testing.assert_close(summed, torch.tensor([-3.0, 9.0, 0.0, -1.0]))


def test_dare_drops_and_rescales() -> None:
    delta = torch.arange(1.0, 1001.0)
    generator = torch.Generator().manual_seed(0)
    result = random_prune(delta, 0.75, generator)
    expected_keep = torch.rand(1000, generator=torch.Generator().manual_seed(0)) >= 0.75
    torch.testing.assert_close(result, delta * expected_keep * 4.0)
    assert 150 < int(expected_keep.sum()) < 350
    torch.testing.assert_close(random_prune(delta, 0.0, generator), delta)


def test_dare_merge_by_hand() -> None:
    deltas = [torch.tensor([1.0, 2.0, -4.0]), torch.tensor([-3.0, 1.0, 2.0])]
    masks = torch.rand(2, 3, generator=torch.Generator().manual_seed(5)) >= 0.5
    dropped = [d * m * 2.0 for d, m in zip(deltas, masks, strict=True)]
    plain = dare(deltas, drop_rate=0.5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(plain, dropped[0] + dropped[1])
    tied = dare(
        deltas, drop_rate=0.5, generator=torch.Generator().manual_seed(5), sign_election=True
    )
    stacked = torch.stack(dropped)
    torch.testing.assert_close(tied, disjoint_merge(stacked, elect_sign(stacked)))


def test_dare_without_drops_is_task_arithmetic_and_dare_ties_is_ties_at_full_density() -> None:
    deltas = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-1.0, -1.0, 1.0])]
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(
        dare(deltas, drop_rate=0.0, generator=generator),
        task_arithmetic(deltas),
    )
    torch.testing.assert_close(
        dare(deltas, drop_rate=0.0, generator=generator, sign_election=True),
        ties(deltas, density=1.0),
    )
    # by hand: signs [0 -> +, -, +]; means [1, -1.5, 2]
    torch.testing.assert_close(ties(deltas, density=1.0), torch.tensor([1.0, -1.5, 2.0]))


def test_bad_prune_option() -> None:
    with pytest.raises(ValueError, match="prune"):
        sparse_task_arithmetic([torch.ones(2)], prune="top")
    with pytest.raises(ValueError, match="Generator"):
        sparse_task_arithmetic([torch.ones(2)], prune="random", drop_rate=0.5)


def test_inputs_are_not_modified() -> None:
    deltas = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-1.0, 3.0, 0.0])]
    before = [d.clone() for d in deltas]
    task_arithmetic(deltas, scale=2.0)
    ties(deltas, density=0.5, scale=3.0)
    dare(deltas, drop_rate=0.5, generator=torch.Generator().manual_seed(0))
    linear(deltas)
    slerp(deltas[0], deltas[1], 0.3)
    assert all(torch.equal(d, b) for d, b in zip(deltas, before, strict=True))


def test_linear_without_normalize_is_the_weighted_sum() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    torch.testing.assert_close(
        linear([a, b], [0.5, 2.0], normalize=False), torch.tensor([6.5, 13.0])
    )
    # normalized: the same sum over 2.5
    torch.testing.assert_close(linear([a, b], [0.5, 2.0]), torch.tensor([2.6, 5.2]))


def test_task_arithmetic_normalized_by_the_weights() -> None:
    deltas = [torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0])]
    # (1 · [1, -1] + 3 · [0.5, 2]) / 4 = [0.625, 1.25], times 2
    result = task_arithmetic(deltas, [1.0, 3.0], scale=2.0, normalize=True)
    torch.testing.assert_close(result, torch.tensor([1.25, 2.5]))
    # weights summing to 0 are not divided by (mergekit's rule): [1, -1] - [0.5, 2]
    cancel = task_arithmetic(deltas, [1.0, -1.0], normalize=True)
    torch.testing.assert_close(cancel, torch.tensor([0.5, -3.0]))


def test_ties_half_weights_normalized_give_the_full_elected_mean() -> None:
    deltas = [torch.tensor([2.0, -2.0, 1.0]), torch.tensor([4.0, 2.0, -3.0])]
    # weighted [1, -1, .5] and [2, 1, -1.5]; sums [3, 0, -1]: signs +, + (0), -
    # normalized by the agreeing weights: (1 + 2)/1, 1/.5, -1.5/.5
    normalized = ties(deltas, [0.5, 0.5], density=1.0)
    torch.testing.assert_close(normalized, torch.tensor([3.0, 2.0, -3.0]))
    # without normalize, the agreeing weighted sum: half of the task vectors' mean in entry 0
    summed = ties(deltas, [0.5, 0.5], density=1.0, normalize=False)
    torch.testing.assert_close(summed, torch.tensor([3.0, 1.0, -1.5]))


def test_ties_density_per_model() -> None:
    deltas = [torch.tensor([4.0, -0.1, 1.0, -2.0]), torch.tensor([-1.0, 3.0, 0.2, -0.5])]
    # density 0.5 keeps 2 of 4: [4, 0, 0, -2]; 0.25 keeps 1: [0, 3, 0, 0]; no sign conflicts
    result = ties(deltas, density=[0.5, 0.25])
    torch.testing.assert_close(result, torch.tensor([4.0, 3.0, 0.0, -2.0]))


def test_magnitude_prune_truncates_the_count_as_mergekit() -> None:
    delta = torch.arange(1.0, 11.0)
    # ⌊0.29 · 10⌋ = 2 entries kept, as mergekit keeps (rounding would keep 3)
    torch.testing.assert_close(magnitude_prune(delta, 0.29), torch.tensor([0.0] * 8 + [9.0, 10.0]))
    # 0.25 · 3 = 0.75: none kept
    assert not magnitude_prune(torch.tensor([1.0, 2.0, 3.0]), 0.25).any()


def test_l1_rescaling_keeps_the_l1_norm() -> None:
    original = torch.tensor([1.0, -2.0, 3.0, 4.0])
    kept = torch.tensor([0.0, 0.0, 3.0, 4.0])
    # ‖original‖₁ = 10, ‖kept‖₁ = 7
    torch.testing.assert_close(
        l1_rescaled(original, kept.clone()), torch.tensor([0.0, 0.0, 30 / 7, 40 / 7])
    )
    # TIES with rescale=l1: the two largest of each kept, scaled back to the L1 norm
    result = ties([original], density=0.5, rescale="l1")
    torch.testing.assert_close(result, torch.tensor([0.0, 0.0, 30 / 7, 40 / 7]))
    # a norm below 1e-7 is not divided by
    tiny = torch.tensor([1e-9, 0.0])
    torch.testing.assert_close(l1_rescaled(tiny, torch.zeros(2)), torch.zeros(2))


def test_dare_rescalings() -> None:
    delta = torch.arange(1.0, 101.0)
    keep = torch.rand(100, generator=torch.Generator().manual_seed(3)) >= 0.6

    def pruned(rescale: str) -> torch.Tensor:
        return random_prune(delta, 0.6, torch.Generator().manual_seed(3), rescale)

    torch.testing.assert_close(pruned("expectation"), delta * keep / 0.4)
    torch.testing.assert_close(pruned("none"), delta * keep)
    kept = delta * keep
    torch.testing.assert_close(pruned("l1"), kept * (delta.sum() / kept.sum()))


def test_dare_ties_normalizes_by_the_agreeing_weights() -> None:
    deltas = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])]
    generator = torch.Generator().manual_seed(0)
    # no drops; weighted [.5, -1] and [1.5, .5]; sums [2, -.5]: +, -
    normalized = dare(deltas, [0.5, 0.5], drop_rate=0.0, generator=generator, sign_election=True)
    torch.testing.assert_close(normalized, torch.tensor([2.0, -2.0]))
    summed = dare(
        deltas,
        [0.5, 0.5],
        drop_rate=0.0,
        generator=generator,
        sign_election=True,
        normalize=False,
    )
    torch.testing.assert_close(summed, torch.tensor([2.0, -1.0]))


def test_slerp_interpolates_linearly_above_lerp_cosine() -> None:
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([math.cos(0.02), math.sin(0.02)])  # cos Ω = cos 0.02 = 0.99980
    angle = slerp(a, b, 0.5)
    torch.testing.assert_close(angle, torch.tensor([math.cos(0.01), math.sin(0.01)]))
    lerp = slerp(a, b, 0.5, lerp_cosine=0.9995)  # mergekit's threshold
    torch.testing.assert_close(lerp, (a + b) / 2, rtol=0, atol=0)


def test_the_combiners_docstring_examples_run() -> None:
    names = [f"accord.combine.{m.name}" for m in pkgutil.iter_modules(accord.combine.__path__)]
    attempted = 0
    for module in [accord.combine, *map(importlib.import_module, names)]:
        result = doctest.testmod(module, extraglobs={"torch": torch}, report=False)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 10
