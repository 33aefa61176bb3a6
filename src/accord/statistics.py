"""Activation statistics of N models: means and covariances per feature space, in float64.

Statistics do not depend on any merge hyper-parameter: collect them once and reuse them for
every method and every ridge value.

Accumulation (one pass, float64). For model i with features ``x_i`` (C,) and a shift ``s_i``
(the first batch's mean), :func:`collect_statistics` keeps ``n``, ``t_i = Σ (x_i − s_i)`` and
``P_ij = Σ (x_i − s_i)(x_j − s_j)ᵀ``. Then ``mean_i = s_i + t_i / n`` and

    Cov(x_i, x_j) = (P_ij − t_i t_jᵀ / n) / (n − 1).

The shift keeps the subtraction well conditioned when features have a large offset. Sums add
across processes: each rank re-expresses its sums around one common shift and all-reduces them.

Cost. The models run one after another on each batch, the reference first; each observed
output is summed as soon as it is produced, in chunks of about 2¹⁸ values shifted and
converted to the accumulation dtype in one pass, and only the chunks a later model pairs
with (the reference's) are kept, converted, until the batch ends: memory holds one model's
activations (in the accumulation dtype), not N. The products cost about as much as the
models' own forward passes (float64 matmuls of C × C blocks); ``precision="float32"``
multiplies each chunk in float32 and sums the chunks in float64, cutting the overhead by
about half for 1e-7–1e-6 relative error (both measured by ``accord bench speed``; see
BENCHMARKS.md).
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from accord._finite import first_non_finite
from accord._io import write_with
from accord.errors import StatisticsError
from accord.spec import Observation
from accord.trace.fx import observed_graph, symbolic_graph

if TYPE_CHECKING:
    from accord.spec import Spec

Pair = tuple[int, int]
STATISTICS_FORMAT = 1


@dataclass
class SpaceStatistics:
    """Statistics of one space over ``count`` samples for N models.

    ``mean[i]`` is model i's feature mean (C,); ``blocks[(i, j)]`` with ``i <= j`` is
    ``Cov(x_i, x_j)`` (C × C, unbiased). Always present: ``(i, i)`` for every model and the
    pairs of every model with the reference; every pair when collected with ``pairs="all"``.
    """

    count: int
    mean: torch.Tensor
    blocks: dict[Pair, torch.Tensor]

    @property
    def size(self) -> int:
        return int(self.mean.shape[1])

    @property
    def num_models(self) -> int:
        return int(self.mean.shape[0])

    def covariance(self, i: int, j: int) -> torch.Tensor:
        """``Cov(x_i, x_j)``: rows are model i's features, columns model j's."""
        if (i, j) in self.blocks:
            return self.blocks[(i, j)]
        if (j, i) in self.blocks:
            return self.blocks[(j, i)].T
        raise KeyError(
            f"the covariance of models {i} and {j} was not collected; collect with pairs='all'"
        )

    def non_finite(self) -> tuple[str, str] | None:
        """``(which tensor, what is wrong)`` for the first mean or covariance block holding
        NaN or inf, else None."""
        blocks = {f"Cov(model {i}, model {j})": b for (i, j), b in self.blocks.items()}
        return first_non_finite({"the means": self.mean, **blocks})

    def correlation(self, i: int, j: int) -> torch.Tensor:
        """Pearson correlation of model i's features (rows) with model j's (columns); a feature
        without variance (a ReLU unit that never fires) correlates with nothing."""
        std_i = torch.diagonal(self.covariance(i, i)).clamp_min(0).sqrt()
        std_j = torch.diagonal(self.covariance(j, j)).clamp_min(0).sqrt()
        return self.covariance(i, j) / (std_i[:, None] * std_j[None, :]).clamp_min(1e-12)


@dataclass
class Statistics:
    """Per-space statistics (``spaces``) and per-BatchNorm output statistics (``norms``).

    ``norms[name]`` holds each model's statistics of that BatchNorm's output (within-model
    blocks only): what the merged BatchNorm is given when maps are dense (DESIGN.md §4).
    """

    spaces: dict[str, SpaceStatistics]
    num_models: int
    reference: int = 0
    pairs: str = "reference"
    norms: dict[str, SpaceStatistics] = field(default_factory=dict)
    precision: str = "float64"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one safetensors file, atomically (suggested suffix ``.safetensors``).

        Tensors (float64): ``s{k}.mean`` and ``s{k}.cov.{i}.{j}`` for the k-th space,
        ``n{k}.…`` for the k-th norm. The header's ``__metadata__["accord"]`` is JSON:
        ``{"format", "num_models", "reference", "pairs", "precision", "spaces": [{"name", "count",
        "key"}], "norms": [...]}``; ``key`` is the tensors' prefix.
        """
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {
            "format": STATISTICS_FORMAT,
            "num_models": self.num_models,
            "reference": self.reference,
            "pairs": self.pairs,
            "precision": self.precision,
        }
        for kind, prefix, group in (("spaces", "s", self.spaces), ("norms", "n", self.norms)):
            meta[kind] = []
            for k, (name, stats) in enumerate(group.items()):
                key = f"{prefix}{k}"
                meta[kind].append({"name": name, "count": stats.count, "key": key})
                tensors[f"{key}.mean"] = stats.mean.detach().cpu().contiguous()
                for (i, j), block in stats.blocks.items():
                    tensors[f"{key}.cov.{i}.{j}"] = block.detach().cpu().contiguous()
        header = {"accord": json.dumps(meta)}
        write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Statistics:
        """Read statistics written by :meth:`save` (tensors on the CPU)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise StatisticsError(f"statistics file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["accord"])
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (KeyError, OSError, ValueError, SafetensorError) as exc:
            raise StatisticsError(
                f"{path} is not a statistics file written by Statistics.save ({exc!r})"
            ) from exc
        if meta.get("format") != STATISTICS_FORMAT:
            raise StatisticsError(
                f"{path} has statistics format {meta.get('format')!r}; this accord reads "
                f"format {STATISTICS_FORMAT}: collect the statistics again"
            )
        groups = {kind: _load_group(meta[kind], tensors) for kind in ("spaces", "norms")}
        return cls(
            spaces=groups["spaces"],
            num_models=int(meta["num_models"]),
            reference=int(meta["reference"]),
            pairs=str(meta["pairs"]),
            norms=groups["norms"],
            precision=str(meta.get("precision", "float64")),
        )


def _load_group(
    entries: list[dict[str, Any]], tensors: Mapping[str, torch.Tensor]
) -> dict[str, SpaceStatistics]:
    group = {}
    for entry in entries:
        key = entry["key"]
        blocks = {}
        for name, tensor in tensors.items():
            if name.startswith(f"{key}.cov."):
                i, j = name[len(key) + 5 :].split(".")
                blocks[(int(i), int(j))] = tensor
        group[entry["name"]] = SpaceStatistics(int(entry["count"]), tensors[f"{key}.mean"], blocks)
    return group


@dataclass(frozen=True)
class _Target:
    """What one accumulator observes: a space or a BatchNorm output, and the blocks it keeps."""

    name: str
    size: int
    points: tuple[Observation, ...]
    pairs: tuple[Pair, ...]
    kind: Literal["space", "BatchNorm"] = "space"

    def describe(self) -> str:
        return f"{self.kind} {self.name!r}"


# Samples are converted about this many values at a time, so that each converted chunk is
# summed and multiplied while it is in cache; it also bounds the chunk's memory.
_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class _Source:
    """One model's observed tensor as G groups of S positions: ``G·S`` samples of C features.

    ``tensor`` is (G, S, C) when the features are last in memory (tokens, channels-last),
    else (G, C, S) (a (N, C, H, W) conv output is (N, C, H·W)), so reading it is in order.
    """

    tensor: torch.Tensor
    features_last: bool

    @classmethod
    def of(cls, tensor: torch.Tensor, axis: int) -> _Source:
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
        return max(1, _CHUNK_ELEMENTS // max(self.tensor[0].numel(), 1))

    def chunks(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of each chunk's groups."""
        for start in range(0, self.tensor.shape[0], self.step):
            yield start, min(start + self.step, self.tensor.shape[0])

    def chunk(
        self, start: int, stop: int, shift: torch.Tensor, rows: bool, out: torch.Tensor
    ) -> torch.Tensor:
        """``x − s`` of groups ``start:stop`` written into ``out`` (in its dtype, one pass),
        as (k·S, C) rows or (C, k·S) columns: either way one long matmul. Reading is in
        order when rows are taken from features-last tensors and columns from the others."""
        part = self.tensor[start:stop]
        if self.features_last:  # (k, S, C)
            view = part if rows else part.permute(2, 0, 1)
        else:  # (k, C, S)
            view = part.transpose(1, 2) if rows else part.transpose(0, 1)
        centre = shift.to(out.dtype) if rows else shift.to(out.dtype)[:, None, None]
        torch.sub(view, centre, out=out.view(view.shape))
        return out

    def chunk_shape(self, start: int, stop: int, rows: bool) -> tuple[int, int]:
        samples = (stop - start) * self.positions
        size = self.tensor.shape[2 if self.features_last else 1]
        return (samples, size) if rows else (size, samples)


