"""Linear merge, the model soup (Wortsman et al., ICML 2022): ``Σ w_i θ_i / Σ w_i``, or
``Σ w_i θ_i`` without ``normalize``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from accord.combine._options import WEIGHT, normalize
from accord.combine._rows import RowForm
from accord.combine._sparse import model_weights
from accord.registry import combiner


def linear(
    tensors: Sequence[Tensor], weights: Sequence[float] | None = None, *, normalize: bool = True
) -> Tensor:
    """``Σ w_i θ_i / Σ w_i`` (the plain mean by default); ``Σ w_i θ_i`` without ``normalize``.

    Accumulated as mergekit does (weights in the tensors' dtype, one fused multiply-add per
    model, their sum as the divisor), so that both round alike."""
    w = model_weights(weights, len(tensors))
    coefficients = torch.tensor(w, dtype=tensors[0].dtype)
    total = torch.zeros_like(tensors[0])
    for tensor, coefficient in zip(tensors, coefficients, strict=True):
        total.addcmul_(tensor, coefficient)
    if not normalize:
        return total
    if sum(w) == 0:
        raise ValueError("linear merge weights sum to 0")
    return total.div_(coefficients.sum())


@combiner(
    "linear",
    paper="Wortsman et al., ICML 2022 (model soups)",
    label="linear (model soup)",
    options=(WEIGHT, normalize(True)),
    rowwise=lambda o: RowForm(lambda rows: linear(rows, o["weight"], normalize=o["normalize"])),
)
def combine_linear(tensors: Iterable[Tensor], *, weight: list[float], normalize: bool) -> Tensor:
    """The record's function: :func:`linear` of the models' tensors."""
    return linear(list(tensors), weight, normalize=normalize)
