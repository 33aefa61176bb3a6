"""Tracing rules for parameter-free tensor operations (elementwise, shape, arithmetic, concat).

A rule takes a :class:`~accord.trace.state.Call` and returns the output's value, or None
when the call is outside what it can prove safe: the tracer then treats the call as unknown
and fixes every space it touches. Rules return None before changing any state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from accord.trace.experts import claim_picked_rows
from accord.trace.state import Call, Feat, Other, Seg, Tup, layouts_match

Rule = Callable[[Call], Any]


def passthrough(call: Call) -> Any:
    """Ops that leave values alone (dropout in eval, contiguous, to, clone, ...)."""
    x = call.x
    if not isinstance(x, Feat) or call.out_shape != x.shape:
        return None
    if x.featured and not call.meta.floating:
        # A cast to integers rounds each entry: still a per-feature function.
        call.table.downgrade_value(x, "dense")
    return x


def constant(call: Call) -> Any:
    """zeros_like, new_ones, ...: a tensor that depends on the input's shape only."""
    return call.plain()


def elementwise(kind: str | None, activation: bool = True) -> Rule:
    """Per-entry functions: the layout stays; ``kind`` is the weakest map they allow."""

    def rule(call: Call) -> Any:
        x = call.x
        extra = (*call.node.args[1:], *call.node.kwargs.values())
        if not isinstance(x, Feat) or call.out_shape != x.shape or _has_tensor(call, extra):
            return None
        if x.param is not None:
            return replace(x, applied=True)
        if not x.featured:
            return call.plain()
        if kind:
            call.table.downgrade_value(x, kind)
        if activation:
            mark_activation(call)
        return x

    return rule


def mark_activation(call: Call) -> None:
    """Its output (post) and input (pre) are the observation points of the spaces it acts on."""
    call.event("act_out")
    if call.input_node() is not None:
        call.event("act_in", call.input_node())


def entrywise(call: Call) -> Any:
    """Entry by entry of several tensors (``where(x > 0, a, b)``, ``minimum(x, eps)``): the
    featured ones must hold the same features, which become one space; the others must be
    the same for every feature (numbers, or size 1 along the features). Permutations exactly,
    other maps as an approximation."""
    operands = [call.resolve(a) for a in (*call.node.args, *call.node.kwargs.values())]
    tensors = [a for a in operands if isinstance(a, Feat)]
    shape = call.out_shape
    if shape is None or any(isinstance(a, Tup) for a in operands) or not tensors:
        return None
    featured = [t for t in tensors if t.featured and t.param is None]
    if not featured:
        return call.plain()
    n = len(shape)
    first = featured[0]
    axis = first.axis + n - first.ndim
    for t in featured:
        if t.heads is not None or t.axis + n - t.ndim != axis or t.shape[t.axis] != shape[axis]:
            return None
    for t in tensors:
        d = axis - (n - t.ndim)
        if not t.featured and d >= 0 and t.shape[d] != 1:
            reason = f"combined at node {call.node.name!r} with a tensor accord cannot map"
            for f in featured:
                call.table.fix_value(f, reason)
            return call.plain()
    for t in featured[1:]:
        if not call.table.union_layouts(first, t, residual=False):
            return None
    call.table.downgrade_value(first, "dense")
    return first.moved(shape, axis)


def _has_tensor(call: Call, args: Sequence[Any]) -> bool:
    return any(isinstance(call.resolve(a), Feat | Tup) for a in args)


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
        touched = x.ndim - 2 if dims is None else dims
        if x.param is not None:
            # a parameter resized along its other axes (position embeddings interpolated to
            # the image's grid, YOLOS) keeps its feature axes; those it mixes stay in place
            kept = x.ndim - touched
            out = Feat(
                tuple(shape),
                param=x.param,
                dims=(*x.dims[:kept], *(-1 if n != 1 else None for n in shape[kept:])),
                applied=x.applied,
            )
            call.walk.taint_axes(x, out.dims, f"{x.param} is resized by {call.desc}")
            return out
        if not x.featured:
            return call.plain()
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
    if not isinstance(x, Feat) or not isinstance(widths, Sequence):
        return None
    return pad_features(call, x, widths, value)


