"""Rewrite a state dict in new coordinates: one transform per feature space.

Writers get ``T`` on their feature axis, readers get ``T⁻¹`` on theirs
(``W ← T_out · W · T_in⁻¹``, ``b ← T_out · b``), elementwise parameters follow permutations.
Dense maps need the space's BatchNorms folded into their writers first
(:func:`accord.batchnorm.fold_batchnorms`); a folded BatchNorm keeps only its shift, which
moves like a bias.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from accord.batchnorm import require_folded
from accord.errors import SpecError
from accord.spec import AxisRef, FeatureSpace, Spec

StateDict = dict[str, torch.Tensor]


# Maps solved from statistics of float32 activations carry their rounding (about sqrt(eps)
# relative after a solve): a map this close to a permutation is that permutation.
SNAP_TOLERANCE = torch.finfo(torch.float32).eps ** 0.5


def permutation_of(matrix: torch.Tensor, tol: float = SNAP_TOLERANCE) -> torch.Tensor | None:
    """``perm`` with ``matrix[c, perm[c]] ≈ 1`` when ``matrix`` is a permutation matrix to within
    ``tol`` (entrywise), else None."""
    largest = matrix.abs().argmax(dim=1)
    candidate = torch.zeros_like(matrix)
    candidate[torch.arange(matrix.shape[0]), largest] = 1.0
    is_permutation = torch.equal(largest.sort().values, torch.arange(matrix.shape[0]))
    if is_permutation and (matrix - candidate).abs().max() <= tol:
        return largest
    return None


@dataclass(frozen=True)
class Transform:
    """A change of coordinates of one space: ``matrix`` for writers, ``inverse`` for readers.

    ``matrix`` maps a model's features into the target coordinates (C × C, float64);
    ``inverse`` maps back. ``permutation`` is set when the map is a permutation: then
    ``matrix[i, permutation[i]] = 1``, i.e. new feature ``i`` is old feature ``permutation[i]``.
    """

    matrix: torch.Tensor
    inverse: torch.Tensor
    permutation: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])

    @classmethod
    def identity(cls, size: int) -> Transform:
        return cls.from_permutation(torch.arange(size))

    @classmethod
    def from_permutation(cls, permutation: torch.Tensor) -> Transform:
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        size = permutation.numel()
        matrix = torch.zeros(size, size, dtype=torch.float64)
        matrix[torch.arange(size), permutation] = 1.0
        return cls(matrix, matrix.T.clone(), permutation)

    def snapped(self, tol: float = SNAP_TOLERANCE) -> Transform:
        """This map as an exact permutation when it is one to within ``tol``, else itself.

        Applied as a permutation, it moves per-feature parameters (BatchNorm, LayerNorm)
        exactly instead of needing them folded.
        """
        if self.permutation is not None:
            return self
        perm = permutation_of(self.matrix, tol)
        return self if perm is None else Transform.from_permutation(perm)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, inverse: torch.Tensor | None = None) -> Transform:
        matrix = matrix.to(torch.float64)
        if inverse is None:
            inverse = torch.linalg.inv(matrix)
        return cls(matrix, inverse.to(torch.float64))


def sub_tensor(tensor: torch.Tensor, ref: AxisRef) -> tuple[torch.Tensor, AxisRef]:
    """The part of ``tensor`` that ``ref`` lies in (a view: its slice ``ref.at`` of another
    axis, or the whole tensor) and ``ref`` on that part."""
    if ref.at is None:
        return tensor, ref
    other_axis, index = ref.at[0] % tensor.dim(), ref.at[1]
    axis = ref.axis % tensor.dim()
    inner = AxisRef(ref.tensor, axis - (axis > other_axis), ref.block, ref.offset)
    return tensor.select(other_axis, index), inner


def transform_axis(
    tensor: torch.Tensor, ref: AxisRef, size: int, map_: torch.Tensor
) -> torch.Tensor:
    """``new[c] = Σ_d map_[c, d] · old[d]`` over the features of ``ref`` in ``tensor``."""
    return _on_part(tensor, ref, lambda part, inner: _mixed(part, inner, size, map_))


def permute_axis(tensor: torch.Tensor, ref: AxisRef, size: int, perm: torch.Tensor) -> torch.Tensor:
    """Exact gather of the features of ``ref``: new feature ``c`` is old feature ``perm[c]``."""
    return _on_part(tensor, ref, lambda part, inner: _gathered(part, inner, size, perm))


def _on_part(
    tensor: torch.Tensor, ref: AxisRef, change: Callable[[torch.Tensor, AxisRef], torch.Tensor]
) -> torch.Tensor:
    """A copy of ``tensor`` with its part of ``ref`` (:func:`sub_tensor`) replaced by
    ``change(part, ref on the part)``."""
    part, inner = sub_tensor(tensor, ref)
    changed = change(part, inner)
    if ref.at is None:
        return changed
    out = tensor.clone()
    out.select(ref.at[0] % tensor.dim(), ref.at[1]).copy_(changed)
    return out


def _mixed(tensor: torch.Tensor, ref: AxisRef, size: int, map_: torch.Tensor) -> torch.Tensor:
    axis = ref.axis % tensor.dim()
    moved = tensor.movedim(axis, 0)
    stop = ref.offset + size * ref.block
    part = moved[ref.offset : stop]
    rest = part.shape[1:]
    grouped = part.reshape(size, ref.block, -1).to(torch.float64)
    mixed = torch.einsum("cd,dbr->cbr", map_.to(torch.float64), grouped)
    out = moved.clone()
    out[ref.offset : stop] = mixed.reshape(size * ref.block, *rest).to(tensor.dtype)
    return out.movedim(0, axis)


def _gathered(tensor: torch.Tensor, ref: AxisRef, size: int, perm: torch.Tensor) -> torch.Tensor:
    axis = ref.axis % tensor.dim()
    moved = tensor.movedim(axis, 0)
    stop = ref.offset + size * ref.block
    blocks = moved[ref.offset : stop].reshape(size, ref.block, *moved.shape[1:])
    out = moved.clone()
    out[ref.offset : stop] = blocks[perm].reshape(size * ref.block, *moved.shape[1:])
    return out.movedim(0, axis)


def apply_transforms(
    state_dict: Mapping[str, torch.Tensor],
    spec: Spec,
    transforms: Mapping[str, Transform],
) -> StateDict:
    """A new state dict with the spaces in ``transforms`` re-coordinated; the input is kept."""
    out = {key: value.clone() for key, value in state_dict.items()}
    for name, transform in transforms.items():
        space = spec[name]
        if transform.size != space.size:
            raise SpecError(
                f"space {name!r} has {space.size} features, its transform is {transform.size} wide"
            )
        if transform.permutation is not None:
            _permute_space(out, space, transform.permutation)
        else:
            _map_space(out, space, transform)
    return out


def _permute_space(out: StateDict, space: FeatureSpace, perm: torch.Tensor) -> None:
    # For a permutation P, P⁻ᵀ = P: readers and elementwise entries gather like writers.
    for ref in space.refs:
        out[ref.tensor] = permute_axis(out[ref.tensor], ref, space.size, perm)


def _map_space(out: StateDict, space: FeatureSpace, transform: Transform) -> None:
    folded = {bn.norm for bn in space.batchnorms}
    for ref in space.elementwise:
        module, _, leaf = ref.tensor.rpartition(".")
        if module not in folded:
            raise SpecError(
                f"space {space.name!r}: {ref.tensor} is a per-feature parameter, so this space "
                "admits permutations only; use a permutation matcher or mark the space fixed"
            )
        if leaf == "bias":
            require_folded(out, module, space.name)
            out[ref.tensor] = transform_axis(out[ref.tensor], ref, space.size, transform.matrix)
    for ref in space.writers:
        out[ref.tensor] = transform_axis(out[ref.tensor], ref, space.size, transform.matrix)
    inverse_t = transform.inverse.T
    for ref in space.readers:
        out[ref.tensor] = transform_axis(out[ref.tensor], ref, space.size, inverse_t)
