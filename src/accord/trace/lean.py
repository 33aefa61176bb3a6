"""A cheaper forward of an exported graph for passes that only read it (the statistics pass).

Two rewrites of the unlifted module of a program (:func:`accord.trace.programs.bound_module`),
both exact up to float rounding, so every node keeps its name and, up to rounding, its value:

* :func:`fold_batchnorms`: an eval-mode ``batch_norm`` whose input is a convolution or linear
  layer used by nothing else becomes that layer with the folded weight ``W·γ/√(v+ε)`` and bias
  ``β + (b − μ)·γ/√(v+ε)`` (per output channel), under the BatchNorm node's name: a
  BatchNorm's output observed there is the folded layer's output. It saves the BatchNorm's
  pass over the activations (``accord bench speed``; design measurements in BENCHMARKS.md).
* :func:`in_place`: ``relu`` and ``add`` write into an input that nothing reads afterwards
  (every other user of it runs before, and is an observer call, which has copied or summed the
  value by then), so no fresh activation is allocated and faulted in.

The folded tensors are each model's own (:func:`lean_bindings`), so one graph still runs N
models of one architecture in turn, as :func:`accord.trace.programs.bindings` binds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from accord.trace.programs import Binding, bindings

aten = torch.ops.aten
# layers whose weight has the output channels first and whose bias is argument 2
_FOLDABLE = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}
# operators that return a fresh tensor (never a view of an input)
_FRESH = {*_FOLDABLE, aten.batch_norm.default, aten.relu.default, aten.add.Tensor}
_IN_PLACE = {aten.relu.default: aten.relu_.default, aten.add.Tensor: aten.add_.Tensor}
HOLDER = "accord_folded"


@dataclass(frozen=True)
class Fold:
    """One BatchNorm folded into the layer before it: the state-dict keys its folded weight
    and bias (buffers ``HOLDER.<name>_weight``, ``_bias``) are computed from."""

    name: str
    weight: str
    bias: str | None
    norm_weight: str | None
    norm_bias: str | None
    running_mean: str
    running_var: str
    eps: float

    def tensors(self, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded weight and bias of the model whose tensors ``state`` holds, in its
        weight's dtype and memory format (computed in float64: the fold adds one rounding)."""
        weight = state[self.weight]
        wide = {"dtype": torch.float64}
        scale = (state[self.running_var].to(**wide) + self.eps).rsqrt()
        if self.norm_weight is not None:
            scale = scale * state[self.norm_weight].to(**wide)
        bias = -state[self.running_mean].to(**wide)
        if self.bias is not None:
            bias = bias + state[self.bias].to(**wide)
        bias = bias * scale
        if self.norm_bias is not None:
            bias = bias + state[self.norm_bias].to(**wide)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        folded = (weight.to(**wide) * scale.view(shape)).to(weight.dtype)
        return folded, bias.to(weight.dtype)


def _key(node: Any) -> str | None:
    """The parameter or buffer a ``get_attr`` node reads ("" for anything else that is not
    None: such an argument stops the fold)."""
    if node is None:
        return None
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else ""


def _fold_of(norm: fx.Node) -> Fold | None:
    """The fold of a ``batch_norm`` node, when it can fold into its input's layer."""
    if norm.op != "call_function" or norm.target != aten.batch_norm.default or norm.kwargs:
        return None
    if len(norm.args) != 9:
        return None
    layer, weight, bias, mean, var, training, _, eps, _ = norm.args
    if (
        training is not False
        or not isinstance(layer, fx.Node)
        or layer.op != "call_function"
        or layer.target not in _FOLDABLE
        or len(layer.users) != 1
        or layer.kwargs
    ):
        return None
    layer_bias = layer.args[2] if len(layer.args) > 2 else None
    keys = [_key(n) for n in (layer.args[1], layer_bias, weight, bias, mean, var)]
    if "" in keys or None in (keys[0], keys[4], keys[5]):
        return None
    return Fold(norm.name, keys[0], keys[1], keys[2], keys[3], keys[4], keys[5], float(eps))


