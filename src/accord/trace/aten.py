"""Which tracing rule handles which ATen operator of an exported graph, and the rules that
need ATen's argument conventions (slices, splits, selects, reductions, repeated heads).

The set is closed: an operator not listed here is unknown, and the spaces it touches are
fixed with its name as the reason. Operators on tensors without features (masks, position
ids, shapes) are harmless whatever they are.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import replace
from typing import Any

import torch

from accord.trace import aten_attention, aten_layers, concat, heads, rules
from accord.trace.rules import Rule
from accord.trace.split import split_features
from accord.trace.state import SHAPE_MAKERS, SHAPE_READERS, Call, Feat, Seg, Tup, graph_name, plain

aten = torch.ops.aten


def slice_rule(call: Call) -> Any:
    """aten.slice(x, dim, start, end, step): the whole axis keeps everything; a part of the
    feature axis is a piece of a fused projection when the input's other users are the other
    pieces; a part of another axis keeps the features."""
    x, shape = call.x, call.out_shape
    if not isinstance(x, Feat) or shape is None:
        return None
    if concat.written_slice(call.node):
        return call.plain()  # only copied into: it reads nothing of x
    dim = call.arg(1, "dim", 0) % x.ndim
    start, stop, step = _bounds(call, x.shape[dim])
    whole = (start, stop, step) == (0, x.shape[dim], 1)
    if x.param is not None:
        dims = tuple(
            -1 if i == dim and not whole and d is not None else d for i, d in enumerate(x.dims)
        )
        call.walk.taint_axes(x, dims, f"{x.param} is sliced at node {call.node.name!r}")
        return Feat(shape, param=x.param, dims=dims, applied=x.applied)
    if not x.featured:
        return call.plain()
    if whole:
        return replace(x, shape=tuple(shape))
    if dim != x.axis and dim != x.heads and dim != x.repeat:
        return replace(x, shape=tuple(shape))
    if dim == x.axis and x.heads is None and step == 1:
        siblings = _sibling_slices(call, dim)
        if siblings is not None:
            pieces = sorted(siblings.values())
            found = split_features(call, x, pieces, set(siblings))
            if found is not None:
                call.event("writer_out")
                return found[pieces.index((start, stop))]
    if dim == x.axis and x.heads is None and step > 1:
        found = _interleaved(call, x, start, stop, step)
        if found is not None:
            return found
    if dim == x.axis and x.heads is not None and heads.whole_heads(call, x):
        # the same entries of every head (the rotated part under partial rotary embeddings):
        # whole heads may still move, and the heads are the features from here on
        return slice_rule(call)
    reason = f"slicing at node {call.node.name!r} keeps only some of the features"
    call.table.fix_value(x, reason)
    return call.plain()


def _interleaved(call: Call, x: Feat, start: int, stop: int, step: int) -> Any:
    """``x[..., p::k]`` of features in blocks of ``k`` entries: entry ``p`` of every block, the
    features themselves (one piece of projections written interleaved, GPT-OSS's gate and up
    units in turn). A freshly written space whose every use is such a slice, each ``p`` from
    0 to ``k - 1`` once, is made so first (:meth:`SpaceTable.interleave`). None otherwise."""
    if len(x.segs) != 1 or x.segs[0].space is None or stop != x.shape[x.axis] or start >= step:
        return None
    seg = x.segs[0]
    if seg.block == 1 and seg.size % step == 0 and _interleaved_siblings(call, step):
        space = call.table.find(seg.space)
        if call.only_used_here(space, {user.name for user in call.node.args[0].users}):
            part = call.table.interleave(space, step)
            if part is not None:
                seg = Seg(part, seg.size // step, step)
                _relabel_whole(call, space, seg)
                x = replace(x, segs=(seg,))
    if seg.block != step:
        return None
    shape = list(x.shape)
    shape[x.axis] = seg.size
    return replace(x, shape=tuple(shape), segs=(Seg(seg.space, seg.size),))


def _interleaved_siblings(call: Call, step: int) -> bool:
    """Every user of this slice's input is a slice of its feature axis to the end with step
    ``step``, the starts 0 to ``step - 1`` once each."""
    source = call.node.args[0]
    x = call.resolve(source)
    starts = []
    for user in source.users:
        if getattr(user.target, "overloadpacket", None) is not aten.slice:
            return False
        other = Call(call.walk, user, None, "")
        if other.arg(1, "dim", 0) % x.ndim != x.axis:
            return False
        begin, end, every = _bounds(other, x.shape[x.axis])
        if every != step or end != x.shape[x.axis]:
            return False
        starts.append(begin)
    return sorted(starts) == list(range(step))


def _relabel_whole(call: Call, space: int, seg: Seg) -> None:
    """Every traced tensor holding ``space`` whole holds ``seg`` instead."""
    table = call.table
    for name, value in call.walk.values.items():
        if not isinstance(value, Feat) or len(value.segs) != 1 or value.heads is not None:
            continue
        held = value.segs[0]
        if held.space is not None and table.find(held.space) == space and held.block == 1:
            call.walk.values[name] = replace(value, segs=(seg,))


def _bounds(call: Call, size: int) -> tuple[int, int, int]:
    """A slice's ``(start, stop, step)`` within an axis of ``size`` entries."""
    start, stop, step = call.arg(2, "start", None), call.arg(3, "end", None), call.arg(4, "step", 1)
    start, stop, step = slice(start, stop, step).indices(size)
    return start, max(start, stop), step


