"""REPAIR after merging.

Averaging aligned weights shrinks the variance of the merged features; BatchNorm networks
recover by recomputing running statistics on training data
(:func:`accord.batchnorm.reset_batchnorm`), networks without BatchNorm by REPAIR (Jordan et
al., ICLR 2023): rescale each merged channel so its mean and standard deviation match the
average of the models' statistics, carried into the merged coordinates by their maps.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from accord._layout import channels_last, wants_channels_last
from accord.apply import Transform
from accord.data import batches
from accord.statistics.moments import Moments


def _channel_rows(output: torch.Tensor, module: nn.Module) -> torch.Tensor:
    axis = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
    return output.movedim(axis, -1).reshape(-1, output.shape[axis])


def _writer_modules(model: nn.Module, spec: Any) -> dict[str, str]:
    """``{module: space}`` for the Linear/Conv modules whose output channels are exactly the
    features of one free space (channel c is feature c)."""
    modules = dict(model.named_modules())
    names: dict[str, str] = {}
    for space in spec.free_spaces:
        for ref in space.writers:
            name, _, leaf = ref.tensor.rpartition(".")
            module = modules.get(name)
            whole = ref.axis == 0 and ref.block == 1 and ref.offset == 0 and ref.at is None
            whole = whole and leaf == "weight"
            if (
                whole
                and isinstance(module, nn.Linear | nn.modules.conv._ConvNd)
                and module.weight.shape[0] == space.size
            ):
                names.setdefault(name, space.name)
    return names


class _Stop(Exception):
    """Raised by the hook of the layer a measuring pass is for: the rest of the forward, which
    cannot change that layer's output, is skipped."""


Hook = Callable[[nn.Module, Any, torch.Tensor], None]


@torch.no_grad()
def _run(
    model: nn.Module, hooks: Mapping[str, Hook], data: Any, device: Any, limit: int | None = None
) -> None:
    """``model`` on the inputs of ``data``'s batches (the first ``limit``) with a forward hook
    on each named module; a hook ends a forward by raising :class:`_Stop`. On a CPU the pass
    runs 2-d convolutions channels-last (:mod:`accord._layout`); the weights are given back
    when it ends, before a repair rescales them."""
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items()]
    try:
        with channels_last([model], wants_channels_last(device)):
            for index, batch in enumerate(batches(data)):
                if index == limit:
                    break
                inputs = batch[0] if isinstance(batch, tuple | list) else batch
                with contextlib.suppress(_Stop):
                    model(inputs.to(device))
    finally:
        for handle in handles:
            handle.remove()


