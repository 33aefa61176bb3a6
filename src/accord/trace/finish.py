"""The last step of tracing: settle the spaces, choose observation points, build the Spec.

Axes that two spaces claim identically (a module called twice, a parameter added twice)
unite those spaces; axes that two spaces claim differently fix both. Parameters that an
unknown operation also uses fix every space claiming them. The result is validated against
the model: a mismatch is a bug in the tracer, never a user error.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any

from torch import nn

from accord.errors import SpecError, TraceError
from accord.spec import AxisRef, FeatureSpace, Observation, Spec
from accord.trace.experts import groupings_held, per_expert, routing
from accord.trace.state import Feat, SpaceRecord, SpaceTable, Walk, weaker

# Observation kinds, best first: activations (their outputs, or inputs for "pre"), then
# where readers read the space, then the writers' outputs.
_KINDS = {
    "post": ("act_out", "reader_in", "writer_out"),
    "pre": ("act_in", "reader_in", "writer_out"),
}


def finish(walk: Walk, model: nn.Module, observe: str, leaves: set[str], graph: str = "fx") -> Spec:
    """The Spec of a walked graph (``graph``: "fx" or "export"), validated against ``model``."""
    table = walk.table
    parts = _union_shared(table)
    for root in table.roots():
        for ref in (r for refs in table.records[root].refs.values() for r in refs):
            if ref.tensor in walk.tainted:
                table.fix(root, walk.tainted[ref.tensor])
            if (ref.tensor, ref.axis) in walk.tainted_axes:
                table.fix(root, walk.tainted_axes[ref.tensor, ref.axis])
    _strip_overlaps(table, walk.shapes)
    roots = sorted(table.roots(), key=lambda r: table.records[r].order)
    for root in roots:
        _settle(table.records[root])
        _join_slices(table.records[root], walk.shapes)
        _add_aliases(table.records[root], walk.aliases)
    # A space left without axes (a key space absorbed by attention, a space split into
    # parts) is gone, unless it is the input or was fixed: those are reported.
    roots = [
        r
        for r in roots
        if table.records[r].is_input
        or table.records[r].reasons
        or any(table.records[r].refs.values())
    ]
    names = _names(table, roots)
    observations = _observations(walk, observe, parts)
    spaces, held = [], groupings_held(walk)
    for root in roots:
        space = _space(table.records[root], names[root], observations.get(root, []))
        routed = routing(walk, root, held) if space.free else None
        spaces += (
            [space] if routed is None else per_expert(space, table.records[root], routed, walk)
        )
    spec = Spec(
        spaces,
        type(model).__name__,
        observe,
        _notes(spaces),
        tuple(sorted(leaves)),  # type: ignore[arg-type]
        graph,  # type: ignore[arg-type]
    )
    try:
        spec.validate(model)
    except SpecError as exc:
        raise TraceError(
            f"accord.trace built an inconsistent spec (a bug; please report): {exc}"
        ) from exc
    return spec


def _union_shared(table: SpaceTable) -> dict[int, int]:
    """Spaces claiming the very same axis (shared module, parameter used twice) are one; so
    are a space writing an axis and one reading it (an embedding tied to an output layer that
    reads another space than the stream the embedding writes, as masked-LM heads do): one map
    must move both, and :func:`_tie` keeps it orthogonal. Returns, per space, its root before
    such ties joined it, whose observation points it keeps (:func:`_observations`)."""
    first: dict[Any, int] = {}
    pairs = []
    for root in table.roots():
        record = table.records[root]
        for role, refs in record.refs.items():
            for ref in refs:
                other = first.setdefault((role, ref, record.size), root)
                if other != root:
                    pairs.append((other, root))
    for a, b in pairs:
        table.union(a, b)
    parts = {space: table.find(space) for space in range(len(table.parent))}
    written = {
        (ref, table.records[root].size): root
        for root in table.roots()
        for ref in table.records[root].refs["writers"]
    }
    for root in table.roots():
        for ref in table.records[root].refs["readers"]:
            writer = written.get((ref, table.records[root].size))
            if writer is not None:
                table.union(writer, root)
    return parts


def _strip_overlaps(table: SpaceTable, shapes: dict[str, tuple[int, ...]]) -> None:
    """Overlapping claims on one axis other than the very same one (a tied weight read where
    it is written, a layer read with two layouts): fix the spaces, drop the claims."""
    claims = defaultdict(list)
    for root in table.roots():
        record = table.records[root]
        for role, refs in record.refs.items():
            for ref in refs:
                axis = ref.axis % max(len(shapes.get(ref.tensor, ())), 1)
                stop = ref.offset + record.size * ref.block
                claims[(ref.tensor, axis)].append((ref.offset, stop, root, role, ref))
    bad, tied = set(), set()
    for entries in claims.values():
        for i, (start, stop, root, role, ref) in enumerate(entries):
            for start2, stop2, root2, role2, ref2 in entries[i + 1 :]:
                same = (root, role, ref) == (root2, role2, ref2)
                if (root, ref) == (root2, ref2) and {role, role2} == {"writers", "readers"}:
                    tied.add((root, ref))
                elif not same and start < stop2 and start2 < stop and not ref.apart_from(ref2):
                    reason = f"{ref.describe()} is claimed twice, in different ways"
                    table.fix(root, reason)
                    table.fix(root2, reason)
                    bad |= {(root, role, ref), (root2, role2, ref2)}
    for root, role, ref in bad:
        refs = table.records[root].refs[role]
        refs[:] = [r for r in refs if r != ref]
    for root, ref in tied:
        _tie(table.records[root], ref)


def _tie(record: SpaceRecord, ref: AxisRef) -> None:
    """One axis both writes and reads the space (an embedding tied to the output layer): a
    writer gets ``T``, a reader ``T⁻ᵀ``, which agree for orthogonal maps, so it is listed once
    as a writer and the space keeps orthogonal maps (permutations if it had fewer)."""
    record.refs["readers"] = [r for r in record.refs["readers"] if r != ref]
    record.maps = "orthogonal" if record.maps == "linear" else weaker(record.maps, "permutation")


def _add_aliases(record: SpaceRecord, aliases: dict[str, list[str]]) -> None:
    """Every state-dict key of a tied tensor moves with it (loading a state dict writes the
    shared tensor once per key)."""
    for refs in record.refs.values():
        refs += [
            replace(ref, tensor=alias)
            for ref in list(refs)
            for alias in aliases.get(ref.tensor, ())
            if all(r.tensor != alias for r in refs)
        ]


def _settle(record: SpaceRecord) -> None:
    """Drop duplicates; per-feature parameters other than folded BatchNorms (which a dense
    map skips) allow permutations only."""
    for role, refs in record.refs.items():
        record.refs[role] = list(dict.fromkeys(refs))
    record.batchnorms = list(dict.fromkeys(record.batchnorms))
    folded = {bn.norm for bn in record.batchnorms}
    if any(ref.tensor.rpartition(".")[0] not in folded for ref in record.refs["elementwise"]):
        record.maps = weaker(record.maps, "permutation")
    if record.size > 1 and record.groups == record.size:
        record.reasons.append("its groups leave every feature in place")


def _join_slices(record: SpaceRecord, shapes: dict[str, tuple[int, ...]]) -> None:
    """Claims of every slice of a tensor's other axis (each expert of a packed parameter read
    by one space, the stream) are one claim of the whole axis."""
    for role, refs in record.refs.items():
        slices: dict[AxisRef, set[int]] = defaultdict(set)
        for ref in refs:
            if ref.at is not None:
                slices[replace(ref, at=(ref.at[0], -1))].add(ref.at[1])
        for key, found in slices.items():
            shape = shapes.get(key.tensor, ())
            if key.at is None or not shape or found != set(range(shape[key.at[0]])):
                continue
            whole = replace(key, at=None)
            kept = [r for r in refs if r.at is None or replace(r, at=(r.at[0], -1)) != key]
            record.refs[role] = refs = kept + ([] if whole in kept else [whole])


def _names(table: SpaceTable, roots: list[int]) -> dict[int, str]:
    inputs = sum(table.records[r].is_input for r in roots)
    outputs = sum(table.records[r].is_output and not table.records[r].is_input for r in roots)
    names: dict[int, str] = {}
    for root in roots:
        record = table.records[root]
        if record.is_input:
            name = "input" if inputs == 1 else record.base
        elif record.is_output:
            name = "output" if outputs == 1 else f"output:{record.base}"
        elif record.residual:
            name = f"stream:{record.base}"
        else:
            name = record.base
        taken, count = set(names.values()), 1
        unique = name
        while unique in taken:
            count += 1
            unique = f"{name}#{count}"
        names[root] = unique
    return names


def _observations(walk: Walk, observe: str, parts: dict[int, int]) -> dict[int, list[Observation]]:
    """Per root, the observation points of the best kind it has (see ``_KINDS``); a root
    that ties joined (``parts``: a stream and the space its tied output layer reads) keeps
    those of every part, so the stream is not seen only where the head's activation is."""
    kinds = _KINDS[observe]
    events = _events(walk)
    table = walk.table
    found: dict[int, dict[str, list[Observation]]] = defaultdict(dict)
    for kind, node in events:
        value = walk.values.get(node)
        if kind not in kinds or not _pure(value):
            continue
        space = value.segs[0].space
        if not table.records[table.find(space)].runs:  # whole heads are seen whole, see _runs
            part = parts.get(space, table.find(space))
            found[part].setdefault(kind, []).append(Observation(node, value.axis))
    chosen: dict[int, list[Observation]] = {}
    for part, lists in found.items():
        best = next(lists[kind] for kind in kinds if kind in lists)
        chosen.setdefault(table.find(part), []).extend(best)
    sliced: dict[int, dict[str, list[Observation]]] = defaultdict(dict)
    for kind, node in events:
        value = walk.values.get(node)
        if kind in kinds and not _pure(value):
            for space, observation in _parts(walk, node, value):
                sliced[space].setdefault(kind, []).append(observation)
    # parts of a tensor only where nothing sees it whole
    for root, lists in [*sliced.items(), *_runs(walk, kinds, events).items()]:
        if root not in chosen:
            chosen[root] = next(lists[kind] for kind in kinds if kind in lists)
    _keys_for_constant_queries(walk, chosen)
    return {root: [_scattered(walk, point) for point in points] for root, points in chosen.items()}


