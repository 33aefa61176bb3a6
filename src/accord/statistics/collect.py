"""One pass over the data: the observed graph of each model, the schedule of the models, the
reduction across torch.distributed ranks, and :func:`collect_statistics`."""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from accord._layout import channels_last as channels_last_weights
from accord._layout import wants_channels_last
from accord.errors import StatisticsError
from accord.spec import Observation
from accord.trace.export import batchnorm_nodes
from accord.trace.fx import symbolic_graph
from accord.trace.lean import fold_batchnorms, in_place, lean_bindings
from accord.trace.observe import GraphValue, call_after, traced_module
from accord.trace.programs import Binding, shared_exports

if TYPE_CHECKING:
    from accord.spec import Spec

from accord.statistics.accumulator import Accumulator, Scratch, Target
from accord.statistics.types import Pair, SpaceStatistics, Statistics


def _pairs(num_models: int, reference: int, pairs: str) -> tuple[Pair, ...]:
    if pairs == "all":
        return tuple(itertools.combinations_with_replacement(range(num_models), 2))
    cross = [(min(i, reference), max(i, reference)) for i in range(num_models) if i != reference]
    return tuple((i, i) for i in range(num_models)) + tuple(cross)


def _targets(
    spec: Spec,
    model: nn.Module,
    example: torch.Tensor,
    pairs: tuple[Pair, ...],
    batchnorms: bool,
    only: Collection[str] | None = None,
) -> tuple[list[Target], list[Target]]:
    """The free observed spaces (those named in ``only`` when given), and the BatchNorms folded
    into them (within-model blocks) when ``batchnorms``."""
    used = [
        space
        for space in spec.spaces
        if space.free and space.observe and (only is None or space.name in only)
    ]
    spaces = [
        Target(s.name, s.size * s.observed_block, s.observe, pairs, block=s.observed_block)
        for s in used
    ]
    folded = (bn.norm for space in used for bn in space.batchnorms) if batchnorms else ()
    norm_names = list(dict.fromkeys(folded))
    if not norm_names:
        return spaces, []
    diagonal = tuple(p for p in pairs if p[0] == p[1])
    norms = []
    found = _batchnorm_nodes(spec, model, example, norm_names)
    for name in norm_names:
        nodes = found[name]
        module = next((m for n, m in model.named_modules() if n == name), None)
        if not nodes or not isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise StatisticsError(
                f"the spec folds {name!r}, which is not a BatchNorm called in the traced "
                f"graph of {type(model).__name__}; the spec was made for another model"
            )
        points = tuple(Observation(node, 1) for node in nodes)
        norms.append(Target(name, module.num_features, points, diagonal, "BatchNorm"))
    return spaces, norms


def _batchnorm_nodes(
    spec: Spec, model: nn.Module, example: torch.Tensor, names: Sequence[str]
) -> dict[str, list[str]]:
    """The nodes of the spec's graph that apply each BatchNorm module of ``names`` (one
    trace or export for all of them)."""
    if spec.graph == "export":
        return batchnorm_nodes(model, example, names)
    graph = symbolic_graph(model, spec.leaf_modules).graph
    found: dict[str, list[str]] = {name: [] for name in names}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in found:
            found[str(node.target)].append(node.name)
    return found


class _Observer(nn.Module):
    """Called by the traced forward right after each observed node, so it copies the node's
    output before any later in-place op (``ReLU(inplace=True)``, ``+=``) can change it."""

    def __init__(self, model: int, accumulators: Sequence[Accumulator]) -> None:
        super().__init__()
        self.model = model
        self.uses: dict[Observation, list[tuple[Accumulator, int]]] = {}
        for accumulator in accumulators:
            for index, point in enumerate(accumulator.target.points):
                self.uses.setdefault(point, []).append((accumulator, index))

    def forward(
        self,
        tensor: Any,
        node: str,
        axis: int,
        offset: int | None = None,
        block: int = 1,
        entry: int | None = None,
        rows: tuple[str, int] | None = None,
        scatter: tuple[str, str] | None = None,
        offsets: Any = None,
        index: torch.Tensor | None = None,
        source: torch.Tensor | None = None,
    ) -> None:
        point = Observation(node, axis, offset, block, rows, scatter, entry)
        for accumulator, at in self.uses[point]:
            seen = samples_seen(point, accumulator.target.size, tensor, offsets, index, source)
            accumulator.observe(self.model, at, seen)