def fold_batchnorms(module: fx.GraphModule, model: nn.Module) -> list[Fold]:
    """Fold every eval-mode BatchNorm of ``module``'s graph that follows a convolution or
    linear layer used only by it (module docstring); edited in place, holding ``model``'s
    folded tensors (:func:`lean_bindings` binds another's)."""
    graph = module.graph
    folds = [fold for fold in map(_fold_of, graph.nodes) if fold is not None]
    if not folds:
        return []
    holder = nn.Module()
    for fold, (weight, bias) in zip(folds, fold_tensors(folds, model), strict=True):
        holder.register_buffer(f"{fold.name}_weight", weight, persistent=False)
        holder.register_buffer(f"{fold.name}_bias", bias, persistent=False)
    module.add_submodule(HOLDER, holder)
    by_name = {node.name: node for node in graph.nodes}
    for fold in folds:
        norm = by_name[fold.name]
        layer = norm.args[0]
        read = [
            a for a in (*layer.args, *norm.args) if isinstance(a, fx.Node) and a.op == "get_attr"
        ]
        with graph.inserting_before(layer):
            folded = [graph.get_attr(f"{HOLDER}.{fold.name}_{p}") for p in ("weight", "bias")]
        norm.args = (layer.args[0], *folded, *layer.args[3:])
        norm.target = layer.target
        graph.erase_node(layer)
        for node in read:  # no dead-code pass: it would drop the observer calls
            if not node.users:
                graph.erase_node(node)
    graph.lint()
    module.recompile()
    return folds


def fold_tensors(folds: list[Fold], model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The folded weight and bias of each fold, from ``model``'s tensors."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    return [fold.tensors(state) for fold in folds]


def lean_bindings(module: fx.GraphModule, folds: list[Fold], model: nn.Module) -> list[Binding]:
    """``(slots, name, tensor)`` pointing the tensors of ``module`` (edited here or not) at
    ``model``'s, its folded tensors at ``model``'s folded ones (computed now: a model's weights
    must not change between this and its pass): :func:`accord.trace.programs.bindings`."""
    found = bindings(module, model, derived=HOLDER)
    if not folds:
        return found
    slots = module.get_submodule(HOLDER)._buffers
    for fold, (weight, bias) in zip(folds, fold_tensors(folds, model), strict=True):
        found += [(slots, f"{fold.name}_weight", weight), (slots, f"{fold.name}_bias", bias)]
    return found


def _same_value(a: fx.Node, b: fx.Node) -> bool:
    """Whether both nodes' recorded outputs have one shape and dtype (so one can be written
    into the other's memory)."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (
        isinstance(va, torch.Tensor)
        and isinstance(vb, torch.Tensor)
        and va.shape == vb.shape
        and va.dtype == vb.dtype
    )


def in_place(module: fx.GraphModule, reader: str) -> int:
    """Rewrite ``relu`` and ``add`` to write into their first input where nothing reads it
    afterwards: the input is a fresh tensor (never a view), and its other users all come
    before and call the submodule ``reader`` (an observer, done with the value when it
    returns). Edited in place; returns how many were rewritten."""
    order = {node: index for index, node in enumerate(module.graph.nodes)}
    readers = {n for n in module.graph.nodes if n.op == "call_module" and n.target == reader}
    rewritten = 0
    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target not in _IN_PLACE or not node.args:
            continue
        first = node.args[0]
        if (
            not isinstance(first, fx.Node)
            or first.op != "call_function"
            or first.target not in _FRESH | set(_IN_PLACE.values())
            or any(first is arg for arg in node.args[1:])
            or not _same_value(first, node)
        ):
            continue
        others = [user for user in first.users if user is not node]
        if any(u not in readers or order[u] > order[node] for u in others):
            continue
        node.target = _IN_PLACE[node.target]
        rewritten += 1
    if rewritten:
        module.recompile()
    return rewritten


__all__ = ["Fold", "fold_batchnorms", "in_place", "lean_bindings"]
