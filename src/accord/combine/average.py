"""Weighted averaging of aligned state dicts: the combiner of alignment methods."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from accord.registry import combiner


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ_i w_i θ_i``, summed in float64 in the models' order (the result is float64)."""
    total = torch.zeros_like(tensors[0], dtype=torch.float64)
    for weight, tensor in zip(weights, tensors, strict=True):
        total += weight * tensor.to(torch.float64)
    return total


def average_states(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    reference: int = 0,
) -> dict[str, torch.Tensor]:
    """``Σ_i w_i θ_i`` per floating tensor (uniform weights by default, summing to 1).

    Integer buffers (BatchNorm's ``num_batches_tracked``) are taken from model ``reference``.
    """
    if weights is None:
        weights = [1.0 / len(states)] * len(states)
    if len(weights) != len(states):
        raise ValueError(f"{len(weights)} weights for {len(states)} models")
    merged = {}
    for key, value in states[reference].items():
        if not value.is_floating_point():
            merged[key] = value.clone()
            continue
        merged[key] = weighted_mean([state[key] for state in states], weights).to(value.dtype)
    return merged


@combiner(
    "average",
    paper="the plain mean of the aligned models (Wortsman et al., ICML 2022, for one basin)",
    label="average",
)
def combine_average(tensors: Iterable[Tensor]) -> Tensor:
    """The record's function: the plain mean, in float64."""
    tensors = list(tensors)
    return weighted_mean(tensors, [1.0 / len(tensors)] * len(tensors))
