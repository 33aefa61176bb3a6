"""One space per expert: the hidden units of a mixture of experts' packed (experts, …)
parameters.

A mixture of experts sorts its tokens by expert and multiplies the rows of group ``g`` by
expert ``g``'s weights (``torch._grouped_mm``). Expert ``g``'s hidden units are then seen by
expert ``g``'s weights alone, so each expert may permute its own: a space whose every axis is
claimed by grouped products expert by expert, and whose every tensor keeps the rows of each
expert apart, is one space per expert, each moving the slice of its expert
(``AxisRef.at``) and observed on its expert's rows (``Observation.rows``).

Without an offsets tensor (JetMoE), a split along the rows by sizes known at run time cuts
the tokens into one piece per expert (``Feat.group``), each piece runs through its expert's
slice ``W[g]`` of the packed parameter, and the pieces concatenated again in order are rows
grouped so; the split names the grouping and gives the observers each group's rows.

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
from torch import fx

from accord.spec import AxisRef, FeatureSpace, Observation
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
    """``result`` with ``Feat.routed``, ``Feat.gathered`` and ``Feat.group`` kept where the
    call keeps its input's rows, else dropped (a rule may return its input as it is):
    operators acting row by row keep all three; writers (a Linear, a grouped product) keep
    where the rows came from and the group. The grouped products set their grouping,
    ``aten.index`` its gathering, a split along axis 0 the group of each piece, and a
    concatenation of the groups of one grouping in order the grouping."""
    inputs = [f for f in feats(call_args(call)) if f.param is None]
    packet = getattr(call.node.target, "overloadpacket", None)
    grouped = _name(call.node.target) in _GROUPED or _batched(result)
    if call.node.target is operator.getitem:
        return result  # the item taken is marked as the call that made it marked it
    row_by_row = packet in _ROW_PACKETS or (packet is aten.slice and _along_features(call))
    writer = grouped or (packet in _WRITER_PACKETS and len(inputs) == 1)
    if grouped or packet is aten.index:
        own = result if isinstance(result, Feat) else Feat(())
        routed = own.routed if grouped else None
        gathered = own.gathered if packet is aten.index else _only(f.gathered for f in inputs)
        return _marked(result, routed, gathered, None, None)
    if packet is aten.split_with_sizes and _row_dim(call) == 0:
        return _split_rows(call, result)
    if packet is aten.cat and _row_dim(call) == 0:
        joined = _joined_groups(call, result)
        if joined is not None:
            return joined
    rows = {f.shape[0] for f in inputs if f.routed or f.gathered or f.group}
    routed = _only(f.routed for f in inputs) if row_by_row else None
    gathered = _only(f.gathered for f in inputs) if row_by_row or writer else None
    group = _only(f.group for f in inputs) if row_by_row or writer else None
    return _marked(result, routed, gathered, rows if len(rows) == 1 else set(), group)


def _batched(result: Any) -> bool:
    """Whether a rule marked its output as a product batched over the experts (the rule of
    ``torch.bmm`` by a packed parameter: :func:`accord.trace.aten_layers.matmul`)."""
    return isinstance(result, Feat) and result.routed is not None and result.routed.batched


def _row_dim(call: Call) -> int | None:
    """The axis a split (``split_with_sizes(x, sizes, dim)``), a concatenation
    (``cat(tensors, dim)``) or a slice (``slice(x, dim, …)``) runs along, when it is a plain
    int."""
    at = 2 if call.node.target.overloadpacket is aten.split_with_sizes else 1
    args = call.node.args
    dim = args[at] if len(args) > at else call.node.kwargs.get("dim", 0)
    return dim if isinstance(dim, int) else None


def _along_features(call: Call) -> bool:
    """A slice along an axis other than the rows (axis 0) of its input."""
    dim, x = _row_dim(call), call.x
    return isinstance(dim, int) and isinstance(x, Feat) and x.ndim > 0 and dim % x.ndim != 0


def _split_rows(call: Call, result: Any) -> Any:
    """A 2-d activation split along its rows by sizes (JetMoE cuts its tokens, sorted by
    expert, into one piece per expert by sizes known at run time): piece ``g`` holds group
    ``g`` of the grouping of those sizes, one grouping per list of sizes (the split that
    first cuts by them names it, and is where an observer finds the groups' rows)."""
    x, sizes = call.x, call.node.args[1]
    fits = isinstance(x, Feat) and x.featured and x.ndim == 2 and x.axis == 1
    fits = fits and x.param is None and x.heads is None and isinstance(result, Tup)
    fits = fits and isinstance(sizes, list | tuple) and len(sizes) >= 2
    if not fits or len(result.items) != len(sizes):
        return _marked(result, None, None, None, None)
    key = tuple(size.name if isinstance(size, fx.Node) else size for size in sizes)
    routed, _ = call.walk.row_groups.setdefault(
        key, (Routed(call.node.name, len(sizes)), x.gathered)
    )
    pieces = tuple(
        _marked(item, None, None, None, (routed, g)) for g, item in enumerate(result.items)
    )
    return Tup(pieces)


def _joined_groups(call: Call, result: Any) -> Any:
    """The pieces of every group of one grouping concatenated in order along the rows
    (JetMoE's experts' outputs): rows grouped so (``Feat.routed``), gathered where the rows
    that were split were; None for any other concatenation."""
    items = call.arg(0, "tensors")
    if not isinstance(items, list | tuple) or not all(isinstance(i, Feat) for i in items):
        return None
    groups = [item.group for item in items]
    if any(group is None for group in groups):
        return None
    routed = groups[0][0]
    if groups != [(routed, g) for g in range(routed.groups)]:
        return None
    gathered = next(
        (gathered for r, gathered in call.walk.row_groups.values() if r == routed), None
    )
    return _marked(result, routed, gathered, None, None)


def _only(marks: Any) -> Any:
    """The one mark the inputs carry, or None when they carry none or several."""
    found = {mark for mark in marks if mark is not None}
    return next(iter(found)) if len(found) == 1 else None


def _marked(
    value: Any,
    routed: Routed | None,
    gathered: Any,
    rows: set[int] | None,
    group: tuple[Routed, int] | None,
) -> Any:
    """``value`` (each item of a tuple) marked so where it is a 2-d activation with its
    features on axis 1 (a product batched over the experts: 3-d, features on axis 2) and,
    unless ``rows`` is None, as many rows as its inputs."""
    if isinstance(value, Tup):
        return Tup(tuple(_marked(item, routed, gathered, rows, group) for item in value.items))
    if not isinstance(value, Feat) or value.param is not None:
        return value  # a parameter's rows picked by an index keep their mark (aten.index)
    ndim = 3 if routed is not None and routed.batched else 2
    fits = value.featured and value.axis == ndim - 1 and value.ndim == ndim
    fits = fits and value.param is None and value.heads is None
    fits = fits and (rows is None or value.shape[0] in rows)
    marks = (routed, gathered, group) if fits else (None, None, None)
    if (value.routed, value.gathered, value.group) == marks:
        return value
    return replace(value, routed=marks[0], gathered=marks[1], group=marks[2])


# the grouped products, whose rules set ``Feat.routed``
_GROUPED = frozenset({"aten::_grouped_mm", "transformers::grouped_mm_fallback"})


def _name(target: Any) -> str:
    name = getattr(target, "name", None)
    return name() if callable(name) else ""


def groupings_held(walk: Walk) -> dict[int, set[Routed | None]]:
    """Per space (its root), the row groupings of the tensors holding it (None: a tensor
    whose rows are not grouped; a tensor holding one group of a grouping counts as grouped
    so)."""
    held: dict[int, set[Routed | None]] = {}
    for value in walk.values.values():
        for feat in feats(value):
            grouping = feat.routed if feat.group is None else feat.group[0]
            for seg in feat.segs:
                if seg.space is not None:
                    held.setdefault(walk.table.find(seg.space), set()).add(grouping)
    return held


def routing(walk: Walk, root: int, held: dict[int, set[Routed | None]]) -> Routed | None:
    """The row grouping by which ``root`` is one space per expert, or None: every axis of it
    is claimed expert by expert by grouped products of one grouping, and every tensor holding
    it has its rows grouped so (``held``: :func:`groupings_held`), and no expert's rows met
    another expert's slice of a parameter."""
    record = walk.table.records[root]
    if len(record.routed) != 1 or record.reasons or record.batchnorms or record.runs:
        return None
    if record.crossed:
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


def per_expert(
    space: FeatureSpace, record: SpaceRecord, routed: Routed, walk: Walk
) -> list[FeatureSpace]:
    """``space`` as one space per expert: expert ``g``'s moves entry ``g`` of each tensor's
    expert axis and is observed on the rows of group ``g`` (at the points holding every
    group's rows; a piece holding one group's is left out)."""
    points = [
        point
        for point in space.observe
        if getattr(walk.values.get(point.node), "routed", None) == routed
    ]

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
            observe=tuple(_picked(point, routed, expert) for point in points),
        )
        for expert in range(routed.groups)
    ]


