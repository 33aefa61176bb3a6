"""BatchNorm in a merge: folding into writers, the two routes under dense maps, the statistics
the merged BatchNorms are given, and the running-statistics reset.

Permutations move a BatchNorm's per-channel parameters exactly. Dense maps (CCA, ZipIt!, OT
plans) cannot: on the ``"fold"`` route (the default) each BatchNorm of a dense space is folded
into the writer before it (:func:`fold_batchnorms`), keeping only its shift, which the map
moves like a bias, and the merged BatchNorm is then given the statistics the merged features
should have (:func:`batchnorm_targets`, DESIGN.md §4) before a reset
(:func:`reset_batchnorm`); on the ``"transform"`` route the map is applied to γ and β as to a
writer's rows (:func:`batchnorm_as_writers`), as the CCA Merge reference code does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from accord._layout import channels_last, wants_channels_last
from accord.data import batches
from accord.errors import MergeError, SpecError
from accord.registry import AlignMethod, plan_methods
from accord.spec import FeatureSpace, Spec
from accord.statistics import Statistics

BATCHNORM_ROUTES = ("fold", "transform")


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def has_batchnorm(model: nn.Module) -> bool:
    return any(is_batchnorm(m) for m in model.modules())


def fold_batchnorms(model: nn.Module, spaces: list[FeatureSpace] | Spec) -> dict[str, torch.Tensor]:
    """The model's state dict with each listed BatchNorm folded into the writer before it.

    In eval mode BN is the per-channel affine ``y = γ (x − μ)/σ + β`` with
    ``σ = sqrt(var + eps)``: it becomes ``W ← diag(γ/σ) W`` in the writer, the writer's bias is
    zeroed, and the BN keeps ``weight = 1``, ``running_mean = 0``, ``running_var = 1 − eps``
    (so that it divides by exactly 1) and the whole shift ``β − γμ/σ + γ b/σ`` as its bias.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    for space in spaces:
        for bn in space.batchnorms:
            norm = modules.get(bn.norm)
            if norm is None or not is_batchnorm(norm) or norm.running_var is None:
                raise SpecError(
                    f"space {space.name!r}: {bn.norm!r} is not a BatchNorm with running statistics"
                )
            _fold_one(state, bn.norm, bn.writer, norm.eps)
    return state


def _fold_one(state: dict[str, torch.Tensor], norm: str, writer: str, eps: float) -> None:
    var = state[f"{norm}.running_var"].to(torch.float64)
    mean = state[f"{norm}.running_mean"].to(torch.float64)
    gamma = state.get(f"{norm}.weight", torch.ones_like(var)).to(torch.float64)
    beta = state.get(f"{norm}.bias", torch.zeros_like(var)).to(torch.float64)
    scale = gamma / torch.sqrt(var + eps)
    weight = state[f"{writer}.weight"]
    shape = (-1,) + (1,) * (weight.dim() - 1)
    state[f"{writer}.weight"] = (weight.to(torch.float64) * scale.reshape(shape)).to(weight.dtype)
    shift = beta - scale * mean
    if f"{writer}.bias" in state:
        shift = shift + scale * state[f"{writer}.bias"].to(torch.float64)
        state[f"{writer}.bias"] = torch.zeros_like(state[f"{writer}.bias"])
    dtype = state[f"{norm}.running_mean"].dtype
    state[f"{norm}.running_mean"] = torch.zeros_like(mean).to(dtype)
    state[f"{norm}.running_var"] = torch.full_like(var, 1.0 - eps).to(dtype)
    if f"{norm}.weight" in state:
        state[f"{norm}.weight"] = torch.ones_like(gamma).to(dtype)
    if f"{norm}.bias" not in state:
        raise SpecError(f"BatchNorm {norm!r} has no affine shift to hold the folded bias")
    state[f"{norm}.bias"] = shift.to(dtype)


def require_folded(state: Mapping[str, torch.Tensor], norm: str, space: str) -> None:
    """SpecError unless BatchNorm ``norm`` of ``space`` is folded in ``state`` (γ = 1 and
    running mean 0, where it has them): only then does its shift move like a bias."""
    weight, mean = state.get(f"{norm}.weight"), state.get(f"{norm}.running_mean")
    unfolded = (weight is not None and not torch.all(weight == 1)) or (
        mean is not None and not torch.all(mean == 0)
    )
    if unfolded:
        raise SpecError(
            f"space {space!r}: BatchNorm {norm!r} must be folded into its writer before a "
            "dense map is applied; call accord.fold_batchnorms first"
        )


