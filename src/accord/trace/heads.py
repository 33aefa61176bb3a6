"""Attention written out in the graph: a space split into heads, scaled dot-product attention.

``q = self.q(x).reshape(B, L, H, D).transpose(1, 2)`` splits q's space into H heads of D
features (the space then admits block-diagonal maps only, one block per head);
``F.scaled_dot_product_attention(q, k, v)`` keeps ``q·k`` per head when ``q ← T q`` and
``k ← T⁻ᵀ k``, so k's writers become readers of q's space (the "qk" space), and its output
is in v's space; the reshape back to (B, L, H·D) joins the heads again. A fused projection
laid out per head (``view(B, L, H, 3·D)`` and chunked, ``view(B, L, H, 3, D)`` and selected)
is cut into one space per head and slot (:func:`cut_slots`), which rotary embeddings join
into whole heads again (:func:`whole_heads`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from accord.trace import rules as rules
from accord.trace.state import Call, Feat, Seg, Tup


def reshape(call: Call) -> Any:
    """The reshape rule, plus splitting a space into heads and joining them back."""
    x, shape = call.x, call.out_shape
    if not isinstance(x, Feat) or shape is None or not x.featured:
        return rules.reshape(call)
    if x.heads is not None:
        squeezed = _squeezed(x, shape)
        if squeezed is not None:
            return squeezed
        if x.repeat is not None:
            return _join_repeated(call, x, shape)
        joined = _join(x, shape) or _batch_heads(x, shape) or _other_axes(x, shape)
        joined = joined or _finer_heads(call, x, shape)
        if joined is None:
            joined = _interleaved_slots(call, x, shape) or _interleaved(call, x, shape)
        if joined is None:
            call.table.fix_value(x, f"{call.desc} at node {call.node.name!r} mixes heads")
            return call.plain()
        return joined
    if rules.follow_reshape(x, shape) is None:
        split = _split(x, shape)
        if split is not None:
            call.table.constrain_groups(x.segs[0].space, shape[split.heads])
            return split
        pieces = _split_slots(call, x, shape) or _split_pieces(call, x, shape)
        if pieces is not None:
            return pieces
    return rules.reshape(call)


def _split_slots(call: Call, x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """(…, C) → (…, H, S, D) with C = H·S·D, every user taking it apart along S (Bloom's and
    Persimmon's ``fused.view(B, L, H, 3, D)[..., 0, :]``): each head's q, k and v in a row,
    cut into one space per head and slot (:func:`cut_slots`); S is the axis of the pieces,
    after the heads (``Feat.pieces``)."""
    if len(x.segs) != 1 or x.segs[0].block != 1 or x.segs[0].space is None:
        return None
    if x.axis != x.ndim - 1 or len(shape) != x.ndim + 2:
        return None
    b = x.axis
    heads, slots, width = shape[b], shape[b + 1], shape[b + 2]
    if tuple(shape[:b]) != x.shape[:b] or heads * slots * width != x.shape[b] or heads == 1:
        return None
    if slots == 1 or not _taken_apart(call, b + 1, len(shape)):
        return None
    return _in_slots(call, x.segs[0].space, heads, slots, width, shape, b)


def _taken_apart(call: Call, axis: int, ndim: int) -> bool:
    """Whether every user of the call's output selects along ``axis`` or unbinds it."""
    users = list(call.node.users)

    def along(user: Any) -> bool:
        name = getattr(user.target, "__name__", "")
        if not name.startswith(("select.", "unbind.")):
            return False
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
        return isinstance(dim, int) and dim % ndim == axis

    return bool(users) and all(along(user) for user in users)


def _split_pieces(call: Call, x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """(…, C, …) → (…, P, H, D, …) with C = P·H·D: a fused projection (q, k and v) cut into
    P pieces of H heads each on an axis of their own (``Feat.pieces``), for a tensor holding
    one freshly written space, which splits into one space per piece."""
    if len(x.segs) != 1 or x.segs[0].block != 1 or x.segs[0].space is None:
        return None
    space, before = x.segs[0].space, math.prod(x.shape[: x.axis])
    b = next(
        (
            b
            for b in range(len(shape) - 2)
            if math.prod(shape[:b]) == before
            and shape[b] * shape[b + 1] * shape[b + 2] == x.shape[x.axis]
            and shape[b] > 1
            and shape[b + 2] > 1
        ),
        None,
    )
    if b is None or not call.only_used_here(space):
        return None
    table, values = call.table, call.walk.values
    old = table.find(space)
    holders = [n for n, v in values.items() if old in map(table.find, table.spaces(v))]
    count, heads = shape[b], shape[b + 1]
    parts = table.split_written(space, [heads * shape[b + 2]] * count)
    if parts is None:
        return None
    segs = [Seg(part, heads * shape[b + 2]) for part in parts]
    for part in parts:
        table.constrain_groups(part, heads)
    for name in holders:  # the projection's output: each piece observed where it is written
        values[name] = replace_segs(table, values[name], old, segs)
    return Feat(tuple(shape), b + 2, tuple(segs), heads=b + 1, pieces=b)


def replace_segs(table: Any, value: Any, old: int, segs: list[Seg]) -> Any:
    """``value`` with its segment of the space ``old`` replaced by ``segs`` (its block kept):
    the same features, now of the spaces it was split into."""
    if not isinstance(value, Feat):
        return value
    found: list[Seg] = []
    for seg in value.segs:
        if seg.space is not None and table.find(seg.space) == old:
            found += [Seg(new.space, new.size, seg.block) for new in segs]
        else:
            found.append(seg)
    return Feat(
        value.shape, value.axis, tuple(found), value.param, value.dims, value.heads, value.repeat
    )


def _split(x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """(…, C, …) → (…, H, D, …) with C = H·D, for a tensor holding one whole space."""
    if len(x.segs) != 1 or x.segs[0].block != 1 or x.segs[0].space is None:
        return None
    before = math.prod(x.shape[: x.axis])
    for b in range(len(shape) - 1):
        if math.prod(shape[:b]) != before or shape[b] * shape[b + 1] != x.shape[x.axis]:
            continue
        if shape[b] > 1 and shape[b + 1] > 1:
            return Feat(tuple(shape), b + 1, x.segs, heads=b)
    return None


def _squeezed(x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """Heads kept when a reshape only adds or removes axes of size 1."""
    kept = [d for d, n in enumerate(x.shape) if n != 1]
    out = [b for b, n in enumerate(shape) if n != 1]
    if [x.shape[d] for d in kept] != [shape[b] for b in out]:
        return None
    where = dict(zip(kept, out, strict=True))
    if x.axis not in where or x.heads not in where:
        return None
    repeat = None if x.repeat is None else where.get(x.repeat)
    if x.repeat is not None and repeat is None:
        return None
    return Feat(tuple(shape), where[x.axis], x.segs, heads=where[x.heads], repeat=repeat)


def _join_repeated(call: Call, x: Feat, shape: tuple[int, ...]) -> Any:
    """(…, H, n, L, D) repeated heads → (…, H·n, L, D): each head's space n times in a row.

    Heads then share spaces, so the space splits into one space per head first (it must be
    freshly written: a value projection)."""
    heads, times = x.shape[x.heads], x.shape[x.repeat]
    before = math.prod(x.shape[: x.heads])
    rest = x.shape[x.repeat + 1 :]
    b = next(
        (
            b
            for b in range(len(shape))
            if math.prod(shape[:b]) == before and shape[b] == heads * times
        ),
        None,
    )
    if b is None or tuple(shape[b + 1 :]) != tuple(rest):
        call.table.fix_value(x, f"{call.desc} at node {call.node.name!r} mixes repeated heads")
        return call.plain()
    per_head = _per_head_segs(call, x, heads)
    if per_head is None:
        call.table.fix_value(x, f"heads repeated at node {call.node.name!r} share a space")
        return call.plain()
    segs = tuple(seg for seg in per_head for _ in range(times))
    return Feat(tuple(shape), b + 1 + x.axis - x.repeat - 1, segs, heads=b)


def _interleaved(call: Call, x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """(…, H, D) → (…, A, B, D) with H = A·B: the heads of a fused projection interleaved in
    groups of B (Falcon's q, k and v per head, or each key/value group's query heads, key and
    value in a row), whose slots the next operators take apart. Each group moves only whole,
    its B·D features a run (:func:`regroup`): the A groups become the features, on the axis of
    A, and every axis after it is per position. None, changing nothing, where the space is
    not one freshly written space split into heads."""
    at, heads_shape = x.heads, x.shape[x.heads]
    if x.axis != at + 1 or len(x.segs) != 1 or x.segs[0].block != 1 or x.segs[0].space is None:
        return None
    if len(shape) != x.ndim + 1 or tuple(shape[:at]) != x.shape[:at]:
        return None
    groups, slots = shape[at], shape[at + 1]
    if groups * slots != heads_shape or slots == 1 or tuple(shape[at + 2 :]) != x.shape[at + 1 :]:
        return None
    runs = regroup(call, x.segs[0].space, slots * x.shape[x.axis])
    return None if runs is None else Feat(tuple(shape), at, (Seg(runs, groups),))


def _interleaved_slots(call: Call, x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """(…, H, D) → (…, A, B, D) with H = A·B, every user taking it apart along B (Falcon's
    q, k and v per head, ``unflatten`` and ``unbind``): each of the A heads cut into B slots
    (:func:`cut_slots`), B the axis of the pieces after the heads (``Feat.pieces``)."""
    at = x.heads
    if x.axis != at + 1 or len(x.segs) != 1 or x.segs[0].block != 1 or x.segs[0].space is None:
        return None
    if len(shape) != x.ndim + 1 or tuple(shape[:at]) != x.shape[:at] or x.repeat is not None:
        return None
    groups, slots, width = shape[at], shape[at + 1], x.shape[x.axis]
    if groups * slots != x.shape[at] or slots == 1 or tuple(shape[at + 2 :]) != x.shape[at + 1 :]:
        return None
    if not _taken_apart(call, at + 1, len(shape)):
        return None
    return _in_slots(call, x.segs[0].space, groups, slots, width, shape, at)


def _in_slots(
    call: Call, space: int, heads: int, slots: int, width: int, shape: Any, at: int
) -> Feat | None:
    """The value of ``shape`` whose heads (axis ``at``) each hold ``slots`` pieces (the next
    axis) of ``width`` features of ``space`` (cut by :func:`cut_slots`); None where it cannot
    be cut."""
    cut = cut_slots(call, space, heads, [width] * slots)
    if cut is None:
        return None
    segs = tuple(seg for head in zip(*cut, strict=True) for seg in head)
    return Feat(tuple(shape), at + 2, segs, heads=at, pieces=at + 1)


def _per_head_segs(call: Call, x: Feat, heads: int) -> list[Seg] | None:
    """``x``'s layout as one segment of one space per head, splitting a fresh space."""
    width = x.shape[x.axis]
    if len(x.segs) == heads and all(s.size == width and s.block == 1 for s in x.segs):
        return list(x.segs)
    if len(x.segs) != 1 or x.segs[0].space is None or x.segs[0].block != 1:
        return None
    space = x.segs[0].space
    if not call.only_used_here(space):
        return None
    parts = call.table.split_written(space, [width] * heads)
    return None if parts is None else [Seg(part, width) for part in parts]


def whole_heads(call: Call, x: Feat) -> bool:
    """Re-describe a freshly written space split into heads (``x``) as its heads, which then
    move only whole (rotary embeddings mix each head's features per position, the same way in
    every head): a new space of H features on ``x``'s heads axis, each owning the D entries
    of its head on every axis (:meth:`SpaceTable.coarsen`); or, for one slot of every head
    of a cut (:func:`cut_slots`), every slot of each head joined into one run again (unless
    the walk keeps rotated slots in place, ``Walk.join_rotated_slots``). False, changing
    nothing, where some traced value holds the space otherwise than whole."""
    if x.heads is None or x.repeat is not None:
        return False
    if len(x.segs) > 1:
        return call.walk.join_rotated_slots and _joined_cut(call, x)
    if x.segs[0].block != 1:
        return False
    space, width = x.segs[0].space, x.shape[x.axis]
    if space is None or x.segs[0].size != x.shape[x.heads] * width:
        return False
    return regroup(call, space, width) is not None


def cut_slots(call: Call, space: int, heads: int, sizes: list[int]) -> list[tuple[Seg, ...]] | None:
    """Each of the ``heads`` heads of a freshly written ``space`` cut along its features into
    slots of ``sizes`` (GPT-NeoX's chunk of (…, H, 3·D) into q, k and v, Bloom's select from
    (…, H, 3, D)): one space per head and slot, since q, k and v of a head lie in a row; the
    cut is recorded so that rotary embeddings can join each head's slots again
    (:func:`whole_heads`). Per slot its segments, head by head; None, changing nothing,
    where the space is used already or cut across its heads."""
    table, values = call.table, call.walk.values
    if table.record(space).size != heads * sum(sizes) or not call.only_used_here(space):
        return None
    old = table.find(space)
    holders = [n for n, v in values.items() if old in map(table.find, table.spaces(v))]
    parts = table.split_written(space, sizes * heads)
    if parts is None:
        return None
    base = table.record(parts[0]).base.rpartition(":")[0]
    for number, part in enumerate(parts):  # head h's slots: base:h0.0, base:h0.1, …
        table.record(part).base = f"{base}:head{number // len(sizes)}.{number % len(sizes)}"
    table.cuts.append((parts, len(sizes)))
    segs = [Seg(part, size) for part, size in zip(parts, sizes * heads, strict=True)]
    for name in holders:  # the projection's output: each part observed where it is written
        values[name] = replace_segs(table, values[name], old, segs)
    return [tuple(segs[slot :: len(sizes)]) for slot in range(len(sizes))]


def _joined_cut(call: Call, x: Feat) -> bool:
    """``x``, one slot of every head of a cut (:func:`cut_slots`), as whole heads: every part
    of the cut joined into one space of the heads (:meth:`SpaceTable.join_parts`), every
    traced value holding a part rewritten; False, changing nothing, where that fails."""
    table, values = call.table, call.walk.values
    spaces = [None if seg.space is None else table.find(seg.space) for seg in x.segs]
    width, size = x.shape[x.axis], x.segs[0].size
    # one segment per head, or per run of heads (CodeGen's blocks of H/mp_num heads)
    if any(seg.block != 1 or seg.size != size for seg in x.segs) or size % width:
        return False
    if len(x.segs) * size != x.shape[x.heads] * width:
        return False
    for parts, slots in table.cuts:
        roots = [table.find(p) for p in parts]
        if not any(spaces == roots[slot::slots] for slot in range(slots)):
            continue
        holders = [
            n for n, v in values.items() if set(roots) & set(map(table.find, table.spaces(v)))
        ]
        if any(_as_joined(values[n], roots, slots, -1, table) is None for n in holders):
            return False
        runs = table.join_parts(parts, slots)
        if runs is None:
            return False
        for name in holders:
            values[name] = _as_joined(values[name], roots, slots, runs, table)
        return True
    return False


def _as_joined(value: Any, roots: list[int], slots: int, runs: int, table: Any) -> Any:
    """``value`` with the parts of a cut (``roots``, ``slots`` a head) replaced by ``runs``,
    one feature per head: split into heads, every slot of each head or one slot of every
    head; laid out without heads, all parts or one slot of each head in a row. None where
    that cannot be said."""
    if isinstance(value, Tup):
        items = [_as_joined(item, roots, slots, runs, table) for item in value.items]
        return None if any(item is None for item in items) else Tup(tuple(items))
    if not isinstance(value, Feat) or not set(roots) & set(map(table.find, table.spaces(value))):
        return value
    found = [None if seg.space is None else table.find(seg.space) for seg in value.segs]
    count = len(roots) // slots
    patterns = [roots] + [roots[slot::slots] for slot in range(slots)]
    if value.heads is not None:
        # every head of a run in a row: the run's features are those heads
        heads, width = value.shape[value.heads], value.shape[value.axis]
        width *= 1 if value.pieces is None else value.shape[value.pieces]
        whole = value.repeat is None and all(seg.block == 1 for seg in value.segs)
        whole = whole and heads % count == 0 and sum(s.size for s in value.segs) == heads * width
        if whole and found in patterns:
            return Feat(value.shape, value.heads, (Seg(runs, count, heads // count),))
        return None
    for pattern in patterns:
        per_run = len(pattern) // count
        for i in range(len(found) - len(pattern) + 1):
            segs = value.segs[i : i + len(pattern)]
            if found[i : i + len(pattern)] != pattern or len({seg.block for seg in segs}) > 1:
                continue
            block = sum(seg.size for seg in segs[:per_run]) * segs[0].block
            joined = (*value.segs[:i], Seg(runs, count, block), *value.segs[i + len(pattern) :])
            return Feat(value.shape, value.axis, joined)
    return None


def regroup(call: Call, space: int, factor: int) -> int | None:
    """``space`` as the space of its runs of ``factor`` features (:meth:`SpaceTable.coarsen`),
    with every traced value that holds it rewritten to hold the runs; None, changing nothing,
    where the table refuses or a value holds the space otherwise than whole."""
    return _rewritten(call, space, factor, call.table.coarsen, _as_runs)


def fold(call: Call, space: int, times: int) -> int | None:
    """``space``, split into ``times`` heads, as one space that each head holds
    (:meth:`SpaceTable.fold`), with every traced value that holds it rewritten to hold it
    once per head; None, changing nothing, where the table refuses or a value holds the
    space otherwise than whole."""
    return _rewritten(call, space, times, call.table.fold, _as_folded)


def _rewritten(
    call: Call,
    space: int,
    count: int,
    change: Callable[[int, int], int | None],
    rewrite: Callable[..., Any],
) -> int | None:
    """The space ``change(root, count)`` makes of ``space``, every traced value holding it
    rewritten by ``rewrite`` (checked first with -1: None where one cannot be rewritten)."""
    table, values = call.table, call.walk.values
    root = table.find(space)
    size = table.record(root).size
    holders = [n for n, v in values.items() if root in map(table.find, table.spaces(v))]
    if any(rewrite(table, values[n], root, size, count, -1) is None for n in holders):
        return None
    new = change(root, count)
    if new is None:
        return None
    for name in holders:
        values[name] = rewrite(table, values[name], root, size, count, new)
    return new


def _as_folded(table: Any, value: Any, root: int, size: int, times: int, folded: int) -> Any:
    """``value`` with each whole segment of ``root`` (``size`` features) replaced by
    ``times`` segments of ``folded``; None where a segment holds only part of the space."""
    if isinstance(value, Tup):
        items = [_as_folded(table, item, root, size, times, folded) for item in value.items]
        return None if any(item is None for item in items) else Tup(tuple(items))
    if not isinstance(value, Feat) or root not in map(table.find, table.spaces(value)):
        return value
    if value.repeat is not None:
        return None
    segs = []
    for seg in value.segs:
        if seg.space is not None and table.find(seg.space) == root:
            if seg.size != size:
                return None
            segs += [Seg(folded, size // times, seg.block)] * times
        else:
            segs.append(seg)
    return Feat(value.shape, value.axis, tuple(segs), heads=value.heads)


def _as_runs(table: Any, value: Any, root: int, size: int, factor: int, runs: int) -> Any:
    """``value`` with the space ``root`` (``size`` features) replaced by ``runs``, its runs of
    ``factor`` features; None where that cannot be said: split into heads other than one run
    per head, or only part of the space in one segment."""
    if isinstance(value, Tup):
        items = [_as_runs(table, item, root, size, factor, runs) for item in value.items]
        return None if any(item is None for item in items) else Tup(tuple(items))
    if not isinstance(value, Feat) or root not in map(table.find, table.spaces(value)):
        return value
    if value.heads is not None:
        # each run one head, or several heads in a row (interleaved groups)
        whole = len(value.segs) == 1 and value.segs[0].block == 1 and value.repeat is None
        if not whole or factor % value.shape[value.axis] or value.segs[0].size != size:
            return None
        per_run = factor // value.shape[value.axis]
        return Feat(value.shape, value.heads, (Seg(runs, size // factor, per_run),))
    segs = []
    for seg in value.segs:
        if seg.space is not None and table.find(seg.space) == root:
            if seg.size != size:
                return None
            seg = Seg(runs, size // factor, seg.block * factor)
        segs.append(seg)
    return Feat(value.shape, value.axis, tuple(segs))


def _finer_heads(call: Call, x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """(…, A, W) → (…, A·r, W/r): every head cut into r heads (CodeGen's mp_num blocks of
    H/mp_num heads each); each space's maps then act per new head."""
    if x.axis != x.heads + 1 or x.repeat is not None or x.pieces is not None:
        return None
    at, count, width = x.heads, x.shape[x.heads], x.shape[x.axis]
    if len(shape) != x.ndim or shape[:at] != x.shape[:at] or shape[at + 2 :] != x.shape[at + 2 :]:
        return None
    if shape[at] <= count or shape[at] * shape[at + 1] != count * width:
        return None
    if any(seg.block != 1 or seg.size % shape[at + 1] for seg in x.segs):
        return None
    for seg in x.segs:
        if seg.space is not None:
            call.table.constrain_groups(seg.space, seg.size // shape[at + 1])
    return Feat(tuple(shape), at + 1, x.segs, heads=at)


def _other_axes(x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """A reshape that regroups only axes other than the heads and the features: both start
    and end at the same entries (Hiera's pooling of query positions, ``q.view(B, H, W, s, -1,
    D)``), so every head keeps its features."""
    if x.repeat is not None or x.pieces is not None:
        return None

    def same(axis: int) -> int | None:
        start, size = math.prod(x.shape[:axis]), x.shape[axis]
        return next(
            (b for b, n in enumerate(shape) if n == size and math.prod(shape[:b]) == start), None
        )

    heads, axis = same(x.heads), same(x.axis)
    if heads is None or axis is None or (heads < axis) != (x.heads < x.axis):
        return None
    return Feat(tuple(shape), axis, x.segs, heads=heads)


def head_count(x: Feat) -> int:
    """How many heads a tensor split into heads holds (its features over each head's)."""
    return sum(seg.size * seg.block for seg in x.segs) // x.shape[x.axis]


def _batch_heads(x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """Heads merged into the batch, heads minor, and split out again: (B, H, L, D) ↔
    (B·H, L, D), attention written with ``bmm`` (XGLM, Bloom). The heads axis then holds
    B·H entries, head ``i mod H`` at entry ``i``; the axes after it stay as they are."""
    if x.repeat is not None or x.axis < x.heads:
        return None
    heads, rest = head_count(x), x.shape[x.heads + 1 :]
    before = math.prod(x.shape[: x.heads + 1])
    for b in range(len(shape)):
        if tuple(shape[b + 1 :]) != tuple(rest) or math.prod(shape[: b + 1]) != before:
            continue
        merged = shape[b] % heads == 0 and shape[b] > heads == x.shape[x.heads]
        split = shape[b] == heads < x.shape[x.heads]
        if merged or split:
            return Feat(tuple(shape), b + x.axis - x.heads, x.segs, heads=b)
    return None


def _join(x: Feat, shape: tuple[int, ...]) -> Feat | None:
    """(…, H, D, …) → (…, H·D, …): heads axis right before the per-head axis."""
    if x.axis != x.heads + 1 or x.shape[x.heads] != head_count(x):
        return None
    before = math.prod(x.shape[: x.heads])
    for b, size in enumerate(shape):
        if math.prod(shape[:b]) == before and size == x.shape[x.heads] * x.shape[x.axis]:
            return Feat(tuple(shape), b, x.segs)
    return None


def attention(call: Call) -> Any:
    """F.scaled_dot_product_attention on (…, H, L, D) heads of q, k and v."""
    q, k, v = (call.arg(i, name) for i, name in enumerate(("query", "key", "value")))
    mask = call.arg(3, "attn_mask", None)
    shape = call.out_shape
    if shape is None or (isinstance(mask, Feat) and mask.featured):
        return None
    if not all(isinstance(t, Feat) and _per_head(t) for t in (q, k, v)):
        return None
    if not q.shape[-3] == k.shape[-3] == v.shape[-3] or q.shape[-1] != k.shape[-1]:
        return None  # grouped-query attention shares k and v heads: not handled here
    table = call.table
    query, key = q.segs[0].space, k.segs[0].space
    if table.find(query) == table.find(key) or not _only_written(call, key):
        return None
    table.absorb_as_readers(query, key)
    table.downgrade(query, "orthogonal")
    record, key_record = table.record(query), table.record(key)
    parent, _, _ = record.base.rpartition(".")
    if parent and key_record.base.rpartition(".")[0] == parent:
        record.base = f"{parent}.qk"
    return Feat(shape, len(shape) - 1, v.segs, heads=len(shape) - 3)


def _per_head(t: Feat) -> bool:
    return (
        t.heads == t.ndim - 3
        and t.axis == t.ndim - 1
        and len(t.segs) == 1
        and t.segs[0].space is not None
    )


def _only_written(call: Call, key: int) -> bool:
    """The key space is only written, and its values reach nothing but this call."""
    record = call.table.record(key)
    if record.refs["readers"] or record.refs["elementwise"] or record.reasons:
        return False
    return call.only_used_here(key)
