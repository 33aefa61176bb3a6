"""Tracing on torch.export: the ATen graph of a model, walked with :mod:`accord.trace.aten`.

``torch.export.export`` runs the model's Python (shape-dependent control flow included, which
stops torch.fx) and records ATen operators with each output's shape (``node.meta['val']``), so
no separate shape-recording run is needed. Parameters and buffers are inputs of the graph,
named by the export signature; tied tensors (an lm_head sharing the embedding) appear once
and every state-dict key of the tensor moves with it. The batch axis is exported as dynamic
where the model allows it, so the same graph runs the statistics pass on any batch size.
Inside a merge the tracer, the BatchNorm lookup and the statistics pass of every model read
one program per architecture (:mod:`accord.trace.programs`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram

from accord.errors import ConfigError, did_you_mean
from accord.trace.aten import ATEN_HEAD_RULES, rule_for
from accord.trace.experts import carry_rows
from accord.trace.programs import bound_module, program_for
from accord.trace.state import Call, Feat, Seg, TensorMeta, Walk, plain
from accord.trace.units import units, walk_unit
from accord.trace.walk import admits, call_args, output, taint_unused, unknown


def trace_exported(model: nn.Module, example_input: Any, walk: Walk) -> ExportedProgram:
    """Walk the exported graph of ``model``, filling ``walk`` (values, events, spaces)."""
    program = program_for(model, example_input)
    signature = program.graph_signature
    tensors = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    walk.aliases = _aliases(model)
    order = {key: index for index, key in enumerate(model.state_dict())}
    # a tied tensor goes by its first state-dict key (the embedding, not the output layer)
    tensors = {
        name: min([key, *walk.aliases.get(key, ())], key=lambda k: order.get(k, len(order)))
        for name, key in tensors.items()
    }
    for index, node in enumerate(program.graph.nodes):
        walk.order[node.name] = index
        walk.metas[node.name] = _meta(node.meta.get("val"))
    walk.constant = _constant_nodes(program.graph, set(signature.user_inputs))
    calls = units(program.graph, walk.modules)
    for node in program.graph.nodes:
        if node.name in walk.values:
            continue  # inside a module walked as one call
        unit = calls.get(node) if _leaf(walk, node) is None else None
        if unit is None:
            walk.values[node.name] = _visit(walk, node, tensors)
        else:
            walk.values.update(walk_unit(walk, unit, tensors))
    return program


def _constant_nodes(graph: fx.Graph, user_inputs: set[str]) -> set[str]:
    """The nodes whose output no user input's entries reach (its shape may: a learned query
    expanded to the batch): the same for every input."""
    varying: set[str] = set()
    for node in graph.nodes:
        entries = [a for a in node.all_input_nodes if not _size_like(a.meta.get("val"))]
        if node.name in user_inputs or any(arg.name in varying for arg in entries):
            varying.add(node.name)
    return {node.name for node in graph.nodes} - varying


def _size_like(value: Any) -> bool:
    """A number (a size read off a tensor's shape), not a tensor or tensors."""
    return isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool | int | float | bool)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Per state-dict key, the other keys holding the very same tensor (tied weights)."""
    by_tensor: dict[tuple[int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        identity = (value.data_ptr(), tuple(value.shape), tuple(value.stride()))
        by_tensor.setdefault(identity, []).append(key)
    return {
        key: [k for k in keys if k != key]
        for keys in by_tensor.values()
        for key in keys
        if len(keys) > 1
    }


def _meta(value: Any) -> Any:
    """A node's output as the tracer sees it; symbolic sizes become the example's sizes."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(_size(n) for n in value.shape), value.is_floating_point())
    if isinstance(value, tuple | list):
        return tuple(_meta(v) for v in value)
    if isinstance(value, torch.SymInt | int):
        return _size(value)
    return value if value is None or isinstance(value, float | bool) else None


def _size(value: Any) -> int:
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return int(hint) if hint is not None else -1
    return int(value)


def _visit(walk: Walk, node: fx.Node, tensors: dict[str, str]) -> Any:
    meta = walk.metas[node.name]
    if node.op == "placeholder":
        return _placeholder(walk, node, meta, tensors)
    if node.op == "output":
        return output(walk, node)
    if node.op != "call_function":
        return plain(meta)
    if not node.users and _pure(node.target):
        return plain(meta)  # its result is never used (``x[:, :, -1]`` read for its shape)
    leaf = _leaf(walk, node)
    if leaf is not None:
        return _opaque(Call(walk, node, meta, f"leaf module {leaf!r}"), leaf)
    call = Call(walk, node, meta, _describe(node.target))
    rule = rule_for(node.target)
    if rule is not None and not admits(rule, ATEN_HEAD_RULES, call):
        rule = None
    result = rule(call) if rule is not None else None
    if result is None:
        result = unknown(call)
    taint_unused(call, result)
    return carry_rows(call, result)


