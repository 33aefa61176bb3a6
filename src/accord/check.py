"""Function preservation: random re-coordinations of a model's free spaces must not change it."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from accord.apply import Transform, apply_transforms
from accord.batchnorm import fold_batchnorms
from accord.errors import SpecError
from accord.spec import FeatureSpace, Spec


def random_permutation(size: int, groups: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation that keeps each of ``groups`` equal blocks in place."""
    block = size // groups
    parts = [torch.randperm(block, generator=generator) + g * block for g in range(groups)]
    return torch.cat(parts)


def random_transform(space: FeatureSpace, generator: torch.Generator) -> Transform:
    """A random map of the kind ``space`` admits exactly (block-diagonal when grouped).

    ``linear`` spaces get ``Q₁ diag(s) Q₂`` with singular values in [0.5, 2]; ``orthogonal``
    spaces a random orthogonal map; ``dense`` and ``permutation`` spaces a permutation.
    """
    if space.maps in ("dense", "permutation"):
        return Transform.from_permutation(random_permutation(space.size, space.groups, generator))
    block = space.size // space.groups
    blocks = []
    for _ in range(space.groups):
        q1 = random_orthogonal(generator, block, block)
        if space.maps == "orthogonal":
            blocks.append(q1)
            continue
        q2 = random_orthogonal(generator, block, block)
        scales = 0.5 * 4.0 ** torch.rand(block, generator=generator, dtype=torch.float64)
        blocks.append(q1 @ torch.diag(scales) @ q2)
    return Transform.from_matrix(torch.block_diag(*blocks))


