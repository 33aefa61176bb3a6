"""DELLA-Merging (Deep, Bhardwaj & Fortuna, "DELLA-Merging: Reducing Interference in Model
Merging through Magnitude-Based Sampling", 2024, arXiv:2406.11617).

MagPrune drops each entry of a task vector ``τ`` at random, the small ones more often than the
large ones: within a row of ``n`` entries (the entries sharing a first index; a 1-D tensor is
one row), the entry of magnitude rank ``r`` (0 for the smallest, ties by position) is kept with
probability::

    q_r = (density − ε) + 2ε · r / (n − 1)        (density for a row of one entry)

so that the keep probabilities are spread evenly over ``[density − ε, density + ε]`` and average
``density``. A kept entry is rescaled by ``1 / q_r`` (``rescale="expectation"``, the paper's
``1/(1 − p_i)`` with ``p_i`` its drop probability), so that the pruned task vector's
expectation is ``τ``; ``"l1"`` scales the kept entries back to ``τ``'s L1 norm instead
(mergekit's ``rescale: true``, its default) and ``"none"`` leaves them. The pruned task vectors
are then weighted, sign-elected and disjointly merged as in TIES (``della``), or summed
(``della_linear``, ``sign_election=False``), and scaled by ``λ``.

mergekit's names: ``della`` / ``della_linear``, per model ``weight``, ``density`` (default 1:
nothing dropped) and ``epsilon`` (default 0.15), globally ``lambda``, ``normalize`` (default
true for ``della``, false for ``della_linear``) and ``rescale``. As mergekit requires,
``density − ε > 0`` and ``density + ε < 1`` unless ``density`` is 1. The draws come from the
caller's generator; the merge seeds one per tensor from ``seed`` and the tensor's name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from accord.combine._options import (
    DENSITY,
    EPSILON,
    NORMALIZE,
    RANDOM_RESCALES,
    SCALE,
    TASK_VECTORS,
    WEIGHT,
    model_value,
    rescale,
    value_problem,
)
from accord.combine._sparse import pruned_task_arithmetic, rescaled
from accord.combine._variants import Variant, register_variants

_PAPER = "Deep et al., 2024 (DELLA-Merging, arXiv:2406.11617)"


def check_della(density: float, epsilon: float) -> str | None:
    """Why ``density`` and ``epsilon`` make no keep probabilities in (0, 1), or None."""
    problem = value_problem(DENSITY, density) or value_problem(EPSILON, epsilon)
    if problem is not None:
        return problem
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        return (
            f"density={density} ± epsilon={epsilon} leaves the keep probabilities outside "
            f"(0, 1); choose epsilon < {min(density, 1 - density):g}"
        )
    return None


def della_prune(
    delta: Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: str = "expectation",
) -> Tensor:
    """MagPrune (see the module docs): ``delta`` with entries dropped, each kept with its
    rank's probability ``q_r``, and the kept ones rescaled as ``rescale`` says."""
    problem = check_della(density, epsilon)
    if problem is not None:
        raise ValueError(problem)
    if rescale not in RANDOM_RESCALES:
        raise ValueError(f"rescale={rescale!r}; expected one of {', '.join(RANDOM_RESCALES)}")
    if density == 1:
        return delta.clone()
    rows = delta.reshape(delta.shape[0] if delta.dim() > 1 else 1, -1)
    n = rows.shape[1]
    order = rows.abs().argsort(dim=1, stable=True)  # stable: ties ranked by position
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand_as(order))
    spread = ranks.to(rows.dtype) / (n - 1) if n > 1 else torch.full_like(rows, 0.5)
    keep_probability = (density - epsilon) + 2 * epsilon * spread
    keep = torch.rand(rows.shape, generator=generator) < keep_probability
    if rescale == "expectation":
        return (rows * keep / keep_probability).reshape(delta.shape)
    return rescaled(delta, (rows * keep).reshape(delta.shape), rescale)


def della(
    deltas: Iterable[Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    epsilon: float | Sequence[float],
    generator: torch.Generator,
    scale: float = 1.0,
    sign_election: bool = True,
    normalize: bool | None = None,
    rescale: str = "expectation",
) -> Tensor:
    """DELLA: MagPrune each ``τ_i`` (``density`` and ``epsilon``: one for all, or one per
    model), then TIES' sign election and disjoint merge (``sign_election``, ``della``) or the
    sum (``della_linear``); ``normalize`` defaults to ``sign_election``."""

    def prune(delta: Tensor, i: int) -> Tensor:
        return della_prune(
            delta, model_value(density, i), model_value(epsilon, i), generator, rescale
        )

    return pruned_task_arithmetic(
        deltas, prune, weights, scale=scale, sign_election=sign_election, normalize=normalize
    )


def check_della_options(options: dict[str, Any]) -> tuple[int, str] | None:
    """The first model whose ``density`` and ``epsilon`` (resolved for one tensor) make no keep
    probabilities in (0, 1), and why; None when every model's do."""
    for i, (density, epsilon) in enumerate(
        zip(options["density"], options["epsilon"], strict=True)
    ):
        problem = check_della(density, epsilon)
        if problem is not None:
            return i, problem
    return None


def combine_della(
    sign_election: bool,
    deltas: Iterable[Tensor],
    /,
    *,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    scale: float,
    normalize: bool,
    rescale: str,
    generator: torch.Generator,
) -> Tensor:
    """The records' function: :func:`della`, with sign election (``della``) or summed
    (``della_linear``)."""
    return della(
        deltas,
        weight,
        density=density,
        epsilon=epsilon,
        generator=generator,
        scale=scale,
        sign_election=sign_election,
        normalize=normalize,
        rescale=rescale,
    )


register_variants(
    (
        Variant("della", _PAPER, "DELLA", sign_election=True),
        Variant(
            "della_linear",
            f"{_PAPER}, without sign election (mergekit's della_linear)",
            "DELLA, summed",
            sign_election=False,
        ),
    ),
    combine_della,
    (WEIGHT, DENSITY, EPSILON, SCALE, NORMALIZE, rescale(RANDOM_RESCALES)),
    needs=TASK_VECTORS,
    random=True,
    check=check_della_options,
)
