"""Pieces the matchers share: assignments within groups, statistics look-ups, the star loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from accord.apply import Transform
from accord.errors import MergeError
from accord.match._alignment import Alignment
from accord.spec import FeatureSpace, Spec
from accord.statistics import SpaceStatistics, Statistics

NO_STATISTICS = (
    "no statistics for this space (it has no observation point): identity transforms; "
    "weight_matching aligns such spaces from the weights"
)


class Matched(NamedTuple):
    """One model's alignment in one space: the method used, the map, scores and a note."""

    method: str
    transform: Transform
    scores: dict[str, Any]
    note: str = ""


PairAligner = Callable[[FeatureSpace, SpaceStatistics, int, int], Matched]


def group_slices(size: int, groups: int) -> list[slice]:
    """The ``groups`` equal, contiguous feature blocks a grouped space's maps must respect."""
    block = size // groups
    return [slice(g * block, (g + 1) * block) for g in range(groups)]


# Permutations whose score sums (over one block) lie within this of each other are tied: the
# statistics' own rounding (float32 products: relative covariance errors near 1e-7–1e-6) can
# order them, no sample can.
TIED = 1e-6


def assign(
    score: torch.Tensor, groups: int = 1, tie_cost: torch.Tensor | None = None
) -> torch.Tensor:
    """The permutation ``perm`` maximising ``Σ_c score[c, perm[c]]``, block by block.

    ``score`` is (C, C) with rows in the target coordinates and columns the model's features,
    so ``Transform.from_permutation(perm)`` maps the model into the target. Grouped spaces are
    solved per diagonal block (Hungarian algorithm, scipy ``linear_sum_assignment``).

    ``tie_cost`` (C, C), entries in [0, 2], breaks ties: among the permutations whose score
    sums lie within :data:`TIED` of the best, the one of least ``Σ_c tie_cost[c, perm[c]]``
    wins. Solved as the lexicographic optimum by perturbation: maximising
    ``score − ε·tie_cost`` with ``ε = TIED / (2·block size)`` moves any sum by at most TIED,
    so a permutation that leads by more than TIED is the answer with or without ``tie_cost``.
    """
    from scipy.optimize import linear_sum_assignment  # here: scipy costs every command a second

    size = score.shape[0]
    perm = torch.empty(size, dtype=torch.long)
    for part in group_slices(size, groups):
        block = score[part, part].to(torch.float64)
        if tie_cost is not None:
            width = part.stop - part.start
            block = block - TIED / (2 * width) * tie_cost[part, part].to(torch.float64)
        block = block.numpy()
        _, cols = linear_sum_assignment(block, maximize=True)
        perm[part] = torch.as_tensor(cols, dtype=torch.long) + part.start
    return perm


def covariance(stats: SpaceStatistics, i: int, j: int, space: str) -> torch.Tensor:
    """``Cov(x_i, x_j)`` in float64, or a MergeError that says how to collect it."""
    try:
        return stats.covariance(i, j).to(torch.float64)
    except KeyError:
        raise _not_collected(space, i, j) from None


def _not_collected(space: str, i: int, j: int) -> MergeError:
    return MergeError(
        f"space {space!r}: the covariance of models {i} and {j} was not collected; "
        "collect statistics with pairs='all'"
    )


def correlation(stats: SpaceStatistics, i: int, j: int, space: str) -> torch.Tensor:
    """Pearson correlation of model i's features (rows) with model j's (columns), float64, or a
    MergeError that says how to collect the block."""
    covariance(stats, i, j, space)  # a missing block fails here with its remedy
    return stats.correlation(i, j).to(torch.float64)


def moment_mismatch(stats: SpaceStatistics, i: int, j: int) -> torch.Tensor:
    """(C, C) in [0, 2]: how far model i's feature c (rows) lies from model j's feature d
    (columns) in mean and scale, ``|z_c − z_d|² / (|z_c|² + |z_d|²)`` with ``z = (mean, std)``
    (0 for two constant zeros).

    Correlation cannot tell apart features that are affine functions of one another (the
    channels of a 1×1 conv fed one channel, constant channels); their means and scales can,
    and a permuted copy's feature has exactly its original's.
    """
    mean_i, mean_j = stats.mean[i].to(torch.float64), stats.mean[j].to(torch.float64)
    std_i = torch.diagonal(stats.covariance(i, i)).to(torch.float64).clamp_min(0).sqrt()
    std_j = torch.diagonal(stats.covariance(j, j)).to(torch.float64).clamp_min(0).sqrt()
    apart = (mean_i[:, None] - mean_j[None, :]) ** 2 + (std_i[:, None] - std_j[None, :]) ** 2
    size_i, size_j = mean_i**2 + std_i**2, mean_j**2 + std_j**2
    return apart / (size_i[:, None] + size_j[None, :]).clamp_min(torch.finfo(torch.float64).tiny)


