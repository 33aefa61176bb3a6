"""Partial merging: one merged trunk, then each model's own branch, heads averaged on logits.

ZipIt! (Stoica et al., ICLR 2024, Sec. 5 "partial zipping") and the CCA Merge reference code
(``stop_at``) merge the first k feature spaces only and keep the rest per model: the result
shares the trunk up to k and has N branches after it, whose logits are averaged. k = 0 is the
ensemble; k = all feature spaces is the fully merged model. Between them lies the trade of
cost (parameters kept) against accuracy.

``accord.merge(..., stop_at=k)`` aligns as usual, keeps the maps of the first k free spaces
(graph order, :attr:`accord.Spec.free_spaces`) and replaces the others by identities, then
combines and repairs: the merged model's trunk is the merged trunk (its statistics repaired).
The trunk is the longest prefix, in execution order, of the modules with parameters or
buffers that touch merged spaces only; the branches are each model in the merged
coordinates of the spaces it reads from the trunk (readers ``W_i T_i⁻¹``), its own weights
elsewhere. When k > 0 the branches' BatchNorms get their running statistics reset on the
data, as the merged model's are: the branches read the merged trunk, not their own model.

The returned :class:`PartialMerge` holds the N branches as full copies of the network that
share the trunk's modules (the same objects), so it computes the trunk N times but counts
its parameters once: :func:`parameters_kept` is the cost of the partially merged model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from accord.apply import Transform
from accord.batchnorm import reset_batchnorm
from accord.data import batches
from accord.errors import MergeError
from accord.match import Alignment
from accord.spec import Spec


class PartialMerge(nn.Module):
    """N branches sharing a merged trunk; the output is the mean of their logits.

    ``branches[i]`` is a full network whose trunk modules (``trunk``, by name) are one shared
    object across branches. ``stop_at``: how many feature spaces the trunk merged.
    """

    def __init__(self, branches: Sequence[nn.Module], trunk: Sequence[str], stop_at: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.trunk = tuple(trunk)
        self.stop_at = stop_at

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The branches' logits, averaged."""
        return torch.stack([branch(inputs) for branch in self.branches]).mean(0)


def parameters_kept(model: nn.Module) -> int:
    """Number of distinct parameter entries of ``model`` (shared modules counted once)."""
    return sum(p.numel() for p in model.parameters())


def check_stop_at(stop_at: Any, spec: Spec) -> None:
    """MergeError unless ``stop_at`` is an integer from 0 to the number of free spaces."""
    count = len(spec.free_spaces)
    if isinstance(stop_at, bool) or not isinstance(stop_at, int) or not 0 <= stop_at <= count:
        raise MergeError(
            f"stop_at={stop_at!r}: give how many feature spaces to merge, an integer from 0 "
            f"(the ensemble) to {count} (every free space of this model: the full merge)"
        )


def restrict(spec: Spec, alignment: Alignment, stop_at: int) -> Alignment:
    """The alignment with identities in every free space after the first ``stop_at``."""
    kept = {space.name for space in spec.free_spaces[:stop_at]}
    transforms = [
        {
            name: t if name in kept else Transform.identity(t.size)
            for name, t in model_transforms.items()
        }
        for model_transforms in alignment.transforms
    ]
    report = {name: entry for name, entry in alignment.report.items() if name in kept}
    return Alignment(transforms, report)


def _module_spaces(spec: Spec) -> dict[str, set[str]]:
    """Module name → the free spaces its tensors (and folded BatchNorms) belong to."""
    owners: dict[str, set[str]] = {}
    for space in spec.free_spaces:
        refs = (*space.writers, *space.readers, *space.elementwise)
        modules = {ref.tensor.rpartition(".")[0] for ref in refs}
        modules |= {bn.norm for bn in space.batchnorms}
        for module in modules:
            owners.setdefault(module, set()).add(space.name)
    return owners


def _execution_order(model: nn.Module, inputs: torch.Tensor) -> list[str]:
    """Modules with their own parameters or buffers, in the order one forward pass runs them."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if name and own:

            def record(_module: nn.Module, _args: Any, name: str = name) -> None:
                if name not in order:
                    order.append(name)

            handles.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model.eval()(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def trunk_modules(model: nn.Module, spec: Spec, stop_at: int, inputs: torch.Tensor) -> list[str]:
    """The longest prefix (execution order) of modules touching only the first ``stop_at``
    free spaces: everything before the first module that touches a space kept per model."""
    merged = {space.name for space in spec.free_spaces[:stop_at]}
    owners = _module_spaces(spec)
    trunk = []
    for name in _execution_order(model, inputs):
        if not owners.get(name, set()) <= merged:
            break
        trunk.append(name)
    return trunk


def _share(branch: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(branch.get_submodule(parent) if parent else branch, child, module)


def partial_model(
    merged: nn.Module,
    aligned: Sequence[dict[str, torch.Tensor]],
    spec: Spec,
    stop_at: int,
    inputs: torch.Tensor,
    reset: bool = False,
    data: Any = None,
    device: str = "cpu",
) -> PartialMerge:
    """The partially merged model: ``merged``'s trunk shared by N branches, branch i with
    the weights of ``aligned[i]`` (model i in the merged coordinates of the trunk's spaces).

    ``reset``: recompute every BatchNorm's statistics on ``data`` (the trunk's come out as
    the merged model's: the same data passes through it once per branch).
    """
    trunk = trunk_modules(merged, spec, stop_at, inputs)
    branches = []
    for state in aligned:
        branch = copy.deepcopy(merged)
        branch.load_state_dict(state)
        for name in trunk:
            _share(branch, name, merged.get_submodule(name))
        branches.append(branch)
    model = PartialMerge(branches, trunk, stop_at)
    if reset:
        if data is None:
            raise MergeError("stop_at on a network with BatchNorm needs data to reset it")
        reset_batchnorm(model, data, device=device)
    return model.eval()


def partial_result_model(result: Any, stop_at: int, data: Any, device: str) -> PartialMerge:
    """:func:`partial_model` from a merge whose alignment :func:`restrict` cut at ``stop_at``
    (an :class:`accord.MergeResult`); its report gains ``"partial"``."""
    spec = result.spec
    # every branch now reads the merged trunk, not its own model's features: its BatchNorms'
    # running statistics are stale (a trunk of nothing leaves the models as they are)
    reset = result.report["repair"] == "bn-reset" and stop_at > 0
    inputs = next(iter(batches(data)))
    inputs = inputs[0] if isinstance(inputs, tuple | list) else inputs
    model = partial_model(
        result.model, result.aligned, spec, stop_at, inputs[:2].to(device), reset, data, device
    )
    result.report["partial"] = {
        "stop_at": stop_at,
        "spaces": len(spec.free_spaces),
        "trunk": list(model.trunk),
        "parameters": parameters_kept(model),
        "parameters_one_model": parameters_kept(result.model),
    }
    return model
