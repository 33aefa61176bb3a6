"""Concatenation along the features, of tensors split into heads too, and a fresh tensor
filled piece by piece with ``copy_``, which is the same concatenation written in place.

Along the last axis of (…, H, L, D) tensors, concatenation joins the heads' features head by
head: head ``h`` of the result holds head ``h`` of every piece in a row (DeepSeek's query, a
part of each head without positions beside a rotated part). DeepSeek writes its key so, in
place: ``k = x.new_empty(…)``, then ``k[..., :a].copy_(k_nope)`` and ``k[..., a:].copy_(k_rot)``;
the fresh tensor then holds what was copied in, the entries not written holding no features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from accord.trace.state import Call, Feat, Seg

aten = torch.ops.aten

# operators making a tensor whose entries hold no features
_FRESH = frozenset({aten.new_empty, aten.empty, aten.new_zeros, aten.zeros, aten.empty_like})


def joined(items: list[Feat], shape: tuple[int, ...], dim: int) -> Feat | None:
    """``items`` concatenated along ``dim``, the features axis of every item with features
    (an item without features holds features no space owns), into a tensor of ``shape``;
    where items are split into heads, head by head. None where the layouts do not fit."""
    featured = [item for item in items if item.featured]
    if not featured:
        return Feat(shape)
    if any(
        item.axis != dim or item.repeat is not None or item.pieces is not None for item in featured
    ):
        return None
    if any(item.param is not None for item in items):
        return None
    head_axes = {item.heads for item in featured}
    if head_axes == {None}:
        segs = [seg for item in items for seg in (item.segs or (Seg(None, item.shape[dim]),))]
        return Feat(shape, dim, tuple(segs))
    if len(head_axes) != 1 or None in head_axes:
        return None
    (heads,) = head_axes
    count = shape[heads]
    chunks = [
        head_chunks(item) if item.featured else [(Seg(None, item.shape[dim]),)] * count
        for item in items
    ]
    if any(chunk is None or len(chunk) != count for chunk in chunks):
        return None
    segs = [seg for h in range(count) for chunk in chunks for seg in chunk[h]]  # type: ignore[index]
    return Feat(shape, dim, tuple(segs), heads=heads)


def head_chunks(item: Feat, width: int | None = None) -> list[tuple[Seg, ...]] | None:
    """The segments of each head of ``item``, split into heads of ``width`` entries (as many
    as its features axis has, unless given), or None where a segment crosses heads."""
    if not item.featured or item.heads is None:
        return None
    width = item.shape[item.axis] if width is None else width
    chunks: list[tuple[Seg, ...]] = []
    current: list[Seg] = []
    filled = 0
    for seg in item.segs:
        current.append(seg)
        filled += seg.size * seg.block
        if filled > width:
            return None
        if filled == width:
            chunks.append(tuple(current))
            current, filled = [], 0
    return None if current else chunks


def copy_into(call: Call) -> Any:
    """aten.copy_(dst, src) where ``dst`` is a slice along the last axis of a fresh tensor
    whose slices are written by copy_ alone: the fresh tensor's value becomes the
    concatenation of what has been copied into it so far (:func:`joined`), and ``src``'s
    spaces are read there. None (unknown) for any other copy."""
    dst, src = call.node.args[0], call.arg(1, "src")
    if call.node.users or not isinstance(src, Feat) or not isinstance(dst, fx.Node):
        return None
    if getattr(dst.target, "overloadpacket", None) is not aten.slice:
        return None
    fresh = dst.args[0]
    if not isinstance(fresh, fx.Node) or not _only_copied_into(fresh):
        return None
    shape = getattr(call.walk.metas.get(fresh.name), "shape", None)
    piece = getattr(call.walk.metas.get(dst.name), "shape", None)
    dim = dst.args[1] if len(dst.args) > 1 else 0
    if (
        shape is None
        or piece is None
        or not isinstance(dim, int)
        or dim % len(shape) != len(shape) - 1
    ):
        return None
    if src.shape != piece:
        return None
    bounds = (*dst.args[2:5], None, None, None)[:3]  # slice(x, dim, start, end, step)
    start, stop, step = slice(*bounds).indices(shape[-1])
    if step != 1 or stop - start != piece[-1]:
        return None
    fills = call.walk.fills.setdefault(fresh.name, {})
    if any(a < stop and start < b for a, b in fills):
        return None
    value = _filled(shape, {**fills, (start, stop): src})
    if value is None:
        return None
    fills[(start, stop)] = src
    call.walk.values[fresh.name] = value
    return call.plain()


def written_slice(node: fx.Node) -> bool:
    """A slice of a fresh tensor filled piece by piece, which copy_ writes into and nothing
    reads."""
    fresh = node.args[0] if node.args else None
    return isinstance(fresh, fx.Node) and _only_copied_into(fresh)


def _only_copied_into(fresh: fx.Node) -> bool:
    """A fresh tensor (``new_empty``) each of whose slices is written by copy_ and read by
    nothing else; what reads the tensor itself reads what was copied in."""
    if getattr(fresh.target, "overloadpacket", None) not in _FRESH:
        return False
    for user in fresh.users:
        if getattr(user.target, "overloadpacket", None) is not aten.slice:
            continue
        if any(
            getattr(u.target, "overloadpacket", None) is not aten.copy_ or u.args[0] is not user
            for u in user.users
        ):
            return False
    return True


def _filled(shape: tuple[int, ...], fills: dict[tuple[int, int], Feat]) -> Feat | None:
    """The fresh tensor of ``shape`` with ``fills`` (entry ranges of its last axis) copied in,
    the rest holding no features."""
    items, at = [], 0
    for start, stop in sorted(fills):
        if start > at:
            items.append(Feat((*shape[:-1], start - at)))
        items.append(fills[start, stop])
        at = stop
    if at < shape[-1]:
        items.append(Feat((*shape[:-1], shape[-1] - at)))
    return joined(items, shape, len(shape) - 1)


__all__ = ["copy_into", "head_chunks", "joined", "written_slice"]
