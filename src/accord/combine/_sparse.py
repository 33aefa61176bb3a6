"""What the task-vector combiners share: pruning (by magnitude, at random), L1 rescaling, TIES'
sign election and disjoint merge, and :func:`pruned_task_arithmetic`, of which TIES, DARE,
DELLA, Model Breadcrumbs and their variants are settings (the pruning, the sign election), as
in mergekit; :func:`sparse_task_arithmetic` names the pruning of TIES and DARE.

Notation: models ``θ_1 … θ_n`` (one tensor each), base ``θ_0``, task vectors
``τ_i = θ_i − θ_0``, per-model weights ``w_i``, scale ``λ``. The task-vector methods return
the merged task vector; the merge adds it to the receiver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from accord.combine._options import model_value


def model_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """``weights`` as floats, one per tensor (ones when None)."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} tensors")
    return [float(w) for w in weights]


_CHUNK = 2**24  # entries per pass of the histogram, bounding its temporaries


def _bits(magnitude: Tensor) -> tuple[Tensor, int]:
    """The integer bit patterns of non-negative floats (they order like the floats) and the
    shift that keeps their top 16 bits."""
    bits = magnitude.view(torch.int64 if magnitude.dtype == torch.float64 else torch.int32)
    return bits, bits.element_size() * 8 - 16


def select_largest(
    passes: Callable[[], Iterable[Sequence[Tensor]]], ks: Sequence[int]
) -> list[tuple[Tensor, int]]:
    """For each of several sets of non-negative float32/float64 values, its ``ks[j]``-th
    largest value and how many values are strictly larger. ``passes()`` yields blocks, each
    holding one flat block of every set, the same ones each time; it is called twice.

    A two-level radix select: a histogram of the values' top 16 bits finds the bucket holding
    the ``k``-th largest, and only that bucket's few values are then ranked. Memory stays a
    small fraction of the values (a block at a time), where ``topk`` or ``kthvalue`` copy them
    with 64-bit indices, several times over; blocks of any size give the same answer.
    """
    hists = [torch.zeros(2**15, dtype=torch.int64) for _ in ks]
    for blocks in passes():
        for hist, block in zip(hists, blocks, strict=True):
            bits, shift = _bits(block)
            for chunk in bits.split(_CHUNK):
                hist += torch.bincount(chunk >> shift, minlength=2**15)
    buckets, above = [], []
    for hist, k in zip(hists, ks, strict=True):
        at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[b]: entries in buckets b and up
        bucket = int((at_least >= k).nonzero().max())
        buckets.append(bucket)
        above.append(int(at_least[bucket] - hist[bucket]))  # entries in the buckets above
    inside: list[list[Tensor]] = [[] for _ in ks]
    for blocks in passes():
        for found, bucket, block in zip(inside, buckets, blocks, strict=True):
            bits, shift = _bits(block)
            for m, c in zip(block.split(_CHUNK), bits.split(_CHUNK), strict=True):
                found.append(m[(c >> shift) == bucket])
    selected = []
    for found, k, larger in zip(inside, ks, above, strict=True):
        values = torch.cat(found)
        threshold = values.topk(k - larger).values[-1]  # rank k - larger within its bucket
        selected.append((threshold, larger + int((values > threshold).sum())))
    return selected


class LargestMask:
    """The mask of the ``k`` largest-magnitude entries of a tensor, made a row block at a time
    in order once its threshold is known (:func:`select_largest`): entries above the
    threshold, and the first ``missing`` entries equal to it (ties broken by position; zeros
    left out)."""

    def __init__(self, threshold: Tensor, above: int, k: int) -> None:
        self.threshold = threshold
        self.missing = k - above if threshold > 0 else 0

    def block(self, magnitude: Tensor) -> Tensor:
        """The mask of the next block (``magnitude``: its entries' magnitudes, any shape)."""
        keep = magnitude > self.threshold
        if self.missing > 0:
            tied = (magnitude.reshape(-1) == self.threshold).nonzero().reshape(-1)
            tied = tied[: self.missing]
            keep.view(-1)[tied] = True
            self.missing -= tied.numel()
        return keep


