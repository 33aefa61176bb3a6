"""TIES-Merging (Yadav et al., NeurIPS 2023): trim each ``τ_i`` to its top ``density`` fraction
by magnitude, elect the sign of ``Σ_i w_i τ̂_i`` per entry, and keep, per entry ``p``, the models
``A_p`` whose (nonzero) weighted entry has the elected sign: ``Σ_{i∈A_p} w_i τ̂_{i,p} /
Σ_{i∈A_p} w_i`` with ``normalize`` (the default; the paper's disjoint mean when the weights
are 1), the sum ``Σ_{i∈A_p} w_i τ̂_{i,p}`` without; ``λ`` times that. These are mergekit's
formulas."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from accord.combine._options import (
    DENSITY,
    MAGNITUDE_RESCALES,
    SCALE,
    TASK_VECTORS,
    WEIGHT,
    normalize,
    rescale,
)
from accord.combine._rows import task_vector_rows
from accord.combine._sparse import sparse_task_arithmetic
from accord.registry import combiner


def ties(
    deltas: Iterable[Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    scale: float = 1.0,
    normalize: bool = True,
    rescale: str = "none",
) -> Tensor:
    """TIES-Merging: trim to ``density`` (one for all, or one per model), elect signs, disjoint
    merge (see the module docs).

    >>> ties([torch.tensor([3.0, -1.0, 0.5]), torch.tensor([-2.0, -4.0, 0.1])], density=2 / 3)
    tensor([ 3.0000, -2.5000,  0.0000])
    """
    return sparse_task_arithmetic(
        deltas,
        weights,
        scale=scale,
        prune="magnitude",
        density=density,
        rescale=rescale,
        sign_election=True,
        normalize=normalize,
    )


@combiner(
    "ties",
    paper="Yadav et al., NeurIPS 2023",
    label="TIES",
    options=(WEIGHT, DENSITY, SCALE, normalize(True), rescale(MAGNITUDE_RESCALES)),
    needs=TASK_VECTORS,
    rowwise=lambda o: task_vector_rows(
        o, sign_election=True, prune="magnitude", amounts=o["density"]
    ),
)
def combine_ties(
    deltas: Iterable[Tensor],
    *,
    weight: list[float],
    density: list[float],
    scale: float,
    normalize: bool,
    rescale: str,
) -> Tensor:
    """The record's function: :func:`ties` of the task vectors."""
    return ties(deltas, weight, density=density, scale=scale, normalize=normalize, rescale=rescale)
