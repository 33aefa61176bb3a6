"""Attention in an exported graph: scaled_dot_product_attention, or written out with matmul.

Heads are split and joined by the reshape rule of :mod:`accord.trace.heads`. ``q·k`` per
head is kept when ``q ← T q`` and ``k ← T⁻ᵀ k``, so k's writers become readers of q's space
(the "qk" space, orthogonal maps per head) when both are freshly written and reach nothing
else; query heads that all read one key head (multi-query attention) share one map, the
query's space folded into one head's features. A fused projection whose q, k and v lie in a
row per head is cut into one space per head and slot (:func:`accord.trace.heads.cut_slots`):
q·k is then one qk space per head and v one value space per head, which a mask that differs
per head (ALiBi) keeps, since no head moves. Rotary embeddings leave q and k as whole heads
(:func:`accord.trace.heads.whole_heads`, joining each head's slots of such a cut again), as
does a fused projection whose query heads are sliced off each key/value group: then only
permutations of whole key/value groups keep the attention, each moving its key and value head
with its query heads and their output columns, one space of permutations for all of them,
unless the mask differs per head (ALiBi). Anything else in
between (norms of q and k) is outside what the tracer proves: those spaces are fixed, by the
rule of the operator that touched them; where a head's q and k each hold several parts in a
row (DeepSeek's part without positions beside a rotated part left in place), each pair of
parts is a qk space of its own. Values are per head: the output lies in v's space,
laid out as the heads of the query (grouped-query attention repeats each key/value head, see
:func:`accord.trace.heads.reshape`).
"""

from __future__ import annotations

from typing import Any

from accord.trace import concat, heads
from accord.trace.state import Call, Feat, Seg


def sdpa(call: Call) -> Any:
    """aten.scaled_dot_product_attention(q, k, v, mask, dropout, causal, scale, enable_gqa)."""
    q, k, v = (call.arg(i, name) for i, name in enumerate(("query", "key", "value")))
    mask, shape = call.arg(3, "attn_mask", None), call.out_shape
    if shape is None or not all(isinstance(t, Feat) and t.param is None for t in (q, k, v)):
        return None
    if isinstance(mask, Feat) and mask.featured:
        if not _bias_per_head(mask, shape):
            return None
        # a learned bias of each head's own (T5's relative position bias): whole heads stay in
        # place, as under ALiBi, and each head's q·k and values may still map
        reason = f"attention at node {call.node.name!r} adds a bias of each head's own"
        call.table.fix_value(mask, reason)
    q, k, v = _one_head(q), _one_head(k), _one_head(v)
    if _whole_heads(q) or _whole_heads(k):
        if isinstance(mask, Feat) and mask.ndim >= 3 and mask.shape[-3] > 1:
            # a bias of each head's own (ALiBi's slopes): its heads may not move
            reason = f"attention at node {call.node.name!r} adds a mask that differs per head"
            call.table.fix_value([q, k, v], reason)
            return call.plain()
        return _rotary(call, q, k, v, shape)
    _query_key(call, q, k, f"attention at node {call.node.name!r}")
    return _values(call, v, shape, f"attention at node {call.node.name!r}")


def _bias_per_head(mask: Feat, shape: tuple[int, ...]) -> bool:
    """A mask of (…, H, L, S) whose features are the H heads, on the output's heads axis."""
    return (
        mask.heads is None
        and mask.param is None
        and mask.ndim >= 3
        and mask.axis == mask.ndim - 3
        and mask.shape[-3] == shape[-3] > 1
    )


def _values(call: Call, v: Feat, shape: tuple[int, ...], where: str) -> Any:
    """The attention's output in v's spaces, each value head where it is (the query heads in
    place)."""
    if not v.featured:
        return call.plain()
    if not _per_head_values(v):
        call.table.fix_value(v, f"{where} mixes value features")
        return call.plain()
    segs = _query_layout(call, v, shape[-3])
    if segs is None:
        return call.plain()
    return Feat(shape, len(shape) - 1, segs, heads=len(shape) - 3)


def _per_head_values(v: Feat) -> bool:
    """Values split into heads on (…, H, L, D), each head's features on the last axis."""
    return v.heads == v.ndim - 3 and v.axis == v.ndim - 1 and v.repeat is None