def _sibling_slices(call: Call, dim: int) -> dict[str, tuple[int, int]] | None:
    """The entry ranges of every slice of this call's input, when all its users are slices
    of ``dim`` with step 1 that do not overlap."""
    source = call.node.args[0]
    size = call.resolve(source).shape[dim]
    found = {}
    for user in source.users:
        if getattr(user.target, "overloadpacket", None) is not aten.slice:
            return None
        other = Call(call.walk, user, None, "")
        if other.arg(1, "dim", 0) % len(call.resolve(source).shape) != dim:
            return None
        start, stop, step = _bounds(other, size)
        if step != 1:
            return None
        found[user.name] = (start, stop)
    ranges = sorted(found.values())
    if any(a[1] > b[0] for a, b in itertools.pairwise(ranges)):
        return None
    return found


def split(call: Call) -> Any:
    """aten.split / split_with_sizes / chunk / tensor_split / unbind: pieces along one axis."""
    x, meta = call.x, call.meta
    if not isinstance(x, Feat) or not isinstance(meta, tuple):
        return None
    name = call.node.target.__name__
    dim = call.arg(1 if name.startswith("unbind") else 2, "dim", 0) % x.ndim
    if x.param is not None:
        return None
    if not x.featured:
        return call.plain()
    if x.pieces is not None:
        if dim != x.pieces or not name.startswith("unbind"):
            return None
        return Tup(tuple(_piece(x, item.shape, dim, i) for i, item in enumerate(meta)))
    if dim == x.axis and x.heads is not None and not name.startswith("unbind"):
        # each head of a fused projection cut into its q, k and v (GPT-NeoX's chunk of
        # (…, H, 3·D), CodeGen's split of its mp_num blocks)
        slots = _cut(call, x, [item.shape[dim] for item in meta])
        if slots is not None:
            return Tup(
                tuple(
                    Feat(item.shape, x.axis, segs, heads=x.heads)
                    for item, segs in zip(meta, slots, strict=True)
                )
            )
    if dim != x.axis and dim != x.heads and dim != x.repeat:
        items = []
        for item in meta:
            axis = x.axis - (name.startswith("unbind") and dim < x.axis)
            heads_axis = (
                None if x.heads is None else x.heads - (name.startswith("unbind") and dim < x.heads)
            )
            items.append(Feat(item.shape, axis, x.segs, heads=heads_axis))
        return Tup(tuple(items))
    if dim == x.heads and not name.startswith("unbind"):
        return _split_heads(call, x, meta, dim)
    if dim != x.axis or x.heads is not None or name.startswith("unbind"):
        return None
    pieces, start = [], 0
    for item in meta:
        pieces.append((start, start + item.shape[dim]))
        start += item.shape[dim]
    found = split_features(call, x, pieces, set())
    if found is None:
        return None
    for user in call.node.users:
        if user.target is operator.getitem:
            call.event("writer_out", user.name)
    return Tup(tuple(found))


def _cut(call: Call, x: Feat, sizes: list[int]) -> list[tuple[Any, ...]] | None:
    """The slots of ``sizes`` of every head of ``x``, one freshly written space split into
    heads (:func:`accord.trace.heads.cut_slots`), or None."""
    seg = x.segs[0] if len(x.segs) == 1 else None
    if x.repeat is not None or seg is None or seg.space is None or seg.block != 1:
        return None
    return heads.cut_slots(call, seg.space, x.shape[x.heads], sizes)


def _split_heads(call: Call, x: Feat, meta: tuple[Any, ...], dim: int) -> Any:
    """Heads split into groups of whole heads (Falcon's multi-query ``split([H, 1, 1])`` of
    its fused q, k and v): a fused projection, cut at head boundaries."""
    if x.axis != x.heads + 1 or x.repeat is not None:
        return None
    width = x.shape[x.axis]
    flat = Feat((*x.shape[:dim], x.shape[dim] * width, *x.shape[x.axis + 1 :]), dim, x.segs)
    pieces, start = [], 0
    for item in meta:
        pieces.append((start, start + item.shape[dim] * width))
        start += item.shape[dim] * width
    found = split_features(call, flat, pieces, set())
    if found is None:
        return None
    source = call.input_node()
    if source is not None:  # split_features left the source laid out without heads
        segs = tuple(seg for piece in found for seg in piece.segs)
        call.walk.values[source] = Feat(x.shape, x.axis, segs, heads=x.heads)
    return Tup(
        tuple(
            Feat(item.shape, x.axis, piece.segs, heads=x.heads)
            for item, piece in zip(meta, found, strict=True)
        )
    )


