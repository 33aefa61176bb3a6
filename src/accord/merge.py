"""Merge N same-architecture models: trace → statistics → match → apply → combine → repair.

Every model is aligned to the reference (a star) and the aligned models are averaged.
Dense maps (CCA, ZipIt!, OT plans) cannot move BatchNorm's per-channel normalisation, so by
default (``batchnorm="fold"``) the BatchNorms of such spaces are folded into their writers
before the map, and the merged BatchNorm is then given the statistics the merged features
should have (DESIGN.md §4), or under ``repair="none"`` stays the identity folding left;
``batchnorm="transform"`` applies the map to γ and β instead, as the CCA Merge reference code
does.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from accord._finite import describe_non_finite, first_non_finite
from accord.apply import Transform, apply_transforms
from accord.batchnorm import (
    BATCHNORM_ROUTES,
    batchnorm_as_writers,
    batchnorm_targets,
    fold_batchnorms,
    has_batchnorm,
    needs_batchnorm_statistics,
    reset_batchnorm,
)
from accord.combine._state_dicts import check_inputs, merge_state_dicts, spread_options
from accord.compatible import TensorShapes, check_same_tensors
from accord.data import batches
from accord.errors import MergeError, did_you_mean
from accord.evaluate import evaluate
from accord.match import Alignment, match
from accord.partial import check_stop_at, partial_result_model, restrict
from accord.registry import (
    DEFAULT_COMBINE,
    CombineContext,
    Combined,
    CombineMethod,
    MethodPlan,
    plan_methods,
    resolve_options,
)
from accord.repair import repair_activations
from accord.spec import Spec
from accord.statistics import Statistics, collect_statistics
from accord.trace.programs import shared_exports
from accord.tune import merge_tuned

REPAIRS = ("auto", "bn-reset", "repair", "none")


def split_options(
    plan: MethodPlan, options: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` split into the alignment's and the combiner's; MergeError naming an option
    neither has (with the closest one) and listing theirs."""
    aligned = {k: v for k, v in options.items() if k in plan.align.defaults}
    combined = {k: v for k, v in options.items() if k in plan.combine.defaults}
    unknown = [k for k in options if k not in aligned and k not in combined]
    if unknown:
        accepted = {**plan.align.defaults, **plan.combine.defaults}
        listed = ", ".join(sorted(accepted)) or "none"
        hints = [f"{name!r}{did_you_mean(name, accepted)}" for name in unknown]
        raise MergeError(
            f"method {plan.name!r} has no option {', '.join(hints)}; accepted options: {listed}"
        )
    return aligned, combined


def request_plan(
    method: str | None, align: str | None, combine: str | None, options: Mapping[str, Any]
) -> tuple[MethodPlan, dict[str, Any]]:
    """The alignment and combiner a merge is asked for, and the options left for them:
    ``align``/``combine`` in ``options`` (how a YAML config or ``--option`` names them) win
    over the arguments."""
    rest = dict(options)
    align = rest.pop("align", align)
    combine = rest.pop("combine", combine)
    return plan_methods(method, align, combine), rest