def magnitudes(values: Tensor) -> Tensor:
    """``|values|`` flat in float32 (float64 for float64 values): what pruning ranks."""
    wide = values.dtype == torch.float64
    return values.abs().to(torch.float64 if wide else torch.float32).reshape(-1)


def magnitude_prune(delta: Tensor, density: float) -> Tensor:
    """``delta`` with all but its ``⌊density · numel⌋`` largest-magnitude entries zeroed (ties
    at the threshold broken by position). The count is truncated as mergekit truncates it;
    where it is 0, nothing is kept (mergekit keeps one entry).

    >>> magnitude_prune(torch.tensor([0.1, -3.0, 2.0, -0.5]), 0.5)
    tensor([ 0., -3.,  2., -0.])
    """
    k = int(density * delta.numel())
    if k >= delta.numel():
        return delta.clone()
    if k == 0:
        return torch.zeros_like(delta)
    return delta * largest_mask(delta, k)


def largest_mask(values: Tensor, k: int) -> Tensor:
    """A boolean mask, shaped like ``values``, of its ``k`` largest-magnitude entries (ties at
    the threshold broken by position; zeros are left out, as keeping them changes nothing). The
    masks of two counts nest: the smaller one's entries are all in the larger one's."""
    if k <= 0:
        return torch.zeros(values.shape, dtype=torch.bool)
    if k >= values.numel():
        return values != 0
    magnitude = magnitudes(values)
    [(threshold, above)] = select_largest(lambda: [[magnitude]], [k])
    return LargestMask(threshold, above, k).block(magnitude).reshape(values.shape)


def random_prune(
    delta: Tensor, drop_rate: float, generator: torch.Generator, rescale: str = "expectation"
) -> Tensor:
    """DARE: each entry kept with probability ``1 − p``; the kept ones rescaled by ``1/(1 − p)``
    (``rescale="expectation"``: the expectation is ``delta``), to ``delta``'s L1 norm
    (``"l1"``, see :func:`l1_rescaled`) or not at all (``"none"``)."""
    if drop_rate == 0:
        return delta.clone()
    return dropped(delta, torch.rand(delta.shape, generator=generator), drop_rate, rescale)


def dropped(delta: Tensor, draws: Tensor, drop_rate: float, rescale: str) -> Tensor:
    """:func:`random_prune` of ``delta`` given its uniform ``draws`` (one per entry): entries
    whose draw is below ``drop_rate`` dropped, the rest rescaled."""
    keep = draws >= drop_rate
    if rescale == "expectation":
        return delta * keep / (1 - drop_rate)
    return rescaled(delta, delta * keep, rescale)


_L1_EPS = 1e-7  # mergekit's: below it, a norm is taken for zero and nothing is rescaled


def l1_rescaled(original: Tensor, kept: Tensor) -> Tensor:
    """``kept · ‖original‖₁ / ‖kept‖₁``, so pruning keeps the L1 norm (mergekit's ``rescale``);
    ``kept`` itself where either norm is below 1e-7. Computed in the tensors' dtype, as
    mergekit computes it."""
    before = original.abs().sum()
    after = kept.abs().sum()
    if before < _L1_EPS or after < _L1_EPS:
        return kept
    return kept.mul_(before / after)


def rescaled(original: Tensor, kept: Tensor, rescale: str) -> Tensor:
    """``kept`` (a new tensor, changed in place) rescaled as ``rescale`` says: ``"l1"`` or
    ``"none"``."""
    if rescale == "l1":
        return l1_rescaled(original, kept)
    if rescale == "none":
        return kept
    raise ValueError(f"rescale={rescale!r}; expected 'l1' or 'none' here")


def elect_sign(deltas: Iterable[Tensor]) -> Tensor:
    """TIES sign election over deltas (a sequence, or a stacked tensor's first axis): the sign
    of the entry-wise sum (the sign with the larger total magnitude), +1 where the sum is 0."""
    total = sum(deltas)  # from 0 + ...: never -0.0, so copysign gives +1 where it is 0
    return torch.ones_like(total).copysign_(total)