def pad_features(call: Call, x: Feat, widths: Sequence[int], value: Any) -> Any:
    """Padding along other axes keeps the features; a nonzero constant makes maps approximate.
    Padding the feature axis itself (or a non-numeric value) is unknown (None)."""
    if not x.featured:
        return call.plain()
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
        return _reshape_param(call, x, shape, call.walk.shapes.get(x.param))
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
    entries = x.shape[x.axis]
    found = []
    for b, size in enumerate(shape):
        if not _starts_alike(x.shape, x.axis, shape, b) or size == 0:
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


def _starts_alike(a: tuple[int, ...], i: int, b: tuple[int, ...], j: int) -> bool:
    """Whether axis ``i`` of shape ``a`` and axis ``j`` of shape ``b`` (the same entries) start
    at the same place: the axes before them have equal products, or, where a size before them
    is unknown (-1: a data-dependent size, such as the rows a boolean mask picks), the axes
    from them on do."""
    if min(a[:i], default=0) >= 0 and min(b[:j], default=0) >= 0:
        return math.prod(a[:i]) == math.prod(b[:j])
    rest_a, rest_b = a[i:], b[j:]
    return min((*rest_a, *rest_b)) >= 0 and math.prod(rest_a) == math.prod(rest_b)


def _reshape_param(
    call: Call, x: Feat, shape: tuple[int, ...], whole: tuple[int, ...] | None
) -> Feat | None:
    """A parameter view that only adds or removes size-1 axes keeps its axis mapping; a
    reshape of the parameter itself (``whole`` is its shape) may merge whole axes, in order
    (-2: ``w.reshape(1, out, -1)`` of weight standardization), and split them back."""
    if tuple(shape) == whole and in_order(x, whole) is not None:
        return Feat(tuple(shape), param=x.param, dims=tuple(range(len(shape))), applied=x.applied)
    heads = _cut_into_heads(x, shape, whole)
    if heads is not None:
        return heads
    kept = [(d, n) for d, n in zip(x.dims, x.shape, strict=True) if n != 1]
    if [n for _, n in kept] == [n for n in shape if n != 1]:
        dims = iter(d for d, _ in kept)
        return Feat(
            tuple(shape),
            param=x.param,
            dims=tuple(next(dims) if n != 1 else None for n in shape),
            applied=x.applied,
        )
    if whole is not None and in_order(x, whole) is not None:
        dims = in_order(Feat(tuple(shape), param=x.param, dims=(-2,) * len(shape)), whole)
        if dims is not None:
            return Feat(tuple(shape), param=x.param, dims=dims, applied=x.applied)
    out = _reshape_other_axes(x, tuple(shape))
    if out is not None:
        reason = f"{x.param} is reshaped at node {call.node.name!r} across some of its axes"
        call.walk.taint_axes(x, out.dims, reason)
    return out


def _cut_into_heads(x: Feat, shape: tuple[int, ...], whole: tuple[int, ...] | None) -> Feat | None:
    """A whole 1-d parameter (size-1 axes aside) viewed as (H, D) on two consecutive axes,
    the rest size 1 (``Feat.heads_of``)."""
    if whole is None or len(whole) != 1 or x.heads_of is not None:
        return None
    if [n for n in x.shape if n != 1] != list(whole) or 0 not in x.dims:
        return None
    cut = [i for i, n in enumerate(shape) if n != 1]
    if len(cut) != 2 or cut[1] != cut[0] + 1 or shape[cut[0]] * shape[cut[1]] != whole[0]:
        return None
    dims = tuple(None if n == 1 else -1 for n in shape)
    return Feat(
        tuple(shape), param=x.param, dims=dims, applied=x.applied, heads_of=(cut[0], cut[1])
    )