def index_add(call: Call) -> Any:
    """aten.index_add(start, dim, index, source): rows of ``source`` summed into ``start`` at
    ``index`` along an axis other than the features (a mixture of experts putting each
    token's expert outputs back in place: JetMoE, or experts of a ModuleList adding theirs one
    after the other) keep the features. ``start`` is zeros, or holds the same features, which
    become one space with the source's (feature ``c`` is added to feature ``c``, as in a
    residual add). Into anything else it is unknown: the rows added to could carry other
    features."""
    x, source, shape = call.x, call.arg(3, "source"), call.out_shape
    start = call.node.args[0]
    packet = getattr(getattr(start, "target", None), "overloadpacket", None)
    zeros = packet in (aten.zeros, aten.zeros_like, aten.new_zeros)
    if not isinstance(source, Feat) or not isinstance(x, Feat) or shape is None:
        return None
    if source.param is not None or source.heads is not None or source.ndim != len(shape):
        return None
    if not (zeros or (x.featured and x.shape == tuple(shape) and x.param is None)):
        return None
    if not source.featured:
        return call.plain() if zeros else None
    if (
        call.arg(1, "dim") % len(shape) == source.axis
        or source.shape[source.axis] != shape[source.axis]
    ):
        return None
    out = source.moved(shape, source.axis)
    if zeros:
        return out
    if x.axis != source.axis or x.heads is not None or not call.table.union_layouts(x, out, True):
        return None
    return out


def glu(call: Call) -> Any:
    """aten.glu(x, dim) = a · sigmoid(b) for the halves a, b of ``dim``: along the features
    the halves of a fresh space (a GLU projection) become one space for the pair, since
    feature i of a gates with feature i of b; permutations only."""
    x, shape = call.x, call.out_shape
    if not isinstance(x, Feat) or x.param is not None or x.heads is not None or shape is None:
        return None
    if not x.featured:
        return call.plain()
    dim = call.arg(1, "dim", -1) % x.ndim
    call.table.downgrade_value(x, "permutation")
    if dim != x.axis:
        call.event("act_out")
        return x.moved(shape, x.axis)
    half = x.shape[dim] // 2
    found = split_features(call, x, [(0, half), (half, 2 * half)], set())
    if found is None or not call.table.union_layouts(found[0], found[1], residual=False):
        return None
    call.table.downgrade_value(found[0], "permutation")
    call.event("act_out")
    return found[0].moved(shape, x.axis)


def index(call: Call) -> Any:
    """aten.index(x, [None, …, idx]): rows gathered along axes other than the features (a
    mixture of experts sorting its tokens by expert and back; a boolean mask picking the
    positions of an end-of-sequence token, ``x[mask]``) keep the features."""
    x, indices, shape = call.x, call.arg(1, "indices"), call.out_shape
    if not isinstance(x, Feat) or not isinstance(indices, list | tuple) or shape is None:
        return None
    tensors = [(d, i) for d, i in enumerate(indices) if i is not None]
    if x.heads is not None or len(tensors) != 1:
        return None
    ((dim, idx),) = tensors
    if not isinstance(idx, Feat):
        return None
    if x.param is not None:
        return _gathered_param(call, x, dim, idx)
    # integer indices replace one axis with theirs; a boolean mask replaces as many axes as
    # it has with one (told apart by the output's rank where the two differ)
    taken, given = (1, idx.ndim) if len(shape) == x.ndim - 1 + idx.ndim else (idx.ndim, 1)
    if len(shape) != x.ndim - taken + given:
        return None
    call.table.fix_value(idx, f"used as indices by {call.desc}")
    if not x.featured:
        return call.plain()
    if dim <= x.axis < dim + taken:
        call.table.fix_value(x, f"indexing at node {call.node.name!r} keeps only some features")
        return call.plain()
    axis = x.axis if x.axis < dim else x.axis - taken + given
    if shape[axis] != x.shape[x.axis]:
        return None
    return replace(x.moved(shape, axis), gathered=_gathered_rows(call, x, dim, idx))


def _gathered_param(call: Call, x: Feat, dim: int, idx: Feat) -> Any:
    """``W[ids]``: entries of a parameter's axis 0 picked by a 1-d integer index (each token's
    expert bias or weights of a mixture of experts' packed (experts, …) parameter): its other
    axes are the parameter's, and axis 0 is marked as picked by the index
    (``Feat.gathered``), for :func:`accord.trace.experts.claim_picked_rows` and the products
    by each token's weights (:func:`accord.trace.aten_layers.matmul`)."""
    index = call.node.args[1][dim]
    val = getattr(index, "meta", {}).get("val")
    integer = isinstance(val, torch.Tensor) and val.dtype != torch.bool
    integer = integer and not val.is_floating_point() and not val.is_complex()
    if dim != 0 or idx.ndim != 1 or not integer or x.dims[0] != 0 or x.picked is not None:
        return None
    if any(d is None or d < 0 for d in x.dims[1:]) or x.applied:
        return None
    call.table.fix_value(idx, f"used as indices by {call.desc}")
    gathered = (graph_name(index, idx), x.param)
    return Feat(call.out_shape, param=x.param, dims=(-1, *x.dims[1:]), gathered=gathered)