def samples_seen(
    point: Observation,
    size: int,
    tensor: Any,
    offsets: Any = None,
    index: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
) -> Any:
    """What ``point`` contributes of its node's output ``tensor``, ``size`` entries of it (the
    space's size times the point's block): its part from ``offset`` on, its ``entry`` along
    axis 0, then the rows it picks (``rows`` and ``scatter``, with the outputs of the nodes
    they name: ``offsets``, ``index``, ``source``)."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    axis, offset = point.axis, point.offset
    if offset is not None and tensor.shape[axis] >= offset + size:
        tensor = tensor.narrow(axis, offset, size)
    if point.entry is not None:
        tensor = tensor.narrow(0, point.entry, 1)  # keeps the axes, so ``axis`` still holds
    return _rows_seen(tensor, point.rows, offsets, index, source)


def observed_samples(point: Observation, size: int, observed: dict[str, Any]) -> Any:
    """:func:`samples_seen` from the outputs of a model run that kept every node of
    ``point.nodes`` (``observed``, by node name)."""
    offsets = None if point.rows is None else observed[point.rows[0]]
    index, source = (None, None) if point.scatter is None else map(observed.get, point.scatter)
    return samples_seen(point, size, observed[point.node], offsets, index, source)


def group_rows(offsets: Any, group: int) -> tuple[int, int]:
    """``(first row, rows)`` of group ``group`` (:class:`Observation` ``rows``): between the
    end offsets of groups ``group - 1`` and ``group``, or, where the offsets node is a split
    along axis 0 (its pieces), the rows of piece ``group``."""
    if isinstance(offsets, list | tuple):
        return sum(len(piece) for piece in offsets[:group]), len(offsets[group])
    start = int(offsets[group - 1]) if group > 0 else 0
    return start, int(offsets[group]) - start


def _rows_seen(
    tensor: torch.Tensor,
    rows: tuple[str, int] | None,
    offsets: Any,
    index: torch.Tensor | None,
    source: torch.Tensor | None,
) -> torch.Tensor:
    """The samples of an observation with ``rows`` or ``scatter`` (:class:`Observation`): the
    rows of one group along axis 0 (:func:`group_rows`); then, with an index and its source,
    those rows summed back into zeros of the source's rows."""
    if rows is not None and offsets is not None:
        start, size = group_rows(offsets, rows[1])
        tensor = tensor.narrow(0, start, size)
        index = None if index is None else index.narrow(0, start, size)
    if index is None or source is None:
        return tensor
    summed = tensor.new_zeros((source.shape[0], *tensor.shape[1:]))
    return summed.index_add_(0, index.to(tensor.device), tensor)


def _statistics_graph(
    model: nn.Module, observer: _Observer, spec: Spec, example: torch.Tensor
) -> nn.Module:
    """``model``'s traced forward (the exported one in eval mode: the program of its
    architecture, shared by every model), calling ``observer`` after every observed node."""
    module = traced_module(model, example, spec.graph, spec.leaf_modules)
    calls = [
        (point.node, (point.node, point.axis, point.offset, point.block, *_picks(point)))
        for point in observer.uses
    ]
    call_after(module, observer, calls, type(model).__name__)
    return module if spec.graph == "export" else module.eval()