def _reshape_other_axes(x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """A reshape of a parameter view that merges or splits only some of its axes (a
    resized grid of position embeddings flattened back into positions): an axis that starts
    where an output axis starts and has its size is carried unchanged; every other output
    axis holds no whole parameter axis (-1). None when no parameter axis is carried."""
    if min((*x.shape, *shape)) < 0 or math.prod(x.shape) != math.prod(shape):
        return None
    dims: list[int | None] = [None if n == 1 else -1 for n in shape]
    for i, d in enumerate(x.dims):
        if d is None or d < 0:
            continue
        before = math.prod(x.shape[:i])
        for j, n in enumerate(shape):
            if n == x.shape[i] and math.prod(shape[:j]) == before:
                dims[j] = d
                break
    if not any(d is not None and d >= 0 for d in dims):
        return None
    return Feat(shape, param=x.param, dims=tuple(dims), applied=x.applied)


def in_order(x: Feat, whole: tuple[int, ...]) -> tuple[int | None, ...] | None:
    """When ``x``'s axes are the parameter's axes in order (size-1 axes aside), each whole or
    several merged (-2 in ``x.dims``): the parameter axis behind each axis (None for size 1,
    -2 for a merge); else None."""
    axes = [d for d, n in enumerate(whole) if n != 1]
    found: list[int | None] = []
    for d, n in zip(x.dims, x.shape, strict=True):
        if n == 1:
            found.append(None)
            continue
        if d is not None and d >= 0:
            if not axes or axes[0] != d or whole[d] != n:
                return None
            found.append(axes.pop(0))
            continue
        if d != -2:
            return None
        product, taken = 1, 0
        while taken < len(axes) and product < n:
            product *= whole[axes[taken]]
            taken += 1
        if product != n:
            return None
        found.append(axes[0] if taken == 1 else -2)
        del axes[:taken]
    return None if axes else tuple(found)


def reorder(call: Call, x: Feat, perm: Sequence[int]) -> Any:
    """``x`` with output axis ``i`` taken from input axis ``perm[i]``."""
    if sorted(perm) != list(range(x.ndim)):
        return None
    if x.param is not None:
        cut = None if x.heads_of is None else tuple(list(perm).index(a) for a in x.heads_of)
        dims = tuple(x.dims[p] for p in perm)
        return Feat(call.out_shape, param=x.param, dims=dims, applied=x.applied, heads_of=cut)
    if not x.featured:
        return call.plain()
    heads = None if x.heads is None else list(perm).index(x.heads)
    pieces = None if x.pieces is None else list(perm).index(x.pieces)
    return Feat(call.out_shape, list(perm).index(x.axis), x.segs, heads=heads, pieces=pieces)


def transpose(call: Call) -> Any:
    """transpose / swapaxes: the features follow their axis."""
    x = call.x
    d0, d1 = call.arg(1, "dim0"), call.arg(2, "dim1")
    if not isinstance(x, Feat) or not isinstance(d0, int) or not isinstance(d1, int):
        return None
    perm = list(range(x.ndim))
    perm[d0 % x.ndim], perm[d1 % x.ndim] = d1 % x.ndim, d0 % x.ndim
    return reorder(call, x, perm)


def permute(call: Call) -> Any:
    """permute(*dims) or permute(dims): the features follow their axis."""
    x = call.x
    if not isinstance(x, Feat):
        return None
    dims = [call.resolve(a) for a in call.node.args[1:]] or call.arg(1, "dims", [])
    if len(dims) == 1 and isinstance(dims[0], Sequence):
        dims = list(dims[0])
    if not all(isinstance(d, int) for d in dims):
        return None
    return reorder(call, x, [d % x.ndim for d in dims])


def movedim(call: Call) -> Any:
    """movedim(source, destination), ints or sequences."""
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
    return reorder(call, x, [p if p is not None else next(rest) for p in perm])


def expand(call: Call) -> Any:
    """expand / expand_as / broadcast_to: new leading axes, size-1 axes repeated."""
    x, shape = call.x, call.out_shape
    if not isinstance(x, Feat) or shape is None:
        return None
    lead = len(shape) - x.ndim
    if x.param is not None:
        dims = [None] * lead + [
            d if n == shape[lead + i] else None
            for i, (d, n) in enumerate(zip(x.dims, x.shape, strict=True))
        ]
        return Feat(shape, param=x.param, dims=tuple(dims), applied=x.applied)
    if not x.featured:
        return call.plain()
    if shape[lead + x.axis] != x.shape[x.axis]:
        return None
    return x.moved(shape, lead + x.axis)


def reduce(kind: str | None) -> Rule:
    """mean / sum / amax / amin / var / std over axes other than the features."""

    def rule(call: Call) -> Any:
        x = call.x
        if not isinstance(x, Feat) or call.out_shape is None:
            return None
        if not x.featured:
            return call.plain()
        dims = reduced_axes(call, x.ndim)
        if x.axis in dims:
            return None
        keep = call.schema_arg(2, "keepdim", False)
        axis = x.axis if keep else x.axis - sum(d < x.axis for d in dims)
        if kind:
            call.table.downgrade_value(x, kind)
        return x.moved(call.out_shape, axis)

    return rule


def reduced_axes(call: Call, ndim: int) -> set[int]:
    """The axes a reduction's ``dim`` names; none named (None, or an empty list) is all."""
    dims = call.schema_arg(1, "dim", None)
    if dims is None or (isinstance(dims, Sequence) and not dims):
        return set(range(ndim))
    return {d % ndim for d in ([dims] if isinstance(dims, int) else dims)}


def getattr_rule(call: Call) -> Any:
    """``x.shape``, ``x.dtype`` and the like are metadata; anything else is unknown."""
    harmless = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
    return Other(call.meta) if call.node.args[1] in harmless else None


def metadata(call: Call) -> Any:
    """``x.size()``, ``x.dim()``, ``x.numel()``: they read no values, of features or of
    parameters."""
    x = call.x
    if isinstance(x, Feat):
        call.use(x)
    return Other(call.meta)


def getitem(call: Call) -> Any:
    """Indexing: tuples give their items; tensors keep their features if every one is kept."""
    container, index = call.arg(0, "a"), call.arg(1, "b")
    if isinstance(container, Tup):
        if not isinstance(index, int | slice):
            return None
        items = container.items[index]
        return Tup(items) if isinstance(index, slice) else items
    if not isinstance(container, Feat):
        return Other(call.meta)
    mapping = _index_map(container.shape, index)
    if mapping is None or call.out_shape is None:
        return None
    out_dims, partial = mapping
    if container.param is not None:
        dims = [None if d is None else -1 if d in partial else container.dims[d] for d in out_dims]
        return Feat(
            call.out_shape, param=container.param, dims=tuple(dims), applied=container.applied
        )
    if not container.featured:
        return call.plain()
    if container.axis not in out_dims or container.axis in partial:
        reason = f"indexing at node {call.node.name!r} keeps only some of the features"
        call.table.fix_value(container, reason)
        return call.plain()
    return container.moved(call.out_shape, out_dims.index(container.axis))


def _index_map(shape: tuple[int, ...], index: Any) -> tuple[list[int | None], set[int]] | None:
    """For basic indexing: the input axis behind each output axis, and the partly sliced axes."""
    items = index if isinstance(index, tuple) else (index,)
    consumed = sum(item is not None and item is not Ellipsis for item in items)
    out_dims: list[int | None] = []
    partial: set[int] = set()
    d = 0
    for item in items:
        if item is Ellipsis:
            out_dims += range(d, d + len(shape) - consumed)
            d += len(shape) - consumed
        elif item is None:
            out_dims.append(None)
        elif isinstance(item, int) and not isinstance(item, bool) and d < len(shape):
            d += 1
        elif isinstance(item, slice) and d < len(shape):
            bounds = (item.start, item.stop, item.step)
            if not all(b is None or isinstance(b, int) for b in bounds):
                return None
            if range(*item.indices(shape[d])) != range(shape[d]):
                partial.add(d)
            out_dims.append(d)
            d += 1
        else:
            return None
    return out_dims + list(range(d, len(shape))), partial


def binary(op: str) -> Rule:
    """add / sub / mul / div between tensors, parameters and scalars.

    Two feature tensors: their spaces become one (a residual add); a product or quotient
    allows permutations only. A parameter with a full feature axis is a writer of an added
    space (a positional embedding) or a per-feature scale of a multiplied one. A scalar or a
    tensor constant across the features shifts every feature alike: exact for permutations
    only (an add) or harmless (a scale).
    """

    def rule(call: Call) -> Any:
        a, b = call.arg(0, "input"), call.arg(1, "other")
        if call.out_shape is None:
            return Other(call.meta)
        featured_a, featured_b = (isinstance(v, Feat) and v.featured for v in (a, b))
        if not (featured_a or featured_b):
            return _scaled_param(call, op, a, b)
        if featured_a and featured_b:
            return _both_featured(call, op, a, b)
        x, other = (a, b) if featured_a else (b, a)
        return _one_featured(call, op, x, other, x_first=featured_a)

    return rule


def _scaled_param(call: Call, op: str, a: Any, b: Any) -> Any:
    """A parameter times a number moves like the parameter itself (``T (c p) = c T p``); a
    parameter plus a number (Gemma's ``1 + w`` gain), or a number divided by it, follows
    permutations only."""
    if isinstance(a, Feat) and isinstance(b, Feat) and a.param and a.param == b.param:
        return same_param(call, a, b)
    for param, number in ((a, b), (b, a)):
        scalar = not isinstance(number, Feat | Tup)
        if not (scalar and isinstance(param, Feat) and param.param):
            continue
        if param.shape != call.out_shape:
            break
        if op == "mul" or (op == "div" and param is a):
            return param
        return replace(param, applied=True)
    return call.plain()


def same_param(call: Call, a: Feat, b: Feat) -> Any:
    """The parameter combined with a reduction of itself over whole axes (``w - w.mean(1,
    keepdim=True)``: -3 on the reduced axes, each other axis the same parameter axis) follows
    permutations of every axis of the parameter, and nothing else."""
    full, other = (a, b) if a.shape == call.out_shape else (b, a)
    if full.shape != call.out_shape or other.ndim != full.ndim:
        return call.plain()
    if any(d is None or d < 0 for d in full.dims):
        return call.plain()
    for d, e, n in zip(full.dims, other.dims, other.shape, strict=True):
        if e != d and not (e == -3 and n == 1):
            return call.plain()
    return replace(full, applied=True)


def _both_featured(call: Call, op: str, a: Feat, b: Feat) -> Any:
    n = len(call.out_shape)
    axis_a, axis_b = a.axis + n - a.ndim, b.axis + n - b.ndim
    size_a, size_b = a.shape[a.axis], b.shape[b.axis]
    table, where = call.table, f"node {call.node.name!r}"
    if axis_a == axis_b and size_a == size_b:
        if not table.union_layouts(a, b, residual=op in ("add", "sub")):
            reason = f"combined at {where} with features laid out differently"
            table.fix_value(a, reason)
            table.fix_value(b, reason)
        elif op in ("mul", "div"):
            table.downgrade_value(a, "permutation")
        return a.moved(call.out_shape, axis_a)
    if axis_a == axis_b and min(size_a, size_b) == 1:
        x, y = (a, b) if size_b == 1 else (b, a)
        table.fix_value(y, f"broadcast across the features of {where}")
        _scalar_effect(call, op, x, x_first=x is a)
        return x.moved(call.out_shape, x.axis + n - x.ndim)
    reason = f"combined at {where} with features on another axis"
    table.fix_value(a, reason)
    table.fix_value(b, reason)
    return call.plain()


def _one_featured(call: Call, op: str, x: Feat, other: Any, x_first: bool) -> Any:
    n = len(call.out_shape)
    axis = x.axis + n - x.ndim
    if isinstance(other, Feat):
        d = axis - (n - other.ndim)
        if d >= 0 and other.shape[d] != 1:
            pd = other.dims[d] if other.param is not None else None
            if pd is None or pd < 0:
                reason = f"combined at node {call.node.name!r} with a tensor accord cannot map"
                call.table.fix_value(x, reason)
                # fixed features never move: what they are mixed into need not follow them
                return call.plain()
            if op in ("add", "sub") and not other.applied:
                call.use(other)
                call.table.add_per_feature(x, "writers", other.param, pd)
                _observe_after_bias(call, x_first)
            else:
                call.use(other)
                call.table.add_per_feature(x, "elementwise", other.param, pd)
                call.table.downgrade_value(x, "permutation")
            if other.gathered is not None:
                claim_picked_rows(call, x, other, pd)
            return x.moved(call.out_shape, axis)
    _scalar_effect(call, op, x, x_first)
    return x.moved(call.out_shape, axis)


def _observe_after_bias(call: Call, x_first: bool) -> None:
    """A writer written out as ``x @ Wᵀ`` whose only use is this bias add is observed after
    the bias, as a Linear is."""
    source = call.node.args[0 if x_first else 1]
    event = ("writer_out", getattr(source, "name", None))
    if event in call.walk.events and len(source.users) == 1:
        del call.walk.events[event]
        call.event("writer_out")


def _scalar_effect(call: Call, op: str, x: Feat, x_first: bool) -> None:
    """The same number for every feature: a shift or a reciprocal keeps only permutations."""
    if op in ("add", "sub") or (op == "div" and not x_first):
        call.table.downgrade_value(x, "dense")


def cat(call: Call) -> Any:
    """Concatenation along the features stacks layouts; along another axis it unites them."""
    items, dim, shape = call.arg(0, "tensors"), call.arg(1, "dim", 0), call.out_shape
    if not isinstance(items, list | tuple) or shape is None or not isinstance(dim, int):
        return None
    if not all(isinstance(item, Feat) for item in items):
        return None
    featured = [item for item in items if item.featured]
    if not featured:
        return _cat_param_pieces(items, dim % len(shape), shape) or call.plain()
    axis = featured[0].axis
    if any(item.axis != axis for item in featured):
        return None
    if dim % len(shape) == axis:
        # Pieces without features (constants, parameters) are features no space owns.
        segs = [s for item in items for s in (item.segs or (Seg(None, item.shape[axis]),))]
        return Feat(shape, axis, tuple(segs))
    first = featured[0]
    if not all(layouts_match(first, item) for item in featured):
        return None
    for item in featured[1:]:
        call.table.union_layouts(first, item, residual=False)
    for item in items:
        if item.featured:
            continue
        pd = item.dims[axis] if item.param is not None else None
        if pd is None or pd < 0 or item.applied or item.shape[axis] != first.shape[axis]:
            reason = f"concatenated at node {call.node.name!r} with a tensor accord cannot map"
            call.table.fix_value(first, reason)
        else:
            call.use(item)
            call.table.add_per_feature(first, "writers", item.param, pd)
    return first.moved(shape, axis)


def _cat_param_pieces(items: Sequence[Feat], dim: int, shape: tuple[int, ...]) -> Feat | None:
    """Pieces of one parameter put back together along ``dim`` (YOLOS's position embeddings:
    the class token's, the patches' resized, the detection tokens'): every other axis that is
    the same parameter axis in every piece stays that axis."""
    first = items[0]
    if first.param is None or any(
        item.param != first.param or item.applied != first.applied or item.ndim != len(shape)
        for item in items
    ):
        return None
    dims: list[int | None] = [None if n == 1 else -1 for n in shape]
    for axis in range(len(shape)):
        if axis != dim and all(item.dims[axis] == first.dims[axis] for item in items):
            dims[axis] = first.dims[axis]
    if not any(d is not None and d >= 0 for d in dims):
        return None
    return Feat(shape, param=first.param, dims=tuple(dims), applied=first.applied)


def stack(call: Call) -> Any:
    """Stacking feature tensors on a new axis unites their spaces."""
    items, dim, shape = call.arg(0, "tensors"), call.arg(1, "dim", 0), call.out_shape
    if not isinstance(items, list | tuple) or shape is None or not isinstance(dim, int):
        return None
    if not all(isinstance(item, Feat) and item.param is None for item in items):
        return None
    if not any(item.featured for item in items):
        return call.plain()
    first = items[0]
    if not all(item.featured and item.axis == first.axis for item in items):
        return None
    if not all(layouts_match(first, item) for item in items):
        return None
    for item in items[1:]:
        call.table.union_layouts(first, item, residual=False)
    dim %= len(shape)
    return first.moved(shape, first.axis + (dim <= first.axis))
