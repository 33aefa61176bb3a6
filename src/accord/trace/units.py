"""Modules whose exported operators are walked as one call, with the torch.fx module rule.

torch.export writes ``nn.MultiheadAttention`` out with batch and heads on one axis (and, with
``need_weights``, the weights averaged over heads), which the per-operator rules cannot
follow; the module's spaces are known exactly, so its call is one unit: query, key and value
enter, the attention output leaves, nothing inside is featured.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from torch import fx, nn

from accord.trace.layers import multihead_attention
from accord.trace.state import Call, Feat, Walk, plain

UNIT_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


@dataclass
class Unit:
    """One call of a module in ``UNIT_TYPES``: its path, module and operator nodes."""

    path: str
    module: nn.Module
    nodes: list[fx.Node]


def units(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[fx.Node, Unit]:
    """Per first operator of each call of a unit module, that call."""
    calls: dict[str, Unit] = {}
    for node in graph.nodes:
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            module = modules.get(path)
            if node.op == "call_function" and isinstance(module, UNIT_TYPES):
                calls.setdefault(key, Unit(path, module, [])).nodes.append(node)
                break
    return {unit.nodes[0]: unit for unit in calls.values()}


def walk_unit(walk: Walk, unit: Unit, tensors: dict[str, str]) -> dict[str, Any]:
    """The values of a unit's nodes: its attention output from the module rule, nothing
    featured inside. Query, key and value are the featured tensors entering the call, in the
    order the module first uses them (query, then key, then value where they differ)."""
    inside = set(unit.nodes)
    entering: list[fx.Node] = []
    for node in unit.nodes:
        for arg in node.all_input_nodes:
            value = walk.values.get(arg.name)
            if arg not in inside and arg not in entering and _enters(value, unit.path):
                entering.append(arg)
    leaving = [n for n in unit.nodes if any(user not in inside for user in n.users)]
    values: dict[str, Any] = {n.name: plain(walk.metas[n.name]) for n in unit.nodes}
    if not 1 <= len(entering) <= 3:
        return _unknown_unit(walk, unit, entering, values, "its inputs cannot be told apart")
    query, key, value = (entering + entering[-1:] * 2)[:3]
    size = unit.module.embed_dim
    shape = (*walk.metas[query.name].shape[:-1], size)
    outputs = [n for n in leaving if getattr(walk.metas[n.name], "shape", None) == shape]
    if len(outputs) != 1:
        return _unknown_unit(walk, unit, entering, values, "its output cannot be found")
    out = outputs[0]
    stand_in = SimpleNamespace(
        name=out.name, op="call_module", target=unit.path, args=(query, key, value),
        kwargs={}, users=out.users, graph=out.graph,
    )  # fmt: skip
    meta = (walk.metas[out.name], None)
    call = Call(walk, stand_in, meta, f"{type(unit.module).__name__} {unit.path!r}", unit.module)
    result = multihead_attention(call)  # type: ignore[arg-type]
    if result is None:
        return _unknown_unit(walk, unit, entering, values, "the rule does not apply")
    values[out.name] = result.items[0]
    return values


def _enters(value: Any, path: str) -> bool:
    """Whether ``value`` is an input of the unit at ``path``: a tensor with features, or a
    view of a parameter of another module (a learned query: SigLIP's attention pooling
    probe), not one of the unit's own weights."""
    if not isinstance(value, Feat):
        return False
    if value.param is not None:
        return not value.param.startswith(f"{path}.")
    return value.featured


def _unknown_unit(
    walk: Walk, unit: Unit, entering: list[fx.Node], values: dict[str, Any], why: str
) -> dict[str, Any]:
    reason = f"consumed by {type(unit.module).__name__} {unit.path!r}, where {why}"
    walk.table.fix_value([walk.values[n.name] for n in entering], reason)
    for key in walk.keys:
        if key.startswith(f"{unit.path}."):
            walk.taint(key, f"{key} is used inside {unit.path!r}, where {why}")
    return values