def claim_picked_rows(call: Call, x: Feat, picked: Feat, axis: int) -> None:
    """``picked`` (rows of a packed (experts, …) parameter picked by an index, ``W[ids]``:
    each token's expert bias) combined entry by entry with ``x`` along its parameter axis
    ``axis``. Where the index is the sorted expert ids whose counts make the end offsets of
    ``x``'s row grouping (:func:`_sorted_ids`), row ``s`` in group ``g`` picks row ``g``:
    the axis is claimed expert by expert, as a grouped product claims its weight's. Any
    other index leaves the claim on every expert's rows (one space for all experts)."""
    routed, index = x.routed, picked.gathered[0] if picked.gathered else None
    if routed is None or routed.batched or index is None or picked.dims[0] != -1:
        return
    if _sorted_ids(call.node.graph, routed) != index:
        return
    for space in call.table.spaces(x):
        record = call.table.record(space)
        record.routed.add(routed)
        record.expert_axes[(picked.param, axis)] = 0


# conversions between integer and floating dtypes, which keep the expert ids
_CASTS = frozenset({aten.to, aten._to_copy, aten.type_as})


def _sorted_ids(graph: fx.Graph, routed: Routed) -> str | None:
    """The node holding sorted expert ids whose counts per expert make ``routed``'s end
    offsets: ``cumsum(histc(ids, bins=E, min=0, max=E-1))`` with ``ids = sort(…)[0]``
    ascending (transformers' grouped experts). In rows sorted so, group ``g`` is exactly the
    rows whose id is ``g``: histc puts integer ``g`` < E - 1 in bin ``g`` (bins (E-1)/E wide)
    and E - 1 in the last, which includes its upper edge."""
    nodes = {node.name: node for node in graph.nodes}
    offsets = nodes.get(routed.offsets)
    if offsets is None or _packet(offsets) is not aten.cumsum or _arg(offsets, 1, "dim") != 0:
        return None
    counts = offsets.args[0]
    if _packet(counts) is not aten.histc:
        return None
    bins, low, high = (_arg(counts, i, key) for i, key in ((1, "bins"), (2, "min"), (3, "max")))
    if (bins, low, high) != (routed.groups, 0, routed.groups - 1):
        return None
    ids = counts.args[0]
    while _packet(ids) in _CASTS:
        ids = ids.args[0]
    if not (isinstance(ids, fx.Node) and ids.target is operator.getitem and ids.args[1] == 0):
        return None
    sort = ids.args[0]
    if _packet(sort) is not aten.sort or _arg(sort, 2, "descending") not in (None, False):
        return None
    return ids.name


def _packet(node: Any) -> Any:
    return getattr(getattr(node, "target", None), "overloadpacket", None)


def _arg(node: fx.Node, at: int, key: str) -> Any:
    return node.args[at] if len(node.args) > at else node.kwargs.get(key)


def _picked(point: Observation, routed: Routed, expert: int) -> Observation:
    """``point`` observed on expert ``expert``'s rows of the grouping ``routed``."""
    if routed.batched:
        return replace(point, entry=expert)
    return replace(point, rows=(routed.offsets, expert))


__all__ = ["carry_rows", "claim_picked_rows", "groupings_held", "per_expert", "routing"]
