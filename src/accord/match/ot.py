"""OT fusion: align features with an exact optimal-transport plan between activations.

Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020. The ground cost between
reference feature ``a`` and feature ``b`` of model i is their expected squared distance over
the data, computed from the statistics alone:

    D[a, b] = E[(x_r[a] − x_i[b])²] = Var(a) + Var(b) − 2 Cov(a, b) + (μ_a − μ_b)²

With uniform marginals (1/C each) the exact EMD plan ``P`` (C × C, rows reference features,
columns model i's) gives the transport map ``T = C · P``, doubly stochastic: new feature ``a``
of model i is ``Σ_b T[a, b] · x_i[b]``. Writers get ``T``, readers ``Tᵀ`` (OT fusion aligns the
next layer's incoming weights with the same plan). An exact EMD solution is usually a vertex of
the transport polytope, i.e. a permutation, and is then returned as one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from accord.apply import Transform, permutation_of
from accord.match._alignment import Alignment
from accord.match._common import (
    Matched,
    assign,
    covariance,
    group_slices,
    star_alignment,
)
from accord.registry import Needs, alignment
from accord.spec import FeatureSpace, Spec
from accord.statistics import SpaceStatistics, Statistics


def squared_distances(stats: SpaceStatistics, reference: int, i: int, space: str) -> Tensor:
    """``D[a, b] = E[(x_r[a] − x_i[b])²]`` (C × C, float64) from means and covariances."""
    var_r = torch.diagonal(covariance(stats, reference, reference, space))
    var_i = torch.diagonal(covariance(stats, i, i, space))
    cross = covariance(stats, reference, i, space)
    shift = stats.mean[reference].to(torch.float64)[:, None] - stats.mean[i].to(torch.float64)
    # Rounding can make a zero distance slightly negative; EMD needs non-negative costs.
    return (var_r[:, None] + var_i[None, :] - 2.0 * cross + shift**2).clamp_min(0.0)


def transport_map(distances: Tensor, groups: int = 1) -> Tensor:
    """``T = B · P`` per group block of size B, ``P`` the exact EMD plan (uniform marginals).

    Block-diagonal for grouped spaces: features only move within their group.
    """
    import ot as pot  # here: POT (and the sklearn it loads) costs every accord command seconds

    size = distances.shape[0]
    plan = torch.zeros(size, size, dtype=torch.float64)
    for part in group_slices(size, groups):
        block = part.stop - part.start
        uniform = np.full(block, 1.0 / block)
        cost = np.ascontiguousarray(distances[part, part].numpy())
        # The network simplex needs more pivots than POT's default on wide layers.
        emd = pot.emd(uniform, uniform, cost, numItermax=max(100_000, 50 * block * block))
        plan[part, part] = torch.as_tensor(emd, dtype=torch.float64) * block
    return plan


def ot_match(space: FeatureSpace, stats: SpaceStatistics, reference: int, i: int) -> Matched:
    """Model i's transport map onto the reference in one space.

    Report: ``mean_squared_distance`` (``Σ T∘D / C``, the plan's expected squared distance per
    feature) and ``permutation`` (whether the map is one).
    """
    distances = squared_distances(stats, reference, i, space.name)
    plan = transport_map(distances, space.groups)
    scores = {"mean_squared_distance": float((plan * distances).sum() / space.size)}
    perm = permutation_of(plan, tol=1e-9)
    if perm is not None:
        return Matched("ot", Transform.from_permutation(perm), {**scores, "permutation": True})
    if space.maps in ("permutation", "orthogonal"):
        note = (
            f"model {i}: the transport plan is not a permutation and the space admits "
            f"{space.maps} maps only: rounded to the permutation that maximises the plan's "
            "mass (linear_sum_assignment)"
        )
        perm = assign(plan, space.groups)
        rounded = {**scores, "permutation": True, "rounded": True}
        return Matched("ot", Transform.from_permutation(perm), rounded, note)
    dense = Transform(plan, plan.T.clone())
    return Matched("ot", dense, {**scores, "permutation": False})


@alignment(
    "ot",
    paper="Singh & Jaggi, Model Fusion via Optimal Transport, NeurIPS 2020",
    label="optimal transport",
    needs=Needs(data=True),
    compare=4,
)
def match_ot(
    spec: Spec,
    statistics: Statistics,
    states: Sequence[Mapping[str, Tensor]],
    reference: int,
) -> Alignment:
    """Align every model to the reference with exact OT on activation distances (star)."""
    return star_alignment(spec, statistics, len(states), reference, "ot", ot_match)
