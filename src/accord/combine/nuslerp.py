"""NuSLERP, mergekit's ``nuslerp``: spherical interpolation (Shoemake 1985) of two models, or of
their task vectors when a base is given (the result is then added to the base), with the
position taken from two per-model weights and the sphere chosen per tensor or per vector.

For vectors ``a`` and ``b`` (the two models' tensors, or their task vectors) and
``t = w_2 / (w_1 + w_2)`` (0.5 where ``|w_1 + w_2| < 1e-6``, as mergekit)::

    cos Ω = a·b / (max(‖a‖, 1e-7) max(‖b‖, 1e-7))
    slerp = sin((1 − t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b

and ``(1 − t) a + t b`` where ``|sin Ω| < 1e-8`` (parallel or opposite) or either vector is
zero. The vectors are: the whole tensor (``nuslerp_flatten``, mergekit's default, true); else
each vector along its last axis (``W[i, :]`` of a matrix), or along its first one
(``W[:, j]``) with ``nuslerp_row_wise`` (default false); a 1-D tensor is one vector.

mergekit's names: ``nuslerp``, per model ``weight`` (required), globally ``nuslerp_flatten``
and ``nuslerp_row_wise``. One deliberate difference: mergekit slerps a zero vector too (giving
``sin(t π/2) · b`` for ``a = 0``, so a tensor one fine-tune left unchanged shrinks the other's
change), where accord interpolates linearly, the angle being undefined.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from accord.combine._options import WEIGHT
from accord.registry import Needs, Option, combiner

_WEIGHT_SUM_FLOOR = 1e-6  # mergekit's: weights summing to less give t = 0.5
_NORM_FLOOR = 1e-7
_PARALLEL = 1e-8  # |sin Ω| below it: (anti)parallel, where the formula divides by ~0


def nuslerp_t(weights: Sequence[float]) -> float:
    """The position ``t = w_2 / (w_1 + w_2)`` of two models' weights (0.5 where they sum to
    about 0)."""
    if len(weights) != 2:
        raise ValueError(f"nuslerp interpolates 2 tensors, got {len(weights)} weights")
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < _WEIGHT_SUM_FLOOR else weights[1] / total


def nuslerp(
    a: Tensor, b: Tensor, t: float, *, flatten: bool = True, row_wise: bool = False
) -> Tensor:
    """Spherical interpolation from ``a`` (``t = 0``) to ``b`` (``t = 1``), over the whole
    tensor or per vector (see the module docs).

    >>> nuslerp(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]]),
    ...         0.5, flatten=False)
    tensor([[0.7071, 0.7071],
            [1.5000, 0.0000]])
    """
    if a.shape != b.shape:
        raise ValueError(f"nuslerp of tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if flatten or a.dim() < 2:
        dims: tuple[int, ...] = tuple(range(a.dim()))
    else:
        dims = (0,) if row_wise else (-1,)
    # float64 sums: the angle of near-parallel vectors needs the digits
    dot = (a * b).sum(dim=dims, keepdim=True, dtype=torch.float64)
    norm_a = torch.linalg.vector_norm(a, dim=dims, keepdim=True, dtype=torch.float64)
    norm_b = torch.linalg.vector_norm(b, dim=dims, keepdim=True, dtype=torch.float64)
    cos = dot / (norm_a.clamp(min=_NORM_FLOOR) * norm_b.clamp(min=_NORM_FLOOR))
    omega = torch.acos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    linear = (sin.abs() < _PARALLEL) | (norm_a == 0) | (norm_b == 0)
    safe = torch.where(linear, torch.ones_like(sin), sin)
    weight_a = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / safe)
    weight_b = torch.where(linear, t, torch.sin(t * omega) / safe)
    return weight_a.to(a.dtype) * a + weight_b.to(b.dtype) * b


@combiner(
    "nuslerp",
    paper="mergekit's NuSLERP (Shoemake 1985 per tensor or vector)",
    label="NuSLERP",
    options=(
        WEIGHT,
        Option("nuslerp_flatten", bool, True, "one angle per tensor"),
        Option(
            "nuslerp_row_wise",
            bool,
            False,
            "unflattened: vectors along the first axis, not the last",
        ),
    ),
    needs=Needs(base="optional", min_models=2, max_models=2),
)
def combine_nuslerp(
    tensors: Iterable[Tensor],
    *,
    weight: list[float],
    nuslerp_flatten: bool,
    nuslerp_row_wise: bool,
) -> Tensor:
    """The record's function: :func:`nuslerp` of the two models (or task vectors) at the
    position their weights give."""
    a, b = tensors
    return nuslerp(a, b, nuslerp_t(weight), flatten=nuslerp_flatten, row_wise=nuslerp_row_wise)
