"""Normalisation repair after merging: BatchNorm statistics reset and REPAIR.

Averaging aligned weights shrinks the variance of the merged features; BatchNorm networks
recover by recomputing running statistics on training data (one pass, cumulative average),
networks without BatchNorm by REPAIR (Jordan et al., ICLR 2023): rescale each merged channel
so its mean and standard deviation match the average of the endpoints' statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

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
    the model is returned in eval mode.
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
    """Running per-channel sums of a module's output (float64), channel axis 1 or last.

    Sums are of ``x − s`` with the shift ``s`` the first batch's mean, so the variance is not
    the difference of two large numbers when channels sit far from zero (DESIGN.md §5).
    """

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.total: torch.Tensor | float = 0.0
        self.squares: torch.Tensor | float = 0.0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float64)
        if self.shift is None:
            self.shift = rows.mean(0)
        centred = rows - self.shift
        self.count += rows.shape[0]
        self.total = self.total + centred.sum(0)
        self.squares = self.squares + (centred * centred).sum(0)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        offset = torch.as_tensor(self.total) / self.count
        var = torch.as_tensor(self.squares) / self.count - offset * offset
        return self.shift + offset, var.clamp_min(0).sqrt()


def _channel_rows(output: torch.Tensor, module: nn.Module) -> torch.Tensor:
    axis = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
    return output.movedim(axis, -1).reshape(-1, output.shape[axis])


def _writer_modules(model: nn.Module, spec: Any) -> list[str]:
    """Linear/Conv modules whose output channels are all writers of one free space."""
    modules = dict(model.named_modules())
    names = []
    for space in spec.free_spaces:
        for ref in space.writers:
            name, _, leaf = ref.tensor.rpartition(".")
            module = modules.get(name)
            whole = ref.axis == 0 and ref.block == 1 and ref.offset == 0 and leaf == "weight"
            if whole and isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
                names.append(name)
    return list(dict.fromkeys(names))


@torch.no_grad()
def _output_moments(
    model: nn.Module, names: list[str], data: Any, device: Any, correct: dict | None = None
) -> dict[str, _ChannelMoments]:
    """Per-channel moments of the named modules' outputs over one pass.

    With ``correct`` (name → (target mean, target std)), each output is also re-standardised
    on the fly with its batch statistics, so later layers see repaired inputs.
    """
    modules = dict(model.named_modules())
    moments = {name: _ChannelMoments() for name in names}

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


@torch.no_grad()
def repair_activations(
    merged: nn.Module, endpoints: list[nn.Module], spec: Any, data: Any, device: Any = "cpu"
) -> nn.Module:
    """REPAIR (Jordan et al., ICLR 2023), in place: match each merged channel's statistics.

    For every Linear/Conv writer of a free space, the target mean and std of each output
    channel are the averages over the aligned ``endpoints``; the merged layer's rows are
    rescaled and shifted so its outputs have them (``W ← s·W``, ``b ← s·(b − μ) + μ_target``
    with ``s = σ_target / σ``). The merged statistics are measured in one pass in which each
    layer's output is re-standardised with batch statistics, as REPAIR's reset does.
    """
    names = _writer_modules(merged, spec)
    targets: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    for endpoint in endpoints:
        for name, moment in _output_moments(endpoint, names, data, device).items():
            targets[name].append(moment.mean_std())
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
