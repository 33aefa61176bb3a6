"""Normalisation repair after merging: BatchNorm statistics reset and REPAIR.

Averaging aligned weights shrinks the variance of the merged features; BatchNorm networks
recover by recomputing running statistics on training data (one pass, cumulative average),
networks without BatchNorm by REPAIR (Jordan et al., ICLR 2023): rescale each merged channel
so its mean and standard deviation match the average of the models' statistics, carried
into the merged coordinates by their maps.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from accord._layout import channels_last, wants_channels_last
from accord.apply import Transform
from accord.data import batches
from accord.errors import MergeError


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
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


class _ChannelMoments:
    """Running per-channel sums of a module's output (float64), channel axis 1 or last; with
    ``full``, also the channels' cross products, for the covariance a dense map needs.

    Sums are of ``x − s`` with the shift ``s`` the first batch's mean, so the variance is not
    the difference of two large numbers when channels sit far from zero (DESIGN.md §5).
    """

    def __init__(self, full: bool = False) -> None:
        self.full = full
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.total: torch.Tensor | float = 0.0
        self.squares: torch.Tensor | float = 0.0
        self.products: torch.Tensor | float = 0.0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float64)
        if self.shift is None:
            self.shift = rows.mean(0)
        centred = rows - self.shift
        self.count += rows.shape[0]
        self.total = self.total + centred.sum(0)
        self.squares = self.squares + (centred * centred).sum(0)
        if self.full:
            self.products = self.products + centred.T @ centred

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        offset = torch.as_tensor(self.total) / self.count
        var = torch.as_tensor(self.squares) / self.count - offset * offset
        return self.shift + offset, var.clamp_min(0).sqrt()

    def mean_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance; only with ``full``."""
        offset = torch.as_tensor(self.total) / self.count
        covariance = torch.as_tensor(self.products) / self.count - torch.outer(offset, offset)
        return self.shift + offset, covariance


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
            whole = ref.axis == 0 and ref.block == 1 and ref.offset == 0 and leaf == "weight"
            if (
                whole
                and isinstance(module, nn.Linear | nn.modules.conv._ConvNd)
                and module.weight.shape[0] == space.size
            ):
                names.setdefault(name, space.name)
    return names


@torch.no_grad()
def _output_moments(
    model: nn.Module,
    names: list[str],
    data: Any,
    device: Any,
    correct: dict | None = None,
    full: frozenset[str] = frozenset(),
) -> dict[str, _ChannelMoments]:
    """Per-channel moments of the named modules' outputs over one pass (with their
    covariance for the modules in ``full``).

    With ``correct`` (name → (target mean, target std)), each output is also re-standardised
    on the fly with its batch statistics, so later layers see repaired inputs.
    """
    modules = dict(model.named_modules())
    moments = {name: _ChannelMoments(name in full) for name in names}

    def hook(name: str):
        def record(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            moments[name].add(_channel_rows(output, module))
            if correct is None:
                return None
            axis = 1 if isinstance(module, nn.modules.conv._ConvNd) else output.dim() - 1
            rows = _channel_rows(output, module)
            mean, std = rows.mean(0), rows.std(0, unbiased=False).clamp_min(1e-8)
            target_mean, target_std = (t.to(output.dtype) for t in correct[name])
            shape = [1] * output.dim()
            shape[axis] = -1
            scale = (target_std / std).reshape(shape)
            return (output - mean.reshape(shape)) * scale + target_mean.reshape(shape)

        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        model.to(device).eval()
        for batch in batches(data):
            inputs = batch[0] if isinstance(batch, tuple | list) else batch
            model(inputs.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return moments


def _target_moments(
    moment: _ChannelMoments, transform: Transform | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of one model's channels in the merged coordinates: ``T μ`` and
    ``sqrt(diag(T Σ Tᵀ))`` (a permutation gathers, no map keeps them)."""
    if transform is not None and transform.permutation is None:
        mean, covariance = moment.mean_covariance()
        matrix = transform.matrix.to(mean.device)
        variance = torch.einsum("cd,de,ce->c", matrix, covariance, matrix)
        return matrix @ mean, variance.clamp_min(0).sqrt()
    mean, std = moment.mean_std()
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
    ``s = σ_target / σ``), measured in one pass in which each layer's output is
    re-standardised with batch statistics, as REPAIR's reset does.
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
    measured = _output_moments(merged, names, data, device, correct=goal)
    modules = dict(merged.named_modules())
    for name in names:
        module = modules[name]
        mean, std = measured[name].mean_std()
        scale = goal[name][1] / std.clamp_min(1e-8)
        shape = (-1,) + (1,) * (module.weight.dim() - 1)
        module.weight.mul_(scale.reshape(shape).to(module.weight.dtype))
        # Without a bias (an architecture choice we keep) only the scale can be repaired.
        if module.bias is not None:
            shifted = scale * (module.bias.to(torch.float64) - mean) + goal[name][0]
            module.bias.copy_(shifted.to(module.bias.dtype))
    return merged.eval()
