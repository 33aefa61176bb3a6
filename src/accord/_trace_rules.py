"""Tracing rules for parameter-free tensor operations (elementwise, shape, arithmetic, concat).

A rule takes a :class:`~accord._trace_state.Call` and returns the output's value, or None
when the call is outside what it can prove safe: the tracer then treats the call as unknown
and fixes every space it touches. Rules return None before changing any state.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

from accord._trace_state import Call, Feat, Other, Seg, TensorMeta, Tup, seg_offsets

Rule = Callable[[Call], Any]


def passthrough(call: Call) -> Any:
    """Ops that leave values alone (dropout in eval, contiguous, to, clone, ...)."""
    x = call.x
    if not isinstance(x, Feat) or call.out_shape != x.shape:
        return None
    return x


def elementwise(kind: str | None, activation: bool = True) -> Rule:
    """Per-entry functions: the layout stays; ``kind`` is the weakest map they allow."""

    def rule(call: Call) -> Any:
        x = call.x
        extra = [a for a in (*call.node.args[1:], *call.node.kwargs.values())]
        if not isinstance(x, Feat) or call.out_shape != x.shape or _has_tensor(call, extra):
            return None
        if not x.featured:
            return call.plain()
        if kind:
            call.table.downgrade_value(x, kind)
        if activation:
            call.event("act_out")
            if call.input_node():
                call.event("act_in", call.input_node())
            if _inplace(call):
                call.walk.inplace.append(call.node.name)
        return x

    return rule


def _has_tensor(call: Call, args: Sequence[Any]) -> bool:
    return any(isinstance(call.resolve(a), Feat | Tup) for a in args)


def _inplace(call: Call) -> bool:
    module_inplace = getattr(call.module, "inplace", False)
    return bool(
        module_inplace
        or call.node.kwargs.get("inplace")
        or (call.node.op == "call_method" and str(call.node.target).endswith("_"))
    )


def softmax(call: Call) -> Any:
    """Softmax over the features permutes with them; over another axis it is per feature."""
    x = call.x
    dim = call.module.dim if call.module is not None else call.arg(1, "dim", None)
    if not isinstance(x, Feat) or not isinstance(dim, int) or call.out_shape != x.shape:
        return None
    if x.featured:
        call.table.downgrade_value(x, "permutation" if dim % x.ndim == x.axis else "dense")
    return x


def spatial(dims: int | None, kind: str | None = None) -> Rule:
    """Ops on the last ``dims`` axes (pools, upsampling; None: every axis after 1).

    They act on each feature alone, so the layout stays when the feature axis is not among
    those axes and keeps its size.
    """

    def rule(call: Call) -> Any:
        x, shape = call.x, call.out_shape
        if not isinstance(x, Feat) or shape is None or len(shape) != x.ndim:
            return None
        if not x.featured:
            return call.plain()
        touched = x.ndim - 2 if dims is None else dims
        if x.axis >= x.ndim - touched or shape[x.axis] != x.shape[x.axis]:
            return None
        if kind:
            call.table.downgrade_value(x, kind)
        return x.moved(shape, x.axis)

    return rule


def pad(call: Call) -> Any:
    """F.pad and padding modules: zero padding is linear, a constant shift is not."""
    if call.module is not None:
        widths, value = call.module.padding, getattr(call.module, "value", 0.0)
    else:
        widths, value = call.arg(1, "pad"), call.arg(3, "value", None) or 0.0
    x = call.x
    if not isinstance(x, Feat) or not isinstance(widths, Sequence) or not x.featured:
        return None if not isinstance(x, Feat) else call.plain()
    touched = [x.ndim - 1 - i // 2 for i, w in enumerate(widths) if w]
    if x.axis in touched or not isinstance(value, int | float):
        return None
    if value:
        call.table.downgrade_value(x, "dense")
    return x.moved(call.out_shape, x.axis)


def reshape(call: Call) -> Any:
    """view, reshape, flatten, unflatten, squeeze, unsqueeze: shapes decide where features go."""
    x, shape = call.x, call.out_shape
    if not isinstance(x, Feat) or shape is None:
        return None
    if x.param is not None:
        return _reshape_param(x, shape)
    if not x.featured:
        return call.plain()
    out = follow_reshape(x, shape)
    if out is None:
        call.table.fix_value(
            x, f"{call.desc} at node {call.node.name!r} splits or interleaves the features"
        )
        return call.plain()
    return out


def follow_reshape(x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """Where ``x``'s features land in a row-major reshape to ``shape``, or None.

    The feature axis must start where an output axis starts (same product of the axes before
    it). That axis may merge the feature axis with the axes after it (each entry then owns
    ``q`` entries: blocks grow by ``q``) or undo such a merge (blocks shrink by ``q``).
    """
    before = math.prod(x.shape[: x.axis])
    entries = x.shape[x.axis]
    found = []
    for b, size in enumerate(shape):
        if math.prod(shape[:b]) != before or size == 0:
            continue
        if size % entries == 0:
            q = size // entries
            segs = tuple(Seg(s.space, s.size, s.block * q) for s in x.segs)
        elif entries % size == 0 and all(s.block % (entries // size) == 0 for s in x.segs):
            q = entries // size
            segs = tuple(Seg(s.space, s.size, s.block // q) for s in x.segs)
        else:
            continue
        found.append((b, segs))
    # Size-1 axes make several positions fit; the batch axis never carries the features.
    found.sort(key=lambda item: item[0] < min(x.axis, 1))
    return Feat(tuple(shape), found[0][0], found[0][1]) if found else None


def _reshape_param(x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """A parameter view that only adds or removes size-1 axes keeps its axis mapping."""
    kept = [(d, n) for d, n in zip(x.dims, x.shape, strict=True) if n != 1]
    if [n for _, n in kept] != [n for n in shape if n != 1]:
        return None
    dims = iter(d for d, _ in kept)
    return Feat(tuple(shape), param=x.param, dims=tuple(next(dims) if n != 1 else None for n in shape))


def _reorder(call: Call, x: Feat, perm: Sequence[int]) -> Any:
    """``x`` with output axis ``i`` taken from input axis ``perm[i]``."""
    if sorted(perm) != list(range(x.ndim)):
        return None
    if x.param is not None:
        return Feat(call.out_shape, param=x.param, dims=tuple(x.dims[p] for p in perm))
    if not x.featured:
        return call.plain()
    return x.moved(call.out_shape, list(perm).index(x.axis))


def transpose(call: Call) -> Any:
    x = call.x
    d0, d1 = call.arg(1, "dim0"), call.arg(2, "dim1")
    if not isinstance(x, Feat) or not isinstance(d0, int) or not isinstance(d1, int):
        return None
    perm = list(range(x.ndim))
    perm[d0 % x.ndim], perm[d1 % x.ndim] = d1 % x.ndim, d0 % x.ndim
    return _reorder(call, x, perm)


def permute(call: Call) -> Any:
    x = call.x
    if not isinstance(x, Feat):
        return None
    dims = [call.resolve(a) for a in call.node.args[1:]] or call.arg(1, "dims", [])
    if len(dims) == 1 and isinstance(dims[0], Sequence):
        dims = list(dims[0])
    if not all(isinstance(d, int) for d in dims):
        return None
    return _reorder(call, x, [d % x.ndim for d in dims])


def movedim(call: Call) -> Any:
    x = call.x
    source, destination = call.arg(1, "source"), call.arg(2, "destination")
    if not isinstance(x, Feat):
        return None
    source = [source] if isinstance(source, int) else list(source)
    destination = [destination] if isinstance(destination, int) else list(destination)
    perm: list[int | None] = [None] * x.ndim
    for s, d in zip(source, destination, strict=True):
        perm[d % x.ndim] = s % x.ndim
    rest = iter(i for i in range(x.ndim) if i not in {s % x.ndim for s in source})
    return _reorder(call, x, [p if p is not None else next(rest) for p in perm])


def expand(call: Call) -> Any:
    """expand / expand_as / broadcast_to: new leading axes, size-1 axes repeated."""
    x, shape = call.x, call.out_shape
    if not isinstance(x, Feat) or shape is None:
        return None
    lead = len(shape) - x.ndim
    if x.param is not None:
        dims = [None] * lead + [
            d if n == shape[lead + i] else None for i, (d, n) in enumerate(zip(x.dims, x.shape))
        ]
        return Feat(shape, param=x.param, dims=tuple(dims))
    if not x.featured:
        return call.plain()
    if shape[lead + x.axis] != x.shape[x.axis]:
        return None
    return x.moved(shape, lead + x.axis)


def reduce(kind: str | None) -> Rule:
    """mean / sum / amax / amin over axes other than the features."""

    def rule(call: Call) -> Any:
        x, dims = call.x, call.arg(1, "dim", None)
        if not isinstance(x, Feat) or call.out_shape is None or dims is None:
            return None
        if not x.featured:
            return call.plain()
        dims = {d % x.ndim for d in ([dims] if isinstance(dims, int) else dims)}
        if x.axis in dims:
            return None
        keep = call.arg(2, "keepdim", False)
        axis = x.axis if keep else x.axis - sum(d < x.axis for d in dims)
        if kind:
            call.table.downgrade_value(x, kind)
        return x.moved(call.out_shape, axis)

    return rule


def getattr_rule(call: Call) -> Any:
    """``x.shape``, ``x.dtype`` and the like are metadata; anything else is unknown."""
    harmless = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
    return Other(call.meta) if call.node.args[1] in harmless else None


def metadata(call: Call) -> Any:
    """``x.size()``, ``x.dim()``, ``x.numel()``: they read no feature values."""
    return Other(call.meta)
