"""Tracing: a network's code → its :class:`~accord.spec.Spec` (feature spaces, their writers,
readers and observation points). :func:`trace` walks a torch.fx graph (:mod:`accord.trace.fx`)
with rules per module, function and method (:mod:`accord.trace.tables`), or, for models
torch.fx cannot trace, the torch.export graph (:mod:`accord.trace.export`) with rules per ATen
operator (:mod:`accord.trace.aten`)."""

from accord.trace.tracer import trace

__all__ = ["trace"]
