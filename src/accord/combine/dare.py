"""DARE (Yu et al., ICML 2024): drop each entry of ``τ_i`` with probability ``p`` and rescale
the rest by ``1/(1 − p)`` (``rescale="expectation"``, the paper's; ``"l1"`` scales the kept
entries to ``τ_i``'s L1 norm instead, as mergekit's ``rescale: true``), then combine by task
arithmetic (``dare``), or with TIES' sign election (``dare_ties``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from accord.combine._options import (
    DROP_RATE,
    NORMALIZE,
    RANDOM_RESCALES,
    SCALE,
    TASK_VECTORS,
    WEIGHT,
    rescale,
)
from accord.combine._rows import task_vector_rows
from accord.combine._sparse import sparse_task_arithmetic
from accord.combine._variants import Variant, register_variants

_PAPER = "Yu et al., ICML 2024"


def dare(
    deltas: Iterable[Tensor],
    weights: Sequence[float] | None = None,
    *,
    drop_rate: float | Sequence[float],
    generator: torch.Generator,
    scale: float = 1.0,
    sign_election: bool = False,
    normalize: bool | None = None,
    rescale: str = "expectation",
) -> Tensor:
    """DARE: random drop (``drop_rate``: one for all, or one per model) and rescale, then task
    arithmetic (or TIES' sign election and disjoint merge with ``sign_election``, DARE-TIES);
    ``normalize`` defaults to ``sign_election``."""
    return sparse_task_arithmetic(
        deltas,
        weights,
        scale=scale,
        prune="random",
        drop_rate=drop_rate,
        rescale=rescale,
        sign_election=sign_election,
        normalize=normalize,
        generator=generator,
    )


def combine_dare(
    sign_election: bool,
    deltas: Iterable[Tensor],
    /,
    *,
    weight: list[float],
    drop_rate: list[float],
    scale: float,
    normalize: bool,
    rescale: str,
    generator: torch.Generator,
) -> Tensor:
    """The records' function: :func:`dare` of the task vectors (``dare_ties``: with TIES' sign
    election)."""
    return dare(
        deltas,
        weight,
        drop_rate=drop_rate,
        generator=generator,
        scale=scale,
        sign_election=sign_election,
        normalize=normalize,
        rescale=rescale,
    )


register_variants(
    (
        Variant("dare", _PAPER, "DARE", sign_election=False),
        Variant("dare_ties", f"{_PAPER} + TIES", "DARE-TIES", sign_election=True),
    ),
    combine_dare,
    (WEIGHT, DROP_RATE, SCALE, NORMALIZE, rescale(RANDOM_RESCALES)),
    needs=TASK_VECTORS,
    random=True,
    rowwise=lambda o, sign_election: task_vector_rows(
        o, sign_election=sign_election, prune="random", amounts=o["drop_rate"]
    ),
)