def _add_products(product: torch.Tensor, x: torch.Tensor, y: torch.Tensor, rows: bool) -> None:
    """``product += Σ_samples x yᵀ`` of two chunks: in the chunks' dtype, summed into the
    product's (float64)."""
    left, right = (x.T, y) if rows else (x, y.T)
    if x.dtype == product.dtype:
        product.addmm_(left, right)
    else:
        product += (left @ right).to(product.dtype)


class _Accumulator:
    """Shifted sums of one target (module docstring): ``n``, ``t_i`` and ``P_ij``.

    The models are observed one after another in ``order`` (the reference first). A model's
    output is summed into its own block and its blocks with the models observed before it as
    soon as it is observed; only the outputs a later model pairs with (under
    ``pairs="reference"``, the reference's) are copied and kept until :meth:`add`.
    """

    def __init__(
        self, target: _Target, order: Sequence[int], device: torch.device, precision: str
    ) -> None:
        zeros = {"dtype": torch.float64, "device": device}
        self.dtype = torch.float64 if precision == "float64" else torch.float32
        num_models = len(order)
        self.target = target
        self.count = 0
        self.first = order[0]
        self.shift = torch.zeros(num_models, target.size, **zeros)
        self.total = torch.zeros(num_models, target.size, **zeros)
        self.products = {p: torch.zeros(target.size, target.size, **zeros) for p in target.pairs}
        self.has_shift = [False] * num_models
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
        self.scratch: torch.Tensor | None = None
        self.batch_totals: dict[tuple[int, int], torch.Tensor] = {}
        self.samples: dict[int, int] = {}
        self.rows: dict[int, bool] = {}

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
        source = _Source.of(tensor, axis)
        if model == self.first:
            self.samples[point] = source.samples
            self.count += source.samples
        elif source.samples != self.samples[point]:
            raise StatisticsError(
                f"{where} gives {source.samples} samples in model {model} and "
                f"{self.samples[point]} in model {self.first}; statistics need models of one "
                "architecture"
            )
        partners = [(j, self.kept[(j, point)]) for j in self.partners[model]]
        keep = model in self.kept_models
        kept: list[torch.Tensor] = []
        total = torch.zeros_like(self.total[model])
        # one layout for all models (the first model's), so their chunks multiply
        rows = self.rows.setdefault(point, source.features_last)
        for index, (start, stop) in enumerate(source.chunks()):
            shape = source.chunk_shape(start, stop, rows)
            out = self._buffer(shape, keep, source.tensor.device)
            x = self._chunk(model, source, start, stop, rows, out)
            total += x.sum(0 if rows else 1).to(torch.float64)
            _add_products(self.products[(model, model)], x, x, rows)
            for j, chunks in partners:
                if j < model:
                    _add_products(self.products[(j, model)], chunks[index], x, rows)
                else:
                    _add_products(self.products[(model, j)], x, chunks[index], rows)
            if keep:
                kept.append(x)
        self.batch_totals[(model, point)] = total
        if keep:
            self.kept[(model, point)] = kept

    def _buffer(self, shape: tuple[int, int], keep: bool, device: torch.device) -> torch.Tensor:
        """Where a chunk is written: a new tensor when it is kept, else one reused scratch
        tensor (no fresh pages to fault in for every chunk)."""
        numel = shape[0] * shape[1]
        if keep:
            return torch.empty(shape, dtype=self.dtype, device=device)
        if self.scratch is None or self.scratch.numel() < numel:
            self.scratch = torch.empty(numel, dtype=self.dtype, device=device)
        return self.scratch[:numel].view(shape)

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
        self, model: int, source: _Source, start: int, stop: int, rows: bool, out: torch.Tensor
    ) -> torch.Tensor:
        """A chunk of ``x − s`` (rows or columns) in ``out``; the model's first chunk sets its
        shift ``s`` (its mean)."""
        x = source.chunk(start, stop, self.shift[model], rows, out)
        if not self.has_shift[model]:
            mean = x.mean(0 if rows else 1, keepdim=True)
            x -= mean
            self.shift[model] = mean.flatten().to(self.shift.dtype)
            self.has_shift[model] = True
        return x

    def reshift(self, shift: torch.Tensor) -> None:
        """Re-express the sums around ``shift``: with ``d = s − shift``, ``t ← t + n·d`` and
        ``P_ij ← P_ij + t_i d_jᵀ + d_i t_jᵀ + n d_i d_jᵀ``."""
        d = self.shift - shift
        for (i, j), product in self.products.items():
            product += torch.outer(self.total[i], d[j]) + torch.outer(d[i], self.total[j])
            product += self.count * torch.outer(d[i], d[j])
        self.total += self.count * d
        self.shift = shift.clone()

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
        n, name, size = self.count, self.target.describe(), self.target.size
        if n < 2:
            raise StatisticsError(f"{name}: {n} sample(s); covariances need at least 2")
        if n < size:
            warnings.warn(
                f"{name}: {n} samples for {size} features, so its covariances are singular; "
                "collect more data (the ridge keeps later solves stable)",
                stacklevel=4,  # the caller of collect_statistics
            )
        blocks = {}
        for (i, j), product in self.products.items():
            block = (product - torch.outer(self.total[i], self.total[j]) / n) / (n - 1)
            blocks[(i, j)] = ((block + block.T) / 2 if i == j else block).cpu()
        stats = SpaceStatistics(n, (self.shift + self.total / n).cpu(), blocks)
        found = stats.non_finite()
        if found is not None:
            raise StatisticsError(
                f"{name}: {found[0]} has {found[1]}: the activations are finite but too large "
                "to multiply (their products overflow; with precision='float32' from about "
                "1e19 on); check the models' weights and inputs, or collect in float64"
            )
        return stats


