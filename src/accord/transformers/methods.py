"""Weight-space merge methods as plain functions on one tensor at a time.

Notation: models ``θ_1 … θ_n`` (one tensor each), base ``θ_0``, task vectors
``τ_i = θ_i − θ_0``, per-model weights ``w_i``, scale ``λ``.

- :func:`linear`: ``Σ w_i θ_i / Σ w_i`` (model soup; Wortsman et al. 2022).
- :func:`slerp`: spherical interpolation of two tensors (Shoemake 1985), linear when they are
  (anti)parallel.
- :func:`task_arithmetic`: ``λ Σ w_i τ_i`` (Ilharco et al., ICLR 2023).
- :func:`ties`: TIES-Merging (Yadav et al., NeurIPS 2023): trim each ``τ_i`` to its top
  ``density`` fraction by magnitude, elect the sign of ``Σ_i w_i τ̂_i`` per entry, and take the
  disjoint mean ``Σ_{i∈A_p} w_i τ̂_{i,p} / |A_p|`` over the models ``A_p`` whose (nonzero) entry
  agrees with the elected sign; ``λ`` times that.
- :func:`dare`: DARE (Yu et al., ICML 2024): drop each entry of ``τ_i`` with probability ``p``
  and rescale the rest by ``1/(1 − p)``, then combine by task arithmetic, or with TIES' sign
  election and disjoint mean (``sign_election=True``, "DARE-TIES").

The task-vector methods return the merged task vector; the merge adds it to the receiver.
TIES and DARE are two settings of :func:`sparse_task_arithmetic`, as in mergekit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} tensors")
    return [float(w) for w in weights]


def linear(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """``Σ w_i θ_i / Σ w_i`` (the plain mean by default)."""
    w = _weights(weights, len(tensors))
    if sum(w) == 0:
        raise ValueError("linear merge weights sum to 0")
    return sum(wi * t for wi, t in zip(w, tensors, strict=True)) / sum(w)


def slerp(a: Tensor, b: Tensor, t: float, eps: float = 1e-7) -> Tensor:
    """``sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b`` with ``cos Ω`` the cosine of ``a`` and ``b``
    (flattened, in float64); ``(1−t) a + t b`` where ``|cos Ω| > 1 − eps`` (nearly parallel,
    where the formula is ill-conditioned) or either tensor is zero.

    >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    tensor([0.7071, 0.7071])
    """
    x, y = a.flatten().double(), b.flatten().double()
    norms = float(x.norm() * y.norm())
    cos = float(x @ y) / norms if norms > 0 else 1.0
    if abs(cos) > 1 - eps:
        return (1 - t) * a + t * b
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def task_arithmetic(
    deltas: Iterable[Tensor], weights: Sequence[float] | None = None, scale: float = 1.0
) -> Tensor:
    """``λ Σ w_i τ_i``."""
    return sparse_task_arithmetic(deltas, weights, scale=scale)


_CHUNK = 2**24  # entries per pass of the histogram, bounding its temporaries


def _kth_largest(magnitude: Tensor, k: int) -> Tensor:
    """The ``k``-th largest of the non-negative float32/float64 values ``magnitude`` (flat).

    A two-level radix select: the integer bit patterns of non-negative floats order like the
    floats, so a histogram of their top 16 bits finds the bucket holding the ``k``-th largest,
    and only that bucket's few values are then ranked. Memory stays a small fraction of the
    tensor, where ``topk`` or ``kthvalue`` copy it with 64-bit indices, several times over.
    """
    bits = magnitude.view(torch.int64 if magnitude.dtype == torch.float64 else torch.int32)
    shift = bits.element_size() * 8 - 16
    hist = torch.zeros(2**15, dtype=torch.int64)
    for chunk in bits.split(_CHUNK):
        hist += torch.bincount((chunk >> shift).to(torch.int64), minlength=2**15)
    at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[b]: entries in buckets b and above
    bucket = int((at_least >= k).nonzero().max())
    rank = k - int(at_least[bucket] - hist[bucket])  # rank of the k-th largest in its bucket
    inside = torch.cat(
        [
            m[(c >> shift) == bucket]
            for m, c in zip(magnitude.split(_CHUNK), bits.split(_CHUNK), strict=True)
        ]
    )
    return inside.topk(rank).values[-1]


def magnitude_prune(delta: Tensor, density: float) -> Tensor:
    """``delta`` with all but its ``round(density · numel)`` largest-magnitude entries zeroed
    (ties at the threshold broken by position).

    >>> magnitude_prune(torch.tensor([0.1, -3.0, 2.0, -0.5]), 0.5)
    tensor([ 0., -3.,  2., -0.])
    """
    k = round(density * delta.numel())
    if k >= delta.numel():
        return delta.clone()
    if k == 0:
        return torch.zeros_like(delta)
    wide = delta.dtype == torch.float64
    magnitude = delta.abs().to(torch.float64 if wide else torch.float32).reshape(-1)
    threshold = _kth_largest(magnitude, k)
    keep = magnitude > threshold
    if threshold > 0:  # kept zeros would change nothing
        missing = k - int(keep.sum())
        keep[(magnitude == threshold).nonzero().reshape(-1)[:missing]] = True
    return delta * keep.reshape(delta.shape)


def random_prune(delta: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """DARE: each entry kept with probability ``1 − p`` and rescaled by ``1/(1 − p)``, so the
    expectation is ``delta``."""
    if drop_rate == 0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator) >= drop_rate
    return delta * keep / (1 - drop_rate)


def elect_sign(deltas: Iterable[Tensor]) -> Tensor:
    """TIES sign election over deltas (a sequence, or a stacked tensor's first axis): the sign
    of the entry-wise sum (the sign with the larger total magnitude), +1 where the sum is 0."""
    sign = sum(deltas).sign_()  # a new tensor: in place keeps one tensor of memory
    return sign.masked_fill_(sign == 0, 1.0)


def disjoint_mean(deltas: Iterable[Tensor], sign: Tensor) -> Tensor:
    """Mean, per entry, of the nonzero deltas whose sign is ``sign`` (0 where none agree);
    accumulated one delta at a time, with boolean masks (a quarter of a float tensor each)."""
    positive = sign > 0
    total = torch.zeros_like(sign)
    count = torch.zeros(sign.shape, dtype=torch.int32)
    for delta in deltas:
        agree = ((delta > 0) == positive) & (delta != 0)
        total += delta * agree
        count += agree
    return total.div_(count.clamp_min_(1))


def sparse_task_arithmetic(
    deltas: Iterable[Tensor],
    weights: Sequence[float] | None = None,
    *,
    scale: float = 1.0,
    prune: str | None = None,
    density: float = 1.0,
    drop_rate: float = 0.0,
    sign_election: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The merged task vector: each ``τ_i`` pruned (``prune`` = ``"magnitude"`` with
    ``density``, ``"random"`` with ``drop_rate``, or None), weighted by ``w_i``, then summed, or
    sign-elected and disjointly averaged when ``sign_election``; times ``scale``.

    ``deltas`` may be a generator: each task vector is then pruned as soon as it is made, so
    only the pruned ones are held together."""
    if prune not in ("magnitude", "random", None):
        raise ValueError(f"prune={prune!r}; expected 'magnitude', 'random' or None")
    if prune == "random" and generator is None:
        raise ValueError("random pruning (DARE) needs a torch.Generator for reproducibility")
    pruned = []
    for i, delta in enumerate(deltas):
        if prune == "magnitude":
            delta = magnitude_prune(delta, density)
        elif prune == "random":
            delta = random_prune(delta, drop_rate, generator)
        weight = float(weights[i]) if weights is not None and i < len(weights) else 1.0
        pruned.append(delta * weight if weight != 1.0 else delta)
    if weights is not None and len(weights) != len(pruned):
        raise ValueError(f"{len(weights)} weights for {len(pruned)} tensors")
    if not pruned:
        raise ValueError("no task vectors to merge")
    # both branches build a new tensor (sum starts from 0), so scaling in place is safe
    merged = disjoint_mean(pruned, elect_sign(pruned)) if sign_election else sum(pruned)
    return merged.mul_(scale)


def ties(
    deltas: Iterable[Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float = 0.2,
    scale: float = 1.0,
) -> Tensor:
    """TIES-Merging: trim to ``density``, elect signs, disjoint mean (see the module docs).

    >>> ties([torch.tensor([3.0, -1.0, 0.5]), torch.tensor([-2.0, -4.0, 0.1])], density=2 / 3)
    tensor([ 3.0000, -2.5000,  0.0000])
    """
    return sparse_task_arithmetic(
        deltas, weights, scale=scale, prune="magnitude", density=density, sign_election=True
    )


def dare(
    deltas: Iterable[Tensor],
    weights: Sequence[float] | None = None,
    *,
    drop_rate: float = 0.9,
    generator: torch.Generator,
    scale: float = 1.0,
    sign_election: bool = False,
) -> Tensor:
    """DARE: random drop and rescale, then task arithmetic (or TIES' sign election and disjoint
    mean with ``sign_election``, DARE-TIES)."""
    return sparse_task_arithmetic(
        deltas,
        weights,
        scale=scale,
        prune="random",
        drop_rate=drop_rate,
        sign_election=sign_election,
        generator=generator,
    )
