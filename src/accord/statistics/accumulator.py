"""Streaming float64 moments of observed activations: shifted sums, chunked products, and their
reduction across ranks (see :mod:`accord.statistics` for the formulas)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from accord.errors import StatisticsError
from accord.spec import Observation
from accord.statistics.types import Pair, SpaceStatistics


@dataclass(frozen=True)
class Target:
    """What one accumulator observes: a space or a BatchNorm output, and the blocks it keeps.

    ``block`` > 1: each feature owns ``block`` consecutive entries of the ``size`` observed
    ones, and only the products of entries at one position of two features are summed
    (:class:`SpaceStatistics`).
    """

    name: str
    size: int
    points: tuple[Observation, ...]
    pairs: tuple[Pair, ...]
    kind: Literal["space", "BatchNorm"] = "space"
    block: int = 1

    @property
    def product_shape(self) -> tuple[int, ...]:
        """The shape of one pair's sum of products: (size, size), or (block, F, F) for F
        features of ``block`` entries."""
        if self.block == 1:
            return (self.size, self.size)
        features = self.size // self.block
        return (self.block, features, features)

    def describe(self) -> str:
        return f"{self.kind} {self.name!r}"


# Samples are converted about this many values at a time, so that each converted chunk is
# summed and multiplied while it is in cache; it also bounds the chunk's memory.
CHUNK_ELEMENTS = 1 << 18


class Scratch:
    """The one buffer every accumulator of a pass writes the chunk it is summing into: the
    same memory for every chunk of every observation, so it stays in cache and no fresh pages
    are faulted in per chunk."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = shape[0] * shape[1]
        buffer = self.buffers.get((dtype, device))
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


def product_dtype(precision: str, activations: torch.dtype) -> torch.dtype:
    """The dtype chunks are shifted and multiplied in: float64 under ``"float64"``; under
    ``"float32"`` the activations' own dtype, at least float32 (float64 activations keep
    float64 products, half-precision ones get float32)."""
    if precision == "float64":
        return torch.float64
    return torch.promote_types(activations, torch.float32)


