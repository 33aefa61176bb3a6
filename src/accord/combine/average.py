"""Weighted averaging of aligned state dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


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
        total = torch.zeros_like(value, dtype=torch.float64)
        for weight, state in zip(weights, states, strict=True):
            total += weight * state[key].to(torch.float64)
        merged[key] = total.to(value.dtype)
    return merged
