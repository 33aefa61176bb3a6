"""The torch.fx tracing that the tracer and the statistics pass share, so node names agree."""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx, nn

from accord.errors import TraceError

# Modules traced as one opaque call: the tracer knows their internal symmetries.
LEAF_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.leaf_types = LEAF_TYPES

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def symbolic_graph(model: nn.Module, leaf_modules: Iterable[str] = ()) -> fx.GraphModule:
    """Trace ``model`` with torch.fx; ``leaf_modules`` (qualified names) stay opaque calls.

    Raises :class:`TraceError` saying what failed and how to proceed.
    """
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx raises many types; all mean "not traceable"
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Mark the submodule with data-dependent control flow as a leaf "
            "(leaf_modules=['name', ...]; its spaces become fixed), or write a spec file "
            "(accord.Spec.load) instead of tracing."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


__all__ = ["symbolic_graph"]
