"""Observing a model's traced forward on the graph a spec names (torch.fx's or torch.export's):
a module called right after chosen nodes, for the statistics pass and for the tools that
read features (similarity, the CKA attack, the precision benchmark, feature visualisation)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from accord.errors import TraceError
from accord.trace.export import exported_module
from accord.trace.fx import symbolic_graph


def traced_module(
    model: nn.Module, example_input: Any, graph: str = "export", leaf_modules: Iterable[str] = ()
) -> fx.GraphModule:
    """``model``'s forward as the GraphModule of ``graph`` ("export", or "fx" for specs traced
    with torch.fx; ``Spec.graph``, ``Spec.leaf_modules``), so a spec's observation node names
    are its nodes' names. ``example_input`` is what torch.export runs the model on (torch.fx
    ignores it); the exported module is in eval mode, and inside
    :func:`accord.trace.programs.shared_exports` it reuses its architecture's program."""
    if graph == "export":
        return exported_module(model, example_input)
    if graph == "fx":
        return symbolic_graph(model, leaf_modules)
    raise TraceError(f"graph={graph!r}: expected 'export' or 'fx' (Spec.graph)")


@dataclass(frozen=True)
class GraphValue:
    """An argument of :func:`call_after`'s calls that stands for the output of the graph's
    node ``node`` (computed before the observed node), or of the parameter or buffer of that
    state-dict key."""

    node: str


def call_after(
    module: fx.GraphModule,
    observer: nn.Module,
    calls: Sequence[tuple[str, tuple[Any, ...]]],
    model: str,
) -> fx.GraphModule:
    """``module`` calling ``observer(node output, *arguments)`` right after each ``(node,
    arguments)`` of ``calls``, before any later in-place operator (``ReLU(inplace=True)``,
    ``+=``) can change the output; edited in place, and returned. An argument that is a
    :class:`GraphValue` passes that node's output. A node the graph lacks raises TraceError
    (the spec was made for another model than ``model``)."""
    by_name = {node.name: node for node in module.graph.nodes}
    held = {node.target: node for node in module.graph.nodes if node.op == "get_attr"}
    named = {arg.node for _, arguments in calls for arg in arguments if isinstance(arg, GraphValue)}
    missing = sorted({node for node, _ in calls} - set(by_name))
    missing += sorted(named - set(by_name) - set(held))
    if missing:
        raise TraceError(
            f"observation node(s) {missing} are not in the traced graph of {model}; the "
            "spec was made for another model or version: trace again"
        )
    module.add_submodule("accord_observer", observer)
    for node, arguments in calls:
        passed = tuple(
            by_name.get(a.node, held.get(a.node)) if isinstance(a, GraphValue) else a
            for a in arguments
        )
        with module.graph.inserting_after(by_name[node]):
            module.graph.call_module("accord_observer", (by_name[node], *passed))
    module.graph.lint()
    module.recompile()
    return module


class _Collector(nn.Module):
    """Called right after each observed node; keeps its output under the node's name."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, Any] = {}

    def forward(self, tensor: Any, node: str) -> None:
        self.seen[node] = tensor


class ObservedModel(nn.Module):
    """``module`` (a traced GraphModule) returning ``(model output, {node: node output})``.

    ``module`` may still be edited (insert nodes after an observed one, then
    ``module.recompile()``): the collector sees whatever replaces an observed node's uses.
    """

    def __init__(
        self, module: fx.GraphModule, nodes: Iterable[str], model: str, exported: bool
    ) -> None:
        super().__init__()
        self.exported = exported
        collector = _Collector()
        calls = [(name, (name,)) for name in dict.fromkeys(nodes)]
        self.module = call_after(module, collector, calls, model)
        self.collector = collector

    def train(self, mode: bool = True) -> ObservedModel:
        """An exported graph was exported in eval mode and refuses train()/eval(); a torch.fx
        graph calls the model's modules, whose flags follow."""
        if self.exported:
            self.training = mode
            return self
        return super().train(mode)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.collector.seen = {}
        try:
            output = self.module(*args, **kwargs)
            return output, self.collector.seen
        finally:
            self.collector.seen = {}


def observed_model(
    model: nn.Module,
    nodes: Iterable[str],
    example_input: Any,
    *,
    graph: str = "export",
    leaf_modules: Iterable[str] = (),
) -> ObservedModel:
    """``model``'s forward on the graph ``graph`` (:func:`traced_module`), returning
    ``(output, {node: output})`` for ``nodes``, observation node names of a spec of that
    graph (``Spec.graph``, ``Spec.leaf_modules``)."""
    module = traced_module(model, example_input, graph, leaf_modules)
    return ObservedModel(module, nodes, type(model).__name__, graph == "export")


__all__ = ["GraphValue", "ObservedModel", "call_after", "observed_model", "traced_module"]
