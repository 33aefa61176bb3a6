"""The bookkeeping of :func:`accord.trace.trace`: traced values, feature spaces, union-find.

Every graph node (torch.fx or torch.export) gets a *value*: :class:`Feat` for a tensor,
:class:`Tup` for a tuple, or :class:`Other` for anything else (shapes, ints, None). A
tensor's features lie along one axis, laid out as *segments*: ``size`` features of one space,
each owning ``block`` consecutive entries (a Flatten of (C, H, W) gives block H·W; a concat
gives several segments). A segment whose ``space`` is None holds features no space owns (they
are never transformed).

Spaces are merged with union-find; a space's map kind only weakens as evidence arrives
(linear → dense → orthogonal → permutation), and a fixed space stays fixed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx

from accord.spec import MAP_KINDS, AxisRef, FoldedNorm

ROLES = ("writers", "readers", "elementwise")

# ATen operators that read only their input's shape, dtype and device, never its entries
SHAPE_READERS = "sym_size sym_numel sym_stride _assert_tensor_metadata dim size"
SHAPE_MAKERS = (
    "zeros_like ones_like full_like empty_like rand_like randn_like new_zeros new_ones new_full "
    "new_empty arange zeros ones full empty scalar_tensor"
)
_SHAPE_ONLY = frozenset((SHAPE_READERS + " " + SHAPE_MAKERS).split())


@dataclass(frozen=True)
class Seg:
    """``size`` features of ``space`` (None: owned by no space), ``block`` entries each."""

    space: int | None
    size: int
    block: int = 1


@dataclass(frozen=True)
class Routed:
    """Rows sorted into groups, as a mixture of experts sorts its tokens by expert: along axis
    0, group ``g`` holds the rows between the end offsets that node ``offsets`` holds for
    ``g - 1`` and ``g`` (``groups`` of them; the first group starts at row 0), or, where node
    ``offsets`` is a split along axis 0 (sizes known at run time only, JetMoE), the rows of
    its piece ``g``. ``batched``: group ``g`` is entry ``g`` of axis 0 instead, every row in
    every group (a product batched over the experts, ``torch.bmm`` by a packed parameter;
    ``offsets`` then names the first such product)."""

    offsets: str
    groups: int
    batched: bool = False


@dataclass(frozen=True)
class Feat:
    """A traced tensor.

    ``axis`` is its feature axis (non-negative) and ``segs`` their layout, or ``axis`` is None
    when no space's features lie in it. ``param`` names the parameter or buffer it is a view
    of; ``dims[i]`` is then the parameter axis behind axis ``i`` (None: broadcast, -1: sliced,
    -2: consecutive whole parameter axes merged, as a reshape of the parameter merges them,
    -3: reduced to size 1 by a reduction over the whole parameter axis ``i``).
    ``heads`` is set when attention split one space into heads: feature ``h·D + j`` then lies
    at index ``h`` of axis ``heads`` and ``j`` of axis ``axis`` (D entries). ``repeat`` is the
    axis right after ``heads`` when an expand repeats every head along it (repeat_kv of
    grouped-query attention); only a reshape joining it with the heads axis keeps the features.
    ``pieces`` is set when a reshape cut a fused projection into pieces along an axis of
    their own, before the heads (``qkv.reshape(B, L, 3, H, D)``): index ``p`` of that axis
    holds ``segs[p]``, one space per piece, until a select or unbind takes the pieces apart;
    or after the heads (``qkv.view(B, L, H, 3, D)``, each head's q, k and v in a row): index
    ``p`` holds ``segs[p::P]``, one space per head and piece.
    ``routed`` is set on the output of a mixture of experts' grouped product and what acts on
    it row by row: its rows are grouped by expert, each group computed by its own expert
    (:mod:`accord.trace.experts`).
    """

    shape: tuple[int, ...]
    axis: int | None = None
    segs: tuple[Seg, ...] = ()
    param: str | None = None
    dims: tuple[int | None, ...] = ()
    heads: int | None = None
    repeat: int | None = None
    pieces: int | None = None
    # an entrywise function of the parameter (``1 + w``, ``exp(w)``): it follows permutations
    # only, so it can scale features but never write them
    applied: bool = False
    routed: Routed | None = None
    # a view of one entry of a parameter axis, (parameter axis, index): ``W[e]``, one expert
    # of a packed (experts, …) parameter, whose axes a space claims in that slice alone
    picked: tuple[int, int] | None = None
    # (index, source): its rows are rows of the source picked by the 1-d integer index (the
    # tokens gathered for an expert), node names or state-dict keys (accord.trace.experts)
    gathered: tuple[str, str] | None = None
    # (grouping, g): its rows are group ``g`` of the grouping alone, a piece of a split along
    # axis 0 and what acts on it row by row (accord.trace.experts)
    group: tuple[Routed, int] | None = None
    # a 1-d parameter cut into heads (DeBERTa's q and v biases, ``b.view(1, 1, H, -1)``):
    # entry ``h·D + j`` at index ``h`` of axis ``heads_of[0]`` and ``j`` of axis ``heads_of[1]``
    heads_of: tuple[int, int] | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def featured(self) -> bool:
        return self.axis is not None

    def moved(self, shape: tuple[int, ...], axis: int) -> Feat:
        """The same features on axis ``axis`` of a tensor of ``shape``."""
        return Feat(tuple(shape), axis, self.segs)


@dataclass(frozen=True)
class Tup:
    """A traced tuple or list."""

    items: tuple[Any, ...]


@dataclass(frozen=True)
class Other:
    """A traced non-tensor (shape, int, None, ...), with its value from the example run."""

    value: Any = None


def graph_name(node: Any, value: Any) -> str:
    """How an observer finds a node's output in the observed module: a parameter or buffer
    by its state-dict key (the unlifted module reads it as an attribute), else the node's
    name."""
    held = value.param if isinstance(value, Feat) else None
    return held or node.name


def plain(meta: Any) -> Any:
    """The value of a node without features, from its recorded meta."""
    if isinstance(meta, TensorMeta):
        return Feat(meta.shape)
    if isinstance(meta, tuple):
        return Tup(tuple(plain(m) for m in meta))
    return Other(meta)


@dataclass(frozen=True)
class TensorMeta:
    """Shape and kind of a tensor seen while running the example input."""

    shape: tuple[int, ...]
    floating: bool


def seg_offsets(feat: Feat, scale: int = 1) -> Iterator[tuple[Seg, int]]:
    """Each segment with its first entry along the feature axis (entries times ``scale``)."""
    offset = 0
    for seg in feat.segs:
        yield seg, offset * scale
        offset += seg.size * seg.block


@dataclass
class SpaceRecord:
    """What the tracer learned about one space (merged into its union-find root)."""

    size: int
    base: str
    order: int
    refs: dict[str, list[AxisRef]] = field(default_factory=lambda: {r: [] for r in ROLES})
    batchnorms: list[FoldedNorm] = field(default_factory=list)
    maps: str = "linear"
    groups: int = 1
    reasons: list[str] = field(default_factory=list)
    residual: bool = False
    is_input: bool = False
    is_output: bool = False
    # each feature is a run of entries that only moves whole (an attention head under rotary
    # embeddings): observed entry by entry, see FeatureSpace.observed_block
    runs: bool = False
    # its groups come from a grouped convolution, so whole groups may not be permuted (the
    # groups of a split into attention heads may)
    kept_groups: bool = False
    # the row groupings of the grouped products (mixture of experts) that write or read it
    # expert by expert, and per (tensor, feature axis) they claim, the tensor's expert axis
    routed: set[Routed] = field(default_factory=set)
    expert_axes: dict[tuple[str, int], int] = field(default_factory=dict)
    # the rows of one expert's group met another expert's slice of a parameter: one space
    # for all experts
    crossed: bool = False

    def absorb(self, other: SpaceRecord) -> None:
        for role in ROLES:
            self.refs[role] += other.refs[role]
        self.batchnorms += other.batchnorms
        self.maps = weaker(self.maps, other.maps)
        self.groups = common_groups(self.size, self.groups, other.groups)
        self.reasons += other.reasons
        self.residual |= other.residual
        self.is_input |= other.is_input
        self.is_output |= other.is_output
        self.runs |= other.runs
        self.kept_groups |= other.kept_groups
        self.routed |= other.routed
        self.expert_axes.update(other.expert_axes)
        self.crossed |= other.crossed


def weaker(a: str, b: str) -> str:
    """The more restrictive of two map kinds. "dense" (exact for permutations only, see
    accord.spec) with "orthogonal" leaves permutations: an elementwise max or activation is
    not kept by rotations (a max over q's positions before q·k)."""
    if {a, b} == {"dense", "orthogonal"}:
        return "permutation"
    return a if MAP_KINDS.index(a) >= MAP_KINDS.index(b) else b


def common_groups(size: int, a: int, b: int) -> int:
    """Groups that satisfy both block constraints: blocks of gcd of the two block sizes.

    Permuting inside blocks of that size keeps both partitions into equal blocks.
    """
    return size // math.gcd(size // a, size // b)


class SpaceTable:
    """Union-find over spaces, with the operations the tracing rules need."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.records: list[SpaceRecord] = []
        # each head of a space cut into slots (q, k, v): the parts, head by head, and how many
        # slots a head has (:func:`accord.trace.heads.cut_slots`)
        self.cuts: list[tuple[list[int], int]] = []
        # (query, key) of every key space absorbed into a query space as its readers
        self.absorbed: list[tuple[int, int]] = []

    def new(self, size: int, base: str, maps: str = "linear", groups: int = 1) -> int:
        index = len(self.parent)
        self.parent.append(index)
        self.records.append(SpaceRecord(size, base, index, maps=maps, groups=groups))
        return index

    def find(self, index: int) -> int:
        while self.parent[index] != index:
            self.parent[index] = self.parent[self.parent[index]]
            index = self.parent[index]
        return index

    def record(self, index: int) -> SpaceRecord:
        return self.records[self.find(index)]

    def union(self, a: int, b: int, residual: bool = False) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The earlier space stays the root, so a stream is named after its first writer.
            ra, rb = min(ra, rb), max(ra, rb)
            self.parent[rb] = ra
            whole, part, _ = self.records[ra].base.rpartition(":")
            other, part2, _ = self.records[rb].base.rpartition(":")
            if whole and whole == other and part == part2:
                # parts of one split space joined again (the halves of a GLU): its name
                self.records[ra].base = whole
            bases = (self.records[ra].base, self.records[rb].base)
            stem, stem2 = map(_slice_stem, bases)
            if stem is not None and stem == stem2 and bases[0] != bases[1]:
                # spaces of two slices of one parameter (experts) joined: the parameter's name
                self.records[ra].base = stem
            self.records[ra].absorb(self.records[rb])
            self.records[ra].residual |= residual  # x + f(x) in one space is no stream
        return ra

    def roots(self) -> list[int]:
        return [i for i in range(len(self.parent)) if self.find(i) == i]

    def fix(self, index: int, reason: str) -> None:
        record = self.record(index)
        if reason not in record.reasons:
            record.reasons.append(reason)

    def downgrade(self, index: int, kind: str) -> None:
        record = self.record(index)
        record.maps = weaker(record.maps, kind)

    def constrain_groups(self, index: int, groups: int) -> None:
        record = self.record(index)
        record.groups = common_groups(record.size, record.groups, groups)

    def absorb_as_readers(self, query: int, key: int) -> None:
        """The key space's writers become readers of the query space (q·k is kept when
        ``q ← T q`` and ``k ← T⁻ᵀ k``); the key space is left empty."""
        into, other = self.record(query), self.record(key)
        into.refs["readers"] += other.refs["writers"]
        other.refs["writers"] = []
        into.maps = weaker(into.maps, other.maps)
        into.groups = common_groups(into.size, into.groups, other.groups)
        self.absorbed.append((query, key))

    def split_written(
        self, index: int, sizes: list[int], per_feature: bool = False
    ) -> list[int] | None:
        """A space that only has writers so far (``per_feature``: and per-feature parameters
        and folded BatchNorms, which every part lists), split into consecutive parts of
        ``sizes`` (a fused q/k/v or gate/up projection, one space per key/value head, the
        groups of a grouped convolution, each head's q, k and v); None when the space is used
        already or a part cuts across its head blocks. The old space is left empty."""
        record = self.record(index)
        used = record.refs["readers"]
        if not per_feature:
            used = used or record.refs["elementwise"] or record.batchnorms
        if used or record.reasons or record.residual or record.is_input or record.is_output:
            return None
        block = record.size // record.groups
        if sum(sizes) != record.size or not _within_blocks(sizes, block):
            return None
        parts, start = [], 0
        for number, size in enumerate(sizes):
            groups = size // block if record.groups > 1 and size % block == 0 else 1
            part = self.new(size, f"{record.base}:{number}", record.maps, groups)
            for role in ("writers", "elementwise"):
                for ref in record.refs[role]:
                    offset = ref.offset + start * ref.block
                    self.add_ref(part, role, replace(ref, offset=offset))
            self.record(part).batchnorms = list(record.batchnorms)
            self.record(part).kept_groups = record.kept_groups
            self.record(part).routed = set(record.routed)
            self.record(part).expert_axes = dict(record.expert_axes)
            self.record(part).crossed = record.crossed
            parts.append(part)
            start += size
        record.refs["writers"], record.refs["elementwise"], record.batchnorms = [], [], []
        return parts

    def only_written(self, index: int, per_feature: bool = False) -> bool:
        """The space has writers and nothing else yet: a fresh projection's output
        (``per_feature``: or also per-feature parameters, a norm's gain)."""
        record = self.record(index)
        return not (
            record.refs["readers"]
            or (record.refs["elementwise"] and not per_feature)
            or record.batchnorms
            or record.reasons
            or record.residual
            or record.is_input
            or record.is_output
        )

    def coarsen(self, index: int, factor: int) -> int | None:
        """A freshly written space (:meth:`only_written`), its per-feature parameters allowed,
        as a new space of its runs of ``factor`` consecutive features (whole attention heads),
        which move only whole: permutations of the runs, every axis giving each run ``factor``
        times its block. A gain over all the features (OLMo 2's RMSNorm of q across every
        head, whose mean of squares any permutation keeps) moves with the runs. None where the
        space's groups would split a run or cut across runs (a run must be whole groups of a
        split into heads, or the space ungrouped). The old space is left empty."""
        record = self.record(index)
        runs = record.size // factor if record.size % factor == 0 else 0
        grouped = record.groups > 1 and (record.kept_groups or record.groups % max(runs, 1))
        if not runs or not self.only_written(index, per_feature=True) or grouped:
            return None
        part = self.new(runs, record.base, "permutation")
        new = self.records[part]
        new.order, new.runs = record.order, True
        for role in ROLES:
            new.refs[role] = [replace(r, block=r.block * factor) for r in record.refs[role]]
            record.refs[role] = []
        return part

    def interleave(self, index: int, times: int) -> int | None:
        """A freshly written space (:meth:`only_written`; per-feature parameters allowed)
        whose ``times`` interleaved pieces are taken apart (``x[..., p::times]``: GPT-OSS's
        gate and up units in turn), as a space of ``size / times`` features, feature ``c``
        owning the ``times`` entries from ``c · times`` on every axis (a block). None where the
        space is grouped or used otherwise. The old space is left empty."""
        record = self.record(index)
        width = record.size // times if record.size % times == 0 else 0
        if not width or record.groups > 1 or not self.only_written(index, per_feature=True):
            return None
        part = self.new(width, record.base, record.maps)
        new = self.records[part]
        new.order, new.routed, new.crossed = record.order, set(record.routed), record.crossed
        new.expert_axes = dict(record.expert_axes)
        for role in ROLES:
            new.refs[role] = [replace(r, block=r.block * times) for r in record.refs[role]]
            record.refs[role] = []
        return part

    def fold(self, index: int, times: int) -> int | None:
        """A freshly written space (:meth:`only_written`) of ``times`` equal heads, each a
        group of its split into heads, as one space of a head's features that every head
        holds: its map acts on each head alike (the query heads that all read one key head).
        Every writer lists each head's run. None where the space is used or grouped otherwise.
        The old space is left empty."""
        record = self.record(index)
        width = record.size // times if record.size % times == 0 else 0
        if not width or not self.only_written(index) or record.kept_groups:
            return None
        if record.groups % times:
            return None
        part = self.new(width, record.base, record.maps, record.groups // times)
        self.records[part].order = record.order
        self.records[part].refs["writers"] = [
            replace(r, offset=r.offset + h * width * r.block)
            for r in record.refs["writers"]
            for h in range(times)
        ]
        record.refs["writers"] = []
        return part

    def join_parts(self, parts: list[int], per_run: int = 1) -> int | None:
        """Freshly written spaces, each claiming on every axis the entries right after the
        previous one's (as :meth:`split_written` leaves them), as one space of their runs of
        ``per_run`` parts in a row (one value head each, or each head's q, k and v), whose
        sizes repeat from run to run; permutations only. None where they do not line up.
        The parts are left empty."""
        records = [self.record(p) for p in parts]
        first, sizes = records[0], [r.size for r in records]
        width, runs = sum(sizes[:per_run]), len(parts) // per_run
        if len(parts) % per_run or sizes != sizes[:per_run] * runs:
            return None
        if not all(self.only_written(p) for p in parts) or len(set(map(self.find, parts))) < len(
            parts
        ):
            return None
        start = 0
        for record in records:
            for role in ROLES:
                expected = [replace(r, offset=r.offset + start * r.block) for r in first.refs[role]]
                if record.refs[role] != expected:
                    return None
            start += record.size
        base = first.base.rpartition(":")[0] or first.base
        part = self.new(runs, base, "permutation")
        new = self.records[part]
        new.order, new.runs = first.order, True
        for role in ROLES:
            new.refs[role] = [replace(r, block=r.block * width) for r in first.refs[role]]
        for record in records:
            for role in ROLES:
                record.refs[role] = []
        return part

    def add_ref(self, index: int, role: str, ref: AxisRef) -> None:
        self.record(index).refs[role].append(ref)

    # Operations on whole values -------------------------------------------------------------

    def spaces(self, value: Any) -> list[int]:
        """Every space with features in ``value`` (tensors, tuples, lists)."""
        if isinstance(value, Feat):
            return [seg.space for seg in value.segs if seg.space is not None]
        if isinstance(value, Tup | list | tuple):
            items = value.items if isinstance(value, Tup) else value
            return [s for item in items for s in self.spaces(item)]
        if isinstance(value, dict):
            return [s for item in value.values() for s in self.spaces(item)]
        return []

    def fix_value(self, value: Any, reason: str) -> None:
        for space in self.spaces(value):
            self.fix(space, reason)

    def downgrade_value(self, value: Any, kind: str) -> None:
        for space in self.spaces(value):
            self.downgrade(space, kind)

    def add_per_feature(
        self,
        feat: Feat,
        role: str,
        tensor: str,
        axis: int,
        scale: int = 1,
        at: tuple[int, int] | None = None,
    ) -> None:
        """``tensor``'s ``axis`` (in its slice ``at``, see AxisRef) carries ``feat``'s
        features (``scale`` entries per entry)."""
        for seg, offset in seg_offsets(feat, scale):
            if seg.space is not None:
                ref = AxisRef(tensor, axis, seg.block * scale, offset, at)
                self.add_ref(seg.space, role, ref)

    def union_layouts(self, a: Feat, b: Feat, residual: bool) -> bool:
        """Make two layouts one (same segments pairwise); False where they do not line up."""
        if not layouts_match(a, b):
            return False
        for x, y in zip(a.segs, b.segs, strict=True):
            if x.space is None or y.space is None:
                # Features nobody owns cannot follow a map, so their partner cannot either.
                self.fix_value(Feat((), 0, (x, y)), "combined with features accord cannot map")
            else:
                self.union(x.space, y.space, residual)
        return True


def _slice_stem(base: str) -> str | None:
    """``w`` of a space named after slice ``w[i]`` of a parameter, else None."""
    stem, bracket, index = base.rpartition("[")
    return stem if bracket and index.endswith("]") and index[:-1].isdigit() else None


def _within_blocks(sizes: list[int], block: int) -> bool:
    """Whether consecutive parts of ``sizes`` each lie within one block of ``block`` entries
    or are whole blocks."""
    start = 0
    for size in sizes:
        whole = start % block == 0 and size % block == 0
        if not whole and start // block != (start + size - 1) // block:
            return False
        start += size
    return True


def layouts_match(a: Feat, b: Feat) -> bool:
    """Whether two layouts have the same segment sizes and blocks, pair by pair."""
    return len(a.segs) == len(b.segs) and all(
        (x.size, x.block) == (y.size, y.block) for x, y in zip(a.segs, b.segs, strict=True)
    )


class Walk:
    """Everything the rules share while walking one graph."""

    def __init__(self, modules: dict[str, Any], keys: set[str], call_counts: dict[str, int]):
        self.table = SpaceTable()
        self.values: dict[str, Any] = {}
        self.metas: dict[str, Any] = {}
        # (kind, node name) in graph order; kinds: act_in, act_out, reader_in, writer_out.
        self.events: dict[tuple[str, str], None] = {}
        self.tainted: dict[str, str] = {}
        # (parameter, axis) -> why a space may not move that axis (a view picks some of its
        # entries by position: a map of the axis would pick others)
        self.tainted_axes: dict[tuple[str, int], str] = {}
        self.order: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        # parameter or buffer -> the other state-dict keys of the very same tensor (tied)
        self.aliases: dict[str, list[str]] = {}
        # qualified names of the modules kept opaque (torch.export walks; torch.fx keeps them
        # as single calls)
        self.leaves: set[str] = set()
        # per list of split sizes (node names or ints), the grouping of rows that splits
        # along axis 0 by those sizes cut, and where the rows so grouped were gathered from
        self.row_groups: dict[tuple[Any, ...], tuple[Routed, tuple[str, str] | None]] = {}
        # per fresh tensor filled piece by piece (copy_ into its slices), what each entry
        # range of its last axis holds (accord.trace.concat)
        self.fills: dict[str, dict[tuple[int, int], Feat]] = {}
        # whether rotary embeddings on one slot of each head of a cut join every slot of the
        # head into a whole head (else the rotated slot stays in place, accord.trace.heads),
        # and whether rotated query heads met a key that could not be mapped so
        self.join_rotated_slots = True
        self.rotated_dead_end = False
        # the nodes whose output is the same for every input (computed from parameters,
        # buffers and constants alone)
        self.constant: set[str] = set()
        self.modules = modules
        self.keys = keys
        self.call_counts = call_counts

    def taint(self, tensor: str, reason: str) -> None:
        """Any space claiming ``tensor`` will be fixed: ``tensor`` is also used opaquely."""
        self.tainted.setdefault(tensor, reason)

    def taint_axes(self, view: Feat, kept: Sequence[int | None], reason: str) -> None:
        """The parameter axes behind ``view`` that ``kept`` (the axes of the view made from
        it) no longer holds whole: any space claiming one of them will be fixed."""
        if view.param is None:
            return
        for d in set(view.dims) - set(kept):
            if d is not None and d >= 0:
                self.tainted_axes.setdefault((view.param, d), reason)


_MISSING = object()


@dataclass
class Call:
    """One call node being traced: its resolved arguments, output meta and target."""

    walk: Walk
    node: fx.Node
    meta: Any
    desc: str
    module: Any = None
    used: set[str] = field(default_factory=set)

    @property
    def table(self) -> SpaceTable:
        return self.walk.table

    def resolve(self, arg: Any) -> Any:
        """A node argument with nodes replaced by their values (Other unwrapped)."""
        if isinstance(arg, fx.Node):
            value = self.walk.values[arg.name]
            return value.value if isinstance(value, Other) else value
        if isinstance(arg, list | tuple):
            return type(arg)(self.resolve(a) for a in arg)
        if isinstance(arg, slice):
            return slice(self.resolve(arg.start), self.resolve(arg.stop), self.resolve(arg.step))
        if isinstance(arg, dict):
            return {k: self.resolve(v) for k, v in arg.items()}
        return arg

    def arg(self, index: int, name: str, default: Any = _MISSING) -> Any:
        """Argument ``index`` (positional) or ``name`` (keyword), resolved."""
        if index < len(self.node.args):
            return self.resolve(self.node.args[index])
        if name in self.node.kwargs:
            return self.resolve(self.node.kwargs[name])
        if default is _MISSING:
            raise KeyError(name)
        return default

    def schema_arg(self, index: int, name: str, default: Any = _MISSING) -> Any:
        """Argument ``name`` where the target's schema puts it (an ATen overload: keepdim is
        argument 2 of ``mean.dim`` but 3 of ``var.dim`` and keyword-only in ``var.correction``);
        ``default`` when the overload has no such argument. Targets without a schema (torch.fx's
        functions and methods) have it at ``index``."""
        schema = getattr(self.node.target, "_schema", None)
        if schema is not None:
            names = [a.name for a in schema.arguments]
            if name not in names:
                if default is _MISSING:
                    raise KeyError(name)
                return default
            index = names.index(name)
        return self.arg(index, name, default)

    @property
    def x(self) -> Any:
        """The main input: a module's input, a method's tensor, a function's first argument."""
        return self.arg(0, "input", None)

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        return self.meta.shape if isinstance(self.meta, TensorMeta) else None

    def input_node(self, index: int = 0) -> str | None:
        arg = self.node.args[index] if index < len(self.node.args) else None
        return arg.name if isinstance(arg, fx.Node) else None

    def event(self, kind: str, node: str | None = None) -> None:
        self.walk.events[(kind, node or self.node.name)] = None

    def use(self, feat: Feat) -> None:
        """Record that this call claims the parameter behind ``feat``."""
        if feat.param is not None:
            self.used.add(feat.param)

    def plain(self) -> Any:
        return plain(self.meta)

    def only_used_here(self, space: int, also: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
        """Every tensor holding ``space`` is used by tensors holding it, by this call or by the
        nodes named in ``also`` alone, so this call may re-describe the space."""
        table, walk = self.table, self.walk
        root = table.find(space)
        holders = {
            name
            for name, value in walk.values.items()
            if isinstance(value, Feat | Tup) and root in map(table.find, table.spaces(value))
        }
        nodes = {node.name: node for node in self.node.graph.nodes}
        allowed = holders | {self.node.name} | set(also)
        # A user already traced whose output lacks the space took other features (a piece of
        # a fused projection, an item of a split); any use of the space itself left a mark
        # on its record (readers, a reason) or its output holds it.
        return all(
            user.name in allowed or user.name in walk.values or _reads_shape_only(user)
            for name in holders
            for user in nodes[name].users
        )


def _reads_shape_only(node: Any) -> bool:
    """Whether the node reads no entry of its inputs (``new_empty``, ``size``)."""
    packet = getattr(node.target, "overloadpacket", None)
    return getattr(packet, "__name__", "") in _SHAPE_ONLY
