"""One space per expert: the hidden units of a mixture of experts' packed (experts, …)
parameters.

A mixture of experts sorts its tokens by expert and multiplies the rows of group ``g`` by
expert ``g``'s weights (``torch._grouped_mm``). Expert ``g``'s hidden units are then seen by
expert ``g``'s weights alone, so each expert may permute its own: a space whose every axis is
claimed by grouped products expert by expert, and whose every tensor keeps the rows of each
expert apart, is one space per expert, each moving the slice of its expert
(``AxisRef.at``) and observed on its expert's rows (``Observation.rows``).

The rows stay apart through operators that act row by row (activations, arithmetic, the
halves of a gated unit): the tracer carries ``Feat.routed`` through them only
(:func:`carry_routing`). Any other operator on such a tensor leaves its space one space for
all experts, which is exact too, only coarser.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch

from accord.spec import AxisRef, FeatureSpace
from accord.trace.state import Call, Feat, Routed, SpaceRecord, SpaceTable, Tup, Walk
from accord.trace.walk import call_args, feats

aten = torch.ops.aten

# operators that compute each output row from the same row of their inputs
_ROW_BY_ROW = """
    relu gelu silu sigmoid tanh leaky_relu elu celu selu softplus hardswish hardsigmoid
    hardtanh mish log_sigmoid softshrink hardshrink relu6 logit abs exp sqrt rsqrt square pow
    clamp clamp_min clamp_max cos sin log erf reciprocal sign log1p expm1 gt ge lt le eq ne
    where minimum maximum fmin fmax dropout clone contiguous alias detach lift_fresh_copy
    _to_copy to type_as neg add sub rsub mul div glu split split_with_sizes chunk
    tensor_split layer_norm rms_norm
"""
_ROW_PACKETS = frozenset(
    getattr(aten, name)
    for base in _ROW_BY_ROW.split()
    for name in (base, f"{base}_")
    if hasattr(aten, name)
)


def carry_routing(call: Call, result: Any) -> Any:
    """``result`` with ``Feat.routed`` kept where the call acts row by row on tensors of one
    row grouping and keeps their rows, else dropped (a rule may return its input as it is)."""
    if _name(call.node.target) in _GROUPED:
        return result  # the grouped product groups its output's rows
    groupings = {f.routed for f in feats(call_args(call)) if f.routed is not None}
    routed = next(iter(groupings)) if len(groupings) == 1 else None
    rows = {f.shape[0] for f in feats(call_args(call)) if f.routed is not None}
    packet = getattr(call.node.target, "overloadpacket", None)
    row_by_row = call.node.target is operator.getitem or packet in _ROW_PACKETS
    kept = routed is not None and row_by_row and len(rows) == 1
    return _marked(result, routed if kept else None, rows)


def _marked(value: Any, routed: Routed | None, rows: set[int]) -> Any:
    if isinstance(value, Tup):
        return Tup(tuple(_marked(item, routed, rows) for item in value.items))
    if not isinstance(value, Feat) or (value.routed is None and routed is None):
        return value
    keeps = routed is not None and value.featured and value.axis != 0 and value.ndim == 2
    keeps = keeps and value.shape[0] in rows and value.param is None and value.heads is None
    return replace(value, routed=routed if keeps else None)


# the grouped products, whose rules set ``Feat.routed``
_GROUPED = frozenset({"aten::_grouped_mm", "transformers::grouped_mm_fallback"})


def _name(target: Any) -> str:
    name = getattr(target, "name", None)
    return name() if callable(name) else ""


def routing(walk: Walk, root: int) -> Routed | None:
    """The row grouping by which ``root`` is one space per expert, or None: every axis of it
    is claimed expert by expert by grouped products of one grouping, and every tensor holding
    it has its rows grouped so."""
    table = walk.table
    record = table.records[root]
    if len(record.routed) != 1 or record.reasons or record.batchnorms or record.runs:
        return None
    refs = [ref for refs in record.refs.values() for ref in refs]
    if not refs or any((ref.tensor, ref.axis) not in record.expert_axes for ref in refs):
        return None
    (routed,) = record.routed
    for ref in refs:
        shape = walk.shapes.get(ref.tensor, ())
        if shape[record.expert_axes[ref.tensor, ref.axis]] != routed.groups:
            return None
    return routed if _rows_kept(walk.values.values(), table, root, routed) else None


def _rows_kept(values: Any, table: SpaceTable, root: int, routed: Routed) -> bool:
    for value in values:
        for feat in feats(value):
            holds = any(s.space is not None and table.find(s.space) == root for s in feat.segs)
            if holds and feat.routed != routed:
                return False
    return True


def per_expert(space: FeatureSpace, record: SpaceRecord, routed: Routed) -> list[FeatureSpace]:
    """``space`` as one space per expert: expert ``g``'s moves entry ``g`` of each tensor's
    expert axis and is observed on the rows of group ``g``."""

    def refs(items: tuple[AxisRef, ...], expert: int) -> tuple[AxisRef, ...]:
        return tuple(
            replace(ref, at=(record.expert_axes[ref.tensor, ref.axis], expert)) for ref in items
        )

    return [
        replace(
            space,
            name=f"{space.name}[{expert}]",
            writers=refs(space.writers, expert),
            readers=refs(space.readers, expert),
            elementwise=refs(space.elementwise, expert),
            observe=tuple(replace(point, rows=(routed.offsets, expert)) for point in space.observe),
        )
        for expert in range(routed.groups)
    ]


__all__ = ["carry_routing", "per_expert", "routing"]
