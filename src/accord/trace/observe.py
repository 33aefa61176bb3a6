"""A model's traced forward that also hands back chosen nodes' outputs, on the graph a spec
names (torch.fx's, or torch.export's), for the tools that read features: similarity, the CKA
attack, the precision benchmark, feature visualisation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from accord.errors import TraceError
from accord.trace.export import exported_module
from accord.trace.fx import symbolic_graph


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
        wanted = list(dict.fromkeys(nodes))
        by_name = {node.name: node for node in module.graph.nodes}
        missing = [name for name in wanted if name not in by_name]
        if missing:
            raise TraceError(
                f"observation node(s) {missing} are not in the traced graph of {model}; the "
                "spec was made for another model or version: trace again"
            )
        collector = _Collector()
        module.add_submodule("accord_observed", collector)
        for name in wanted:
            with module.graph.inserting_after(by_name[name]):
                module.graph.call_module("accord_observed", (by_name[name], name))
        module.graph.lint()
        module.recompile()
        self.module = module
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
    """``model``'s forward on the graph ``graph`` ("export", or "fx" for specs traced with
    torch.fx), returning ``(output, {node: output})`` for ``nodes``, observation node names
    of a spec of that graph (``Spec.graph``, ``Spec.leaf_modules``). ``example_input`` is
    what torch.export runs the model on (torch.fx ignores it)."""
    if graph == "export":
        module = exported_module(model, example_input)
    elif graph == "fx":
        module = symbolic_graph(model, leaf_modules)
    else:
        raise TraceError(f"graph={graph!r}: expected 'export' or 'fx' (Spec.graph)")
    return ObservedModel(module, nodes, type(model).__name__, graph == "export")


__all__ = ["ObservedModel", "observed_model"]