def _statistics_graphs(
    models: Sequence[nn.Module],
    order: Sequence[int],
    accumulators: Sequence[Accumulator],
    spec: Spec,
    example: torch.Tensor,
    fuse_batchnorms: bool,
) -> list[Callable[[torch.Tensor], Any]]:
    """The statistics graph (:func:`_statistics_graph`) of each model of ``order``: on the
    exported program one graph, built once (a fixed cost of each model otherwise), made
    cheaper by :mod:`accord.trace.lean` (BatchNorms fused where ``fuse_batchnorms``, in-place
    operators where nothing reads their input later) and bound to each model's parameters
    and buffers before it runs; on torch.fx's graph, which calls each model's own modules,
    one per model, as given."""
    if spec.graph != "export":
        return [
            _statistics_graph(models[i], _Observer(i, accumulators), spec, example) for i in order
        ]
    observer = _Observer(order[0], accumulators)
    module = _statistics_graph(models[order[0]], observer, spec, example)
    folds = fold_batchnorms(module, models[order[0]]) if fuse_batchnorms else []
    in_place(module, "accord_observer")
    return [
        functools.partial(_run_bound, module, observer, i, lean_bindings(module, folds, models[i]))
        for i in order
    ]


def _run_bound(
    module: nn.Module, observer: _Observer, model: int, bound: list[Binding], inputs: torch.Tensor
) -> Any:
    for slots, name, tensor in bound:
        slots[name] = tensor
    observer.model = model
    return module(inputs)


def _picks(point: Observation) -> tuple[Any, ...]:
    """The observer's arguments after ``block``: the point's ``entry``, then :func:`_rows`."""
    return (point.entry, *_rows(point))


