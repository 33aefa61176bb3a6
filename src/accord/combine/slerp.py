"""Spherical linear interpolation of two models (Shoemake 1985), tensor by tensor, linear where
the tensors are (anti)parallel; as in mergekit."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import Tensor

from accord.registry import Limits, Needs, Option, combiner


def slerp(a: Tensor, b: Tensor, t: float, lerp_cosine: float = 1 - 1e-7) -> Tensor:
    """``sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b`` with ``cos Ω`` the cosine of ``a`` and ``b``
    (flattened, in float64); ``(1−t) a + t b`` where ``|cos Ω| > lerp_cosine`` (nearly parallel,
    where the formula is ill-conditioned; mergekit's threshold is 0.9995) or either tensor is
    zero.

    >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    tensor([0.7071, 0.7071])
    """
    x, y = a.flatten().double(), b.flatten().double()
    norms = float(x.norm() * y.norm())
    cos = float(x @ y) / norms if norms > 0 else 1.0
    if norms == 0 or abs(cos) > lerp_cosine:
        return (1 - t) * a + t * b
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


@combiner(
    "slerp",
    paper="Shoemake 1985; as in mergekit",
    label="SLERP",
    options=(
        Option("t", float, 0.5, "position, 0 (first model) to 1", Limits(0, 1)),
        Option(
            "lerp_cosine",
            float,
            1 - 1e-7,
            "linear above this |cos Ω| (mergekit: 0.9995)",
            Limits(0, 1, high_open=True),
        ),
    ),
    needs=Needs(min_models=2, max_models=2),
)
def combine_slerp(tensors: Iterable[Tensor], *, t: float, lerp_cosine: float) -> Tensor:
    """The record's function: :func:`slerp` of the two models' tensors."""
    a, b = tensors
    return slerp(a, b, t, lerp_cosine)
