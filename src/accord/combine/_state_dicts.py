"""Combining state dicts held in memory with any tensor-wise combiner of the registry.

:func:`merge_state_dicts` is the combine stage on its own: TIES, DARE, SLERP, ... on the state
dicts of vision models or of LLMs, the same records and functions :func:`accord.merge` and
``accord llm-merge`` use. :func:`combine_tensor` merges one tensor and is what every caller
shares: per-model options as one value per model, and, for a random combiner, a generator
seeded by ``seed`` and the tensor's name, so results depend neither on the order of work nor
on how the tensors are split into files.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from accord._finite import describe_non_finite
from accord.combine._rows import Rows, merge_rows
from accord.compatible import TensorShapes, check_same_tensors
from accord.errors import MergeError
from accord.registry import CombineMethod, lookup, resolve_options


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """The generator of tensor ``name``'s random draws."""
    # XOR keeps within the generator's 32 bits and, for one tensor, maps distinct seeds to
    # distinct streams; the name's CRC makes each tensor's stream its own.
    return torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode("utf-8")))


def combine_tensor(
    record: CombineMethod,
    name: str,
    tensors: Iterable[Tensor],
    options: Mapping[str, Any],
    seed: int = 0,
) -> Tensor:
    """Tensor ``name`` of every model (or its task vectors) merged by tensor-wise combiner
    ``record`` with ``options`` resolved for this tensor (per-model ones as lists)."""
    if record.random:
        return record.function(tensors, generator=tensor_generator(seed, name), **options)
    return record.function(tensors, **options)


def combine_rows(
    record: CombineMethod,
    name: str,
    shape: Sequence[int],
    models: Sequence[Rows],
    options: Mapping[str, Any],
    *,
    base: Rows | None = None,
    receiver: Rows | None = None,
    seed: int = 0,
    block_entries: int | None = None,
) -> Iterator[Tensor] | None:
    """Tensor ``name`` (of ``shape``, at least one axis) merged as :func:`combine_tensor`
    merges it, row block after row block (:mod:`accord.combine._rows`): the models' rows (and
    the ``base``'s, whose task vectors are merged and to which ``receiver``'s rows, default
    the base's, are added) read as needed; None when ``record`` with these ``options`` needs
    the whole tensor at once."""
    form = record.rowwise(dict(options)) if record.rowwise is not None else None
    if form is None or len(shape) == 0:
        return None
    generator = tensor_generator(seed, name) if record.random else None
    return merge_rows(
        form,
        shape,
        models,
        base=base,
        receiver=receiver,
        generator=generator,
        block_entries=block_entries,
    )


def compute_dtype(tensor: Tensor) -> Tensor:
    """``tensor`` in float32, or float64 when it is float64: the precision merges compute in
    whatever the stored dtype, rounding once to it at the end."""
    return tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


def per_model(record: CombineMethod, options: Mapping[str, Any], count: int) -> dict[str, Any]:
    """``options`` with every per-model option as a list of ``count`` values (one value given
    applies to every model); MergeError when a list has another length."""
    spread = dict(options)
    for option in record.options:
        if not option.per_model:
            continue
        value = spread[option.name]
        if isinstance(value, list | tuple):
            if len(value) != count:
                raise MergeError(
                    f"combine={record.name!r}: {option.name} has {len(value)} values for "
                    f"{count} models; give one per model, or one for all"
                )
            spread[option.name] = [float(v) for v in value]
        else:
            spread[option.name] = [value] * count
    return spread


def spread_options(record: CombineMethod, options: Mapping[str, Any], count: int) -> dict[str, Any]:
    """Resolved ``options`` of ``record`` for ``count`` models: per-model ones as lists
    (:func:`per_model`), checked together (``record.check``: e.g. DELLA's density ± epsilon
    within [0, 1]); MergeError naming the model and why."""
    spread = per_model(record, options, count)
    found = record.check(spread) if record.check is not None else None
    if found is not None:
        raise MergeError(f"combine={record.name!r}, model {found[0]}: {found[1]}")
    return spread


def check_inputs(record: CombineMethod, count: int, has_base: bool) -> None:
    """MergeError when ``record`` cannot merge ``count`` models with (or without) a base."""
    problem = record.needs.model_count_problem(record.name, count)
    if problem is not None:
        raise MergeError(f"combine={record.name!r}: {problem}")
    problem = record.needs.base_problem(f"combine={record.name!r}", has_base)
    if problem is not None:
        raise MergeError(problem)