def _rows(point: Observation) -> tuple[Any, ...]:
    """The observer's arguments that pick a group's rows and sum them back into the source's:
    ``rows``, ``scatter`` and the offsets, index and source they name."""
    if point.rows is None and point.scatter is None:
        return ()
    offsets = None if point.rows is None else GraphValue(point.rows[0])
    index, source = (None, None) if point.scatter is None else map(GraphValue, point.scatter)
    return (point.rows, point.scatter, offsets, index, source)


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
    accumulators: Sequence[Accumulator], failure: StatisticsError | None, device: torch.device
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
    accumulators: Sequence[Accumulator],
    schedule: Iterator[tuple[int, torch.Tensor]],
    device: torch.device,
    order: Sequence[int],
    spec: Spec,
    example: torch.Tensor,
    channels_last: bool,
    fuse_batchnorms: bool,
) -> StatisticsError | None:
    """Forward every scheduled batch through every model once, in ``order`` (under
    ``torch.inference_mode``, channels-last convolutions where :mod:`accord._layout` says);
    return a failure, if any."""
    try:
        with (
            closing(schedule),
            _evaluating(models, device),
            channels_last_weights(models, channels_last and wants_channels_last(device)),
            torch.inference_mode(),
        ):
            example = example.to(device)
            graphs = _statistics_graphs(models, order, accumulators, spec, example, fuse_batchnorms)
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
    precision: Literal["float64", "float32"] = "float32",
    batchnorms: bool = True,
    channels_last: bool = True,
    fuse_batchnorms: bool = True,
    spaces: Collection[str] | None = None,
) -> Statistics:
    """Means and covariances of every free observed space of N same-architecture models.

    One pass over ``data`` (batches ``(inputs, labels)``, ``(inputs,)`` or bare tensors), each
    model run once per batch in eval mode under ``torch.inference_mode`` on ``device``; the
    models' devices, training flags and weights are restored afterwards. At an observation
    with feature axis ``a``, ``t.movedim(a, -1).reshape(-1, C)`` gives the samples: every
    spatial position or token is one, and the positions of all of a space's observations pool.

    Kept, in float64 (module docstring): ``mean[i]``, ``Cov(x_i, x_i)``, and ``Cov(x_r, x_i)``
    with the ``reference`` r (``pairs="reference"``, O(N·C²) memory) or every ``Cov(x_i, x_j)``
    (``pairs="all"``). A space whose features own blocks of B entries at their observation
    points (whole attention heads, :attr:`FeatureSpace.observed_block`) keeps only the
    covariances of entries at one position of two features, (B, F, F) per pair instead of
    (F·B)² (:class:`SpaceStatistics`): all its matching reads. ``norms`` gets each model's
    output statistics of every BatchNorm that the observed spaces fold, which dense maps need
    (``batchnorms=False`` skips them: methods whose maps are permutations never use them).
    Fixed spaces and spaces without observations get no entry. ``spec`` defaults to
    ``accord.trace.trace(models[0], first batch's inputs)``.

    ``precision`` is the dtype each chunk of shifted samples (about 2.6·10⁵ values, so its
    own rounding stays small) is multiplied in; the chunks' products are summed in float64
    either way. ``"float32"`` (the default) keeps the activations' dtype, at least float32;
    ``"float64"`` is more exact and slower. ``accord bench speed`` measures both, their errors
    against an exact covariance and their cost (BENCHMARKS.md; the measurement behind the
    default is there too).
    ``channels_last`` runs 2-d convolutions in channels-last memory format on a CPU device
    (:mod:`accord._layout`), and ``fuse_batchnorms`` each eval-mode BatchNorm of an exported
    graph fused into the convolution or linear layer before it (:mod:`accord.trace.lean`):
    each a cheaper forward, the same values up to rounding; False runs the models exactly as
    given (``relu`` and ``add`` write in place where nothing reads their input later either
    way: the same values exactly).

    Features of one model that are nearly linearly dependent on each other (two that
    correlate within :data:`NEAR_DEPENDENT` of ±1, as the hidden units of a small MLP fed a
    fixed 2-d coordinate table do; or several together, as the pre-activations of a first
    convolution whose input channels repeat one grey image, which span at most 10 of its
    channels' directions: :data:`NEAR_SINGULAR`) are told apart only by differences below
    float32's rounding,
    so which of them a matching picks would be decided by rounding: with ``"float32"``, the
    spaces that hold such features are collected again in float64 by a second pass over
    ``data`` restricted to them (when ``data`` can be iterated twice; a one-shot iterator keeps
    the float32 statistics, with a warning). ``spaces`` restricts the pass to the free spaces
    of those names.

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
    # the tracer, the BatchNorm lookup and every model's pass read one exported program
    with shared_exports():
        if spec is None:
            from accord.trace import trace

            spec = trace(models[0], _inputs(first, 0))
        example = _inputs(first, 0)
        targets, norms = _targets(
            spec, models[0], example, _pairs(len(models), reference, pairs), batchnorms, spaces
        )
        device = torch.device(device)
        order = [reference, *(i for i in range(len(models)) if i != reference)]
        scratch = Scratch()  # one chunk buffer for every accumulator: it stays in cache
        accumulators = [Accumulator(t, order, device, precision, scratch) for t in targets + norms]
        stats = Statistics({}, len(models), reference, pairs, precision=precision)
        if not accumulators:
            return stats
        rank, world = _world()
        stride = (0, 1) if sharded else (rank, world)
        batches = itertools.chain([first], stream)
        schedule = _schedule(batches, _length(data), max_samples, stride, progress and rank == 0)
        failure = _accumulate(
            models,
            accumulators,
            schedule,
            device,
            order,
            spec,
            example,
            channels_last,
            fuse_batchnorms,
        )
    _synchronise(accumulators, failure, device)
    finished = _finish(accumulators)
    spaces = zip(targets, finished[: len(targets)], strict=True)
    stats.spaces = {t.name: s for t, s in spaces if s is not None}
    stats.norms = {
        t.name: s for t, s in zip(norms, finished[len(targets) :], strict=True) if s is not None
    }
    dependent = near_dependent_spaces(stats, device) if precision == "float32" else []
    if dependent:
        if iter(data) is data:
            warnings.warn(
                f"spaces {dependent} hold nearly dependent features, which float32 products "
                "cannot tell apart, and the data is a one-shot iterator: pass data that can be "
                "iterated twice (a list, a DataLoader) or collect with precision='float64'",
                stacklevel=2,
            )
            return stats
        exact = collect_statistics(
            models,
            data,
            spec,
            max_samples=max_samples,
            device=device,
            reference=reference,
            pairs=pairs,
            progress=progress,
            sharded=sharded,
            precision="float64",
            batchnorms=False,
            channels_last=channels_last,
            fuse_batchnorms=fuse_batchnorms,
            spaces=dependent,
        )
        stats.spaces.update(exact.spaces)
    return stats


# Off-diagonal within-model correlations this close to ±1 mark features float32 products
# cannot tell apart: their covariances carry relative rounding near 1e-7 to 1e-6.
NEAR_DEPENDENT = 1e-4
# A within-model correlation matrix with an eigenvalue below this marks features that are
# dependent several together (a rank-deficient space): float32 rounding of the covariances,
# about 1e-6 on that eigenvalue for 32 features, then leaves the joint covariance of two
# models indefinite, and a small ridge's CCA gives canonical correlations far above 1.
NEAR_SINGULAR = 1e-5


def _nearly_dependent(correlation: torch.Tensor, samples: int) -> bool:
    """Whether the (…, F, F) within-model ``correlation`` has two features within
    :data:`NEAR_DEPENDENT` of ±1 or an eigenvalue below :data:`NEAR_SINGULAR`, on the features
    that vary (a dead unit's zero row says nothing about rounding). With no more ``samples``
    than features the matrix is singular whatever the precision (the pass warns of that), so
    only the pairs are checked.

    One float64 copy of each matrix is worked in place (at LLM widths an F×F temporary is
    most of the cost besides the factorisation: ``accord bench``'s design measurements)."""
    live = torch.diagonal(correlation, dim1=-2, dim2=-1) > 0.5
    for matrix, kept in zip(
        correlation.reshape(-1, *correlation.shape[-2:]),
        live.reshape(-1, live.shape[-1]),
        strict=True,
    ):
        some = matrix if bool(kept.all()) else matrix[kept][:, kept]
        block = some.to(torch.float64, copy=True)
        if not len(block):
            continue
        diagonal = block.diagonal().clone()
        block.diagonal().zero_()
        low, high = torch.aminmax(block)
        if max(-float(low), float(high)) >= 1 - NEAR_DEPENDENT:
            return True
        if len(block) >= samples:
            continue
        block.diagonal().copy_(diagonal - NEAR_SINGULAR)
        # Cholesky fails exactly when an eigenvalue is below the shift, at a tenth of eigh's
        # cost; it overwrites the copy rather than allocating its factor
        info = torch.empty((), dtype=torch.int32, device=block.device)
        torch.linalg.cholesky_ex(block, out=(block, info))
        if int(info) != 0:
            return True
    return False


def near_dependent_spaces(stats: Statistics, device: str | torch.device = "cpu") -> list[str]:
    """The spaces of ``stats`` in which the features of one model are nearly linearly
    dependent (:func:`_nearly_dependent`; in a space of blocks, the entries at one position
    of the features: the only ones kept, and the only ones a matching of whole blocks
    compares), tested on ``device`` (the pass's: an F×F factorisation per model and space,
    seconds on a CPU at LLM widths)."""
    found = []
    for name, space in stats.spaces.items():
        for i in range(stats.num_models):
            if (i, i) not in space.blocks:
                continue
            correlation = space.entry_correlation(i, i, space.block).to(device)
            if _nearly_dependent(correlation, space.count):
                found.append(name)
                break
    return found


def _finish(accumulators: Sequence[Accumulator]) -> list[SpaceStatistics | None]:
    """Each accumulator's statistics; None for an expert's space (``Observation.rows``) that
    saw fewer than 2 tokens in the whole data, with a warning: it gets no statistics, as a
    space without observation points."""
    finished: list[SpaceStatistics | None] = []
    starved = []
    for accumulator in accumulators:  # no comprehension: warnings' stacklevel counts frames
        if accumulator.count < 2 and any(p.rows for p in accumulator.target.points):
            starved.append(accumulator.target.name)
            finished.append(None)
            continue
        finished.append(accumulator.finish())
    if starved:
        warnings.warn(
            f"experts' spaces {starved} were sent fewer than 2 tokens in the whole data: no "
            "statistics, so methods that align by activations leave them as they are "
            "(weight matching aligns them); collect more data",
            stacklevel=3,  # the caller of collect_statistics
        )
    return finished


def _length(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:  # generators, iterable datasets
        return None


__all__ = ["SpaceStatistics", "Statistics", "collect_statistics"]
