"""Merging a large tensor a block of rows at a time, with the same result as merging it whole.

A tensor-wise combiner whose record has a ``rowwise`` form (:class:`RowForm`) is elementwise
once each task vector's pruning is settled: TIES keeps the ``⌊density · numel⌋`` largest
entries of the whole tensor, so its threshold is found first, by two passes over the task
vector's row blocks (:func:`accord.combine._sparse.select_largest`, one model at a time), and
its ties are filled in row order; DARE's drops come from the tensor's generator, model after
model, so each model's stream starts where the previous model's ends (found by drawing and
discarding, a block at a time). The rows are read as needed (:data:`Rows`), so the float32
working set is a few blocks, not a few copies of the tensor: an embedding of 65 M entries
merges in megabytes. Blocks of any size give the results of the whole tensor, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from accord.combine._sparse import (
    LargestMask,
    dropped,
    magnitudes,
    select_largest,
    sparse_task_arithmetic,
)

# Rows ``start:stop`` of one model's tensor along its first axis, in the compute dtype: a new
# tensor or a view that the merge never writes to.
Rows = Callable[[int, int], Tensor]

BLOCK_ENTRIES = 2**20  # entries per row block: 4 MB in float32


@dataclass(frozen=True)
class RowForm:
    """How a combiner merges row blocks: each task vector (or model) pruned by ``prune``, then
    ``combine(pruned blocks)``, which must be elementwise.

    ``prune``: ``"magnitude"`` keeps each model's ``⌊amounts[i] · numel⌋`` largest entries over
    the whole tensor (:func:`accord.combine.magnitude_prune`); ``"random"`` drops entries with
    probability ``amounts[i]`` and rescales the rest as ``rescale`` says
    (:func:`accord.combine.random_prune`, ``"expectation"`` or ``"none"``: the L1 rescaling
    needs the whole tensor); None keeps everything.
    """

    combine: Callable[[list[Tensor]], Tensor]
    prune: str | None = None
    amounts: Sequence[float] = ()
    rescale: str = "none"


def task_vector_rows(
    options: Mapping[str, Any],
    *,
    sign_election: bool = False,
    prune: str | None = None,
    amounts: Sequence[float] = (),
) -> RowForm | None:
    """The row form of :func:`accord.combine.sparse_task_arithmetic` with one tensor's resolved
    ``options`` (``weight``, ``scale``, ``normalize`` and, where the combiner has one,
    ``rescale``): each task vector pruned as ``prune`` says with ``amounts`` (see
    :class:`RowForm`), then weighted and summed, or sign-elected and merged disjointly with
    ``sign_election``. None with the L1 rescaling, which needs the whole tensor."""
    rescale = options.get("rescale", "none")
    if rescale == "l1":
        return None
    merge = partial(
        sparse_task_arithmetic,
        weights=options["weight"],
        scale=options["scale"],
        sign_election=sign_election,
        normalize=options["normalize"],
    )
    return RowForm(merge, prune=prune, amounts=amounts, rescale=rescale)


def row_spans(shape: Sequence[int], block_entries: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each row block of a tensor of ``shape`` (at least one row a block,
    at most ``block_entries`` entries otherwise)."""
    rows = shape[0]
    step = max(1, block_entries // max(_width(shape), 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] or [(0, 0)]


def merge_rows(
    form: RowForm,
    shape: Sequence[int],
    models: Sequence[Rows],
    *,
    base: Rows | None = None,
    receiver: Rows | None = None,
    generator: torch.Generator | None = None,
    block_entries: int | None = None,
) -> Iterator[Tensor]:
    """The merged tensor of ``shape``, row block after row block, as ``form`` merges it.

    With ``base``, the task vectors ``model − base`` are merged and ``receiver`` (default: the
    base) is added; ``generator``: the tensor's, for random pruning. Each model's pruning is
    settled before the first block is yielded. ``block_entries``: entries per block (default
    :data:`BLOCK_ENTRIES`)."""
    spans = row_spans(shape, block_entries or BLOCK_ENTRIES)
    numel = shape[0] * _width(shape)

    def task_vector(i: int, start: int, stop: int, origin: Tensor | None) -> Tensor:
        rows = models[i](start, stop)
        return rows if origin is None else rows - origin

    prune = _pruners(form, spans, numel, models, base, task_vector, generator)
    for start, stop in spans:
        origin = base(start, stop) if base is not None else None
        pruned = [prune[i](task_vector(i, start, stop, origin)) for i in range(len(models))]
        merged = form.combine(pruned)
        if origin is not None:
            merged = merged.add_(origin if receiver is None else receiver(start, stop))
        yield merged


def _width(shape: Sequence[int]) -> int:
    """Entries per row."""
    return math.prod(shape[1:])


def _pruners(
    form: RowForm,
    spans: list[tuple[int, int]],
    numel: int,
    models: Sequence[Rows],
    base: Rows | None,
    task_vector: Callable[[int, int, int, Tensor | None], Tensor],
    generator: torch.Generator | None,
) -> list[Callable[[Tensor], Tensor]]:
    """Per model, what turns its next task-vector block into its pruned block."""
    count = len(models)
    if form.prune is None:
        return [_unchanged] * count
    if form.prune == "magnitude":
        return _magnitude(form.amounts, spans, numel, base, task_vector, count)
    if form.prune == "random":
        if generator is None:
            raise ValueError("random pruning (DARE) needs a torch.Generator for reproducibility")
        streams = _streams(generator, [form.amounts[i] != 0 for i in range(count)], numel)
        return [_random(form.amounts[i], stream, form.rescale) for i, stream in enumerate(streams)]
    raise ValueError(f"prune={form.prune!r}; expected 'magnitude', 'random' or None")


def _unchanged(delta: Tensor) -> Tensor:
    return delta


def _magnitude(
    densities: Sequence[float],
    spans: list[tuple[int, int]],
    numel: int,
    base: Rows | None,
    task_vector: Callable[[int, int, int, Tensor | None], Tensor],
    count: int,
) -> list[Callable[[Tensor], Tensor]]:
    """Each model's magnitude pruning (as :func:`accord.combine.magnitude_prune`): the
    thresholds of all models from two passes over the row blocks (each block of the base read
    once for all), then a mask a block at a time."""
    ks = [int(densities[i] * numel) for i in range(count)]
    ranked = [i for i in range(count) if 0 < ks[i] < numel]  # the others keep all or none

    def passes() -> Iterator[list[Tensor]]:
        for start, stop in spans:
            origin = base(start, stop) if base is not None else None
            yield [magnitudes(task_vector(i, start, stop, origin)) for i in ranked]

    selected = select_largest(passes, [ks[i] for i in ranked]) if ranked else []
    masks = {
        i: LargestMask(t, above, ks[i]) for i, (t, above) in zip(ranked, selected, strict=True)
    }
    pruners: list[Callable[[Tensor], Tensor]] = []
    for i in range(count):
        if i in masks:
            pruners.append(_masked(masks[i]))
        else:
            pruners.append(_unchanged if ks[i] >= numel else torch.zeros_like)
    return pruners


def _masked(mask: LargestMask) -> Callable[[Tensor], Tensor]:
    return lambda delta: delta * mask.block(magnitudes(delta)).reshape(delta.shape)


def _streams(generator: torch.Generator, draws: list[bool], numel: int) -> list[torch.Generator]:
    """One generator per model, each at the point of ``generator``'s stream where that model's
    draws start when the models draw in turn (``numel`` each, none where ``draws`` is False)."""
    streams = []
    for drawing in draws:
        stream = torch.Generator()
        stream.set_state(generator.get_state())
        streams.append(stream)
        if drawing:
            for start in range(0, numel, BLOCK_ENTRIES):
                torch.rand(min(BLOCK_ENTRIES, numel - start), generator=generator)
    return streams


def _random(drop_rate: float, stream: torch.Generator, rescale: str) -> Callable[[Tensor], Tensor]:
    """Model's DARE drops (as :func:`accord.combine.random_prune`), a block at a time."""
    if drop_rate == 0:
        return _unchanged
    return lambda delta: dropped(
        delta, torch.rand(delta.shape, generator=stream), drop_rate, rescale
    )