def _keys_for_constant_queries(walk: Walk, chosen: dict[int, list[Observation]]) -> None:
    """A q·k space whose query is the same for every input (a learned query: Perceiver's
    latents) gives no samples there; it is observed at its key instead, which its maps
    (orthogonal: ``T⁻ᵀ = T``) move alike."""
    table = walk.table
    for query, key in table.absorbed:
        root, key_root = table.find(query), table.find(key)
        points = chosen.get(root, [])
        if table.records[root].maps not in ("orthogonal", "permutation") or key_root == root:
            continue
        if points and all(p.node in walk.constant for p in points) and chosen.get(key_root):
            chosen[root] = chosen[key_root]


def _scattered(walk: Walk, point: Observation) -> Observation:
    """A point whose rows were gathered from a source (``Feat.gathered``: the tokens sent to
    an expert) is observed summed back into the source's rows (``Observation.scatter``)."""
    value = walk.values.get(point.node)
    gathered = value.gathered if isinstance(value, Feat) else None
    return point if gathered is None else replace(point, scatter=gathered)


def _events(walk: Walk) -> list[tuple[str, str]]:
    """The events in graph order, but for tensors holding one group of rows of a grouping
    (a piece of the tokens sorted by expert): how many rows a model sends to each group
    depends on its router, so two models' rows there are not the same samples."""
    events = sorted(walk.events, key=lambda event: walk.order[event[1]])
    return [
        (kind, node)
        for kind, node in events
        if getattr(walk.values.get(node), "group", None) is None
    ]


