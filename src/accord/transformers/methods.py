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
from collections.abc import Sequence

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
    deltas: Sequence[Tensor], weights: Sequence[float] | None = None, scale: float = 1.0
) -> Tensor:
    """``λ Σ w_i τ_i``."""
    w = _weights(weights, len(deltas))
    return scale * sum(wi * d for wi, d in zip(w, deltas, strict=True))


def magnitude_prune(delta: Tensor, density: float) -> Tensor:
    """``delta`` with all but its ``round(density · numel)`` largest-magnitude entries zeroed
    (ties at the threshold broken by position).

    >>> magnitude_prune(torch.tensor([0.1, -3.0, 2.0, -0.5]), 0.5)
    tensor([ 0., -3.,  2., -0.])
    """
    keep = round(density * delta.numel())
    if keep >= delta.numel():
        return delta.clone()
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[delta.abs().flatten().topk(keep, sorted=False).indices] = True
    return delta * mask.reshape(delta.shape)


def random_prune(delta: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """DARE: each entry kept with probability ``1 − p`` and rescaled by ``1/(1 − p)``, so the
    expectation is ``delta``."""
    if drop_rate == 0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator) >= drop_rate
    return delta * keep / (1 - drop_rate)


def elect_sign(deltas: Tensor) -> Tensor:
    """TIES sign election on stacked deltas (n, …): the sign of the entry-wise sum (the sign
    with the larger total magnitude), +1 where the sum is 0."""
    sign = torch.sign(deltas.sum(0))
    return torch.where(sign == 0, torch.ones_like(sign), sign)


def disjoint_mean(deltas: Tensor, sign: Tensor) -> Tensor:
    """Mean, per entry, of the nonzero stacked deltas whose sign is ``sign`` (0 where none)."""
    agree = (torch.sign(deltas) == sign) & (deltas != 0)
    count = agree.sum(0)
    return (deltas * agree).sum(0) / count.clamp_min(1)


def sparse_task_arithmetic(
    deltas: Sequence[Tensor],
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
    sign-elected and disjointly averaged when ``sign_election``; times ``scale``."""
    w = _weights(weights, len(deltas))
    if prune == "magnitude":
        deltas = [magnitude_prune(d, density) for d in deltas]
    elif prune == "random":
        if generator is None:
            raise ValueError("random pruning (DARE) needs a torch.Generator for reproducibility")
        deltas = [random_prune(d, drop_rate, generator) for d in deltas]
    elif prune is not None:
        raise ValueError(f"prune={prune!r}; expected 'magnitude', 'random' or None")
    stacked = torch.stack([wi * d for wi, d in zip(w, deltas, strict=True)])
    if not sign_election:
        return scale * stacked.sum(0)
    return scale * disjoint_mean(stacked, elect_sign(stacked))


def ties(
    deltas: Sequence[Tensor],
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
    deltas: Sequence[Tensor],
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
