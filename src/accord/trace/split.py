"""Cutting a tensor's features into pieces along their axis, and splitting a freshly written
space into one space per piece (fused projections, GLU halves, the groups of a grouped
convolution)."""

from __future__ import annotations

from typing import Any

from accord.trace.state import Call, Feat, Seg


def cuts(x: Feat, pieces: list[tuple[int, int]]) -> list[Feat] | None:
    """``x`` cut along its feature axis into ``pieces`` (entry ranges) that follow its
    segments (a piece is whole segments), or None."""
    bounds, offset = {0}, 0
    for seg in x.segs:
        offset += seg.size * seg.block
        bounds.add(offset)
    if not all(start in bounds and stop in bounds for start, stop in pieces):
        return None
    out, offset = [], 0
    starts = []
    for seg in x.segs:
        starts.append(offset)
        offset += seg.size * seg.block
    for start, stop in pieces:
        segs = tuple(s for s, at in zip(x.segs, starts, strict=True) if start <= at < stop)
        shape = list(x.shape)
        shape[x.axis] = stop - start
        out.append(Feat(tuple(shape), x.axis, segs))
    return out


def split_features(
    call: Call,
    x: Feat,
    pieces: list[tuple[int, int]],
    also: set[str],
    per_feature: bool = False,
) -> Any:
    """The pieces of ``x`` cut along its features (entry ranges); a freshly written space (a
    fused q/k/v or gate/up projection) is split into one space per piece. None when they
    cannot be. ``per_feature``: the space may have per-feature parameters and folded
    BatchNorms already (the caller unites the parts again: the groups of a grouped
    convolution)."""
    found = cuts(x, pieces)
    if found is not None:
        return found
    if len(x.segs) != 1 or x.segs[0].space is None:
        return None
    space, block = x.segs[0].space, x.segs[0].block
    if any(start % block or stop % block for start, stop in pieces):
        return None
    if not call.only_used_here(space, also):
        return None
    sizes = [(stop - start) // block for start, stop in pieces]
    space = call.table.find(space)
    parts = call.table.split_written(space, sizes, per_feature)
    if parts is None:
        return None
    _relabel(call, space, parts, sizes)
    whole = Feat(
        x.shape,
        x.axis,
        tuple(Seg(p, n, block) for p, n in zip(parts, sizes, strict=True)),
        routed=x.routed,
        gathered=x.gathered,
        group=x.group,
    )
    source = call.input_node()
    if source is not None:
        call.walk.values[source] = whole
    return cuts(whole, pieces)


def _relabel(call: Call, space: int, parts: list[int], sizes: list[int]) -> None:
    """Every traced tensor that held the whole space holds its parts now, so that its
    observation points see them."""
    table = call.table
    for name, value in call.walk.values.items():
        whole = isinstance(value, Feat) and len(value.segs) == 1 and value.heads is None
        if whole and value.segs[0].space is not None and table.find(value.segs[0].space) == space:
            block = value.segs[0].block
            segs = tuple(Seg(p, n, block) for p, n in zip(parts, sizes, strict=True))
            call.walk.values[name] = Feat(
                value.shape,
                value.axis,
                segs,
                routed=value.routed,
                gathered=value.gathered,
                group=value.group,
            )