def _runs(
    walk: Walk, kinds: tuple[str, ...], events: list[tuple[str, str]]
) -> dict[int, dict[str, list[Observation]]]:
    """Per space of whole heads (``SpaceRecord.runs``), where a tensor holds it alone with each
    feature a block of entries (the heads' outputs where the output projection reads them),
    observed entry by entry; each kind keeps the points with its first point's block."""
    found: dict[int, dict[str, list[Observation]]] = defaultdict(dict)
    for kind, node in events:
        value = walk.values.get(node)
        if kind not in kinds or not isinstance(value, Feat) or not value.featured:
            continue
        if len(value.segs) != 1 or value.segs[0].space is None or value.heads is not None:
            continue
        root = walk.table.find(value.segs[0].space)
        if walk.table.records[root].runs:
            point = Observation(node, value.axis, None, value.segs[0].block)
            points = found[root].setdefault(kind, [point])
            if point.block == points[0].block and point not in points:
                points.append(point)
    return found


def _parts(walk: Walk, node: str, value: Any) -> list[tuple[int, Observation]]:
    """Each segment of one space, one entry per feature, in a tensor without heads."""
    if not isinstance(value, Feat) or not value.featured or value.heads is not None:
        return []
    found, offset = [], 0
    for seg in value.segs:
        if seg.space is not None and seg.block == 1 and not walk.table.record(seg.space).runs:
            found.append((walk.table.find(seg.space), Observation(node, value.axis, offset)))
        offset += seg.size * seg.block
    return found


def _pure(value: Any) -> bool:
    """A tensor whose feature axis is exactly one space, one entry per feature."""
    return (
        isinstance(value, Feat)
        and value.featured
        and len(value.segs) == 1
        and value.segs[0].space is not None
        and value.segs[0].block == 1
        and value.heads is None
    )


def _space(record: SpaceRecord, name: str, observe: list[Observation]) -> FeatureSpace:
    free = not record.reasons
    return FeatureSpace(
        name=name,
        size=record.size,
        writers=tuple(record.refs["writers"]),
        readers=tuple(record.refs["readers"]),
        elementwise=tuple(record.refs["elementwise"]),
        batchnorms=tuple(record.batchnorms),
        observe=tuple(observe) if free else (),
        maps=record.maps,  # type: ignore[arg-type]
        groups=record.groups,
        free=free,
        reason="; ".join(record.reasons),
    )


def _notes(spaces: list[FeatureSpace]) -> list[str]:
    notes = []
    blind = [s.name for s in spaces if s.free and not s.observe]
    if blind:
        notes.append(
            f"free spaces without observation points (inside attention modules or never seen "
            f"whole): {', '.join(blind)}; data-free methods (weight matching) align them"
        )
    return notes