def _gathered_rows(call: Call, x: Feat, dim: int, idx: Feat) -> tuple[str, str] | None:
    """``(index, source)`` where rows of a 2-d tensor are picked by a 1-d integer index."""
    source, index = call.node.args[0], call.node.args[1][dim]
    val = getattr(index, "meta", {}).get("val")
    integer = (
        isinstance(val, torch.Tensor) and not val.is_floating_point() and val.dtype != torch.bool
    )
    if dim != 0 or x.ndim != 2 or idx.ndim != 1 or not integer:
        return None
    return graph_name(index, idx), graph_name(source, x)


def select(call: Call) -> Any:
    """aten.select(x, dim, index): one entry of an axis other than the features; of a
    parameter, its other axes (the class token's row of the position embeddings)."""
    x, shape = call.x, call.out_shape
    if not isinstance(x, Feat) or shape is None:
        return None
    dim = call.arg(1, "dim") % x.ndim
    if x.param is not None:
        dims = x.dims[:dim] + x.dims[dim + 1 :]
        reason = f"{x.param} is selected at node {call.node.name!r}"
        call.walk.taint_axes(x, dims, reason)
        # one entry of a whole parameter axis, picked from a parameter not picked before
        whole = x.dims[dim] is not None and x.dims[dim] >= 0 and x.picked is None
        picked = (x.dims[dim], call.arg(2, "index") % x.shape[dim]) if whole else None
        return Feat(tuple(shape), param=x.param, dims=dims, applied=x.applied, picked=picked)
    if not x.featured:
        return call.plain()
    if dim == x.pieces:
        return _piece(x, shape, dim, call.arg(2, "index") % x.shape[dim])
    if dim in (x.axis, x.heads, x.repeat):
        call.table.fix_value(x, f"indexing at node {call.node.name!r} keeps only some features")
        return call.plain()

    def kept(axis: int | None) -> int | None:
        return None if axis is None else axis - (dim < axis)

    return Feat(shape, kept(x.axis), x.segs, heads=kept(x.heads), pieces=kept(x.pieces))


def _piece(x: Feat, shape: tuple[int, ...], dim: int, index: int) -> Feat:
    """Piece ``index`` of a fused projection cut on axis ``dim`` (``Feat.pieces``): its
    segment, or after the heads its segment of every head."""
    heads_axis = None if x.heads is None else x.heads - (dim < x.heads)
    segs = (x.segs[index],) if x.heads is None or dim < x.heads else x.segs[index :: x.shape[dim]]
    return Feat(tuple(shape), x.axis - (dim < x.axis), segs, heads=heads_axis)


def expand(call: Call) -> Any:
    """aten.expand: heads repeated along a size-1 axis right after them (repeat_kv)."""
    x, shape = call.x, call.out_shape
    if not isinstance(x, Feat) or x.heads is None or shape is None:
        return rules.expand(call)
    if tuple(shape) == x.shape:
        return x
    grown = [d for d, (a, b) in enumerate(zip(x.shape, shape, strict=False)) if a != b]
    if len(shape) != x.ndim or grown != [x.heads + 1] or x.repeat is not None:
        return None
    return Feat(tuple(shape), x.axis, x.segs, heads=x.heads, repeat=x.heads + 1)


def unsqueeze(call: Call) -> Any:
    """aten.unsqueeze(x, dim): the axes from ``dim`` on move one place, heads included (a
    single key/value head of multi-query attention has a heads axis of size 1, which a
    reshape cannot place)."""
    x, shape = call.x, call.out_shape
    if not isinstance(x, Feat) or x.heads is None or shape is None:
        return heads.reshape(call)
    dim = call.arg(1, "dim") % len(shape)

    def moved(axis: int | None) -> int | None:
        return None if axis is None else axis + (axis >= dim)

    return Feat(tuple(shape), moved(x.axis), x.segs, heads=moved(x.heads), repeat=moved(x.repeat))


def reduce(kind: str | None) -> Rule:
    """mean / sum / amax / amin / var: over other axes as :func:`rules.reduce`; over the
    features the result has none left and only permutations keep it (an RMSNorm's mean of
    squares, a LayerNorm written out)."""
    along = rules.reduce(kind)

    def rule(call: Call) -> Any:
        x = call.x
        if not isinstance(x, Feat):
            return None
        dims = rules.reduced_axes(call, x.ndim)
        if x.param is not None:
            return _reduced_param(call, x, dims)
        if x.heads is not None:
            if not dims & {x.axis, x.heads} and x.repeat is None and call.out_shape:
                return _reduced_heads(call, x, dims, kind)
            # over each head's features alike (a norm over the head dimension): whole heads
            return rule(call) if dims == {x.axis} and heads.whole_heads(call, x) else None
        if not x.featured:
            return call.plain()
        if x.axis in dims:
            call.table.downgrade_value(x, "permutation")
            return call.plain()
        return along(call)

    return rule


def extreme(call: Call) -> Any:
    """aten.max / aten.min: of every entry (as amax over all axes), or along one axis,
    returning the values and their indices (Hiera's max over the positions of its pooling
    window); of two tensors (``max.other``), entry by entry."""
    if call.node.target._overloadname == "other":
        return rules.entrywise(call)
    along = reduce("dense")
    return tupled(along)(call) if isinstance(call.meta, tuple) else along(call)