def _untraced(k: Feat) -> str:
    """Why the key's heads are unknown, where it carries no traced features."""
    return "" if k.featured else " (the key carries no features accord traced)"


def _one_space_on(t: Feat, axis: int) -> bool:
    """One space, never split into heads, on ``axis`` of ``t``."""
    return (
        t.featured
        and t.heads is None
        and t.axis == axis
        and len(t.segs) == 1
        and t.segs[0].space is not None
    )


def _one_head(t: Feat) -> Feat:
    """A key or value of (…, H, L, D) never split into heads, its D features on the last axis
    (multi-query attention slicing its one key and value head off a fused projection, maybe
    repeated for every query head) as the same head on every index of the heads axis."""
    if t.ndim >= 3 and _single_head(t) and t.segs[0].size == t.shape[-1]:
        return Feat(t.shape, t.axis, t.segs * t.shape[-3], heads=t.ndim - 3)
    return t


def _whole_heads(t: Feat) -> bool:
    """Features that are whole heads (see :func:`accord.trace.heads.whole_heads`) on the
    heads axis of (…, H, L, D), one space."""
    return _one_space_on(t, t.ndim - 3)


def _rotary(call: Call, q: Feat, k: Feat, v: Feat, shape: tuple[int, ...]) -> Any:
    """Attention whose query and key are whole heads (rotary embeddings): one space of the
    key/value groups, each moving its key and value head with the query heads that read them
    (the r = H/G heads in a row, with repeated keys or ``enable_gqa``), permutations only.
    The output's features are those groups, r heads each."""
    groups = _rotary_query_key(call, q, k)
    if groups is None and _per_head_values(v):
        # the heads stay in place: each value head still maps with the output's columns
        # (DeepSeek's key, written into an empty tensor in place, is not traced as heads)
        where = f"attention at node {call.node.name!r}"
        reason = f"{where} compares rotated query heads with key heads accord cannot map"
        call.table.fix_value([q, k], reason + _untraced(k))
        call.walk.rotated_dead_end = True
        return _values(call, v, shape, where)
    value = None if groups is None else _value_groups(call, v, groups.size)
    if groups is None or value is None:
        reason = f"attention at node {call.node.name!r} compares rotated heads accord cannot map"
        call.table.fix_value([q, k, v], reason)
        return call.plain()
    root = call.table.union(groups.space, value)
    return Feat(shape, len(shape) - 3, (Seg(root, groups.size, groups.block),))