def random_orthogonal(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Haar-random orthogonal matrices of ``shape`` (…, C, C), float64: QR of a Gaussian with
    the signs of R's diagonal moved into Q, so that Q is uniformly distributed."""
    gaussian = torch.randn(*shape, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def randomly_permuted(model: nn.Module, spec: Spec, seed: int = 0) -> nn.Module:
    """A copy of ``model`` computing the same function, with every free space permuted.

    Grouped spaces (attention heads) are permuted within each group. The copy is what
    alignment methods must undo: merging a model with its permuted copy returns the model.
    """
    generator = torch.Generator().manual_seed(seed)
    transforms = {
        space.name: Transform.from_permutation(
            random_permutation(space.size, space.groups, generator)
        )
        for space in spec.free_spaces
    }
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_transforms(model.state_dict(), spec, transforms))
    return permuted


def transformed_copy(model: nn.Module, spec: Spec, transforms: dict[str, Transform]) -> nn.Module:
    """A copy of ``model`` with ``transforms`` applied, folding BatchNorms where maps are dense."""
    dense = [
        spec[name] for name, t in transforms.items() if t.permutation is None and spec[name].free
    ]
    state = fold_batchnorms(model, dense) if dense else model.state_dict()
    out = copy.deepcopy(model)
    out.load_state_dict(apply_transforms(state, spec, transforms))
    return out


# Relative output change a correct spec may show when the model cannot run in float64 and is
# checked in its own dtype: random maps with condition number up to 16 (see
# random_transform) amplify rounding; a wrong spec changes outputs by order one.
FALLBACK_RTOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class SpecCheck:
    """How :func:`check_spec` ran: the dtype of the forward passes and the tolerance used;
    ``note`` says why it is not float64 (an operator without a double kernel), else empty."""

    dtype: torch.dtype
    rtol: float
    note: str = ""


def check_spec(
    spec: Spec, model: nn.Module, example_input: Any, *, seed: int = 0, rtol: float = 1e-5
) -> SpecCheck:
    """Raise :class:`SpecError` naming the first free space whose random map changes the output.

    Permutation spaces get a random permutation, ``linear`` ones a random well-conditioned
    invertible map, ``orthogonal`` ones a random orthogonal map; ``dense`` spaces get a
    permutation, since any other map is only an approximation there. Runs in float64 and eval
    mode so that only a wrong spec, not rounding, can fail it. Each space is tested on its own,
    so that the error names the space that broke the function, then all of them together.

    A model with an operator that has no float64 kernel (``torch._grouped_mm`` of mixture of
    experts layers) is checked in its own dtype instead, with the tolerance of
    ``FALLBACK_RTOL`` (or ``rtol`` if larger), and a warning says so; the returned
    :class:`SpecCheck` records which.
    """
    spec.validate(model)
    reference_model, inputs, expected, how = _reference(model, example_input, rtol)
    generator = torch.Generator().manual_seed(seed)
    transforms = {s.name: random_transform(s, generator) for s in spec.free_spaces}
    for name, transform in transforms.items():
        error = _relative_change(spec, reference_model, inputs, expected, {name: transform})
        if error > how.rtol:
            space = spec[name]
            raise SpecError(
                f"space {name!r} ({space.maps} maps, {space.size} features) breaks the function: "
                f"relative output change {error:.2e} > {how.rtol:.0e}{_in(how)}. Its writers "
                f"{[r.describe() for r in space.writers]} or readers "
                f"{[r.describe() for r in space.readers]} are incomplete or wrong; fix the spec "
                "or mark the space fixed"
            )
    if transforms:
        error = _relative_change(spec, reference_model, inputs, expected, transforms)
        if error > how.rtol:
            raise SpecError(
                f"every space passes alone but together they change the output by {error:.2e}"
                f"{_in(how)}: two spaces claim overlapping axes"
            )
    return how


def _in(how: SpecCheck) -> str:
    return f" (checked in {how.dtype}: {how.note})" if how.note else ""


def _reference(
    model: nn.Module, example_input: Any, rtol: float
) -> tuple[nn.Module, Any, list[torch.Tensor], SpecCheck]:
    """The eval copy the check transforms, its inputs and outputs, in float64 where the model
    runs in float64, else in its own dtype."""
    reference_model = copy.deepcopy(model).double().eval()
    inputs = _to_double(example_input)
    try:
        with torch.no_grad():
            expected = _flat_outputs(_call(reference_model, inputs))
        return reference_model, inputs, expected, SpecCheck(torch.float64, rtol)
    except (RuntimeError, NotImplementedError) as exc:
        failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    dtype = _own_dtype(model)
    reference_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = _flat_outputs(_call(reference_model, example_input))
    tolerance = max(rtol, FALLBACK_RTOL.get(dtype, rtol))
    note = f"the float64 forward failed ({failure})"
    warnings.warn(
        f"check_spec: {type(model).__name__} does not run in float64 ({failure}); checked in "
        f"{dtype} with rtol {tolerance:.0e} instead",
        stacklevel=3,
    )
    return reference_model, example_input, expected, SpecCheck(dtype, tolerance, note)


def _own_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (float32 if it has none)."""
    floating = (p.dtype for p in model.parameters() if p.is_floating_point())
    return next(floating, torch.float32)


def _relative_change(
    spec: Spec,
    model: nn.Module,
    inputs: Any,
    expected: list[torch.Tensor],
    transforms: dict[str, Transform],
) -> float:
    changed = transformed_copy(model, spec, transforms).eval()
    with torch.no_grad():
        outputs = _flat_outputs(_call(changed, inputs))
    worst = 0.0
    for got, want in zip(outputs, expected, strict=True):
        scale = want.abs().max().clamp_min(1e-12)
        worst = max(worst, float((got - want).abs().max() / scale))
    return worst


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _to_double(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_to_double(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_double(v) for k, v in value.items()}
    return value


def _flat_outputs(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output.double()] if output.is_floating_point() else [output]
    items: Iterable[Any]
    if isinstance(output, dict):
        items = output.values()
    elif isinstance(output, tuple | list):
        items = output
    else:
        return []
    return [t for item in items for t in _flat_outputs(item)]