def vector_norm(call: Call) -> Any:
    """aten.linalg_vector_norm(x, ord, dim, keepdim): over the features (``F.normalize``)
    the result has none left and only permutations keep it; over other axes it is unknown."""
    x, dims = call.x, call.arg(2, "dim", None)
    if not isinstance(x, Feat) or x.param is not None or x.heads is not None:
        return None
    if not x.featured:
        return call.plain()
    over = range(x.ndim) if dims is None else [dims] if isinstance(dims, int) else dims
    if x.axis not in {d % x.ndim for d in over}:
        return None
    call.table.downgrade_value(x, "permutation")
    return call.plain()


def _reduced_heads(call: Call, x: Feat, over: set[int], kind: str | None) -> Feat:
    """Heads reduced over other axes (positions): each head keeps its features; ``kind`` is
    the weakest map the reduction allows (a max: permutations)."""
    keep = call.schema_arg(2, "keepdim", False)

    def kept(axis: int) -> int:
        return axis if keep else axis - sum(d < axis for d in over)

    if kind:
        call.table.downgrade_value(x, kind)
    return Feat(call.out_shape, kept(x.axis), x.segs, heads=kept(x.heads))


def _reduced_param(call: Call, x: Feat, dims: set[int]) -> Feat | None:
    """A reduction of a parameter over whole axes, kept as size-1 axes (the mean and variance
    of weight standardization): invariant to permutations of those axes (-3, see
    :func:`rules.same_param`), it moves with the parameter along the others."""
    keep = call.schema_arg(2, "keepdim", False)
    if not keep or any(d is None or d < 0 for d in x.dims) or call.out_shape is None:
        return None
    out = tuple(-3 if i in dims else d for i, d in enumerate(x.dims))
    return Feat(call.out_shape, param=x.param, dims=out, applied=True)


def cat(call: Call) -> Any:
    """aten.cat, leaving out empty pieces (an empty key/value cache)."""
    items = call.arg(0, "tensors")
    if not isinstance(items, list | tuple):
        return None
    kept = [item for item in items if not (isinstance(item, Feat) and 0 in item.shape)]
    if len(kept) == 1 and isinstance(kept[0], Feat) and call.out_shape == kept[0].shape:
        return kept[0]
    if any(isinstance(item, Feat) and item.heads is not None for item in kept):
        # heads joined head by head along their features (DeepSeek's query)
        dim, shape = call.arg(1, "dim", 0), call.out_shape
        if not all(isinstance(item, Feat) for item in kept) or shape is None:
            return None
        return concat.joined(kept, tuple(shape), dim % len(shape))
    return rules.cat(call)


def layer_norm(call: Call) -> Any:
    """aten.layer_norm / rms_norm: :func:`aten_layers.layer_norm`, and a norm over each head's
    features alike with one gain for every head (Persimmon's q and k norms): only whole heads
    move (:func:`accord.trace.heads.whole_heads`), each normalised on its own, and the gain
    and shift stay where they are."""
    x, normalized = call.x, call.arg(1, "normalized_shape")
    if not isinstance(x, Feat) or x.param is not None or call.out_shape != x.shape:
        return aten_layers.layer_norm(call)
    per_head = x.heads is not None and x.axis == x.ndim - 1 and len(normalized) == 1
    if per_head and heads.whole_heads(call, x):
        x = call.x
    if x.heads is not None:
        return None
    # whole heads (a run of entries per feature) on an axis the norm does not reduce
    whole = x.featured and x.axis < x.ndim - len(normalized)
    runs = all(seg.space is not None and call.table.record(seg.space).runs for seg in x.segs)
    if not (whole and runs):
        return aten_layers.layer_norm(call)
    for param in (call.arg(2, "weight", None), call.arg(3, "bias", None)):
        if isinstance(param, Feat):
            call.use(param)
    return x


def tupled(rule: Rule) -> Rule:
    """A rule for operators returning (output, indices), applied to the output."""

    def wrapped(call: Call) -> Any:
        if not isinstance(call.meta, tuple):
            return None
        out = rule(replace(call, meta=call.meta[0]))
        return None if out is None else Tup((out, *(plain(m) for m in call.meta[1:])))

    return wrapped