def _pairs(num_models: int, reference: int, pairs: str) -> tuple[Pair, ...]:
    if pairs == "all":
        return tuple(itertools.combinations_with_replacement(range(num_models), 2))
    cross = [(min(i, reference), max(i, reference)) for i in range(num_models) if i != reference]
    return tuple((i, i) for i in range(num_models)) + tuple(cross)


def _targets(
    spec: Spec, model: nn.Module, pairs: tuple[Pair, ...], batchnorms: bool
) -> tuple[list[_Target], list[_Target]]:
    """The free observed spaces, and the BatchNorms folded into them (within-model blocks)
    when ``batchnorms``."""
    used = [space for space in spec.spaces if space.free and space.observe]
    spaces = [_Target(s.name, s.size, s.observe, pairs) for s in used]
    folded = (bn.norm for space in used for bn in space.batchnorms) if batchnorms else ()
    norm_names = list(dict.fromkeys(folded))
    if not norm_names:
        return spaces, []
    graph = symbolic_graph(model, spec.leaf_modules).graph
    diagonal = tuple(p for p in pairs if p[0] == p[1])
    norms = []
    for name in norm_names:
        nodes = [n.name for n in graph.nodes if n.op == "call_module" and n.target == name]
        module = next((m for n, m in model.named_modules() if n == name), None)
        if not nodes or not isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise StatisticsError(
                f"the spec folds {name!r}, which is not a BatchNorm called in the traced "
                f"graph of {type(model).__name__}; the spec was made for another model"
            )
        points = tuple(Observation(node, 1) for node in nodes)
        norms.append(_Target(name, module.num_features, points, diagonal, "BatchNorm"))
    return spaces, norms


