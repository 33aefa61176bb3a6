"""Find a network's feature spaces: :func:`trace` turns a model into a Spec.

torch.export first: the model is exported (:mod:`accord.trace.export`) and its ATen graph
walked with rules per ATen operator (:mod:`accord.trace.aten`); its nodes are named after the
modules that run them, so the statistics pass finds the observation nodes in the same program
(one export per architecture inside a merge, :mod:`accord.trace.programs`) or in a new export.
torch.fx remains for spec files saved with ``graph="fx"`` and as the fallback for a model
torch.export cannot export (a data-dependent branch, say) but torch.fx can trace, with
``leaf_modules`` kept opaque: the model is traced by :func:`accord.trace.fx.symbolic_graph`
with the rules below per module, function and method. ``Spec.graph`` says which graph the
observation nodes name. The ATen rules prove the same structure from the operators that
modules and functions decompose into (``nn.MultiheadAttention``, which torch.export writes out
with batch and heads on one axis, is walked as one call with its module rule).

On torch.fx the model is run once on ``example_input`` to learn every tensor's shape
(torch.export records them). Each tensor's feature axis is laid out in segments of spaces;
walking the graph:

* Linear / Conv / Embedding (and F.linear / F.conv with parameter weights) open a new space:
  weight rows (Embedding: columns) and bias write it; their weight columns read the input's.
* A residual add (``+``, ``-``, torch.add) unites its operands' spaces; a parameter added
  along the features (a positional embedding) is a writer. ``torch.cat`` along the features
  stacks layouts (readers get one axis per segment, with offsets); along another axis it
  unites them, a parameter there (a class token) being a writer. A Flatten of (C, H, W) gives
  each channel a block of H·W columns of the Linear that reads it.
* Elementwise activations, max pools, shifts by a constant: permutations exactly, other maps
  approximately (``dense``). LayerNorm / GroupNorm / InstanceNorm, a BatchNorm that does not
  directly follow its writer, depthwise convolutions, gating products: permutations only.
  A BatchNorm directly after a writer is folded (``FoldedNorm``) and keeps the space linear.
* Attention: ``nn.MultiheadAttention`` and ``accord.zoo.vit.Attention`` (opaque fx leaves)
  give a ``qk`` space (orthogonal maps per head: q rows write it, k rows read it, so q·k is
  kept) and a ``v`` space (per head, read by the output projection's columns); nothing inside
  a leaf can be observed. Attention written out in the graph (q, k, v projections reshaped
  into heads, ``F.scaled_dot_product_attention``, heads joined again) gives the same spaces,
  observed at the q projection's output and at the joined heads.
* Anything else is unknown: every space it touches is fixed, with the reason, and parameters
  it uses cannot be moved by any space. The input and the output spaces are fixed too.

Observation points (``observe="post"``) are the outputs of a space's activations; with
``observe="pre"`` their inputs (a writer's output after its BatchNorm, or a residual sum).
A space without activations is observed where its readers read it, else at its writers'
outputs. Feature axes in observations are non-negative (1 for NCHW, 2 for (N, L, C)).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import fx, nn

from accord.errors import ConfigError, TraceError
from accord.spec import Spec
from accord.trace.export import exported_walk, trace_exported
from accord.trace.finish import finish
from accord.trace.fx import symbolic_graph
from accord.trace.programs import ExportError
from accord.trace.state import Call, Feat, Seg, TensorMeta, Walk, plain
from accord.trace.tables import FUNCTION_RULES, HEAD_RULES, METHOD_RULES, MODULE_RULES
from accord.trace.walk import admits, output, taint_unused, unknown


def trace(
    model: nn.Module,
    example_input: Any,
    *,
    observe: Literal["post", "pre"] = "post",
    leaf_modules: Iterable[str] = (),
) -> Spec:
    """The feature spaces of ``model``, found by tracing it on ``example_input``.

    ``example_input`` is one tensor, a tuple of positional inputs, or a dict of keyword
    inputs; use a batch of at least 2 so that the batch axis is never mistaken for another.
    ``leaf_modules`` (qualified names) are kept opaque: their spaces become fixed. The model
    is run once in eval mode without gradients; its training flags are restored.

    >>> import torch
    >>> from accord.zoo import build_model
    >>> spec = trace(build_model("mlp", width=8, depth=2), torch.zeros(2, 3, 32, 32))
    >>> for space in spec:
    ...     print(space.name, space.size, space.maps, space.free)
    input 3 linear False
    layers.1 8 dense True
    layers.3 8 dense True
    output 10 linear False
    >>> spec["input"].readers[0].block
    1024

    The model is exported with torch.export (``leaf_modules``: every operator inside them is
    one opaque unit); a model torch.export cannot export is traced with torch.fx. Raises
    TraceError when neither can trace the model, with both reasons and the remedies, or when
    the example input fails.
    """
    if observe not in ("post", "pre"):
        raise ConfigError(f"observe={observe!r}: expected 'post' or 'pre'")
    leaves = set(leaf_modules)
    walk = exported_walk(model, leaves)
    try:
        trace_exported(model, example_input, walk)
    except ExportError as export_error:
        try:
            return trace_fx(model, example_input, observe, leaves)
        except TraceError as fx_error:
            raise TraceError(f"{export_error}\n{fx_error}") from export_error
    spec = finish(walk, model, observe, leaves, "export")
    if walk.rotated_dead_end:
        # rotated query heads met a key accord cannot map as whole heads (DeepSeek's, a part
        # without positions beside a rotated part shared by every head): with the rotated
        # parts left in place instead, the heads stay where they are and their other parts
        # may still map; the spec with more free spaces is kept (both are exact)
        in_place = exported_walk(model, leaves)
        in_place.join_rotated_slots = False
        trace_exported(model, example_input, in_place)
        other = finish(in_place, model, observe, leaves, "export")
        if len(other.free_spaces) > len(spec.free_spaces):
            return other
    return spec


def trace_fx(model: nn.Module, example_input: Any, observe: str, leaves: set[str]) -> Spec:
    """:func:`trace` on torch.fx's graph (``Spec.graph == "fx"``), as spec files of earlier
    versions were made; raises TraceError when torch.fx cannot trace the model."""
    graph = symbolic_graph(model, leaves)
    metas = _record_shapes(model, graph, example_input)
    state = model.state_dict()
    counts = Counter(n.target for n in graph.graph.nodes if n.op == "call_module")
    walk = Walk(dict(model.named_modules()), set(state), counts)
    walk.shapes = {key: tuple(value.shape) for key, value in state.items()}
    for index, node in enumerate(graph.graph.nodes):
        walk.order[node.name] = index
        walk.metas[node.name] = metas.get(node.name)
        walk.values[node.name] = _visit(walk, node, leaves)
    return finish(walk, model, observe, leaves)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and keeps, per node, the shapes of its output (not the tensors)."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.metas: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.metas[n.name] = _meta(result)
        return result


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.is_floating_point())
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, tuple | list):
        return tuple(_meta(v) for v in value)
    if value is None or isinstance(value, int | float | bool | str | torch.dtype | torch.device):
        return value
    return None


def _record_shapes(model: nn.Module, graph: fx.GraphModule, example_input: Any) -> dict:
    args = _positional(graph, example_input)
    training = [(module, module.training) for module in model.modules()]
    recorder = _ShapeRecorder(graph)
    try:
        model.eval()
        with torch.no_grad():
            recorder.run(*args)
    except Exception as exc:  # any failure of the user's model on the user's input
        raise TraceError(
            f"running the traced {type(model).__name__} on example_input failed: "
            f"{type(exc).__name__}: {exc}. Pass an input the model accepts (a tensor, a tuple "
            "of positional inputs or a dict of keyword inputs)."
        ) from exc
    finally:
        for module, flag in training:
            module.training = flag
    return recorder.metas


def _positional(graph: fx.GraphModule, example_input: Any) -> list[Any]:
    if isinstance(example_input, tuple):
        return list(example_input)
    if not isinstance(example_input, dict):
        return [example_input]
    args = []
    for node in graph.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.target in example_input:
            args.append(example_input[node.target])
        elif node.args:
            args.append(node.args[0])
        else:
            raise TraceError(f"example_input has no entry for the model's input {node.target!r}")
    return args


def _visit(walk: Walk, node: fx.Node, leaves: set[str]) -> Any:
    meta = walk.metas[node.name]
    if node.op == "placeholder":
        return _placeholder(walk, node, meta)
    if node.op == "get_attr":
        if isinstance(meta, TensorMeta) and node.target in walk.keys:
            return Feat(meta.shape, param=node.target, dims=tuple(range(len(meta.shape))))
        return plain(meta)
    if node.op == "output":
        return output(walk, node)
    call = _call(walk, node, meta)
    rule = _rule(node, call, leaves)
    result = rule(call) if rule is not None else None
    if result is None:
        result = unknown(call)
    taint_unused(call, result)
    return result


def _placeholder(walk: Walk, node: fx.Node, meta: Any) -> Any:
    """A floating input with a batch axis: its features (channels; the last axis of a 3-D
    input unless a 1-d conv or norm reads it) form a fixed space, so its readers are listed."""
    if not isinstance(meta, TensorMeta) or not meta.floating or len(meta.shape) < 2:
        return plain(meta)
    axis = 2 if len(meta.shape) == 3 and not _channels_first(walk, node) else 1
    size = meta.shape[axis]
    space = walk.table.new(size, f"input:{node.target}")
    walk.table.record(space).is_input = True
    walk.table.fix(space, "input")
    return Feat(meta.shape, axis, (Seg(space, size),))


def _channels_first(walk: Walk, node: fx.Node) -> bool:
    """Whether a 3-D input is (N, C, L): it goes straight into a 1-d conv or norm."""
    kinds = (nn.Conv1d, nn.BatchNorm1d, nn.InstanceNorm1d)
    return any(
        user.op == "call_module" and type(walk.modules[user.target]) in kinds for user in node.users
    )


def _call(walk: Walk, node: fx.Node, meta: Any) -> Call:
    if node.op == "call_module":
        module = walk.modules[node.target]
        return Call(walk, node, meta, f"{type(module).__name__} {node.target!r}", module)
    if node.op == "call_method":
        return Call(walk, node, meta, f"Tensor.{node.target}")
    return Call(walk, node, meta, _function_name(node.target))


def _rule(node: fx.Node, call: Call, leaves: set[str]) -> Any:
    rule = _listed_rule(node, call, leaves)
    return rule if admits(rule, HEAD_RULES, call) else None


def _listed_rule(node: fx.Node, call: Call, leaves: set[str]) -> Any:
    if node.op == "call_module":
        return None if node.target in leaves else MODULE_RULES.get(type(call.module))
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    return FUNCTION_RULES.get(node.target)


def _function_name(function: Any) -> str:
    module = getattr(function, "__module__", None) or "torch"
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(module, module)
    return f"{module}.{getattr(function, '__name__', repr(function))}"


__all__ = ["trace"]
