"""Task arithmetic (Ilharco et al., ICLR 2023): ``λ Σ w_i τ_i``, divided by ``Σ w_i`` with
``normalize``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from accord.combine._options import SCALE, TASK_VECTORS, WEIGHT, normalize
from accord.combine._rows import task_vector_rows
from accord.combine._sparse import sparse_task_arithmetic
from accord.registry import combiner


def task_arithmetic(
    deltas: Iterable[Tensor],
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
    *,
    normalize: bool = False,
) -> Tensor:
    """``λ Σ w_i τ_i``; ``λ Σ w_i τ_i / Σ w_i`` with ``normalize`` (a weight sum within 1e-8 of
    0 is not divided by, as in mergekit)."""
    return sparse_task_arithmetic(deltas, weights, scale=scale, normalize=normalize)


@combiner(
    "task_arithmetic",
    paper="Ilharco et al., ICLR 2023",
    label="task arithmetic",
    options=(WEIGHT, SCALE, normalize(False)),
    needs=TASK_VECTORS,
    rowwise=task_vector_rows,
)
def combine_task_arithmetic(
    deltas: Iterable[Tensor], *, weight: list[float], scale: float, normalize: bool
) -> Tensor:
    """The record's function: :func:`task_arithmetic` of the task vectors."""
    return task_arithmetic(deltas, weight, scale, normalize=normalize)