class _Observer(nn.Module):
    """Called by the traced forward right after each observed node, so it copies the node's
    output before any later in-place op (``ReLU(inplace=True)``, ``+=``) can change it."""

    def __init__(self, model: int, accumulators: Sequence[_Accumulator]) -> None:
        super().__init__()
        self.model = model
        self.uses: dict[Observation, list[tuple[_Accumulator, int]]] = {}
        for accumulator in accumulators:
            for index, point in enumerate(accumulator.target.points):
                self.uses.setdefault(point, []).append((accumulator, index))

    def forward(self, tensor: Any, node: str, axis: int) -> None:
        for accumulator, index in self.uses[Observation(node, axis)]:
            accumulator.observe(self.model, index, tensor)


def _statistics_graph(
    model: nn.Module, observer: _Observer, leaf_modules: tuple[str, ...]
) -> fx.GraphModule:
    """``model``'s traced forward, calling ``observer`` after every observed node."""
    # observed_graph checks that the nodes exist; its extra outputs are dropped again
    gm = observed_graph(model, [point.node for point in observer.uses], leaf_modules)
    output = next(node for node in gm.graph.nodes if node.op == "output")
    output.args = (output.args[0][0],)
    gm.add_submodule("accord_observer", observer)
    by_name = {node.name: node for node in gm.graph.nodes}
    for point in observer.uses:
        with gm.graph.inserting_after(by_name[point.node]):
            gm.graph.call_module("accord_observer", (by_name[point.node], point.node, point.axis))
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def _inputs(batch: Any, index: int) -> torch.Tensor:
    """The model inputs of a batch: a tensor, ``(inputs,)`` or ``(inputs, labels, ...)``."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(inputs, torch.Tensor):
        raise StatisticsError(
            f"batch {index}: expected a tensor or a tuple (inputs, labels) whose first item is "
            f"a tensor, got {type(batch).__name__}"
        )
    return inputs


def _schedule(
    batches: Iterable[Any],
    total: int | None,
    max_samples: int | None,
    stride: tuple[int, int],
    show: bool,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(index, inputs)`` of the batches with ``index % world == rank`` (``stride``).

    Every rank walks the whole stream, so ``max_samples`` counts the same samples on all.
    """
    rank, world = stride
    seen = 0
    with tqdm(total=total, disable=not show, desc="statistics", unit="batch") as bar:
        for index, batch in enumerate(batches):
            inputs = _inputs(batch, index)
            if max_samples is not None:
                inputs = inputs[: max_samples - seen]
            seen += len(inputs)
            bar.update()
            if index % world == rank and len(inputs):
                yield index, inputs
            if max_samples is not None and seen >= max_samples:
                return


