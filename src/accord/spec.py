"""Feature spaces: which tensor axes of a network move together under a re-coordination.

A :class:`FeatureSpace` of ``size`` C lists

* ``writers``: axes that produce the features (Linear rows and bias, Conv output channels).
  A transform ``T`` (C_out × C) acts on them as ``new[c] = Σ_d T[c, d] · old[d]``;
* ``readers``: axes that consume them (Linear columns, Conv input channels). They receive
  ``T⁻¹`` on the input side, ``W ← W · T⁻¹``, i.e. ``new[c] = Σ_d T⁻ᵀ[c, d] · old[d]``. Keys of
  attention also sit here: ``q·k`` is unchanged when ``q ← T q`` and ``k ← T⁻ᵀ k``;
* ``elementwise``: per-feature parameters and buffers that can only follow a permutation (norm
  gains and shifts, running statistics, depthwise kernels);
* ``batchnorms``: BatchNorms directly after a writer, which :func:`accord.batchnorm.fold_batchnorms`
  folds into that writer so that a dense map becomes exact in eval mode.

``maps`` says which transforms keep the network's function:

* ``"linear"``: any invertible map, exactly (only linear layers and foldable BatchNorm lie
  between writers and readers);
* ``"dense"``: permutations exactly, other invertible maps as an approximation (an
  elementwise nonlinearity lies in between, as in CCA Merge);
* ``"orthogonal"``: orthogonal maps exactly (query/key spaces, whose map q and k share);
* ``"permutation"``: permutations only (a LayerNorm/GroupNorm normalises across the space, or a
  depthwise convolution ties channels).

``groups`` > 1 restricts maps to block-diagonal ones with ``groups`` equal blocks (attention
heads). Statistics of a space are recorded at its ``observe`` points: node names of the traced
graph (``Spec.graph``: torch.export's, or torch.fx's for old spec files and models
torch.export cannot export) with the feature axis, and where the space is one part of that
axis the offset of its first feature; every position along the other axes is one sample.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from accord._io import read_json, write_json
from accord.errors import SpecError, did_you_mean

if TYPE_CHECKING:
    from torch import nn

MapKind = Literal["linear", "dense", "orthogonal", "permutation"]
MAP_KINDS: tuple[str, ...] = ("linear", "dense", "orthogonal", "permutation")
SPEC_FORMAT = 1


@dataclass(frozen=True)
class AxisRef:
    """An axis of a parameter or buffer that carries a space's features.

    The features occupy ``size * block`` entries from ``offset`` along ``axis``; feature ``c``
    owns the contiguous entries ``offset + c*block ... offset + (c+1)*block - 1`` (``block`` > 1
    when a Flatten gives each channel a block of a Linear layer's columns).

    ``at = (other axis, index)`` restricts the reference to the entries at ``index`` of another
    axis: one expert of a mixture of experts' parameter packed as (experts, …), whose
    features each expert permutes on its own. ``axis`` still counts the whole tensor's axes.
    """

    tensor: str
    axis: int
    block: int = 1
    offset: int = 0
    at: tuple[int, int] | None = None

    def describe(self) -> str:
        extra = "" if self.block == 1 else f", block {self.block}"
        extra += "" if self.offset == 0 else f", from {self.offset}"
        extra += "" if self.at is None else f"; axis {self.at[0]} at {self.at[1]}"
        return f"{self.tensor}[{self.axis}{extra}]"

    def apart_from(self, other: AxisRef) -> bool:
        """Whether the two lie in different entries of one other axis of a tensor (two
        experts' slices), so that they never share an entry."""
        a, b = self.at, other.at
        return a is not None and b is not None and a[0] == b[0] and a[1] != b[1]


@dataclass(frozen=True)
class Observation:
    """Where a space's activations are recorded: a graph node and the feature axis of its
    output, which holds the space's features alone, or from ``offset`` on when the space is
    one part of that axis (a piece of a fused projection). Feature ``c`` owns the ``block``
    consecutive entries from ``c * block`` there (a whole attention head owns its outputs).
    ``rows = (offsets node, g)``: only the rows of group ``g`` along axis 0 are samples, those
    between the end offsets the node ``offsets`` holds for groups ``g - 1`` and ``g`` (the
    tokens a mixture of experts sent to expert ``g``, sorted by expert), or, where that node
    is a split along axis 0, the rows of its piece ``g`` (JetMoE's). ``scatter = (index
    node, source node)``: the rows (those of the group) are rows of the source picked by the
    index, and are summed back into zeros of the source's rows, so that the samples are the
    source's rows (every token, zero where it did not reach the expert) in every model.
    ``entry = g``: only entry ``g`` along axis 0 is sampled, expert ``g``'s part of a product
    batched over the experts (``torch.bmm`` of (experts, tokens, features) by a packed
    (experts, …) parameter: every token in every expert, so samples pair by token)."""

    node: str
    axis: int
    offset: int | None = None
    block: int = 1
    rows: tuple[str, int] | None = None
    scatter: tuple[str, str] | None = None
    entry: int | None = None

    @property
    def picks_rows(self) -> bool:
        """Whether its samples are rows picked from the node's output (``rows``, ``scatter``,
        ``entry``) rather than every position of every input."""
        return self.rows is not None or self.scatter is not None or self.entry is not None

    @property
    def nodes(self) -> tuple[str, ...]:
        """The node observed and the nodes its rows are picked with (``rows``, ``scatter``)."""
        rows = () if self.rows is None else (self.rows[0],)
        return (self.node, *rows, *(self.scatter or ()))


@dataclass(frozen=True)
class FoldedNorm:
    """A BatchNorm module that directly follows a writer module, foldable into it."""

    norm: str
    writer: str


@dataclass(frozen=True)
class FeatureSpace:
    """One feature space of a network; see the module docstring."""

    name: str
    size: int
    writers: tuple[AxisRef, ...] = ()
    readers: tuple[AxisRef, ...] = ()
    elementwise: tuple[AxisRef, ...] = ()
    batchnorms: tuple[FoldedNorm, ...] = ()
    observe: tuple[Observation, ...] = ()
    maps: MapKind = "permutation"
    groups: int = 1
    free: bool = True
    reason: str = ""

    @property
    def refs(self) -> tuple[AxisRef, ...]:
        """Every axis this space moves."""
        return self.writers + self.readers + self.elementwise

    @property
    def observed_block(self) -> int:
        """Entries per feature at the observation points (1 but for whole heads)."""
        return self.observe[0].block if self.observe else 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("writers", "readers", "elementwise"):
            data[key] = [_ref_to_list(ref) for ref in getattr(self, key)]
        data["observe"] = [_observation_to_list(obs) for obs in self.observe]
        data["batchnorms"] = [[bn.norm, bn.writer] for bn in self.batchnorms]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "space") -> FeatureSpace:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}; accepted keys: {sorted(known)}")
        try:
            return cls(
                name=str(data["name"]),
                size=int(data["size"]),
                writers=tuple(_ref_from_list(r) for r in data.get("writers", ())),
                readers=tuple(_ref_from_list(r) for r in data.get("readers", ())),
                elementwise=tuple(_ref_from_list(r) for r in data.get("elementwise", ())),
                batchnorms=tuple(FoldedNorm(*bn) for bn in data.get("batchnorms", ())),
                observe=tuple(_observation_from_list(item) for item in data.get("observe", ())),
                maps=data.get("maps", "permutation"),
                groups=int(data.get("groups", 1)),
                free=bool(data.get("free", True)),
                reason=str(data.get("reason", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(
                f"{where}: malformed entry ({exc!r}); see Spec.save for the format"
            ) from exc


def _observation_to_list(obs: Observation) -> list[Any]:
    out: list[Any] = [obs.node, obs.axis, obs.offset, obs.block]
    out += [None if obs.rows is None else list(obs.rows)]
    out += [None if obs.scatter is None else list(obs.scatter), obs.entry]
    while len(out) > 2 and out[-1] == (1 if len(out) == 4 else None):
        out.pop()  # the defaults from the end
    return out


def _observation_from_list(item: Any) -> Observation:
    node, axis, *rest = item
    rest += [None] * (5 - len(rest))
    offset, block, rows, scatter, entry = rest[:5]
    return Observation(
        str(node),
        int(axis),
        None if offset is None else int(offset),
        1 if block is None else int(block),
        None if rows is None else (str(rows[0]), int(rows[1])),
        None if scatter is None else (str(scatter[0]), str(scatter[1])),
        None if entry is None else int(entry),
    )


def _ref_to_list(ref: AxisRef) -> list[Any]:
    out: list[Any] = [ref.tensor, ref.axis]
    if ref.block != 1 or ref.offset != 0 or ref.at is not None:
        out.append(ref.block)
    if ref.offset != 0 or ref.at is not None:
        out.append(ref.offset)
    if ref.at is not None:
        out.append(list(ref.at))
    return out


def _ref_from_list(item: Any) -> AxisRef:
    if isinstance(item, Mapping):
        item = dict(item)
        at = item.pop("at", None)
        return AxisRef(**item, at=None if at is None else _at(at))
    tensor, axis, *rest = item
    numbers, at = rest[:2], (_at(rest[2]) if len(rest) > 2 else None)
    return AxisRef(str(tensor), int(axis), *(int(x) for x in numbers), at=at)


def _at(value: Any) -> tuple[int, int]:
    other_axis, index = value
    return int(other_axis), int(index)


@dataclass
class Spec:
    """The feature spaces of a network, as found by :func:`accord.trace` or loaded from JSON."""

    spaces: list[FeatureSpace]
    model: str = ""
    observation: Literal["post", "pre"] = "post"
    notes: list[str] = field(default_factory=list)
    # Observation node names belong to the graph traced with these modules kept opaque.
    leaf_modules: tuple[str, ...] = ()
    # Which graph the observation nodes belong to: torch.fx's or torch.export's.
    graph: Literal["fx", "export"] = "fx"

    def __iter__(self) -> Iterator[FeatureSpace]:
        return iter(self.spaces)

    def __len__(self) -> int:
        return len(self.spaces)

    def __getitem__(self, name: str) -> FeatureSpace:
        for space in self.spaces:
            if space.name == name:
                return space
        raise SpecError(f"no space named {name!r}; spaces: {[s.name for s in self.spaces]}")

    @property
    def free_spaces(self) -> list[FeatureSpace]:
        return [s for s in self.spaces if s.free]

    def replace_space(self, name: str, **changes: Any) -> Spec:
        """A copy of this spec with one space's fields changed (e.g. ``free=False``)."""
        spaces = [replace(s, **changes) if s.name == name else s for s in self.spaces]
        self[name]
        return replace(self, spaces=spaces, notes=list(self.notes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "model": self.model,
            "observation": self.observation,
            "notes": list(self.notes),
            "leaf_modules": list(self.leaf_modules),
            "graph": self.graph,
            "spaces": [s.to_dict() for s in self.spaces],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "spec") -> Spec:
        if not isinstance(data, Mapping) or "spaces" not in data:
            raise SpecError(f"{where}: expected a JSON object with a 'spaces' list")
        spaces = [
            FeatureSpace.from_dict(s, f"{where}: spaces[{i}]") for i, s in enumerate(data["spaces"])
        ]
        return cls(
            spaces=spaces,
            model=str(data.get("model", "")),
            observation=data.get("observation", "post"),
            notes=list(data.get("notes", [])),
            leaf_modules=tuple(data.get("leaf_modules", ())),
            graph=data.get("graph", "fx"),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the spec as JSON, atomically. An axis is ``[tensor, axis(, block(, offset(,
        [other axis, index])))]``, an observation ``[node, axis(, offset or null(, block(,
        [offsets node, group] or null(, [index node, source node] or null(, entry)))))))]``."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module | None = None) -> Spec:
        """Read a spec written by :meth:`save`; validate it against ``model`` when given."""
        data = read_json(path, SpecError, missing="expected a spec written by Spec.save")
        spec = cls.from_dict(data, where=str(path))
        if model is not None:
            spec.validate(model)
        return spec

    def validate(self, model: nn.Module) -> None:
        """Raise :class:`SpecError` naming every reference that does not fit ``model``."""
        tensors = dict(model.state_dict())
        problems = [p for space in self.spaces for p in _space_problems(space, tensors)]
        problems += _overlap_problems(self.spaces)
        if problems:
            raise SpecError("spec does not fit the model:\n  " + "\n  ".join(problems))


def _space_problems(space: FeatureSpace, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    where = f"space {space.name!r}"
    problems = []
    if space.maps not in MAP_KINDS:
        problems.append(f"{where}: maps={space.maps!r} is not one of {list(MAP_KINDS)}")
    if space.size < 1 or space.groups < 1 or space.size % space.groups:
        problems.append(f"{where}: size {space.size} is not a positive multiple of groups")
    blocks = {obs.block for obs in space.observe}
    if len(blocks) > 1 or min(blocks, default=1) < 1:
        problems.append(f"{where}: its observations own blocks of {sorted(blocks)} entries")
    for ref in space.refs:
        if ref.tensor not in tensors:
            hint = _close(ref.tensor, tensors)
            problems.append(f"{where}: unknown parameter or buffer {ref.tensor!r}{hint}")
            continue
        shape = tuple(tensors[ref.tensor].shape)
        if not -len(shape) <= ref.axis < len(shape):
            problems.append(f"{where}: {ref.describe()} has no axis {ref.axis} (shape {shape})")
            continue
        if ref.at is not None and not _fits_at(ref.at, ref.axis, shape):
            problems.append(
                f"{where}: {ref.describe()} names axis {ref.at[0]} at {ref.at[1]}, which is "
                f"not an entry of another axis of the tensor (shape {shape})"
            )
            continue
        needed = ref.offset + space.size * ref.block
        if shape[ref.axis] < needed:
            problems.append(
                f"{where}: {ref.describe()} needs {needed} entries on axis {ref.axis}, "
                f"the tensor has {shape[ref.axis]} (shape {shape})"
            )
    return problems


def _fits_at(at: tuple[int, int], axis: int, shape: tuple[int, ...]) -> bool:
    """Whether ``at`` names an entry of an axis of ``shape`` other than ``axis``."""
    other_axis, index = at
    if not -len(shape) <= other_axis < len(shape):
        return False
    return other_axis % len(shape) != axis % len(shape) and 0 <= index < shape[other_axis]


def _overlap_problems(spaces: Iterable[FeatureSpace]) -> list[str]:
    owner: dict[tuple[str, int], list[tuple[int, int, AxisRef, str]]] = {}
    problems = []
    for space in spaces:
        for ref in space.refs:
            start, stop = ref.offset, ref.offset + space.size * ref.block
            for other_start, other_stop, other_ref, other in owner.get((ref.tensor, ref.axis), []):
                apart = ref.apart_from(other_ref)
                if start < other_stop and other_start < stop and other != space.name and not apart:
                    problems.append(
                        f"{ref.describe()} is claimed by spaces {other!r} and {space.name!r}"
                    )
            owner.setdefault((ref.tensor, ref.axis), []).append((start, stop, ref, space.name))
    return problems


def _close(name: str, names: Iterable[str]) -> str:
    return did_you_mean(name, names)


def spec_table(spec: Spec) -> str:
    """The spaces as a text table: name, size, maps, writers, readers, free or fixed and why."""
    from accord._table import format_table

    def refs(items: tuple[AxisRef, ...]) -> str:
        shown = ", ".join(r.describe() for r in items[:3])
        return shown + (f", +{len(items) - 3} more" if len(items) > 3 else "")

    rows = [
        [
            s.name,
            s.size,
            s.maps + (f"/{s.groups} groups" if s.groups > 1 else ""),
            refs(s.writers),
            refs(s.readers),
            "free" if s.free else f"fixed: {s.reason}",
        ]
        for s in spec.spaces
    ]
    headers = ["space", "size", "maps", "writers", "readers", "status"]
    return f"{spec.model}: {len(spec.free_spaces)} free of {len(spec)} spaces\n" + format_table(
        headers, rows
    )
