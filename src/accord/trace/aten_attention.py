"""Attention in an exported graph: scaled_dot_product_attention, or written out with matmul.

Heads are split and joined by the reshape rule of :mod:`accord.trace.heads`. ``q·k`` per
head is kept when ``q ← T q`` and ``k ← T⁻ᵀ k``, so k's writers become readers of q's space
(the "qk" space, orthogonal maps per head) when both are freshly written and reach nothing
else. Anything in between (rotary embeddings, norms of q and k) is outside what the tracer
proves: those spaces are fixed, by the rule of the operator that touched them. Values are
per head: the output lies in v's space, laid out as the heads of the query (grouped-query
attention repeats each key/value head, see :func:`accord.trace.heads.reshape`).
"""

from __future__ import annotations

from typing import Any

from accord.trace import heads as heads
from accord.trace.state import Call, Feat, Seg


def sdpa(call: Call) -> Any:
    """aten.scaled_dot_product_attention(q, k, v, mask, dropout, causal, scale, enable_gqa)."""
    q, k, v = (call.arg(i, name) for i, name in enumerate(("query", "key", "value")))
    mask, shape = call.arg(3, "attn_mask", None), call.out_shape
    if shape is None or (isinstance(mask, Feat) and mask.featured):
        return None
    if not all(isinstance(t, Feat) and t.param is None for t in (q, k, v)):
        return None
    _query_key(call, q, k, f"attention at node {call.node.name!r}")
    if not v.featured:
        return call.plain()
    if v.heads != v.ndim - 3 or v.axis != v.ndim - 1 or v.repeat is not None:
        call.table.fix_value(v, f"attention at node {call.node.name!r} mixes value features")
        return call.plain()
    segs = _query_layout(call, v, shape[-3])
    if segs is None:
        return call.plain()
    return Feat(shape, len(shape) - 1, segs, heads=len(shape) - 3)


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
    """One qk space when q and k are each one freshly written space per head; else fixed."""
    if not (q.featured or k.featured):
        return
    if _per_head(q) and _per_head(k) and q.shape[q.heads] == k.shape[k.heads]:
        table = call.table
        query, key = q.segs[0].space, k.segs[0].space
        if table.find(query) != table.find(key) and heads._only_written(call, key):
            table.absorb_as_readers(query, key)
            table.downgrade(query, "orthogonal")
            record, key_record = table.record(query), table.record(key)
            parent = record.base.rpartition(".")[0]
            if parent and key_record.base.rpartition(".")[0] == parent:
                record.base = f"{parent}.qk"
            return
    reason = f"{where} compares query and key features accord cannot map together"
    call.table.fix_value([q, k], reason)


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
    scores = a.featured and b.featured and a.axis == a.ndim - 1 and b.axis == b.ndim - 2
    if scores and a.heads is not None and b.heads is not None:
        b_as_key = Feat(b.shape, b.ndim - 1, b.segs, heads=b.heads)
        _query_key(call, a, b_as_key, f"attention scores at node {call.node.name!r}")
        return call.plain()
    values = not a.featured and b.featured and b.axis == b.ndim - 1
    if values and (b.heads is None or b.heads < b.ndim - 2):
        return Feat(shape, len(shape) - 1, b.segs, heads=b.heads)
    call.table.fix_value([a, b], f"matrix product at node {call.node.name!r}")
    return call.plain()