def _rotary_query_key(call: Call, q: Feat, k: Feat) -> Seg | None:
    """The query and key heads of rotary attention as one space of the key/value groups
    (query head h reads group h // r); the segment of the query's heads axis, or None."""
    if not (_whole_heads(q) and _whole_heads(k)):
        return None
    table, query, key = call.table, q.segs[0], k.segs[0]
    heads_q, groups = q.shape[-3], key.size
    fits = (
        query.size * query.block == heads_q
        and key.size * key.block == k.shape[-3] in (heads_q, groups)
        and heads_q % groups == 0
        and query.size % groups == 0
    )
    factor = query.size // groups if fits else 0
    runs = None
    if factor:
        runs = query.space if factor == 1 else heads.regroup(call, query.space, factor)
    if runs is None:
        return None
    base = table.record(runs).base
    root = table.union(runs, key.space)
    table.record(root).base = f"{base.rpartition('.')[0] or base}.heads"
    return Seg(root, groups, heads_q // groups)


def _rotary_product(call: Call, a: Feat, b: Feat, shape: tuple[int, ...]) -> Any:
    """Written-out rotary attention: scores ``q @ kᵀ`` of whole heads (features: the key/value
    groups, as :func:`_rotary`), then ``probabilities @ v`` moving v's heads with them."""
    if b.featured and b.heads is None:  # q @ kᵀ: kᵀ has its heads on the same axis as q
        groups = _rotary_query_key(call, a, b)
        if groups is not None:
            return Feat(shape, len(shape) - 3, (groups,))
    elif _whole_heads(a) and a.shape[-3] == a.segs[0].size * a.segs[0].block:
        value = _value_groups(call, b, a.segs[0].size)
        if value is not None:
            call.table.union(a.segs[0].space, value)
            return Feat(shape, len(shape) - 3, a.segs)
    call.table.fix_value([a, b], f"attention at node {call.node.name!r} mixes rotated heads")
    return call.plain()


def _value_groups(call: Call, v: Feat, groups: int) -> int | None:
    """v's space as ``groups`` whole heads (one per key/value group), or None."""
    if _whole_heads(v):
        # already whole (interleaved with q and k: one space with them)
        seg = v.segs[0]
        return seg.space if seg.size == groups and seg.size * seg.block == v.shape[-3] else None
    if v.heads != v.ndim - 3 or v.axis != v.ndim - 1 or v.repeat is not None:
        return None
    width, segs = v.shape[-1], v.segs
    if len(segs) == 1 and segs[0].space is not None and segs[0].size == groups * width:
        return heads.regroup(call, segs[0].space, width)
    # repeated value heads (repeat_kv): one space per group, each r times in a row
    times = len(segs) // groups
    parts = [seg.space for seg in segs[::times]] if times and len(segs) % groups == 0 else []
    repeated = all(
        seg.space is not None and seg.space == parts[i // times] and seg.size == width
        for i, seg in enumerate(segs)
    )
    if not parts or not repeated or not all(call.only_used_here(p) for p in parts):
        return None
    return call.table.join_parts(parts)


def _query_layout(call: Call, v: Feat, query_heads: int) -> tuple[Seg, ...] | None:
    """v's segments as seen by each query head (``enable_gqa`` repeats each value head)."""
    value_heads = v.shape[v.heads]
    if value_heads == query_heads:
        return v.segs
    if query_heads % value_heads:
        return None
    per_head = heads._per_head_segs(call, v, value_heads)
    if per_head is None:
        call.table.fix_value(v, f"value heads shared at node {call.node.name!r}")
        return None
    times = query_heads // value_heads
    return tuple(seg for seg in per_head for _ in range(times))


def _query_key(call: Call, q: Feat, k: Feat, where: str) -> None:
    """One qk space when q and k are each one freshly written space per head, or the query
    heads all read one key head (multi-query attention: the query's space folded into one
    head's features that every query head holds, :func:`heads.fold`); one qk space per head
    where q and k hold a space of each head (the slots of a cut, :func:`heads.cut_slots`);
    else fixed."""
    if not (q.featured or k.featured):
        return
    pairs = _head_pairs(call, q, k)
    if pairs is not None:
        for query, key in pairs:
            _absorb_key(call, query, key)
        return
    table, single = call.table, _single_key(k, q)
    same_heads = _per_head(q) and _per_head(k) and q.shape[q.heads] == k.shape[k.heads]
    if _per_head(q) and (single is not None or same_heads):
        query, key = q.segs[0].space, k.segs[0].space
        fresh = table.find(query) != table.find(key) and heads._only_written(call, key)
        if single is not None and fresh:
            query = heads.fold(call, query, q.shape[q.heads])
        if query is not None and _absorb_key(call, query, key):
            return
    reason = f"{where} compares query and key features accord cannot map together"
    call.table.fix_value([q, k], reason)


def _head_pairs(call: Call, q: Feat, k: Feat) -> list[tuple[int, int]] | None:
    """The query and key space of each part of each head, where q and k hold whole spaces
    per head laid out alike (one per head, or several in a row: DeepSeek's part without
    positions beside a rotated part no space owns, which stays where it is on both sides),
    and every key space is freshly written and reaches nothing else."""
    if q.heads is None or k.heads is None or q.repeat is not None or k.repeat is not None:
        return None
    if q.shape[q.heads] != k.shape[k.heads]:
        return None
    width = q.shape[q.axis]  # k may come transposed (q @ kᵀ)
    query, key = concat.head_chunks(q, width), concat.head_chunks(k, width)
    if query is None or key is None or len(query) != len(key):
        return None
    pairs = []
    for a, b in zip(query, key, strict=True):
        if [(s.size, s.block) for s in a] != [(s.size, s.block) for s in b]:
            return None
        for sa, sb in zip(a, b, strict=True):
            if sa.block != 1 or (sa.space is None) != (sb.space is None):
                return None
            if sa.space is not None:
                pairs.append((sa.space, sb.space))
    table = call.table
    roots = {table.find(space) for pair in pairs for space in pair}
    if len(pairs) < 2 or len(roots) != 2 * len(pairs):
        return None
    if not all(heads._only_written(call, b) for _, b in pairs):
        return None
    return pairs


def baddbmm(call: Call) -> Any:
    """aten.baddbmm(bias, a, b, beta, alpha) = beta·bias + alpha·(a @ b): attention scores
    ``q @ kᵀ`` (:func:`product`) with a bias that carries no features (Bloom's ALiBi, one
    slope per head: the heads stay in place, each head's q·k is kept)."""
    bias, a, b = call.arg(0, "self"), call.arg(1, "batch1"), call.arg(2, "batch2")
    if not isinstance(bias, Feat) or bias.featured or bias.param is not None:
        return None
    if not (isinstance(a, Feat) and isinstance(b, Feat) and a.featured and b.featured):
        return None
    return product(call, a, b)


def _single_key(k: Feat, q: Feat) -> int | None:
    """The space of a single key head that every query head reads (multi-query attention,
    the key repeated per query head or not), when there are several query heads."""
    if q.heads is None or q.shape[q.heads] < 2 or k.heads is None or k.repeat is not None:
        return None
    if k.axis != k.ndim - 1 or k.shape[k.heads] not in (1, q.shape[q.heads]):
        return None
    width, spaces = q.shape[q.axis], {seg.space for seg in k.segs}
    whole = all(seg.size == width and seg.block == 1 for seg in k.segs)
    if len(spaces) != 1 or None in spaces or not whole or len(k.segs) != k.shape[k.heads]:
        return None
    return k.segs[0].space


def _absorb_key(call: Call, query: int, key: int) -> bool:
    """The key space's writers as readers of the query space (one "qk" space, orthogonal
    maps), where the key space is freshly written and reaches nothing else."""
    table = call.table
    if table.find(query) == table.find(key) or not heads._only_written(call, key):
        return False
    table.absorb_as_readers(query, key)
    table.downgrade(query, "orthogonal")
    record, key_record = table.record(query), table.record(key)
    parent = record.base.rpartition(".")[0]
    if parent and key_record.base.rpartition(".")[0] == parent:
        record.base = f"{parent}.qk"
    return True


def _single_head(t: Feat) -> bool:
    """One space on the last axis, never split into heads (attention with one head)."""
    return _one_space_on(t, t.ndim - 1) and t.segs[0].block == 1


def _per_head(t: Feat) -> bool:
    return (
        t.heads is not None
        and t.repeat is None
        and t.axis == t.ndim - 1
        and len(t.segs) == 1
        and t.segs[0].space is not None
        and t.segs[0].block == 1
    )


def product(call: Call, a: Any, b: Any) -> Any:
    """``a @ b`` between activations: scores ``q @ kᵀ`` (features contracted, none left) or
    ``probabilities @ v`` (v's features kept); anything else fixes its spaces."""
    shape = call.out_shape
    if not isinstance(a, Feat) or not isinstance(b, Feat) or shape is None:
        return None
    if a.param is not None or b.param is not None:
        return None
    if not b.featured and not a.featured:
        return call.plain()
    if _whole_heads(a) or _whole_heads(b):
        return _rotary_product(call, a, b, shape)
    scores = a.featured and b.featured and a.axis == a.ndim - 1 and b.axis == b.ndim - 2
    if scores and a.heads is not None and b.heads is not None:
        b_as_key = Feat(b.shape, b.ndim - 1, b.segs, heads=b.heads)
        _query_key(call, a, b_as_key, f"attention scores at node {call.node.name!r}")
        return call.plain()
    b_as_key = Feat(b.shape, b.ndim - 1, b.segs) if b.featured else b
    if scores and _single_head(a) and _single_head(b_as_key) and a.heads is None:
        # one head (PVT's stages with one head): q·k over all the features
        if not _absorb_key(call, a.segs[0].space, b.segs[0].space):
            reason = f"attention scores at node {call.node.name!r} compare features accord "
            call.table.fix_value([a, b], reason + "cannot map together")
        return call.plain()
    values = not a.featured and b.featured and b.axis == b.ndim - 1
    if values and (b.heads is None or b.heads < b.ndim - 2):
        return Feat(shape, len(shape) - 1, b.segs, heads=b.heads)
    call.table.fix_value([a, b], f"matrix product at node {call.node.name!r}")
    return call.plain()
