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
(:func:`carry_rows`). Any other operator on such a tensor leaves its space one space for
all experts, which is exact too, only coarser.

Which tokens an expert sees depends on the model's router, so two models' rows of one expert
are different tokens. The tracer also carries where gathered rows came from
(``Feat.gathered``: ``x[index]``, through row-by-row operators and writers), and such a
point is observed with its rows summed back into the source's rows
(``Observation.scatter``): every model then gives one sample per token, zero where the token
did not reach the expert, and samples of two models pair by token.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch

from accord.spec import AxisRef, FeatureSpace
from accord.trace.state import Call, Feat, Routed, SpaceRecord, Tup, Walk
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


# writers whose every output row comes from the same row of their one activation input
_WRITER_PACKETS = frozenset({aten.linear, aten.addmm, aten.mm, aten.matmul})


def carry_rows(call: Call, result: Any) -> Any:
    """``result`` with ``Feat.routed`` and ``Feat.gathered`` kept where the call keeps its
    input's rows, else dropped (a rule may return its input as it is): operators acting row
    by row keep both; writers (a Linear, a grouped product) keep where the rows came from.
    The grouped products set their grouping, ``aten.index`` its gathering."""
    inputs = [f for f in feats(call_args(call)) if f.param is None]
    packet = getattr(call.node.target, "overloadpacket", None)
    grouped = _name(call.node.target) in _GROUPED
    row_by_row = call.node.target is operator.getitem or packet in _ROW_PACKETS
    writer = grouped or (packet in _WRITER_PACKETS and len(inputs) == 1)
    if grouped or packet is aten.index:
        own = result if isinstance(result, Feat) else Feat(())
        routed = own.routed if grouped else None
        gathered = own.gathered if packet is aten.index else _only(f.gathered for f in inputs)
        return _marked(result, routed, gathered, None)
    rows = {f.shape[0] for f in inputs if f.routed or f.gathered}
    routed = _only(f.routed for f in inputs) if row_by_row else None
    gathered = _only(f.gathered for f in inputs) if row_by_row or writer else None
    return _marked(result, routed, gathered, rows if len(rows) == 1 else set())


def _only(marks: Any) -> Any:
    """The one mark the inputs carry, or None when they carry none or several."""
    found = {mark for mark in marks if mark is not None}
    return next(iter(found)) if len(found) == 1 else None


def _marked(value: Any, routed: Routed | None, gathered: Any, rows: set[int] | None) -> Any:
    """``value`` (each item of a tuple) marked so where it is a 2-d activation with its
    features on axis 1 and, unless ``rows`` is None, as many rows as its inputs."""
    if isinstance(value, Tup):
        return Tup(tuple(_marked(item, routed, gathered, rows) for item in value.items))
    if not isinstance(value, Feat):
        return value
    fits = value.featured and value.axis != 0 and value.ndim == 2
    fits = fits and value.param is None and value.heads is None
    fits = fits and (rows is None or value.shape[0] in rows)
    marks = (routed, gathered) if fits else (None, None)
    if (value.routed, value.gathered) == marks:
        return value
    return replace(value, routed=marks[0], gathered=marks[1])


# the grouped products, whose rules set ``Feat.routed``
_GROUPED = frozenset({"aten::_grouped_mm", "transformers::grouped_mm_fallback"})


def _name(target: Any) -> str:
    name = getattr(target, "name", None)
    return name() if callable(name) else ""


def groupings_held(walk: Walk) -> dict[int, set[Routed | None]]:
    """Per space (its root), the row groupings of the tensors holding it (None: a tensor
    whose rows are not grouped)."""
    held: dict[int, set[Routed | None]] = {}
    for value in walk.values.values():
        for feat in feats(value):
            for seg in feat.segs:
                if seg.space is not None:
                    held.setdefault(walk.table.find(seg.space), set()).add(feat.routed)
    return held


def routing(walk: Walk, root: int, held: dict[int, set[Routed | None]]) -> Routed | None:
    """The row grouping by which ``root`` is one space per expert, or None: every axis of it
    is claimed expert by expert by grouped products of one grouping, and every tensor holding
    it has its rows grouped so (``held``: :func:`groupings_held`)."""
    record = walk.table.records[root]
    if len(record.routed) != 1 or record.reasons or record.batchnorms or record.runs:
        return None
    (routed,) = record.routed
    refs = [ref for refs in record.refs.values() for ref in refs]
    if not refs or held.get(root) != {routed}:
        return None
    for ref in refs:
        expert = record.expert_axes.get((ref.tensor, ref.axis))
        shape = walk.shapes.get(ref.tensor, ())
        if ref.at is not None or expert is None or len(shape) <= expert:
            return None
        if shape[expert] != routed.groups:
            return None
    return routed


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


__all__ = ["carry_rows", "groupings_held", "per_expert", "routing"]