def _output_moments(
    model: nn.Module,
    names: list[str],
    data: Any,
    device: Any,
    full: frozenset[str] = frozenset(),
) -> dict[str, Moments]:
    """Per-channel moments of the named modules' outputs over one pass (with their
    covariance for the modules in ``full``)."""
    moments = {name: Moments(full=[(0, 0)] if name in full else ()) for name in names}

    def hook(name: str) -> Hook:
        def record(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            moments[name].add(_channel_rows(output, module))

        return record

    model.to(device).eval()
    _run(model, {name: hook(name) for name in names}, data, device)
    return moments


def _call_order(
    model: nn.Module, names: list[str], data: Any, device: Any
) -> tuple[list[str], bool]:
    """The named modules that run, in the order of their first call on the first batch, and
    whether each runs once per forward (then a pass may stop after the layer it measures)."""
    calls: dict[str, int] = {}

    def hook(name: str) -> Hook:
        def count(_module: nn.Module, _inputs: Any, _output: torch.Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1

        return count

    _run(model, {name: hook(name) for name in names}, data, device, limit=1)
    return list(calls), all(count == 1 for count in calls.values())


def _measure(model: nn.Module, name: str, data: Any, device: Any, stop: bool) -> Moments:
    """Per-channel moments of module ``name``'s output over all of ``data``; with ``stop``,
    each forward ends at that module."""
    moment = Moments()

    def record(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        moment.add(_channel_rows(output, module))
        if stop:
            raise _Stop

    _run(model, {name: record}, data, device)
    return moment


def _target_moments(
    moment: Moments, transform: Transform | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of one model's channels in the merged coordinates: ``T μ`` and
    ``sqrt(diag(T Σ Tᵀ))`` (a permutation gathers, no map keeps them)."""
    mean = moment.mean()
    if transform is not None and transform.permutation is None:
        matrix = transform.matrix.to(mean.device)
        variance = torch.einsum("cd,de,ce->c", matrix, moment.covariance(), matrix)
        return matrix @ mean, variance.clamp_min(0).sqrt()
    std = moment.std()
    if transform is None:
        return mean, std
    order = transform.permutation.to(mean.device)
    return mean[order], std[order]


@torch.no_grad()
def repair_activations(
    merged: nn.Module,
    models: Sequence[nn.Module],
    transforms: Sequence[Mapping[str, Transform]],
    spec: Any,
    data: Any,
    device: Any = "cpu",
) -> nn.Module:
    """REPAIR (Jordan et al., ICLR 2023), in place: match each merged channel's statistics.

    For every Linear/Conv writer of a free space, the target mean and std of each output
    channel are the averages over the models of their own statistics carried into the merged
    coordinates by their maps (``transforms[i]``, space → map of model i): ``T_i μ_i`` and
    ``sqrt(diag(T_i Σ_i T_iᵀ))``, as the BatchNorm fold route does (DESIGN.md §4). They are
    not measured on the aligned models: a dense map before a ReLU changes the function
    (``ReLU(T y) ≠ T ReLU(y)``), so an aligned model's deeper channels drift from what the
    merged features should match. The merged layer's rows are rescaled and shifted so its
    outputs have the targets (``W ← s·W``, ``b ← s·(b − μ) + μ_target`` with
    ``s = σ_target / σ``). Layers are repaired one at a time in the order they run, each
    measured over all of ``data`` with the layers before it already repaired, so the merged
    model's statistics are the targets whatever the batches (re-standardising every layer in
    one pass with each batch's statistics is exact for one batch only). That costs one pass
    per repaired layer, each stopped at the layer it measures (about (L + 1) / 2 forward
    passes for L layers that each run once per forward), besides one pass per model for the
    targets.
    """
    writers = _writer_modules(merged, spec)
    names = list(writers)
    targets: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    for model, maps in zip(models, transforms, strict=True):
        chosen = {name: maps.get(space) for name, space in writers.items()}
        full = frozenset(n for n, t in chosen.items() if t is not None and t.permutation is None)
        # a copy: the pass moves the model to ``device`` and into eval mode
        moments = _output_moments(copy.deepcopy(model), names, data, device, full=full)
        for name, moment in moments.items():
            targets[name].append(_target_moments(moment, chosen[name]))
    goal = {
        name: (
            torch.stack([m for m, _ in pairs]).mean(0),
            torch.stack([s for _, s in pairs]).mean(0),
        )
        for name, pairs in targets.items()
    }
    merged.to(device).eval()
    order, once = _call_order(merged, names, data, device)
    modules = dict(merged.named_modules())
    for name in order:
        measured = _measure(merged, name, data, device, stop=once)
        _rescale(modules[name], measured, *goal[name])
    return merged.eval()


def _rescale(
    module: nn.Module, measured: Moments, target_mean: torch.Tensor, target_std: torch.Tensor
) -> None:
    """Give ``module``'s output channels, measured as ``measured``, the target mean and std:
    ``W ← s·W``, ``b ← s·(b − μ) + μ_target`` with ``s = σ_target / σ``."""
    mean, std = measured.mean(), measured.std()
    scale = target_std / std.clamp_min(1e-8)
    shape = (-1,) + (1,) * (module.weight.dim() - 1)
    module.weight.mul_(scale.reshape(shape).to(module.weight.dtype))
    # Without a bias (an architecture choice we keep) only the scale can be repaired.
    if module.bias is not None:
        shifted = scale * (module.bias.to(torch.float64) - mean) + target_mean
        module.bias.copy_(shifted.to(module.bias.dtype))
