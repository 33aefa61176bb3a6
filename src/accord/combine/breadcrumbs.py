"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks", ECCV 2024, arXiv:2312.06795).

Each task vector ``τ`` of ``n`` entries, ranked by magnitude, loses its outliers (the
``⌊γ n⌋`` largest: the paper's β, mergekit's ``gamma``) and its smallest entries, so that
``⌊density · n⌋`` remain::

    n_keep = ⌊density · n⌋,   n_top = min(⌊γ n⌋, n − n_keep)
    mask   = the n_keep + n_top largest entries, less the n_top largest   (ties by position)

(where ``γ`` would leave fewer than ``n_keep``, fewer outliers are dropped, as mergekit does),
then the masked task vectors are merged by task arithmetic ``λ Σ w_i τ̂_i`` (``breadcrumbs``),
or with TIES' sign election and disjoint merge (``breadcrumbs_ties``, mergekit's variant).
``rescale="l1"`` scales the kept entries back to ``τ``'s L1 norm (mergekit's ``rescale: true``;
its default, and accord's, is ``"none"``).

mergekit's names: ``breadcrumbs`` / ``breadcrumbs_ties``, per model ``weight``, ``density``
(default 1: nothing dropped) and ``gamma`` (default 0.01), globally ``lambda``, ``normalize``
(default false for both) and ``rescale``. mergekit's own mask is empty when ``⌊γ n⌋ = 0``
(``gamma: 0``, or tensors of fewer than ``1/γ`` entries, such as norms), which zeroes those
task vectors; accord keeps the ``n_keep`` largest there, as the formula says.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from accord.combine._options import (
    DENSITY,
    GAMMA,
    MAGNITUDE_RESCALES,
    NORMALIZE,
    SCALE,
    TASK_VECTORS,
    WEIGHT,
    check_value,
    model_value,
    rescale,
)
from accord.combine._sparse import largest_mask, pruned_task_arithmetic, rescaled
from accord.combine._variants import Variant, register_variants

_PAPER = "Davari & Belilovsky, ECCV 2024 (Model Breadcrumbs, arXiv:2312.06795)"


def breadcrumbs_prune(delta: Tensor, density: float, gamma: float, rescale: str = "none") -> Tensor:
    """``delta`` with its ``⌊γ n⌋`` largest-magnitude entries and its smallest ones zeroed, so
    that ``⌊density · n⌋`` remain (see the module docs).

    >>> breadcrumbs_prune(torch.tensor([5.0, -1.0, 3.0, 0.5]), 0.5, 0.25)
    tensor([ 0., -1.,  3.,  0.])
    """
    check_value(DENSITY, density)
    check_value(GAMMA, gamma)
    n = delta.numel()
    n_keep = int(density * n)
    n_top = min(int(gamma * n), n - n_keep)
    keep = largest_mask(delta, n_keep + n_top) & ~largest_mask(delta, n_top)
    return rescaled(delta, delta * keep, rescale)


def breadcrumbs(
    deltas: Iterable[Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    gamma: float | Sequence[float],
    scale: float = 1.0,
    sign_election: bool = False,
    normalize: bool | None = None,
    rescale: str = "none",
) -> Tensor:
    """Model Breadcrumbs: mask each ``τ_i`` (``density`` and ``gamma``: one for all, or one per
    model), then task arithmetic, or TIES' sign election and disjoint merge with
    ``sign_election``; ``normalize`` defaults to ``sign_election``."""

    def prune(delta: Tensor, i: int) -> Tensor:
        return breadcrumbs_prune(delta, model_value(density, i), model_value(gamma, i), rescale)

    return pruned_task_arithmetic(
        deltas, prune, weights, scale=scale, sign_election=sign_election, normalize=normalize
    )


def combine_breadcrumbs(
    sign_election: bool,
    deltas: Iterable[Tensor],
    /,
    *,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    scale: float,
    normalize: bool,
    rescale: str,
) -> Tensor:
    """The records' function: :func:`breadcrumbs`, summed (``breadcrumbs``) or with TIES' sign
    election (``breadcrumbs_ties``)."""
    return breadcrumbs(
        deltas,
        weight,
        density=density,
        gamma=gamma,
        scale=scale,
        sign_election=sign_election,
        normalize=normalize,
        rescale=rescale,
    )


register_variants(
    (
        Variant("breadcrumbs", _PAPER, "Model Breadcrumbs", sign_election=False),
        Variant(
            "breadcrumbs_ties",
            f"{_PAPER} + TIES (mergekit's breadcrumbs_ties)",
            "Model Breadcrumbs with sign election",
            sign_election=True,
        ),
    ),
    combine_breadcrumbs,
    (WEIGHT, DENSITY, GAMMA, SCALE, NORMALIZE, rescale(MAGNITUDE_RESCALES)),
    needs=TASK_VECTORS,
)