def _pure(target: Any) -> bool:
    """An ATen operator that changes none of its arguments (its schema writes to none)."""
    schema = getattr(target, "_schema", None)
    return schema is not None and not schema.is_mutable


def _leaf(walk: Walk, node: fx.Node) -> str | None:
    """The outermost leaf module (``leaf_modules``) whose call runs ``node``, if any."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if path in walk.leaves:
            return path
    return None


def _opaque(call: Call, leaf: str) -> Any:
    """An operator inside a leaf module: one opaque unit with it, so every space entering or
    leaving the leaf is fixed and none of the leaf's parameters can move."""
    for key in call.walk.keys:
        if key.startswith(f"{leaf}."):
            call.walk.taint(key, f"{key} is used inside {call.desc}")
    call.table.fix_value(call_args(call), f"consumed by {call.desc}, which is kept opaque")
    return call.plain()


def _describe(target: Any) -> str:
    name = getattr(target, "__name__", repr(target))
    packet = getattr(target, "overloadpacket", None)
    return f"aten.{packet.__name__}" if packet is not None else name


def _placeholder(walk: Walk, node: fx.Node, meta: Any, tensors: dict[str, str]) -> Any:
    """A parameter or buffer is a view of itself; a floating user input with a batch axis has a
    fixed space (channels; the last axis of a 3-D input unless a 1-d conv reads it)."""
    key = tensors.get(node.name)
    if key is not None:
        if key in walk.keys and isinstance(meta, TensorMeta):
            return Feat(meta.shape, param=key, dims=tuple(range(len(meta.shape))))
        return plain(meta)
    if not isinstance(meta, TensorMeta) or not meta.floating or len(meta.shape) < 2:
        return plain(meta)
    axis = 2 if len(meta.shape) == 3 and not _channels_first(node) else 1
    size = meta.shape[axis]
    space = walk.table.new(size, f"input:{node.target}")
    walk.table.record(space).is_input = True
    walk.table.fix(space, "input")
    return Feat(meta.shape, axis, (Seg(space, size),))


def _channels_first(node: fx.Node) -> bool:
    """Whether a 3-D input is (N, C, L): it goes straight into a 1-d conv or norm."""
    names = ("conv1d", "convolution", "batch_norm", "instance_norm", "group_norm")
    return any(getattr(user.target, "__name__", "").startswith(names) for user in node.users)


def exported_walk(model: nn.Module, leaves: set[str] = frozenset()) -> Walk:  # type: ignore[assignment]
    """An empty walk over ``model``'s state dict, for :func:`trace_exported`, with the
    qualified names of the modules kept opaque (``leaves``)."""
    modules = dict(model.named_modules())
    unknown_leaves = sorted(set(leaves) - set(modules))
    if unknown_leaves:
        raise ConfigError(
            f"leaf_modules {unknown_leaves} are not submodules of {type(model).__name__}"
            f"{did_you_mean(unknown_leaves[0], list(modules))}; pass qualified names as "
            "model.named_modules() lists them"
        )
    state = model.state_dict()
    walk = Walk({}, set(state), Counter())
    walk.shapes = {key: tuple(value.shape) for key, value in state.items()}
    walk.leaves = set(leaves)
    walk.modules = modules
    return walk


def exported_module(model: nn.Module, example_input: Any) -> fx.GraphModule:
    """The exported, unlifted module of ``model`` (a GraphModule running the model's own
    parameters and buffers), its nodes named as in the traced spec; inside
    :func:`accord.trace.programs.shared_exports` the program of its architecture is reused."""
    return bound_module(program_for(model, example_input), model)


def batchnorm_nodes(
    model: nn.Module, example_input: Any, norms: Sequence[str]
) -> dict[str, list[str]]:
    """The exported graph's nodes that apply each BatchNorm module of ``norms`` (one program
    for all of them, that of :func:`accord.trace.programs.program_for`: exporting is the
    costly part)."""
    program = program_for(model, example_input)
    inputs = program.graph_signature.inputs_to_parameters
    by_weight = {f"{norm}.weight": norm for norm in norms}
    found: dict[str, list[str]] = {norm: [] for norm in norms}
    for node in program.graph.nodes:
        name = getattr(node.target, "__name__", "")
        if node.op == "call_function" and name.startswith(("batch_norm", "_native_batch_norm")):
            weight = node.args[1]
            norm = (
                by_weight.get(inputs.get(weight.name, "")) if isinstance(weight, fx.Node) else None
            )
            if norm is not None:
                firsts = [u.name for u in node.users if u.args[1:] == (0,)]
                found[norm] += (
                    firsts if isinstance(node.meta.get("val"), tuple | list) else [node.name]
                )
    return found