@contextmanager
def _evaluating(models: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Models in eval mode on ``device``; each one's device and training flags restored after."""
    saved = []
    for model in models:
        tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
        flags = [module.training for module in model.modules()]
        saved.append((tensor.device if tensor is not None else None, flags))
    try:
        for model in models:
            model.to(device).eval()
        yield
    finally:
        for model, (original, flags) in zip(models, saved, strict=True):
            if original is not None:
                model.to(original)
            for module, flag in zip(model.modules(), flags, strict=True):
                module.training = flag


def _world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside torch.distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_arguments(
    models: Sequence[nn.Module],
    reference: int,
    pairs: str,
    max_samples: int | None,
    precision: str,
) -> None:
    problems = []
    if precision not in ("float64", "float32"):
        problems.append(f"precision={precision!r} must be 'float64' or 'float32'")
    if not models:
        problems.append("no models given")
    elif not 0 <= reference < len(models):
        problems.append(f"reference={reference} is not a model index (0 … {len(models) - 1})")
    if pairs not in ("reference", "all"):
        problems.append(f"pairs={pairs!r} must be 'reference' or 'all'")
    if max_samples is not None and max_samples < 1:
        problems.append(f"max_samples={max_samples} must be a positive number of samples")
    if problems:
        raise StatisticsError("collect_statistics: " + "; ".join(problems))


def _synchronise(
    accumulators: Sequence[_Accumulator], failure: StatisticsError | None, device: torch.device
) -> None:
    """Sum the accumulators over all ranks; every rank raises if any rank failed."""
    rank, world = _world()
    if world == 1:
        if failure is not None:
            raise failure
        return
    dist = torch.distributed
    flag = torch.tensor([float(failure is not None)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        messages: list[str | None] = [None] * world
        dist.all_gather_object(messages, None if failure is None else str(failure))
        raise failure or StatisticsError(
            "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        )
    # One common shift (that of the lowest rank with data) makes the sums add exactly, so
    # the result equals one process's up to rounding.
    owners = torch.tensor([rank if a.count else world for a in accumulators], device=device)
    dist.all_reduce(owners, op=dist.ReduceOp.MIN)
    shifts = torch.cat(
        [
            a.shift.flatten() * float(owner == rank)
            for a, owner in zip(accumulators, owners, strict=True)
        ]
    )
    dist.all_reduce(shifts)
    sizes = [a.shift.numel() for a in accumulators]
    for a, shift in zip(accumulators, shifts.split(sizes), strict=True):
        a.reshift(shift.view_as(a.shift))
    flat = [a.flat() for a in accumulators]
    summed = torch.cat(flat)
    dist.all_reduce(summed)
    for a, part in zip(accumulators, summed.split([f.numel() for f in flat]), strict=True):
        a.set_flat(part)


def _accumulate(
    models: Sequence[nn.Module],
    accumulators: Sequence[_Accumulator],
    schedule: Iterator[tuple[int, torch.Tensor]],
    device: torch.device,
    order: Sequence[int],
    leaf_modules: tuple[str, ...] = (),
) -> StatisticsError | None:
    """Forward every scheduled batch through every model once, in ``order``; return a
    failure, if any."""
    try:
        with closing(schedule), _evaluating(models, device), torch.no_grad():
            graphs = [
                _statistics_graph(models[i], _Observer(i, accumulators), leaf_modules)
                for i in order
            ]
            for index, inputs in schedule:
                inputs = inputs.to(device)
                for graph in graphs:
                    graph(inputs)
                for accumulator in accumulators:
                    accumulator.add(index)
    except StatisticsError as exc:  # raised on every rank by _synchronise, not here
        return exc
    return None


def collect_statistics(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    spec: Spec | None = None,
    *,
    max_samples: int | None = None,
    device: str | torch.device = "cpu",
    reference: int = 0,
    pairs: Literal["reference", "all"] = "reference",
    progress: bool = True,
    sharded: bool = False,
    precision: Literal["float64", "float32"] = "float64",
    batchnorms: bool = True,
) -> Statistics:
    """Means and covariances of every free observed space of N same-architecture models.

    One pass over ``data`` (batches ``(inputs, labels)``, ``(inputs,)`` or bare tensors), each
    model run once per batch in eval mode under ``torch.no_grad`` on ``device``; the models'
    devices and training flags are restored afterwards. At an observation with feature axis
    ``a``, ``t.movedim(a, -1).reshape(-1, C)`` gives the samples: every spatial position or
    token is one, and the positions of all of a space's observations pool.

    Kept, in float64 (module docstring): ``mean[i]``, ``Cov(x_i, x_i)``, and ``Cov(x_r, x_i)``
    with the ``reference`` r (``pairs="reference"``, O(N·C²) memory) or every ``Cov(x_i, x_j)``
    (``pairs="all"``). ``norms`` gets each model's output statistics of every BatchNorm that
    the observed spaces fold, which dense maps need (``batchnorms=False`` skips them, 25–40 %
    of the pass on ResNet20 as measured by ``accord bench speed``: methods whose maps are
    permutations never use them). Fixed spaces and spaces without observations get no entry.
    ``precision="float32"`` multiplies each chunk of shifted samples (about 2.6·10⁵ values)
    in float32 and sums the chunks' products in float64: a cheaper pass on a CPU, relative
    covariance errors near 1e-7–1e-6 instead of 1e-12 (``accord bench speed`` measures both).
    ``spec`` defaults to ``accord.trace.trace(models[0], first batch's inputs)``.

    ``max_samples`` stops after that many input samples (the last batch is cut). Under
    torch.distributed, every rank reads the whole stream and forwards the batches with
    ``index % world_size == rank``; with ``sharded=True``, ``data`` is already this rank's
    share (a DistributedSampler) and ``max_samples`` counts per rank. Every rank returns the
    same all-reduced statistics, on the CPU. Raises :class:`StatisticsError` on empty data
    or non-finite activations (naming the space, node and batch); warns when a space has
    fewer samples than features.

    >>> from accord.spec import FeatureSpace, Spec
    >>> models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2)]
    >>> spec = Spec([FeatureSpace("hidden", 8, observe=(Observation("_1", 1),))])
    >>> stats = collect_statistics(models, [torch.randn(64, 4)], spec, progress=False)
    >>> stats.spaces["hidden"].covariance(1, 0).shape
    torch.Size([8, 8])
    """
    models = list(models)
    _check_arguments(models, reference, pairs, max_samples, precision)
    stream = iter(data)
    first = next(stream, None)
    if first is None:
        raise StatisticsError("data is empty: pass at least one batch of inputs")
    if spec is None:
        from accord.trace import trace

        spec = trace(models[0], _inputs(first, 0))
    spaces, norms = _targets(spec, models[0], _pairs(len(models), reference, pairs), batchnorms)
    device = torch.device(device)
    order = [reference, *(i for i in range(len(models)) if i != reference)]
    accumulators = [_Accumulator(t, order, device, precision) for t in spaces + norms]
    stats = Statistics({}, len(models), reference, pairs, precision=precision)
    if not accumulators:
        return stats
    rank, world = _world()
    stride = (0, 1) if sharded else (rank, world)
    batches = itertools.chain([first], stream)
    schedule = _schedule(batches, _length(data), max_samples, stride, progress and rank == 0)
    failure = _accumulate(models, accumulators, schedule, device, order, spec.leaf_modules)
    _synchronise(accumulators, failure, device)
    finished = _finish(accumulators)
    stats.spaces = {t.name: s for t, s in zip(spaces, finished[: len(spaces)], strict=True)}
    stats.norms = {t.name: s for t, s in zip(norms, finished[len(spaces) :], strict=True)}
    return stats


def _finish(accumulators: Sequence[_Accumulator]) -> list[SpaceStatistics]:
    finished = []
    for accumulator in accumulators:  # no comprehension: warnings' stacklevel counts frames
        finished.append(accumulator.finish())
    return finished


def _length(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:  # generators, iterable datasets
        return None


__all__ = ["SpaceStatistics", "Statistics", "collect_statistics"]
