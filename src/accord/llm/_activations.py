"""Activation matching: the maps from calibration tokens (modules found through the family's
table).

Both models run on the same token batches with hooks on their Hugging Face modules:

- the residual stream at the input of every pre-norm (two per layer, plus the final norm; where
  a family has no pre-norm, OLMo 2, the input of the block's readers) gives
  one residual permutation: Hungarian on the correlation pooled over those ``2L + 1`` points
  (covariances summed after centring each point, divided by the pooled standard deviations);
- the MLP hidden units (``down_proj`` inputs) give the unit permutation (Hungarian on the
  correlation); the unit scales, a free gauge of the function, come from the weights as in
  weight matching (each unit's up row and down column balanced), not from activation RMS
  ratios, which near-dead units make extreme and which move B's weights far from A's;
- q/k/v projection outputs (cut out of a fused output; before any q/k norm and the rotary
  embedding, which the symmetries commute with) and
  the per-head ``o_proj`` inputs give the groups, heads, plane rotations and value/output maps,
  through the same solver as weight matching with tokens as samples.

Statistics accumulate in float64 over valid tokens (``attention_mask`` 1), from sums shifted by
the first batch's means. Memory: per layer ``d_ff²`` and ``n_q² d_h²`` floats, plus ``d²``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from accord.errors import StatisticsError
from accord.llm._solve import LayerStats, match_layer
from accord.llm._weights import (
    attention_cross,
    attention_finish,
    qk_gains,
    unit_factors,
    with_gain_scales,
)
from accord.llm.arch import Architecture
from accord.llm.symmetry import Symmetry
from accord.match._common import assign
from accord.statistics.moments import Moments


def _correlation(moments: Moments) -> Tensor:
    """The correlation of A's features (rows) with B's (columns), pooled over the points: the
    comoments summed after centring each point, divided by the pooled standard deviations."""
    std_a, std_b = (moments.squared_deviations(side).sqrt() for side in (0, 1))
    return moments.comoment(0, 1) / torch.outer(std_a, std_b).clamp_min(1e-300)


def _hook(module: nn.Module, store: dict[Any, Tensor], key: Any, output: bool) -> Any:
    def keep(_module: nn.Module, args: tuple[Any, ...], result: Any = None) -> None:
        value = result if output else args[0]
        store[key] = value.detach().to(torch.float64)

    if output:
        return module.register_forward_hook(keep)
    return module.register_forward_pre_hook(keep)


def _record(module: nn.Module, arch: Architecture, ids: Tensor, mask: Tensor) -> dict[Any, Tensor]:
    """Run ``module`` on one batch; every observed tensor as (valid tokens, features)."""
    store: dict[Any, Tensor] = {}

    def hook(kind: str, layer: int | None, key: Any, output: bool) -> Any:
        path = arch.locate(kind, layer)[0]
        return _hook(module.get_submodule(path), store, key, output)

    handles = [hook("final_norm", None, ("residual", 2 * arch.layers), False)]
    for i in range(arch.layers):
        for point, (norm, reader) in enumerate((("attn_norm", "q"), ("mlp_norm", "up"))):
            # the residual stream enters a pre-norm, or the readers where there is none
            handles.append(
                hook(norm if arch.has(norm) else reader, i, ("residual", 2 * i + point), False)
            )
        handles += [hook(kind, i, (kind, i), True) for kind in ("q", "k", "v")]
        handles += [hook("o", i, ("o", i), False), hook("down", i, ("h", i), False)]
    try:
        module(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    keep = mask.reshape(-1).bool()
    return {
        key: _part(key, value, arch).reshape(keep.numel(), -1)[keep] for key, value in store.items()
    }


def _part(key: Any, value: Tensor, arch: Architecture) -> Tensor:
    """q, k or v cut out of a fused projection's output (the hook saw the whole output)."""
    if key[0] in ("q", "k", "v") and arch.has("qkv"):
        return value[..., arch.fused_rows("qkv")[key[0]]]
    return value


def _batches(data: Iterable[Any]) -> Iterable[tuple[Tensor, Tensor]]:
    for batch in data:
        ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
        ids = torch.as_tensor(ids)
        ids = ids[None] if ids.dim() == 1 else ids
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        yield ids, torch.ones_like(ids) if mask is None else torch.as_tensor(mask)


def activation_alignment(
    module_b: nn.Module,
    module_a: nn.Module,
    state_b: Mapping[str, Tensor],
    state_a: Mapping[str, Tensor],
    arch: Architecture,
    data: Iterable[Any],
) -> Symmetry:
    """The symmetry moving B onto A, from activations on ``data`` (see the module docs)."""
    # A's features are stream 0 and B's stream 1
    residual = Moments(streams=2, full=[(0, 1)])
    attention: list[dict[str, Tensor]] = [{} for _ in range(arch.layers)]
    units = [Moments(streams=2, full=[(0, 1)]) for _ in range(arch.layers)]
    tokens = 0
    for ids, mask in _batches(data):
        a, b = _record(module_a.eval(), arch, ids, mask), _record(module_b.eval(), arch, ids, mask)
        tokens += int(mask.sum())
        for point in range(2 * arch.layers + 1):
            residual.add(a["residual", point], b["residual", point], point=point)
        for i in range(arch.layers):
            feats = [{k: side[k, i].T for k in ("q", "k", "v", "o")} for side in (a, b)]
            raw = attention_cross(feats[0], feats[1], arch)
            attention[i] = {k: v + attention[i].get(k, 0) for k, v in raw.items()}
            units[i].add(a["h", i], b["h", i])
    if tokens < 2:
        raise StatisticsError(f"activation alignment needs calibration tokens; got {tokens}")
    layers = [
        match_layer(_layer_stats(attention[i], units[i], arch, state_a, state_b, i), arch)
        for i in range(arch.layers)
    ]
    symmetry = Symmetry(residual=assign(_correlation(residual)), layers=layers)
    return with_gain_scales(symmetry, state_a, state_b, arch)


def _layer_stats(
    attention: dict[str, Tensor],
    units: Moments,
    arch: Architecture,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    layer: int,
) -> LayerStats:
    gains = qk_gains(state_a, state_b, arch, layer)
    q, k, v, o, qk_a, qk_b = attention_finish(attention, arch, gains)
    factor_a, factor_b = (unit_factors(state, arch, layer) for state in (state_a, state_b))
    return LayerStats(q, k, v, o, qk_a, qk_b, _correlation(units), factor_a, factor_b)