def batchnorm_as_writers(spec: Spec, names: Iterable[str]) -> Spec:
    """The ``"transform"`` route: the spec with the BatchNorms of spaces ``names`` no longer
    folded, their γ and β moved to the writers (so a map transforms them as rows)."""
    spaces = []
    chosen = set(names)
    for space in spec.spaces:
        norms = {bn.norm for bn in space.batchnorms}
        if space.name not in chosen or not norms:
            spaces.append(space)
            continue
        moved = [r for r in space.elementwise if r.tensor.rpartition(".")[0] in norms]
        kept = [r for r in space.elementwise if r.tensor.rpartition(".")[0] not in norms]
        affine = [r for r in moved if r.tensor.rpartition(".")[2] in ("weight", "bias")]
        spaces.append(
            replace(
                space, writers=space.writers + tuple(affine), elementwise=tuple(kept), batchnorms=()
            )
        )
    return Spec(spaces, spec.model, spec.observation, list(spec.notes), spec.leaf_modules)


def needs_batchnorm_statistics(method: str | AlignMethod, batchnorm: str) -> bool:
    """Whether a merge aligned by ``method`` (an alignment, or a name :func:`plan_methods`
    reads) under ``batchnorm`` may use the BatchNorm-output statistics: only possibly dense
    maps on the fold route do."""
    align = method if isinstance(method, AlignMethod) else plan_methods(method).align
    return batchnorm == "fold" and not align.permutations


def batchnorm_targets(
    spec: Spec,
    maps: Mapping[str, Sequence[torch.Tensor]],
    statistics: Statistics,
    merged: dict[str, torch.Tensor],
    eps: Mapping[str, float],
    weights: Sequence[float] | None = None,
) -> None:
    """Give the folded BatchNorms of the spaces in ``maps`` (space → each model's map ``T_i``
    into the merged coordinates) the REPAIR-style target statistics, in place.

    Target mean ``Σ_i w_i T_i μ_i`` and variance ``Σ_i w_i diag(T_i Σ_i T_iᵀ)`` of the
    models' BatchNorm outputs (``weights`` w, default equal); β ← target mean, γ ←
    sqrt(target variance + eps): a BatchNorm reset afterwards makes the BatchNorm divide the
    merged features by sqrt(var + eps), so this γ gives them exactly the target variance when
    their variance already matches it.
    """
    for name, matrices in maps.items():
        count = len(matrices)
        w = torch.tensor(
            weights if weights is not None else [1 / count] * count, dtype=torch.float64
        )
        for bn in spec[name].batchnorms:
            stats = statistics.norms.get(bn.norm)
            if stats is None:
                raise MergeError(
                    f"no statistics for BatchNorm {bn.norm!r}, which a dense map on space "
                    f"{name!r} needs: collect statistics with batchnorms=True"
                )
            means, variances = [], []
            for i, t in enumerate(matrices):
                means.append(t @ stats.mean[i])
                variances.append(torch.einsum("cd,de,ce->c", t, stats.covariance(i, i), t))
            dtype = merged[f"{bn.norm}.weight"].dtype
            variance = torch.einsum("i,ic->c", w, torch.stack(variances)).clamp_min(0)
            merged[f"{bn.norm}.weight"] = (variance + eps[bn.norm]).sqrt().to(dtype)
            merged[f"{bn.norm}.bias"] = torch.einsum("i,ic->c", w, torch.stack(means)).to(dtype)


@torch.no_grad()
def reset_batchnorm(
    model: nn.Module,
    data: Any,
    *,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``data`` in one pass, in place.

    Momentum is set to None (cumulative average over the pass) and restored afterwards;
    the model is returned in eval mode. On a CPU the pass runs 2-d convolutions channels-last
    (:mod:`accord._layout`); the weights are given back as they were.
    """
    norms = [m for m in model.modules() if is_batchnorm(m)]
    if not norms:
        return model.eval()
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.to(device).train()
    seen = 0
    with channels_last([model], wants_channels_last(device)):  # a cheaper pass on the CPU
        for index, batch in enumerate(
            tqdm(batches(data), desc="BN reset", leave=False, disable=not progress)
        ):
            if max_batches is not None and index >= max_batches:
                break
            inputs = batch[0] if isinstance(batch, tuple | list) else batch
            model(inputs.to(device))
            seen += 1
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    if seen == 0:
        raise MergeError("BatchNorm reset needs training data; the data given was empty")
    return model.eval()
