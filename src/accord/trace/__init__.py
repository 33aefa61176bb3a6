"""Tracing: a network's code → its :class:`~accord.spec.Spec` (feature spaces, their writers,
readers and observation points). :func:`trace` walks a torch.fx graph (:mod:`accord.trace.fx`)
with rules per module, function and method (:mod:`accord.trace.tables`)."""

from accord.trace.tracer import trace

__all__ = ["trace"]