@dataclass(frozen=True)
class Source:
    """One model's observed tensor as G groups of S positions: ``G·S`` samples of C features.

    ``tensor`` is (G, S, C) when the features are last in memory (tokens, channels-last),
    else (G, C, S) (a (N, C, H, W) conv output is (N, C, H·W)), so reading it is in order.
    """

    tensor: torch.Tensor
    features_last: bool

    @classmethod
    def of(cls, tensor: torch.Tensor, axis: int) -> Source:
        source = tensor.detach()
        size, groups = source.shape[axis], source.shape[:axis].numel()
        positions = source.numel() // max(groups * size, 1)
        moved = source.movedim(axis, -1)
        if moved.is_contiguous():
            return cls(moved.reshape(groups, positions, size), True)
        return cls(source.contiguous().reshape(groups, size, positions), False)

    @property
    def samples(self) -> int:
        return self.tensor.shape[0] * self.positions

    @property
    def positions(self) -> int:
        return self.tensor.shape[1 if self.features_last else 2]

    @property
    def step(self) -> int:
        """Groups per chunk."""
        return max(1, CHUNK_ELEMENTS // max(self.tensor[0].numel(), 1))

    def chunks(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of each chunk's groups."""
        for start in range(0, self.tensor.shape[0], self.step):
            yield start, min(start + self.step, self.tensor.shape[0])

    def chunk(
        self, start: int, stop: int, shift: torch.Tensor, rows: bool, out: torch.Tensor
    ) -> torch.Tensor:
        """``x − s`` of groups ``start:stop`` written into ``out`` (in its dtype, one pass),
        as (k·S, C) rows or (C, k·S) columns: either way one long matmul. Reading is in
        order when rows are taken from features-last tensors and columns from the others.
        ``shift`` is ``s`` in ``out``'s dtype."""
        part = self.tensor[start:stop]
        if self.features_last:  # (k, S, C)
            view = part if rows else part.permute(2, 0, 1)
        else:  # (k, C, S)
            view = part.transpose(1, 2) if rows else part.transpose(0, 1)
        torch.sub(view, shift if rows else shift[:, None, None], out=out.view(view.shape))
        return out

    def chunk_shape(self, start: int, stop: int, rows: bool) -> tuple[int, int]:
        samples = (stop - start) * self.positions
        size = self.tensor.shape[2 if self.features_last else 1]
        return (samples, size) if rows else (size, samples)


def _reused(
    memory: list[torch.Tensor],
    index: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The ``index``-th kept chunk's memory: last batch's, grown when this chunk is larger.
    A kept chunk is read until the batch ends (:meth:`Accumulator.add`), so the next batch
    may overwrite it."""
    numel = shape[0] * shape[1]
    if index == len(memory):
        memory.append(torch.empty(numel, dtype=dtype, device=device))
    elif memory[index].numel() < numel:
        memory[index] = torch.empty(numel, dtype=dtype, device=device)
    return memory[index][:numel].view(shape)


def _add_products(
    product: torch.Tensor, x: torch.Tensor, y: torch.Tensor, rows: bool, block: int
) -> None:
    """``product += Σ_samples x yᵀ`` of two chunks, or for features of ``block`` entries only
    its entries at one position of two features, as (block, F, F) (:class:`Target`): in the
    chunks' dtype, summed into the product's (float64)."""
    if block == 1:
        left, right = (x.T, y) if rows else (x, y.T)
    else:
        left, right = _by_position(x, rows, block), _by_position(y, rows, block).mT
    if x.dtype != product.dtype:  # add_ converts the chunk's product as it sums it
        product.add_(left @ right)
    elif block == 1:
        product.addmm_(left, right)
    else:
        product.baddbmm_(left, right)


def _by_position(x: torch.Tensor, rows: bool, block: int) -> torch.Tensor:
    """A chunk of F features of ``block`` entries as (block, F, samples): entry k of every
    feature, position by position (a view)."""
    if rows:  # (samples, F·block)
        return x.view(x.shape[0], -1, block).permute(2, 1, 0)
    return x.view(-1, block, x.shape[1]).transpose(0, 1)  # (F·block, samples)


def _outer(a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
    """``a bᵀ`` of two (size,) vectors as a pair's product keeps it: whole, or for features of
    ``block`` entries the (block, F, F) products of entries at one position."""
    if block == 1:
        return torch.outer(a, b)
    return a.view(-1, block).T[:, :, None] * b.view(-1, block).T[:, None, :]


class Accumulator:
    """Shifted sums of one target (module docstring): ``n``, ``t_i`` and ``P_ij``.

    The models are observed one after another in ``order`` (the reference first). A model's
    output is summed into its own block and its blocks with the models observed before it as
    soon as it is observed; only the outputs a later model pairs with (under
    ``pairs="reference"``, the reference's) are copied and kept until :meth:`add`.
    """

    def __init__(
        self,
        target: Target,
        order: Sequence[int],
        device: torch.device,
        precision: str,
        scratch: Scratch | None = None,
    ) -> None:
        zeros = {"dtype": torch.float64, "device": device}
        self.precision = precision
        num_models = len(order)
        self.target = target
        self.count = 0
        self.first = order[0]
        self.shift = torch.zeros(num_models, target.size, **zeros)
        self.total = torch.zeros(num_models, target.size, **zeros)
        self.products = {p: torch.zeros(target.product_shape, **zeros) for p in target.pairs}
        self.has_shift = [False] * num_models
        # each model's shift in the dtype its chunks are centred in, converted once
        self.shifts: list[torch.Tensor | None] = [None] * num_models
        position = {model: k for k, model in enumerate(order)}
        # model -> the models observed before it with which it has a block
        self.partners: dict[int, list[int]] = {model: [] for model in order}
        for i, j in target.pairs:
            if i != j:
                early, late = sorted((i, j), key=position.__getitem__)
                self.partners[late].append(early)
        self.kept_models = {j for partners in self.partners.values() for j in partners}
        # (model, point index) -> that node's shifted chunks in this batch, until add(): a
        # private copy already (a later in-place op such as ReLU(inplace=True) cannot touch
        # it), converted once however many models pair with it
        self.kept: dict[tuple[int, int], list[torch.Tensor]] = {}
        # the memory of the kept chunks, reused batch after batch (same key as ``kept``)
        self.kept_memory: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.scratch = scratch or Scratch()
        self.batch_totals: dict[tuple[int, int], torch.Tensor] = {}
        self.samples: dict[int, int] = {}
        self.rows: dict[int, bool] = {}
        self.dtypes: dict[int, torch.dtype] = {}

    def observe(self, model: int, point: int, tensor: Any) -> None:
        """Add one node output of one model to the sums (module docstring)."""
        node = self.target.points[point].node
        where = f"{self.target.describe()}: node {node!r}"
        if not isinstance(tensor, torch.Tensor):
            raise StatisticsError(
                f"{where} outputs {type(tensor).__name__}, not a tensor; observe a tensor"
            )
        axis = self.target.points[point].axis % max(tensor.dim(), 1)
        if tensor.dim() == 0 or tensor.shape[axis] != self.target.size:
            raise StatisticsError(
                f"{where} of model {model} gives shape {tuple(tensor.shape)}, the spec says "
                f"{self.target.size} features on axis {axis}; the spec was made for another "
                "model: trace again"
            )
        if tensor.numel() == 0:
            # an expert sent no tokens in this batch (Observation.rows): nothing to add
            self._count(model, point, 0, where)
            return
        source = Source.of(tensor, axis)
        self._count(model, point, source.samples, where)
        partners = [(j, self.kept[(j, point)]) for j in self.partners[model]]
        block = self.target.block
        keep = model in self.kept_models
        kept: list[torch.Tensor] = []
        total = torch.zeros_like(self.total[model])
        # one layout and dtype for all models (the first model's), so their chunks multiply
        rows = self.rows.setdefault(point, source.features_last)
        dtype = self.dtypes.setdefault(point, product_dtype(self.precision, tensor.dtype))
        memory = self.kept_memory.setdefault((model, point), []) if keep else []
        for index, (start, stop) in enumerate(source.chunks()):
            shape = source.chunk_shape(start, stop, rows)
            if keep:
                out = _reused(memory, index, shape, dtype, source.tensor.device)
            else:
                out = self.scratch.get(shape, dtype, source.tensor.device)
            x = self._chunk(model, source, start, stop, rows, out)
            total.add_(x.sum(0 if rows else 1))
            _add_products(self.products[(model, model)], x, x, rows, block)
            for j, chunks in partners:
                if j < model:
                    _add_products(self.products[(j, model)], chunks[index], x, rows, block)
                else:
                    _add_products(self.products[(model, j)], x, chunks[index], rows, block)
            if keep:
                kept.append(x)
        self.batch_totals[(model, point)] = total
        if keep:
            self.kept[(model, point)] = kept

    def _count(self, model: int, point: int, samples: int, where: str) -> None:
        """Count the first model's samples of a point; every other model must have as many."""
        if model == self.first:
            self.samples[point] = samples
            self.count += samples
        elif samples != self.samples[point] and self.target.points[point].rows:
            raise StatisticsError(
                f"{where}: the models send different tokens to this expert ({samples} "
                f"rows in model {model}, {self.samples[point]} in model {self.first}), so its "
                "hidden units have no common samples; per-expert statistics need models that "
                "route alike (a model and its permuted twin): align the experts from their "
                "weights (method 'weight_matching')"
            )
        elif samples != self.samples[point]:
            raise StatisticsError(
                f"{where} gives {samples} samples in model {model} and "
                f"{self.samples[point]} in model {self.first}; statistics need models of one "
                "architecture (and of a mixture of experts, models that send the same tokens "
                "to each expert: align experts from their weights, method 'weight_matching')"
            )

    def add(self, batch: int) -> None:
        """Close the batch: check its sums are finite and add them to ``t``."""
        totals, self.batch_totals, self.kept = self.batch_totals, {}, {}
        for (model, point), total in totals.items():
            if not bool(torch.isfinite(total).all()):
                raise StatisticsError(
                    f"{self.target.describe()}: non-finite activations (NaN or inf) at node "
                    f"{self.target.points[point].node!r} of model {model} in batch {batch}; "
                    "check the models' weights and the inputs of that batch"
                )
            self.total[model] += total

    def _chunk(
        self, model: int, source: Source, start: int, stop: int, rows: bool, out: torch.Tensor
    ) -> torch.Tensor:
        """A chunk of ``x − s`` (rows or columns) in ``out``; the model's first chunk sets its
        shift ``s`` (its mean)."""
        if self.shifts[model] is None or self.shifts[model].dtype != out.dtype:
            self.shifts[model] = self.shift[model].to(out.dtype)
        x = source.chunk(start, stop, self.shifts[model], rows, out)
        if not self.has_shift[model]:
            mean = x.mean(0 if rows else 1, keepdim=True)
            x -= mean
            self.shift[model] = mean.flatten().to(self.shift.dtype)
            self.shifts[model] = None
            self.has_shift[model] = True
        return x

    def reshift(self, shift: torch.Tensor) -> None:
        """Re-express the sums around ``shift``: with ``d = s − shift``, ``t ← t + n·d`` and
        ``P_ij ← P_ij + t_i d_jᵀ + d_i t_jᵀ + n d_i d_jᵀ`` (the entries of them it keeps)."""
        d, block = self.shift - shift, self.target.block
        for (i, j), product in self.products.items():
            product += _outer(self.total[i], d[j], block) + _outer(d[i], self.total[j], block)
            product += self.count * _outer(d[i], d[j], block)
        self.total += self.count * d
        self.shift = shift.clone()
        self.shifts = [None] * len(self.shifts)

    def flat(self) -> torch.Tensor:
        """``[n, t, P…]`` as one float64 vector, for one all-reduce."""
        count = self.total.new_tensor([self.count])
        return torch.cat(
            [count, self.total.flatten(), *(p.flatten() for p in self.products.values())]
        )

    def set_flat(self, flat: torch.Tensor) -> None:
        """Inverse of :meth:`flat`."""
        self.count = round(float(flat[0]))
        sizes = [self.total.numel()] + [p.numel() for p in self.products.values()]
        total, *products = flat[1:].split(sizes)
        self.total = total.view_as(self.total).clone()
        for key, product in zip(self.products, products, strict=True):
            self.products[key] = product.view_as(self.products[key]).clone()

    def finish(self) -> SpaceStatistics:
        """Means and unbiased covariances, on the CPU."""
        n, name, block = self.count, self.target.describe(), self.target.block
        features = self.target.size // block
        if n < 2:
            raise StatisticsError(f"{name}: {n} sample(s); covariances need at least 2")
        if n < features:
            warnings.warn(
                f"{name}: {n} samples for {features} features, so its covariances are singular; "
                "collect more data (the ridge keeps later solves stable)",
                stacklevel=4,  # the caller of collect_statistics
            )
        blocks = {}
        for (i, j), product in self.products.items():
            cov = (product - _outer(self.total[i], self.total[j], block) / n) / (n - 1)
            blocks[(i, j)] = ((cov + cov.mT) / 2 if i == j else cov).cpu()
        stats = SpaceStatistics(n, (self.shift + self.total / n).cpu(), blocks, block)
        found = stats.non_finite()
        if found is not None:
            raise StatisticsError(
                f"{name}: {found[0]} has {found[1]}: the activations are finite but too large "
                "to multiply (their products overflow; with precision='float32' from about "
                "1e19 on); check the models' weights and inputs, or collect in float64"
            )
        return stats