def merge_state_dicts(
    states: Sequence[Mapping[str, Tensor]],
    combine: str = "average",
    *,
    base: Mapping[str, Tensor] | None = None,
    reference: int = 0,
    seed: int = 0,
    **options: Any,
) -> dict[str, Tensor]:
    """``states`` (state dicts of one architecture, already aligned if they need it) merged
    by the tensor-wise combiner ``combine`` (:data:`accord.registry.COMBINERS`) with
    ``options`` (per-model ones: one value, or a list of one per model).

    Task-vector combiners (TIES, DARE, task arithmetic, ...) need ``base``: they merge
    ``τ_i = θ_i − θ_base`` and add the result to the base. Tensors that are not floating
    point are copied from the base, else from state ``reference``; every tensor keeps its
    dtype (computed in float32, or float64 for float64 tensors). ``seed``: the random
    combiners' draws. Checked before any work: the combiner, its options, the number of
    models, the base, and that every state holds the same tensors; a merged tensor that is not
    finite is a MergeError naming it.

    >>> a, b = {"w": torch.tensor([3.0, -1.0])}, {"w": torch.tensor([-2.0, -4.0])}
    >>> merge_state_dicts([a, b], "linear")["w"]
    tensor([ 0.5000, -2.5000])
    >>> merge_state_dicts([a, b], "ties", base={"w": torch.zeros(2)}, density=1.0)["w"]
    tensor([ 3.0000, -2.5000])
    """
    record = lookup("combine", combine)
    if not record.tensorwise:
        raise MergeError(
            f"combine={combine!r} learns from the models and data, not from their tensors "
            f"alone: use accord.merge(models, data, combine={combine!r})"
        )
    states = list(states)
    if not 0 <= reference < max(len(states), 1):
        raise MergeError(f"reference={reference} is not a state index (0..{len(states) - 1})")
    check_inputs(record, len(states), base is not None)
    resolved = spread_options(record, resolve_options(record, options), len(states))
    _check_same_tensors(states, base)
    receiver = base if base is not None else states[reference]
    merged = {}
    for name, stored in receiver.items():
        if not stored.is_floating_point():
            merged[name] = stored.clone()
            continue
        result = _merged_tensor(record, name, states, base, resolved, seed, stored.dtype)
        problem = describe_non_finite(result)
        if problem is not None:
            raise MergeError(
                f"merged tensor {name!r} has {problem}: combine={combine!r} overflowed "
                f"{stored.dtype}; check its options and the states"
            )
        merged[name] = result
    return merged


def _merged_tensor(
    record: CombineMethod,
    name: str,
    states: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor] | None,
    options: Mapping[str, Any],
    seed: int,
    dtype: torch.dtype,
) -> Tensor:
    """Tensor ``name`` merged, in ``dtype``: by row blocks where the combiner allows (a few
    blocks in float32 at once, not a copy of every model's tensor), else whole."""
    shape = tuple(states[0][name].shape)
    models = [_rows_of(state[name]) for state in states]
    origin = _rows_of(base[name]) if base is not None else None
    blocks = combine_rows(record, name, shape, models, options, base=origin, seed=seed)
    if blocks is not None:
        return torch.cat([block.to(dtype) for block in blocks])
    tensors = [compute_dtype(state[name]) for state in states]
    if base is None:
        return combine_tensor(record, name, tensors, options, seed).to(dtype)
    whole = compute_dtype(base[name])
    deltas = (tensor - whole for tensor in tensors)
    return combine_tensor(record, name, deltas, options, seed).add_(whole).to(dtype)


def _rows_of(tensor: Tensor) -> Rows:
    return lambda start, stop: compute_dtype(tensor[start:stop])


def _check_same_tensors(
    states: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None
) -> None:
    """MergeError naming the first tensor that a state (or the base) lacks, holds with another
    shape or holds that state 0 lacks (:func:`accord.compatible.check_same_tensors`)."""
    if not states:
        raise MergeError("merge_state_dicts needs at least one state dict")
    shapes = [TensorShapes.of_state(f"state {i}", state) for i, state in enumerate(states)]
    if base is not None:
        shapes.append(TensorShapes.of_state("the base", base))
    check_same_tensors(
        shapes,
        remedy="merge_state_dicts needs the same tensors (names and shapes) in every state "
        "dict and the base",
    )