def disjoint_merge(
    deltas: Iterable[Tensor],
    sign: Tensor,
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
) -> Tensor:
    """Per entry, the sum of the (weighted) deltas whose nonzero entry has the sign ``sign``,
    divided, with ``normalize``, by the sum of those deltas' ``weights`` (their count when
    ``weights`` is None: the disjoint mean); a sum of 0 is not divided by, and entries no delta
    agrees with are 0. Accumulated one delta at a time with boolean masks."""
    total = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign)
    for i, delta in enumerate(deltas):
        agree = delta * sign > 0  # sign is ±1: a nonzero entry of the elected sign
        total += delta * agree
        if normalize:
            divisor.add_(agree, alpha=1.0 if weights is None else float(weights[i]))
    if not normalize:
        return total
    return total.div_(divisor.masked_fill_(divisor == 0, 1.0))


def sparse_task_arithmetic(
    deltas: Iterable[Tensor],
    weights: Sequence[float] | None = None,
    *,
    scale: float = 1.0,
    prune: str | None = None,
    density: float | Sequence[float] = 1.0,
    drop_rate: float | Sequence[float] = 0.0,
    rescale: str | None = None,
    sign_election: bool = False,
    normalize: bool | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The merged task vector: each ``τ_i`` pruned (``prune`` = ``"magnitude"`` with
    ``density``, ``"random"`` with ``drop_rate``, each a number or one per model, or None),
    weighted by ``w_i``, then summed, or sign-elected and disjointly merged when
    ``sign_election``; divided by the (agreeing) weights' sum when ``normalize`` (default: with
    sign election only, as in the papers); times ``scale``.

    ``rescale`` of the pruned entries: ``"expectation"`` (random pruning's default, ``1/(1−p)``),
    ``"l1"`` (to the task vector's L1 norm) or ``"none"`` (magnitude pruning's default).

    ``deltas`` may be a generator: each task vector is then pruned as soon as it is made, so
    only the pruned ones are held together."""
    if prune not in ("magnitude", "random", None):
        raise ValueError(f"prune={prune!r}; expected 'magnitude', 'random' or None")
    if prune == "random" and generator is None:
        raise ValueError("random pruning (DARE) needs a torch.Generator for reproducibility")
    if prune == "magnitude" and rescale == "expectation":
        raise ValueError("rescale='expectation' is for random pruning; use 'l1' or 'none'")

    def pruned(delta: Tensor, i: int) -> Tensor:
        if prune == "magnitude":
            kept = magnitude_prune(delta, model_value(density, i))
            return rescaled(delta, kept, rescale or "none")
        if prune == "random":
            rate = model_value(drop_rate, i)
            return random_prune(delta, rate, generator, rescale or "expectation")
        return delta

    return pruned_task_arithmetic(
        deltas, pruned, weights, scale=scale, sign_election=sign_election, normalize=normalize
    )


def pruned_task_arithmetic(
    deltas: Iterable[Tensor],
    prune: Callable[[Tensor, int], Tensor],
    weights: Sequence[float] | None = None,
    *,
    scale: float = 1.0,
    sign_election: bool = False,
    normalize: bool | None = None,
) -> Tensor:
    """:func:`sparse_task_arithmetic` with each ``τ_i`` pruned by ``prune(τ_i, i)`` (a new
    tensor, or ``τ_i`` itself) as soon as it is made: TIES, DARE, DELLA and Model Breadcrumbs
    differ only in ``prune`` and ``sign_election``."""
    pruned = []
    for i, delta in enumerate(deltas):
        delta = prune(delta, i)
        weight = float(weights[i]) if weights is not None and i < len(weights) else 1.0
        pruned.append(delta * weight if weight != 1.0 else delta)
    if weights is not None and len(weights) != len(pruned):
        raise ValueError(f"{len(weights)} weights for {len(pruned)} tensors")
    if not pruned:
        raise ValueError("no task vectors to merge")
    if normalize is None:
        normalize = sign_election
    if sign_election:
        merged = disjoint_merge(pruned, elect_sign(pruned), weights, normalize=normalize)
    else:
        merged = sum(pruned)  # a new tensor (the sum starts from 0): in place below is safe
        total = sum(model_weights(weights, len(pruned)))
        if normalize and abs(total) >= 1e-8:
            merged = merged.div_(total)
    return merged.mul_(scale)
