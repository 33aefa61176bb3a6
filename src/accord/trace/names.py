"""Stable names for the nodes of an exported graph, derived from the modules that run them.

torch.export numbers its nodes by operator (``linear_3``), so a node's name depends on every
operator before it; the observation points of a spec need names that say where they are and
that the statistics pass, exporting the model again, finds again.
"""

from __future__ import annotations

import builtins
import keyword
import operator
import re
from collections import Counter
from typing import Any

from torch import fx, nn

# Operators that only describe shapes: named apart, so that a dynamic or a static export of
# the same model gives every other node the same name.
_SHAPE_OPS = ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor")


def name_nodes(graph: fx.Graph, model: nn.Module) -> None:
    """Rename ``graph``'s operator nodes after the modules that run them, as torch.fx names
    its module calls: the one operator of a module without submodules is named by the
    module's path (``layers_2``, ``attn_q``, ``fc_1`` for the second call of ``fc``), other
    operators of a module by its path and the operator (``attn_view``, ``attn_view_1``,
    ``layer1_0_add``), operators of the model's own forward by the operator (``add``,
    ``add_1``).

    The names depend only on the operators and their module stack, so the same model
    exported anew (as an ExportedProgram or as its unlifted module), as a spec file's
    statistics pass does, has every node named the same way."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    groups: dict[str, list[fx.Node]] = {}
    for node in calls:
        groups.setdefault(_scope(node), []).append(node)
    parents = {path for path, module in model.named_modules() if next(module.children(), None)}
    names: dict[fx.Node, str] = {}
    taken = _reserved(model) | {n.name for n in graph.nodes if n.op != "call_function"}
    for scope, nodes in groups.items():
        path, _, index = scope.partition("@")
        prefix = path.replace(".", "_") + (f"_{index}" if index else "")
        substantive = [n for n in nodes if not _shape_only(n)]
        counts: Counter[str] = Counter()
        for node in nodes:
            if len(substantive) == 1 and node is substantive[0] and path and path not in parents:
                candidate = prefix
            else:
                op = _op_name(node.target)
                candidate = f"{prefix}_{op}" if prefix else op
                counts[candidate] += 1
                if counts[candidate] > 1:
                    candidate = f"{candidate}_{counts[candidate] - 1}"
            names[node] = _unique(_identifier(candidate), taken)
    # torch.fx's namespace never forgets a name, so renaming through it would number the new
    # names after the old ones: the names are set, and the namespace rebuilt from them
    namespace = type(graph._graph_namespace)()
    for node in graph.nodes:
        node.name = names.get(node, node.name)
        namespace._used_names.add(node.name)
        namespace._obj_to_name[node] = node.name
    graph._graph_namespace = namespace


def _scope(node: fx.Node) -> str:
    """The innermost module call running ``node``: its path, with ``@k`` for the k-th call
    of a module called again; "" for the model's own forward."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    key, (path, _) = list(stack.items())[-1]
    _, at, index = key.rpartition("@")
    return f"{path}@{index}" if at and index.isdigit() and path else path


def _shape_only(node: fx.Node) -> bool:
    return node.target is operator.getitem or _op_name(node.target).startswith(_SHAPE_OPS)


def _op_name(target: Any) -> str:
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet if packet is not None else target, "__name__", "op").strip("_")


def _identifier(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    name = f"_{name}" if not name or name[0].isdigit() else name
    return f"{name}_" if keyword.iskeyword(name) or name in dir(builtins) else name


def _reserved(model: nn.Module) -> set[str]:
    """Names other nodes may have in either form of the graph (parameters and buffers as
    placeholders or attributes, the inputs, the output)."""
    taken = {"output", "_guards_fn"}
    for key in model.state_dict(keep_vars=True):
        flat = _identifier(key.replace(".", "_"))
        taken |= {flat, f"p_{flat}", f"b_{flat}", f"c_{flat}", f"_{flat}"}
    return taken


def _unique(name: str, taken: set[str]) -> str:
    unique, count = name, 0
    while unique in taken:
        count += 1
        unique = f"{name}_op{count}"
    taken.add(unique)
    return unique