def head_scalar(op: str) -> Rule:
    """add / sub / mul / div: :func:`rules.binary`, and heads scaled or shifted by a number.

    A tensor varying along each head's features per position but alike for every head (the
    cos and sin of rotary embeddings) leaves only permutations of whole heads: the heads
    become the features (:func:`accord.trace.heads.whole_heads`); anything else varying
    along the features fixes them."""
    plain_rule = rules.binary(op)

    def rule(call: Call) -> Any:
        a, b = call.arg(0, "self"), call.arg(1, "other")
        if not any(isinstance(v, Feat) and v.heads is not None for v in (a, b)):
            return plain_rule(call)
        x, other = (a, b) if isinstance(a, Feat) and a.heads is not None else (b, a)
        if _per_head_param(other, x, call.out_shape):
            return _add_per_head(call, op, x, other)
        if _shared_gain(other, x, call.out_shape) and heads.whole_heads(call, x):
            call.use(other)
            return plain_rule(call)
        if _varies_along(other, x, call.out_shape):
            # Rotary embeddings: the same position-dependent mix of every head's features,
            # so whole heads may still move; the heads become the features.
            alike = not _varies_along(other, replace(x, axis=x.heads), call.out_shape)
            if alike and heads.whole_heads(call, x):
                return plain_rule(call)
            reason = (
                f"multiplied or shifted at node {call.node.name!r} by a tensor that varies "
                "along the features per position (as rotary embeddings do): no map of these "
                "features is proven to keep it"
            )
            call.table.fix_value(x, reason)
            return call.plain()
        constant = isinstance(other, Feat) and other.param is None and not other.featured
        if (isinstance(other, Feat | Tup) and not constant) or call.out_shape != x.shape:
            return None
        if x.repeat is not None:
            return None
        if op in ("add", "sub") or (op == "div" and x is b):
            call.table.downgrade_value(x, "dense")
        return x

    return rule


def _per_head_param(other: Any, x: Feat, shape: tuple[int, ...] | None) -> bool:
    """A 1-d parameter cut into the heads of ``x`` (``Feat.heads_of``), head by head and
    feature by feature where ``x`` holds them, alike for every other position."""
    if not isinstance(other, Feat) or other.heads_of is None or shape != x.shape:
        return False
    if x.repeat is not None or x.pieces is not None:
        return False
    lead = x.ndim - other.ndim
    heads_axis, axis = (a + lead for a in other.heads_of)
    return (heads_axis, axis) == (x.heads, x.axis) and other.shape[other.heads_of[0]] == x.shape[
        x.heads
    ]


def _add_per_head(call: Call, op: str, x: Feat, bias: Feat) -> Feat:
    """Each head's features shifted by its run of a 1-d parameter (a writer of theirs:
    DeBERTa's q and v biases) or scaled by it (per-feature: permutations only)."""
    call.use(bias)
    if op in ("add", "sub") and not bias.applied:
        call.table.add_per_feature(x, "writers", bias.param, 0)
    else:
        call.table.add_per_feature(x, "elementwise", bias.param, 0)
        call.table.downgrade_value(x, "permutation")
    return x


def _shared_gain(other: Any, x: Feat, shape: tuple[int, ...] | None) -> bool:
    """A parameter that scales each head's features alike in every head (the gain of a norm
    over the head dimension, Qwen3's q/k norm): only whole heads move under it, and it stays."""
    if not isinstance(other, Feat) or other.param is None or other.applied or not shape:
        return False
    lead = len(shape) - other.ndim

    def size(axis: int) -> int:
        d = axis + len(shape) - x.ndim - lead
        return other.shape[d] if d >= 0 else 1

    return size(x.axis) > 1 and size(x.heads) == 1


def _varies_along(other: Any, x: Feat, shape: tuple[int, ...] | None) -> bool:
    """A tensor without features that broadcasts against ``x`` with more than one value
    along ``x``'s feature axis."""
    if not isinstance(other, Feat) or other.param is not None or other.featured or not shape:
        return False
    d = x.axis + len(shape) - x.ndim - (len(shape) - other.ndim)
    return d >= 0 and other.shape[d] != 1


def repeat(call: Call) -> Any:
    """aten.repeat(x, sizes): tiling along axes other than the features keeps them; a
    parameter tiled along its size-1 axes (a learned query repeated over the batch) is a
    broadcast view of it."""
    x, sizes, shape = call.x, call.arg(1, "repeats"), call.out_shape
    if not isinstance(x, Feat) or not isinstance(sizes, list | tuple) or shape is None:
        return None
    lead = len(sizes) - x.ndim
    times = list(sizes[lead:])
    if x.param is not None:
        if any(n != 1 and size != 1 for n, size in zip(times, x.shape, strict=True)):
            return None
        dims = [None] * lead + [d if n == 1 else None for d, n in zip(x.dims, times, strict=True)]
        return Feat(shape, param=x.param, dims=tuple(dims), applied=x.applied)
    if not x.featured:
        return call.plain()
    if times[x.axis] != 1 or x.heads is not None:
        return None
    return x.moved(shape, lead + x.axis)


def repeat_interleave(call: Call) -> Any:
    """aten.repeat_interleave(x, k, dim): every entry repeated ``k`` times in a row along an
    axis other than the features (each token once per expert it goes to) keeps them."""
    x, dim, shape = call.x, call.arg(2, "dim", None), call.out_shape
    if not isinstance(x, Feat) or x.param is not None or not isinstance(dim, int):
        return None
    if shape is None or len(shape) != x.ndim:
        return None
    if not x.featured:
        return call.plain()
    if dim % x.ndim == x.axis or x.heads is not None:
        return None
    return x.moved(shape, x.axis)


def t(call: Call) -> Any:
    """aten.t: a 2-d transpose."""
    x = call.x
    return rules.reorder(call, x, [1, 0]) if isinstance(x, Feat) and x.ndim == 2 else None


