"""Activation matching: the permutation that maximises the correlation of matched features.

For model i and the reference r, with ``R[c, d] = corr(x_r[c], x_i[d])`` (C × C), the
permutation ``π`` maximises ``Σ_c R[c, π(c)]`` (Hungarian algorithm); new feature ``c`` of
model i is its old feature ``π(c)``. Grouped spaces are solved block by block. Among
permutations with (numerically) equal sums, the one that also pairs features of equal means and
scales wins (lexicographically: correlation first). This is the
activation matching of Git Re-Basin (Ainsworth et al., ICLR 2023), after Li et al. (2016),
and the fallback of the dense methods in permutation-only spaces (DESIGN.md §3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from accord.apply import Transform
from accord.match._alignment import Alignment
from accord.match._common import (
    Matched,
    assign,
    correlation,
    moment_mismatch,
    star_alignment,
)
from accord.registry import Needs, alignment
from accord.spec import FeatureSpace, Spec
from accord.statistics import SpaceStatistics, Statistics


def correlation_permutation(
    space: FeatureSpace, stats: SpaceStatistics, reference: int, i: int
) -> tuple[Tensor, float]:
    """The correlation-maximising permutation of model i onto the reference, and the mean
    correlation of the matched pairs. Ties (features affine in one another correlate ±1 with
    each other's matches alike) go to the permutation that also matches means and scales
    (:func:`moment_mismatch`)."""
    corr = correlation(stats, reference, i, space.name)
    perm = assign(corr, space.groups, tie_cost=moment_mismatch(stats, reference, i))
    return perm, float(corr[torch.arange(space.size), perm].mean())


def permutation_match(
    space: FeatureSpace, stats: SpaceStatistics, reference: int, i: int, note: str = ""
) -> Matched:
    """Activation matching of model i in one space, as a :class:`Matched` (``note``: why it
    was used when another method was asked for)."""
    perm, mean = correlation_permutation(space, stats, reference, i)
    scores = {"mean_correlation": mean}
    return Matched("permutation", Transform.from_permutation(perm), scores, note)


@alignment(
    "permutation",
    paper="Ainsworth et al., Git Re-Basin, ICLR 2023 (activation matching)",
    label="permutation (activations)",
    needs=Needs(data=True),
    permutations=True,
    compare=1,
)
def match_permutation(
    spec: Spec,
    statistics: Statistics,
    states: Sequence[Mapping[str, Tensor]],
    reference: int,
) -> Alignment:
    """Permute every model onto the reference by activation correlation (star alignment).

    Report per model: ``mean_correlation``, the mean correlation of the matched pairs.
    """
    return star_alignment(
        spec, statistics, len(states), reference, "permutation", permutation_match
    )