def check_options(
    plan: MethodPlan, options: Mapping[str, Any], count: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` split into the alignment's and the combiner's (:func:`split_options`), each
    resolved over its record's defaults and checked against the record (MergeError naming the
    method, the option, the value and its range), and, with the number of models ``count``, a
    tensor-wise combiner's per-model values and the values that are only wrong together: what
    every merge checks before any statistics pass or export."""
    aligned, combined = split_options(plan, options)
    aligned = resolve_options(plan.align, aligned)
    combined = resolve_options(plan.combine, combined)
    if count is not None and plan.combine.tensorwise:
        spread_options(plan.combine, combined, count)
    return aligned, combined


def declared_options(
    method: str | None = None, align: str | None = None, combine: str | None = None
) -> dict[str, Any]:
    """The options a merge with these methods accepts, with their defaults: the alignment's
    and the combiner's."""
    plan = plan_methods(method, align, combine)
    return {**plan.align.defaults, **plan.combine.defaults}


class StageClock:
    """Each stage's wall seconds (the report's ``timings``) and CPU seconds of this process, all
    its threads (``cpu_timings``: other processes on the cores hardly move them, unlike wall
    time), from :meth:`start` to :meth:`stop`."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.start()

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self, stage: str) -> None:
        self.wall[stage] = time.perf_counter() - self._wall
        self.cpu[stage] = time.process_time() - self._cpu


@dataclass
class MergeResult:
    """The merged model (a new module of the models' class) and how it was made."""

    model: nn.Module
    transforms: list[dict[str, Transform]]
    report: dict[str, Any]
    spec: Spec
    statistics: Statistics | None = None
    # Each model's state in the reference's coordinates. Under batchnorm="fold" the BatchNorms
    # of dense spaces are folded into their writers and given that model's own transformed
    # output statistics as γ/β: reset their running statistics before using such a state
    # (with repair="none" they stay the identities folding left, and the state works as is).
    aligned: list[dict[str, torch.Tensor]] = field(default_factory=list, repr=False)
    # NP Merge's learned weights per parameter, (N, *shape); None for averaging methods.
    coefficients: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def _model_name(index: int, names: Sequence[str] | None) -> str:
    return f"model {index} ({names[index]})" if names else f"model {index}"


def check_compatible(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """MergeError naming the first model whose class differs from model 0's, or the first
    tensor whose name or shape (:func:`accord.compatible.check_same_tensors`), then dtype,
    differs; ``names`` (e.g. checkpoint paths) label the models in the message."""
    if not models:
        raise MergeError("merging needs at least one model, got none")
    labels = [_model_name(i, names) for i in range(len(models))]
    for label, model in zip(labels[1:], models[1:], strict=True):
        if type(model) is not type(models[0]):
            raise MergeError(
                f"{label} is a {type(model).__name__}, {labels[0]} a "
                f"{type(models[0]).__name__}: only models of one architecture can be merged"
            )
    _check_same_states([model.state_dict() for model in models], labels)


def _check_same_states(states: Sequence[Mapping[str, torch.Tensor]], labels: list[str]) -> None:
    """MergeError naming the first tensor whose name or shape, then dtype, differs from
    ``states[0]``'s."""
    check_same_tensors(
        [TensorShapes.of_state(label, state) for label, state in zip(labels, states, strict=True)],
        what="parameter",
    )
    for label, state in zip(labels[1:], states[1:], strict=True):
        for key, tensor in states[0].items():
            if state[key].dtype != tensor.dtype:
                raise MergeError(
                    f"parameter {key!r} is {state[key].dtype} in {label} but {tensor.dtype} in "
                    f"{labels[0]}: models of one dtype are merged; convert them all first, "
                    f"e.g. model.to({tensor.dtype})"
                )


def check_models(models: Sequence[nn.Module], names: Sequence[str] | None = None) -> None:
    """Before any work: the models are compatible (:func:`check_compatible`) and every tensor
    of every model is finite, since one NaN or inf weight makes the whole merge non-finite."""
    check_compatible(models, names)
    for index, model in enumerate(models):
        _require_finite(
            model.state_dict(),
            _model_name(index, names),
            "it would make the merged model non-finite; the checkpoint is corrupt or its "
            "training diverged: retrain it, or merge without it",
        )


def check_base(
    base: nn.Module | Mapping[str, torch.Tensor],
    models: Sequence[nn.Module],
    name: str = "the base",
    names: Sequence[str] | None = None,
) -> Mapping[str, torch.Tensor]:
    """The base's state, checked as a model would be: of model 0's class (given as a
    module), with its tensors, shapes and dtypes, every tensor finite. ``name`` (e.g. "the
    base (its path)") and ``names`` (the models') label the messages."""
    first = _model_name(0, names)
    if isinstance(base, nn.Module):
        if type(base) is not type(models[0]):
            raise MergeError(
                f"{name} is a {type(base).__name__}, {first} a {type(models[0]).__name__}: "
                "give the model the merged ones were fine-tuned from"
            )
        state: Mapping[str, torch.Tensor] = base.state_dict()
    elif isinstance(base, Mapping):
        state = base
    else:
        raise MergeError(
            f"base is a {type(base).__name__}: give the model the merged ones were fine-tuned "
            "from, or its state dict"
        )
    _check_same_states([models[0].state_dict(), state], [first, name])
    _require_finite(state, name, "task vectors against it would make the merged model non-finite")
    return state


def _check_input_dtype(model: nn.Module, data: Any, what: str) -> None:
    """MergeError when ``data``'s first floating inputs differ in dtype from the model's
    parameters: torch layers do not mix them, and accord casts neither. A one-shot iterator
    is not looked at, so that none of its batches is lost."""
    if data is None or iter(batches(data)) is batches(data):
        return
    batch = next(iter(batches(data)), None)
    inputs = batch[0] if isinstance(batch, tuple | list) else batch
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is None or not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        return
    if inputs.dtype != dtype:
        raise MergeError(
            f"{what} gives {inputs.dtype} inputs but the models' parameters are {dtype}: give "
            f"{dtype} inputs (e.g. inputs.to({dtype}) in the loader), or convert every model "
            f"to the data's dtype (model.to({inputs.dtype}))"
        )


def choose_reference(
    models: Sequence[nn.Module], reference: int | str, validation: Any, device: str
) -> int:
    """An index, or ``"best"``: the model with the highest validation accuracy."""
    if reference == "best":
        if validation is None:
            raise MergeError('reference="best" needs validation data (validation=...)')
        scores = [evaluate(m, validation, device).accuracy for m in models]
        return max(range(len(models)), key=scores.__getitem__)
    if isinstance(reference, bool) or not isinstance(reference, int):
        raise MergeError(f"reference={reference!r}: give a model index or 'best'")
    if not 0 <= reference < len(models):
        raise MergeError(f"reference={reference} is not a model index (0..{len(models) - 1})")
    return reference


def first_inputs(data: Any) -> torch.Tensor:
    """The inputs of the first batch of ``data`` (for tracing)."""
    batch = next(iter(batches(data)), None)
    if batch is None:
        raise MergeError("data is empty")
    return batch[0] if isinstance(batch, tuple | list) else batch


def snap_permutations(alignment: Alignment) -> Alignment:
    """The alignment with every map that is a permutation to within float32 rounding made
    exactly one (:meth:`Transform.snapped`).

    Dense methods return a permutation as a dense matrix when the features are permuted
    copies; applied as a permutation it needs no BatchNorm folding and stays exact.
    """
    transforms = [{name: t.snapped() for name, t in ts.items()} for ts in alignment.transforms]
    return Alignment(transforms, alignment.report)


def dense_spaces(spec: Spec, alignment: Alignment) -> list[str]:
    """Spaces where some model's map is not a permutation."""
    names = {
        name
        for transforms in alignment.transforms
        for name, t in transforms.items()
        if t.permutation is None
    }
    return [s.name for s in spec.spaces if s.name in names]


def align_states(
    models: Sequence[nn.Module], spec: Spec, alignment: Alignment, batchnorm: str = "fold"
) -> list[dict[str, torch.Tensor]]:
    """Each model's state dict in the merged coordinates."""
    dense = dense_spaces(spec, alignment)
    return [
        align_state(m, spec, t, dense, batchnorm)
        for m, t in zip(models, alignment.transforms, strict=True)
    ]


def align_state(
    model: nn.Module,
    spec: Spec,
    transforms: Mapping[str, Transform],
    dense: list[str],
    batchnorm: str = "fold",
) -> dict[str, torch.Tensor]:
    """One model's state dict in the merged coordinates by its ``transforms``; the BatchNorms
    of the ``dense`` spaces are folded into their writers, or, under
    ``batchnorm="transform"``, transformed as writers."""
    if batchnorm == "transform":
        return apply_transforms(model.state_dict(), batchnorm_as_writers(spec, dense), transforms)
    folded = [spec[name] for name in dense]
    state = fold_batchnorms(model, folded) if folded else model.state_dict()
    return apply_transforms(state, spec, transforms)


def _resolve_repair(repair: str, model: nn.Module, data: Any) -> str:
    if repair not in REPAIRS:
        raise MergeError(f"repair={repair!r}: choose one of {', '.join(REPAIRS)}")
    if repair == "auto":
        if data is None:
            return "none"
        return "bn-reset" if has_batchnorm(model) else "repair"
    if repair != "none" and data is None:
        raise MergeError(f"repair={repair!r} needs data (a pass over training inputs)")
    if repair == "bn-reset" and not has_batchnorm(model):
        raise MergeError("repair='bn-reset' but the model has no BatchNorm; use 'repair'")
    return repair


def merge(
    models: Sequence[nn.Module],
    data: Any = None,
    method: str | None = None,
    spec: Spec | None = None,
    reference: int | str = 0,
    repair: str = "auto",
    statistics: Statistics | None = None,
    *,
    align: str | None = None,
    combine: str | None = None,
    batchnorm: str = "fold",
    base: nn.Module | Mapping[str, torch.Tensor] | None = None,
    validation: Any = None,
    max_samples: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    options: Mapping[str, Any] | str | None = None,
    stop_at: int | None = None,
    **method_options: Any,
) -> MergeResult:
    """Merge ``models``: align them with ``align`` (:data:`accord.registry.ALIGNMENTS`, default
    ``"cca"``), then combine the aligned states with ``combine``
    (:data:`accord.registry.COMBINERS`, default ``"average"``).

    ``method`` is a shorthand for either (:func:`plan_methods`): ``method="cca"`` is
    ``align="cca"`` averaged, ``method="npmerge"`` is ``combine="npmerge"`` after its default
    alignment (CCA). ``data``: batches ``(inputs, labels)`` of training data for the
    statistics pass, the repair and combiners that learn (NP Merge early-stops on
    ``validation`` when given). Both methods' options (e.g. ``ridge`` for CCA,
    ``epochs`` for NP Merge) come as keywords or as the ``options`` mapping; ``options="auto"``
    chooses them on ``validation`` (:func:`accord.tune.merge_tuned`). ``statistics`` from an
    earlier :func:`accord.collect_statistics` call are reused rather than collected again.
    ``reference`` is a model index or ``"best"`` (by validation accuracy). ``base``: the model
    (or its state dict) that ``models`` were fine-tuned from, for the combiners that merge
    task vectors against a base (their record's ``needs.base``: task arithmetic, TIES,
    DARE...); it moves into the merged coordinates as the reference does, and the aligned
    models' task vectors against it are combined (:func:`accord.merge_state_dicts`).

    ``stop_at=k`` merges the first k free feature spaces only (graph order) and keeps the rest
    per model: ``model`` is then an :class:`accord.PartialMerge`, a merged trunk with one
    branch per model whose logits are averaged (k = 0: the ensemble; :mod:`accord.partial`).
    It needs ``data``, fixed options and a tensorwise combiner (averaging).

    Checked before any work: the models and the base (:func:`check_models`: one architecture
    and dtype, every tensor finite), the methods, whether the combiner needs a base, their
    options (:func:`check_options`: names, values within their records' ranges, also those
    given with ``options="auto"``, before ``data`` is read), and that ``data`` and
    ``validation`` give inputs of the models' dtype (nothing is cast). A merged model with a
    NaN or inf tensor is never returned: a MergeError names the tensor and the stage that
    produced it.
    """
    models = list(models)
    check_models(models)
    if isinstance(options, str) and options != "auto":
        raise MergeError(f"options={options!r}: give a mapping of method options or 'auto'")
    given = {**(options if isinstance(options, Mapping) else {}), **method_options}
    plan, given = request_plan(method, align, combine, given)
    # the options given, also under "auto" (which tunes the others), before anything reads data
    align_options, combine_options = check_options(plan, given, len(models))
    if len(models) > 1:
        check_inputs(plan.combine, len(models), has_base=base is not None)
    _check_input_dtype(models[0], data, "data")
    _check_input_dtype(models[0], validation, "validation")
    base_state = check_base(base, models) if base is not None else None
    if stop_at is not None and (options == "auto" or not plan.combine.tensorwise or data is None):
        raise MergeError(
            f"stop_at={stop_at!r} needs data, fixed options (choose them with a full merge "
            "under options='auto' first) and a tensorwise combiner such as 'average'"
        )
    if options == "auto":
        return merge_tuned(
            merge,
            models,
            data,
            plan,
            validation,
            spec=spec,
            reference=reference,
            repair=repair,
            statistics=statistics,
            batchnorm=batchnorm,
            base=base,
            max_samples=max_samples,
            device=device,
            progress=progress,
            **given,
        )
    if batchnorm not in BATCHNORM_ROUTES:
        raise MergeError(f"batchnorm={batchnorm!r}: choose one of {', '.join(BATCHNORM_ROUTES)}")
    if not plan.combine.repair_after and repair == "auto" and not has_batchnorm(models[0]):
        repair = "none"  # the combiner already fitted the data; REPAIR would undo it
    repair_kind = _resolve_repair(repair, models[0], data)
    ref = choose_reference(models, reference, validation, device)
    needs_data = plan.align.needs.data
    if needs_data and data is None and statistics is None:
        raise MergeError(f"method {plan.align.name!r} needs data: pass data=... (training batches)")
    clock = StageClock()
    # the tracer and every model's statistics pass read one exported program
    with shared_exports():
        if spec is None:
            if data is None:
                raise MergeError("tracing the models needs an example input: pass data or spec")
            from accord.trace import trace

            spec = trace(models[0], first_inputs(data)[:2])
        if stop_at is not None:
            check_stop_at(stop_at, spec)
        clock.stop("trace")
        report = {
            "method": plan.name,
            "alignment": plan.align.name,
            "combine": plan.combine.name,
            "options": align_options,
            "combine_options": combine_options,
        }
        if len(models) == 1:
            return _only_model(models[0], spec, report, clock)
        if needs_data and statistics is None:
            clock.start()
            statistics = collect_statistics(
                models,
                batches(data),
                spec,
                max_samples=max_samples,
                device=device,
                reference=ref,
                pairs="all" if plan.align.needs.all_pairs and len(models) > 2 else "reference",
                progress=progress,
                # with repair="none" the folded BatchNorms stay identities and need no targets
                batchnorms=needs_batchnorm_statistics(plan.align, batchnorm)
                and repair_kind != "none",
            )
            clock.stop("statistics")
    clock.start()
    states = [m.state_dict() for m in models]
    used = statistics if needs_data else None
    alignment = snap_permutations(
        match(plan.align.name, spec, used, states, reference=ref, **align_options)
    )
    if stop_at is not None:
        alignment = restrict(spec, alignment, stop_at)
    clock.stop("match")
    if base_state is not None:
        # the base moves as the reference does (the fine-tunes share its coordinates)
        holder = copy.deepcopy(models[ref])
        holder.load_state_dict(base_state)
        dense = dense_spaces(spec, alignment)
        base_state = align_state(holder, spec, alignment.transforms[ref], dense, batchnorm)
    combiner = _combine_stage(
        plan.combine, combine_options, models, data, device, progress, base_state, validation
    )
    result = combine_aligned(
        models,
        spec,
        alignment,
        statistics,
        ref,
        repair_kind,
        data,
        batchnorm,
        device,
        clock,
        combiner,
        fits_data=not plan.combine.repair_after,
    )
    result.report.update({**report, "reference": ref, "num_models": len(models)})
    if stop_at is not None:
        result.model = partial_result_model(result, stop_at, data, device)
    if "combination" in result.report:  # what the combiner reports, under its name
        result.report[plan.combine.name] = result.report.pop("combination")
    return result


def _only_model(
    model: nn.Module, spec: Spec, report: dict[str, Any], clock: StageClock
) -> MergeResult:
    """The merge of one model: a copy of it, since every method returns a model merged with
    itself unchanged."""
    report = {
        **report,
        "reference": 0,
        "num_models": 1,
        "notes": ["one model: nothing to merge, the result is a copy of it"],
        "timings": clock.wall,
        "cpu_timings": clock.cpu,
    }
    transforms = [{s.name: Transform.identity(s.size) for s in spec.free_spaces}]
    return MergeResult(copy.deepcopy(model).eval(), transforms, report, spec)


Combine = Callable[[list[dict[str, torch.Tensor]], int], Combined]


def _combine_stage(
    record: CombineMethod,
    options: dict[str, Any],
    models: list[nn.Module],
    data: Any,
    device: str,
    progress: bool,
    base: Mapping[str, torch.Tensor] | None = None,
    validation: Any = None,
) -> Combine:
    """The combine stage: ``(aligned states, reference) -> Combined`` by ``record`` (with the
    aligned ``base`` for task vectors; ``validation`` for the combiners that learn)."""

    def tensorwise(aligned: list[dict[str, torch.Tensor]], reference: int) -> Combined:
        merged = merge_state_dicts(aligned, record.name, base=base, reference=reference, **options)
        return Combined(merged)

    def whole(aligned: list[dict[str, torch.Tensor]], reference: int) -> Combined:
        context = CombineContext(models, reference, data, device, progress, validation)
        return record.function(aligned, context, **options)

    return tensorwise if record.tensorwise else whole


def _average(aligned: list[dict[str, torch.Tensor]], reference: int) -> Combined:
    return Combined(merge_state_dicts(aligned, DEFAULT_COMBINE, reference=reference))


def combine_aligned(
    models: Sequence[nn.Module],
    spec: Spec,
    alignment: Alignment,
    statistics: Statistics | None,
    reference: int,
    repair: str,
    data: Any,
    batchnorm: str,
    device: str,
    clock: StageClock,
    combiner: Combine = _average,
    fits_data: bool = False,
) -> MergeResult:
    """Apply the alignment, combine (``combiner``: averaging by default), and repair: the
    stages after matching. Every stage's output is checked to be finite (from finite models).

    On folded BatchNorm spaces under dense maps, each aligned model gets its own target
    statistics before combining, so that it computes after a reset what it computed before;
    the merged state gets the averaged targets unless the combiner ``fits_data`` (NP Merge),
    whose learned γ/β already fit the reset model it trained."""
    _check_maps(alignment)
    clock.start()
    aligned = align_states(models, spec, alignment, batchnorm)
    clock.stop("apply")
    _check_aligned(aligned)
    clock.start()
    dense = dense_spaces(spec, alignment)
    folded = [n for n in dense if spec[n].batchnorms] if batchnorm == "fold" else []
    # With repair="none" the folded BatchNorms keep what folding left them: the identity
    # (γ = 1, mean 0, variance 1 − eps) plus the merged shift, so the merged weights compute
    # as they are; targets are only meant for a statistics reset.
    if folded and repair != "none":
        if statistics is None or repair != "bn-reset":
            raise MergeError(
                f"dense maps on BatchNorm spaces ({', '.join(folded)}) need statistics and "
                "repair='bn-reset' to give the merged BatchNorms their statistics, or "
                "repair='none' to keep the folded BatchNorms as identities"
            )
        eps = {n: m.eps for n, m in models[reference].named_modules() if hasattr(m, "eps")}
        maps = {n: [t[n].matrix for t in alignment.transforms] for n in dense}
        for i, state in enumerate(aligned):
            one_hot = [float(i == j) for j in range(len(aligned))]
            batchnorm_targets(spec, maps, statistics, state, eps, one_hot)
    combined = combiner(aligned, reference)
    merged_state = combined.state
    if folded and repair != "none" and not fits_data:
        batchnorm_targets(spec, maps, statistics, merged_state, eps)
    _require_finite(
        merged_state,
        "the merged model",
        "every aligned model is finite, so combining them overflowed the parameters' dtype",
    )
    merged = copy.deepcopy(models[reference])
    merged.load_state_dict(merged_state)
    clock.stop("combine")
    clock.start()
    if repair == "bn-reset":
        reset_batchnorm(merged, data, device=device)
    elif repair == "repair":
        repair_activations(merged, models, alignment.transforms, spec, data, device=device)
    _require_finite(
        merged.state_dict(),
        f"the merged model after the repair ({repair!r})",
        "its activations on the training data overflow; check the data, or merge with "
        "repair='none'",
    )
    clock.stop("repair")
    report = {
        "repair": repair,
        "batchnorm": batchnorm if dense else None,
        "dense_spaces": dense,
        "spaces": alignment.report,
        "timings": clock.wall,
        "cpu_timings": clock.cpu,
    }
    if combined.report is not None:
        report["combination"] = combined.report
    if repair == "none" and batchnorm == "transform" and has_batchnorm(merged) and dense:
        warnings.warn("dense maps without a BatchNorm reset leave stale statistics", stacklevel=3)
    return MergeResult(
        merged.eval(),
        alignment.transforms,
        report,
        spec,
        statistics,
        aligned,
        combined.coefficients,
    )


def _require_finite(state: Mapping[str, torch.Tensor], where: str, cause: str) -> None:
    found = first_non_finite(state)
    if found is not None:
        tensor, problem = found
        raise MergeError(f"{where}: tensor {tensor!r} has {problem}; {cause}")


def _check_maps(alignment: Alignment) -> None:
    """MergeError naming the space, model and method of the first non-finite map."""
    for index, transforms in enumerate(alignment.transforms):
        for space, transform in transforms.items():
            problem = describe_non_finite(transform.matrix) or describe_non_finite(
                transform.inverse
            )
            if problem is not None:
                method = alignment.report.get(space, {}).get("method", "the matcher")
                raise MergeError(
                    f"the {method} map of space {space!r} for model {index} has {problem}, "
                    "from finite models and statistics: its solve broke down on degenerate "
                    "statistics; collect more samples, or regularise more (cca: a larger "
                    "ridge)"
                )


def _check_aligned(aligned: Sequence[dict]) -> None:
    """MergeError naming the first non-finite aligned tensor and its likely cause."""
    for index, state in enumerate(aligned):
        _require_finite(
            state,
            f"model {index} aligned to the reference",
            "its maps are finite but so large that its weights overflow their dtype (a "
            "near-singular solve); regularise more (cca: a larger ridge)",
        )