def numpy_t(call: Call) -> Any:
    """aten.numpy_T (``W.T``): every axis reversed."""
    x = call.x
    return rules.reorder(call, x, range(x.ndim)[::-1]) if isinstance(x, Feat) else None


def matrix_t(call: Call) -> Any:
    """aten.mT (``W.mT``): the last two axes swapped."""
    x = call.x
    if not isinstance(x, Feat) or x.ndim < 2:
        return None
    return rules.reorder(call, x, [*range(x.ndim - 2), x.ndim - 1, x.ndim - 2])


def pad(call: Call) -> Any:
    """aten.constant_pad_nd(x, pad, value)."""
    x, widths, value = call.x, call.arg(1, "pad"), call.arg(2, "value", 0)
    if not isinstance(x, Feat) or x.param is not None or x.heads is not None:
        return None
    return rules.pad_features(call, x, widths, value)


def getitem(call: Call) -> Any:
    """operator.getitem: an item of an operator's tuple (a split's pieces, heads included);
    a tensor split into heads is not indexed here."""
    container = call.arg(0, "a")
    if isinstance(container, Feat) and container.heads is not None:
        return None
    return rules.getitem(call)


_activation = rules.elementwise("dense")
_math = rules.elementwise("dense", activation=False)


def _packets(names: str) -> list[Any]:
    return [getattr(aten, name) for name in names.split() if hasattr(aten, name)]


_ACTIVATIONS = _packets(
    "relu relu_ gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ leaky_relu leaky_relu_ elu "
    "elu_ celu celu_ selu selu_ softplus hardswish hardswish_ hardsigmoid hardsigmoid_ hardtanh "
    "hardtanh_ mish mish_ log_sigmoid softshrink hardshrink relu6 logit"
)
_MATH = _packets(
    "abs exp sqrt rsqrt square pow clamp clamp_ clamp_min clamp_max cos sin log erf "
    "reciprocal sign log1p expm1"
)
# entry by entry of several tensors: comparisons (a mask of the features), selections
_ENTRYWISE = "gt ge lt le eq ne where minimum maximum fmin fmax"
_PASS = _packets(
    "dropout dropout_ feature_dropout feature_dropout_ alpha_dropout alpha_dropout_ clone "
    "contiguous alias detach detach_ lift_fresh_copy _to_copy to type_as neg"
)
_META = _packets(SHAPE_READERS)
_CONSTANT = _packets(SHAPE_MAKERS)
_RESHAPE = _packets("view reshape _unsafe_view flatten unflatten squeeze view_as reshape_as")
_ARITHMETIC = {"add": "add add_", "sub": "sub sub_ rsub", "mul": "mul mul_", "div": "div div_"}
_POOLS = {
    1: ("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d"),
    2: ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d"),
    3: ("max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d"),
}


def window_pool(dims: int, kind: str | None = None) -> Rule:
    """max_pool / avg_pool (x, kernel_size, stride, padding, …): :func:`rules.spatial`, and a
    window of one entry along the features (Funnel pooling its sequence with
    ``avg_pool2d(x[:, None], (2, 1))``) acts on each feature alone."""
    spatial = rules.spatial(dims, kind)

    def rule(call: Call) -> Any:
        x, shape = call.x, call.out_shape
        if not isinstance(x, Feat) or not x.featured or x.param is not None or shape is None:
            return spatial(call)
        at = x.axis - (x.ndim - dims)
        if at < 0 or x.heads is not None or len(shape) != x.ndim:
            return spatial(call)
        kernel = _per_axis(call.arg(1, "kernel_size"), dims)
        stride = _per_axis(call.arg(2, "stride", None) or kernel, dims)
        padding = _per_axis(call.arg(3, "padding", 0), dims)
        if None in (kernel, stride, padding) or (kernel[at], stride[at], padding[at]) != (1, 1, 0):
            return spatial(call)
        if shape[x.axis] != x.shape[x.axis]:
            return None
        if kind:
            call.table.downgrade_value(x, kind)
        return x.moved(shape, x.axis)

    return rule


def _per_axis(value: Any, dims: int) -> tuple[int, ...] | None:
    """A pooling argument (an int or one per axis) as one int per pooled axis."""
    if isinstance(value, int):
        return (value,) * dims
    if isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
        return tuple(value) * dims if len(value) == 1 else tuple(value)
    return None


# interpolation along the axes after the channels, each channel on its own
_UPSAMPLE = """
    upsample_nearest1d upsample_nearest2d upsample_nearest3d _upsample_nearest_exact1d
    _upsample_nearest_exact2d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d
    upsample_trilinear3d upsample_bicubic2d _upsample_bilinear2d_aa _upsample_bicubic2d_aa
"""


def _pool_rules() -> dict[Any, Rule]:
    table: dict[Any, Rule] = {}
    for dims, (max_pool, avg_pool, adaptive_avg, adaptive_max) in _POOLS.items():
        table[getattr(aten, max_pool)] = window_pool(dims, "dense")
        table[getattr(aten, f"{max_pool}_with_indices")] = tupled(window_pool(dims, "dense"))
        table[getattr(aten, adaptive_max)] = tupled(rules.spatial(dims, "dense"))
        table[getattr(aten, avg_pool)] = window_pool(dims)
        table[getattr(aten, adaptive_avg)] = rules.spatial(dims)
    return table