def block_correlation(stats: SpaceStatistics, i: int, j: int, space: FeatureSpace) -> torch.Tensor:
    """(C, C): how well model i's feature c (rows) matches model j's feature d (columns), where
    each feature owns a block of B entries at its observation points (a whole attention head):
    the correlation of their entries taken in the same order, averaged over the block,

        S[c, d] = (1/B) Σ_k Cov(x_i[cB + k], x_j[dB + k]) / (σ_i[cB + k] σ_j[dB + k]).

    Only whole blocks move, so entry k of one block can only ever meet entry k of another:
    these entrywise covariances are all the statistics keep of such a space
    (:meth:`SpaceStatistics.entry_covariance`)."""
    try:
        corr = stats.entry_correlation(i, j, space.observed_block)
    except KeyError:
        raise _not_collected(space.name, i, j) from None
    return corr.to(torch.float64).mean(0)


def _whole_blocks(
    space: FeatureSpace, stats: SpaceStatistics, num_models: int, reference: int, method: str
) -> tuple[dict[int, Transform], dict[str, Any]]:
    """Every model onto the reference by the permutation of whole blocks that maximises
    :func:`block_correlation` (Hungarian algorithm, within groups)."""
    maps, models = {}, {}
    for i in range(num_models):
        if i == reference:
            continue
        score = block_correlation(stats, reference, i, space)
        perm = assign(score, space.groups)
        maps[i] = Transform.from_permutation(perm)
        models[i] = {"mean_correlation": float(score[torch.arange(space.size), perm].mean())}
    notes = []
    if method != "permutation":
        notes.append(
            f"fell back to permutation: each feature is a block of {space.observed_block} "
            "entries (a whole attention head) that moves only as a whole"
        )
    return maps, {"method": "permutation", "notes": notes, "models": models}


def identity_transforms(spec: Spec, num_models: int) -> list[dict[str, Transform]]:
    """Identity maps for every free space of every model."""
    return [
        {s.name: Transform.identity(s.size) for s in spec.free_spaces} for _ in range(num_models)
    ]


# One space's alignment: each model's map (a model left out keeps the identity) and the report.
SpaceAligner = Callable[
    [FeatureSpace, SpaceStatistics], tuple[dict[int, Transform], dict[str, Any]]
]


def align_spaces(
    spec: Spec,
    statistics: Statistics,
    num_models: int,
    align: SpaceAligner,
    reference: int,
    method: str,
) -> Alignment:
    """Every free space that has statistics aligned by ``align(space, stats)``; the others keep
    identities, with a note. A space whose features are blocks of entries at their
    observation points (whole attention heads) admits permutations of whole blocks only,
    whatever the method: each model is permuted onto ``reference`` block by block."""
    transforms = identity_transforms(spec, num_models)
    report: dict[str, dict[str, Any]] = {}
    for space in spec.free_spaces:
        stats = statistics.spaces.get(space.name)
        if stats is None:
            report[space.name] = {"method": "identity", "notes": [NO_STATISTICS], "models": {}}
            continue
        if space.observed_block > 1:
            maps, report[space.name] = _whole_blocks(space, stats, num_models, reference, method)
        else:
            maps, report[space.name] = align(space, stats)
        for i, transform in maps.items():
            transforms[i][space.name] = transform
    return Alignment(transforms, report)


def star_alignment(
    spec: Spec,
    statistics: Statistics,
    num_models: int,
    reference: int,
    method: str,
    align: PairAligner,
) -> Alignment:
    """Align every model to the reference in every free space that has statistics.

    ``align(space, stats, reference, i)`` matches model i to the reference in one space. The
    reference keeps identities; spaces without statistics keep identities, with a note.
    """

    def star(
        space: FeatureSpace, stats: SpaceStatistics
    ) -> tuple[dict[int, Transform], dict[str, Any]]:
        maps, used, notes, models = {}, [], [], {}
        for i in range(num_models):
            if i == reference:
                continue
            matched = align(space, stats, reference, i)
            maps[i] = matched.transform
            models[i] = matched.scores
            used.append(matched.method)
            if matched.note and matched.note not in notes:
                notes.append(matched.note)
        methods = sorted(set(used)) or [method]
        return maps, {"method": "+".join(methods), "notes": notes, "models": models}

    return align_spaces(spec, statistics, num_models, star, reference, method)


def check_option(name: str, value: Any, *, low: float, high: float = math.inf) -> None:
    """MergeError unless ``value`` is a finite real number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MergeError(f"option {name}={value!r} must be a finite number")
    if not low <= value <= high:
        raise MergeError(f"option {name}={value!r} must lie in [{low}, {high}]")


def check_integer(name: str, value: Any, *, low: int) -> None:
    """MergeError unless ``value`` is an integer ≥ ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MergeError(f"option {name}={value!r} must be an integer ≥ {low}")
