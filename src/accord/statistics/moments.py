"""Streaming float64 moments of samples its caller holds (rows of one or more feature streams),
where the statistics pass's accumulator (:mod:`accord.statistics.accumulator`) observes a traced
spec: REPAIR's channel statistics and the LLM activation matching use this one.

The formulas are the accumulator's (see :mod:`accord.statistics`), pooled over observation
points: each point ``p`` has, per stream ``i``, a shift ``s_ip`` (the point's first batch's
mean), its count ``n_p`` and its sums ``t_ip = Σ (x_i − s_ip)``; the products are summed over
the points, ``P_ij = Σ_p Σ (x_i − s_ip)(x_j − s_jp)ᵀ`` (the full matrix for the pairs asked for,
the diagonal of every stream's own). Then

    C_ij = P_ij − Σ_p t_ip t_jpᵀ / n_p = Σ_p Σ (x_i − x̄_ip)(x_j − x̄_jp)ᵀ,

the comoment about each point's own mean (with one point, the sample's), which the shift keeps
from being the difference of two large numbers when features sit far from zero (DESIGN.md §5).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from accord.errors import StatisticsError

Pair = tuple[int, int]


@dataclass
class _Point:
    shift: list[Tensor]
    total: list[Tensor]
    count: int = 0


class Moments:
    """Shifted float64 sums of ``streams`` feature streams observed together (module docs);
    ``full``: the stream pairs ``(i, j)`` whose whole comoment is kept (the diagonal of every
    stream's own always is)."""

    def __init__(self, streams: int = 1, full: Iterable[Pair] = ()) -> None:
        self.streams = streams
        self.points: dict[Hashable, _Point] = {}
        self.squares: list[Tensor | float] = [0.0] * streams
        self.products: dict[Pair, Tensor | float] = {pair: 0.0 for pair in full}
        self.count = 0

    def add(self, *rows: Tensor, point: Hashable = None) -> None:
        """One batch of samples at observation ``point``: one (samples, features) tensor per
        stream, the same samples in each."""
        if len(rows) != self.streams or len({len(r) for r in rows}) != 1:
            shapes = [tuple(r.shape) for r in rows]
            raise StatisticsError(
                f"moments of {self.streams} stream(s) take one (samples, features) tensor per "
                f"stream, the same samples in each; got shapes {shapes}"
            )
        if len(rows[0]) == 0:  # no samples: nothing to add, and no mean to shift by
            return
        rows = tuple(r.to(torch.float64) for r in rows)
        state = self.points.get(point)
        if state is None:
            state = _Point([r.mean(0) for r in rows], [torch.zeros_like(r[0]) for r in rows])
            self.points[point] = state
        centred = [r - shift for r, shift in zip(rows, state.shift, strict=True)]
        state.count += len(rows[0])
        self.count += len(rows[0])
        for i, x in enumerate(centred):
            state.total[i] = state.total[i] + x.sum(0)
            self.squares[i] = self.squares[i] + (x * x).sum(0)
        for i, j in self.products:
            self.products[(i, j)] = self.products[(i, j)] + centred[i].T @ centred[j]

    def comoment(self, i: int = 0, j: int = 0) -> Tensor:
        """``C_ij`` (module docs), for a pair kept in full."""
        if (i, j) not in self.products:
            raise KeyError(
                f"the comoment of streams {i} and {j} was not kept; pass full=[({i}, {j})]"
            )
        self._check_samples()
        result = torch.as_tensor(self.products[(i, j)]).clone()
        for state in self.points.values():
            result -= torch.outer(state.total[i], state.total[j]) / state.count
        return result

    def squared_deviations(self, i: int = 0) -> Tensor:
        """The diagonal of ``C_ii``: each feature's summed squared deviation from its mean."""
        self._check_samples()
        result = torch.as_tensor(self.squares[i]).clone()
        for state in self.points.values():
            result -= state.total[i].pow(2) / state.count
        return result.clamp_min(0)

    def mean(self, i: int = 0, point: Hashable = None) -> Tensor:
        """Stream ``i``'s mean at ``point``: ``s + t / n``."""
        self._check_samples()
        state = self.points[point]
        return state.shift[i] + state.total[i] / state.count

    def std(self, i: int = 0) -> Tensor:
        """Each feature's standard deviation (population: divided by ``n``)."""
        return (self.squared_deviations(i) / self.count).sqrt()

    def covariance(self, i: int = 0, j: int = 0) -> Tensor:
        """``C_ij / n`` (population covariance), for a pair kept in full."""
        return self.comoment(i, j) / self.count

    def _check_samples(self) -> None:
        if self.count == 0:
            raise StatisticsError("no samples were observed; moments need data")