ATEN_RULES: dict[Any, Rule] = {
    **{op: _activation for op in _ACTIVATIONS},
    **{op: _math for op in _MATH},
    **{op: rules.passthrough for op in _PASS},
    **{op: rules.metadata for op in _META},
    **{op: rules.constant for op in _CONSTANT},
    **{op: heads.reshape for op in _RESHAPE},
    **{op: head_scalar(kind) for kind, names in _ARITHMETIC.items() for op in _packets(names)},
    **_pool_rules(),
    **{op: rules.spatial(None) for op in _packets(_UPSAMPLE)},
    **{op: rules.entrywise for op in _packets(_ENTRYWISE)},
    aten.constant_pad_nd: pad,
    aten.pad: rules.pad,
    aten.softmax: rules.softmax,
    aten._softmax: rules.softmax,
    aten.log_softmax: rules.softmax,
    aten._log_softmax: rules.softmax,
    aten.transpose: rules.transpose,
    aten.swapaxes: rules.transpose,
    aten.permute: rules.permute,
    aten.movedim: rules.movedim,
    aten.t: t,
    aten.numpy_T: numpy_t,
    aten.mT: matrix_t,
    aten.expand: expand,
    aten.expand_as: expand,
    aten.repeat: repeat,
    aten.repeat_interleave: repeat_interleave,
    aten.broadcast_to: expand,
    aten.unsqueeze: unsqueeze,
    aten.cat: cat,
    aten.concat: cat,
    aten.copy_: concat.copy_into,
    aten.stack: rules.stack,
    aten.slice: slice_rule,
    aten.select: select,
    aten.index: index,
    aten.index_add: index_add,
    aten.index_add_: index_add,
    aten._grouped_mm: aten_layers.grouped_mm,
    aten.einsum: aten_layers.einsum,
    aten.glu: glu,
    aten.split: split,
    aten.split_with_sizes: split,
    aten.chunk: split,
    aten.tensor_split: split,
    aten.unbind: split,
    aten.mean: reduce(None),
    aten.sum: reduce(None),
    aten.amax: reduce("dense"),
    aten.amin: reduce("dense"),
    aten.var: reduce("dense"),
    aten.max: extreme,
    aten.min: extreme,
    aten.linalg_vector_norm: vector_norm,
    aten.std: reduce("dense"),
    aten.linear: aten_layers.linear,
    aten.addmm: aten_layers.addmm,
    aten.mm: aten_layers.matmul,
    aten.matmul: aten_layers.matmul,
    aten.bmm: aten_layers.matmul,
    aten.baddbmm: aten_attention.baddbmm,
    aten.conv1d: aten_layers.convolution,
    aten.conv2d: aten_layers.convolution,
    aten.conv3d: aten_layers.convolution,
    aten.convolution: aten_layers.convolution,
    aten.conv_transpose1d: aten_layers.conv_transpose,
    aten.conv_transpose2d: aten_layers.conv_transpose,
    aten.conv_transpose3d: aten_layers.conv_transpose,
    aten.embedding: aten_layers.embedding,
    aten.layer_norm: layer_norm,
    aten.rms_norm: layer_norm,
    aten.group_norm: aten_layers.group_norm,
    aten.batch_norm: aten_layers.batch_norm,
    aten._native_batch_norm_legit_no_training: aten_layers.batch_norm,
    aten.instance_norm: aten_layers.batch_norm,
    aten.prelu: aten_layers.prelu,
    aten.scaled_dot_product_attention: aten_attention.sdpa,
}

# Operators of other libraries that their models export, by qualified name.
LIBRARY_RULES: dict[str, Rule] = {
    # transformers' mixture of experts where torch._grouped_mm does not run (CPU, float32)
    "transformers::grouped_mm_fallback": aten_layers.grouped_mm,
}

# The rules that understand a space split into attention heads.
ATEN_HEAD_RULES = frozenset(
    {
        _activation,
        _math,
        rules.passthrough,
        rules.metadata,
        ATEN_RULES[aten.mean],
        ATEN_RULES[aten.sum],
        extreme,
        rules.transpose,
        rules.permute,
        rules.movedim,
        heads.reshape,
        aten_attention.sdpa,
        aten_attention.baddbmm,
        layer_norm,
        aten_layers.matmul,
        aten_layers.einsum,
        slice_rule,
        select,
        split,
        expand,
        unsqueeze,
        cat,
        concat.copy_into,
        getitem,
        *(ATEN_RULES[op] for names in _ARITHMETIC.values() for op in _packets(names)),
    }
)


def rule_for(target: Any) -> Rule | None:
    """The rule of an exported graph's call target (an ATen overload or getitem)."""
    if target is operator.getitem:
        return getitem
    rule = ATEN_RULES.get(getattr(target, "overloadpacket", None))
    if rule is None and isinstance(target, torch._ops.OpOverload):
        return LIBRARY_RULES.get(target.name())
    return rule
