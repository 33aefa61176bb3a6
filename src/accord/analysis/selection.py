"""Which checkpoints to merge: merge candidate combinations of experts' training steps and pick
by the merged model's validation accuracy (Horoi et al., 2025, "Less is More: Undertraining
Experts Improves Model Upcycling").

Experts trained longer for their own accuracy can merge worse: late steps memorise a few hard
examples whose updates interfere. :func:`select_checkpoints` takes each expert's checkpoints in
training order (``accord train --keep-every``; :func:`accord.training_steps`), merges each
candidate combination, either step k of every expert (``grid="aligned"``) or every combination
(``grid="all"``), and picks the one whose merged model scores best on the validation split;
never by the experts' own accuracy, never by the test split (reported, not used).

Merges: any combiner of task vectors ``τ_i = θ_i − θ_0`` around a ``base`` θ_0 (one whose
record takes a base: task arithmetic ``Σ τ_i``, TIES, DARE, ...; :data:`accord.COMBINERS`), as
``θ_0 + λ τ`` with ``τ`` the combiner's merged task vector at scale 1 (``density``: its
``density`` option, e.g. TIES' top fraction per tensor) and ``λ`` chosen per candidate on
validation from ``scales``; or any alignment, or other combiner, for experts trained apart
(:func:`accord.merge`).

Diagnostics per candidate (with a base): ‖τ_i‖, the mean pairwise cosine of the task vectors,
and the sign-conflict rate (TIES' notion: among entries that at least two trimmed task vectors
keep, the share whose kept signs disagree). For every method: each expert's hard examples, the
``hard_fraction`` of its training examples with the largest EL2N score ``‖softmax(f(x)) −
onehot(y)‖₂`` at an early checkpoint (``el2n_step``, default its first), the expert's accuracy
on them (before merging) and the merged model's (after), and the share of hard examples among
those it learned late (correct at this step, wrong at the EL2N step). The table, JSON, figure
and ``accord select`` are in :mod:`accord.analysis.selection_report`.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from accord.checkpoint import Checkpoint, load_checkpoint
from accord.combine._sparse import magnitude_prune
from accord.combine._state_dicts import check_inputs, combine_tensor, spread_options
from accord.data import Dataset, DataSplits, make_loader, split_indices
from accord.errors import ConfigError, MergeError
from accord.merge import check_options, merge
from accord.registry import (
    CombineMethod,
    MethodPlan,
    lookup,
    plan_methods,
    resolve_options,
    task_vector_combiners,
)
from accord.store import training_steps

GRIDS = ("aligned", "all")
StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class Expert:
    """One expert's checkpoints in training order and the examples it was trained on."""

    checkpoints: list[Checkpoint]
    train_indices: np.ndarray
    classes: np.ndarray

    @property
    def steps(self) -> list[int]:
        return [_step(c, k) for k, c in enumerate(self.checkpoints)]


def _step(checkpoint: Checkpoint, index: int) -> int:
    return int(checkpoint.config.get("progress", {}).get("step", index))


def _epochs(checkpoint: Checkpoint) -> float | None:
    epochs = checkpoint.config.get("progress", {}).get("epochs")
    return None if epochs is None else float(epochs)


def expert_from_store(
    entry: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | Checkpoint],
    data: DataSplits,
    device: str = "cpu",
) -> Expert:
    """An expert from a store entry (its kept steps, then itself) or from checkpoints in
    training order; its training examples are recomputed from the split its key records."""
    if isinstance(entry, (str, os.PathLike)):
        entry = training_steps(entry)
    checkpoints = [c if isinstance(c, Checkpoint) else load_checkpoint(c, device) for c in entry]
    if not checkpoints:
        raise ConfigError("an expert needs at least one checkpoint")
    key = checkpoints[-1].config.get("key", {})
    split = key.get("split")
    labels = data.train.labels.numpy()
    if split is None:
        indices = np.arange(len(labels))
    else:
        parts = split_indices(
            labels, split["models"], split["mode"], alpha=split["alpha"] or 0.5, seed=split["seed"]
        )
        indices = parts[split["part"]]
    return Expert(checkpoints, indices, np.unique(labels[indices]))


@torch.no_grad()
def predictions(model: nn.Module, data: Dataset, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """``(correct, el2n)`` per example: whether the argmax is the label, and EL2N ``‖softmax(f(x))
    − onehot(y)‖₂`` (Paul et al., 2021)."""
    model = model.to(device).eval()
    correct, scores = [], []
    for inputs, labels in make_loader(data, batch_size=512):
        logits = model(inputs.to(device)).float().cpu()
        correct.append(logits.argmax(1) == labels)
        error = logits.softmax(1) - F.one_hot(labels, logits.shape[1]).float()
        scores.append(error.norm(dim=1))
    return torch.cat(correct), torch.cat(scores)


def _own(data: Dataset, classes: np.ndarray) -> Dataset:
    """The examples of ``data`` whose label is one of ``classes``."""
    return data.subset(np.flatnonzero(np.isin(data.labels.numpy(), classes)))


def task_vectors(base: StateDict, state: StateDict) -> StateDict:
    """``θ − θ_0`` for every floating tensor."""
    return {n: state[n] - t for n, t in base.items() if t.is_floating_point()}


def merged_task_vector(
    base: StateDict,
    states: Sequence[StateDict],
    method: str,
    options: Mapping[str, Any] | None = None,
) -> StateDict:
    """The task vectors merged by combiner ``method`` with ``options`` at scale 1: every
    combiner's ``scale`` multiplies its merged task vector, so ``λ`` scales this one."""
    record = _task_vector_combiner(method)
    resolved = _task_vector_options(record, options or {}, len(states))
    merged = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            continue
        deltas = [s[name] - tensor for s in states]
        merged[name] = combine_tensor(record, name, deltas, resolved)
    return merged


def _task_vector_combiner(method: str) -> CombineMethod:
    """The record of combiner ``method``, one that merges task vectors tensor by tensor."""
    record = lookup("combine", method)
    if not (record.tensorwise and record.needs.base != "no"):
        raise ConfigError(
            f"method {method!r} is not a task-vector merge: {', '.join(task_vector_combiners())}"
        )
    return record


def _task_vector_options(
    record: CombineMethod, options: Mapping[str, Any], count: int
) -> dict[str, Any]:
    """``record``'s options for ``count`` models at scale 1 (``λ`` comes from the scales),
    checked against the record."""
    if "scale" in options:
        raise ConfigError(
            f"options: scale of {record.name!r} is λ, chosen from scales=...; leave it out"
        )
    fixed = {"scale": 1.0} if "scale" in record.defaults else {}
    return spread_options(record, resolve_options(record, {**options, **fixed}), count)


def task_vector_diagnostics(
    base: StateDict, states: Sequence[StateDict], density: float
) -> dict[str, Any]:
    """‖τ_i‖, the mean pairwise cosine of the τ_i, and the TIES sign-conflict rate at
    ``density`` (see the module docstring)."""
    vectors = [task_vectors(base, s).values() for s in states]
    flat = torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in vectors]).double()
    norms = flat.norm(dim=1)
    pairs = itertools.combinations(range(len(states)), 2)
    cosines = [float(flat[i] @ flat[j] / (norms[i] * norms[j]).clamp_min(1e-30)) for i, j in pairs]
    trimmed = torch.stack(  # per tensor, as TIES trims
        [torch.cat([magnitude_prune(t, density).reshape(-1) for t in v]) for v in vectors]
    )
    positive, negative = (trimmed > 0).sum(0), (trimmed < 0).sum(0)
    shared = (positive + negative) >= 2
    conflict = shared & (positive > 0) & (negative > 0)
    return {
        "task_vector_norms": norms.tolist(),
        "mean_cosine": float(np.mean(cosines)) if cosines else None,
        "sign_conflict": float(conflict.sum()) / max(1, int(shared.sum())),
    }


@dataclass(frozen=True)
class _StepRecord:
    """What one expert checkpoint scores on its own: accuracies and per-example correctness
    on its training examples."""

    step: int
    epochs: float | None
    own_val_accuracy: float
    val_accuracy: float
    train_correct: Tensor


def _record(expert: Expert, checkpoint: Checkpoint, k: int, data: DataSplits, device: str):
    own, _ = predictions(checkpoint.model, _own(data.val, expert.classes), device)
    val, _ = predictions(checkpoint.model, data.val, device)
    train, _ = predictions(checkpoint.model, data.train.subset(expert.train_indices), device)
    return _StepRecord(_step(checkpoint, k), _epochs(checkpoint), _mean(own), _mean(val), train)


def _mean(values: Tensor) -> float | None:
    """The mean of a boolean or numeric tensor; None (never NaN) when it is empty."""
    return float(values.float().mean()) if len(values) else None


@dataclass
class Selection:
    """The candidates' table (one dict per candidate, see :func:`select_checkpoints`) and the
    index of the chosen one."""

    method: str
    grid: str
    rows: list[dict[str, Any]]
    chosen: int
    hard_fraction: float
    el2n_steps: list[int]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> dict[str, Any]:
        return self.rows[self.chosen]


def _candidates(experts: Sequence[Expert], grid: str) -> list[tuple[int, ...]]:
    """Index tuples (one checkpoint index per expert) to merge."""
    if grid not in GRIDS:
        raise ConfigError(f"grid={grid!r}: choose one of {', '.join(GRIDS)}")
    counts = [len(e.checkpoints) for e in experts]
    if grid == "all":
        return list(itertools.product(*(range(c) for c in counts)))
    if len(set(counts)) != 1:
        raise ConfigError(
            f"grid='aligned' merges step k of every expert, but the experts have {counts} "
            "checkpoints; keep the same steps for each, or use grid='all'"
        )
    return [(k,) * len(experts) for k in range(counts[0])]


def _hard_masks(
    experts: Sequence[Expert], el2n_step: int, fraction: float, data: DataSplits, device: str
) -> list[Tensor]:
    """Per expert, the mask of its training examples whose EL2N score at checkpoint
    ``el2n_step`` is among the top ``fraction``."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"hard_fraction={fraction}: give a share in (0, 1]")
    masks = []
    for expert in experts:
        early = expert.checkpoints[el2n_step].model
        _, scores = predictions(early, data.train.subset(expert.train_indices), device)
        count = max(1, round(fraction * len(scores)))
        mask = torch.zeros(len(scores), dtype=torch.bool)
        mask[scores.topk(count).indices] = True
        masks.append(mask)
    return masks


def _merged_models(
    models: Sequence[nn.Module],
    base: StateDict | None,
    method: str,
    scales: Sequence[float],
    density: float,
    options: Mapping[str, Any],
    data: DataSplits,
    device: str,
) -> list[tuple[float | None, nn.Module]]:
    """``(λ, merged model)`` for every scale of a task-vector merge, or ``(None, model)`` for
    merge by :func:`accord.merge`."""
    plan = plan_methods(method)
    if not _sweeps_scales(plan, base is not None):
        loader = make_loader(data.train, batch_size=256)
        given = {"base": base} if plan.combine.needs.task_vectors(base is not None) else {}
        result = merge(models, loader, method=method, device=device, **given, **options)
        return [(None, result.model)]
    states = [m.state_dict() for m in models]
    vector = merged_task_vector(base, states, method, _with_density(plan, options, density))
    merged = []
    for scale in scales:
        model = copy.deepcopy(models[0])
        model.load_state_dict(
            {n: t + scale * vector[n] if n in vector else t for n, t in base.items()}
        )
        merged.append((float(scale), model.eval()))
    return merged


def _evaluate_candidate(
    experts: Sequence[Expert],
    records: Sequence[Sequence[_StepRecord]],
    indices: tuple[int, ...],
    merged: Sequence[tuple[float | None, nn.Module]],
    hard: Sequence[Tensor],
    el2n_step: int,
    data: DataSplits,
    device: str,
) -> dict[str, Any]:
    """One candidate's row: λ chosen on validation, then everything measured for that λ."""
    scored = [(_mean(predictions(m, data.val, device)[0]), scale, m) for scale, m in merged]
    val, scale, model = max(scored, key=lambda item: item[0])  # first of equals: smallest λ
    mine = [records[i][k] for i, k in enumerate(indices)]
    early = [records[i][el2n_step] for i in range(len(experts))]
    row: dict[str, Any] = {
        "checkpoints": list(indices),
        "steps": [r.step for r in mine],
        "epochs": [r.epochs for r in mine],
        "expert_own_val_accuracy": [r.own_val_accuracy for r in mine],
        "expert_val_accuracy": [r.val_accuracy for r in mine],
        "merged_val_accuracy": val,
        "merged_test_accuracy": _mean(predictions(model, data.test, device)[0]),
        "merged_own_val_accuracy": [
            _mean(predictions(model, _own(data.val, e.classes), device)[0]) for e in experts
        ],
        "scale": scale,
        "scales_val_accuracy": {f"{s:g}": v for v, s, _ in scored if s is not None},
    }
    hard_rows: dict[str, list[float | None]] = {
        k: [] for k in ("expert_accuracy", "merged_accuracy")
    }
    hard_rows |= {"easy_expert_accuracy": [], "easy_merged_accuracy": [], "late_share": []}
    for expert, record, first, mask in zip(experts, mine, early, hard, strict=True):
        after, _ = predictions(model, data.train.subset(expert.train_indices), device)
        late = record.train_correct & ~first.train_correct
        hard_rows["expert_accuracy"].append(_mean(record.train_correct[mask]))
        hard_rows["merged_accuracy"].append(_mean(after[mask]))
        hard_rows["easy_expert_accuracy"].append(_mean(record.train_correct[~mask]))
        hard_rows["easy_merged_accuracy"].append(_mean(after[~mask]))
        hard_rows["late_share"].append(_mean(mask[late]))
    row["hard"] = hard_rows
    return row


def _sweeps_scales(plan: MethodPlan, has_base: bool) -> bool:
    """Whether ``plan`` merges as ``θ_0 + λ τ``: its combiner merges task vectors (with the
    base given) tensor by tensor; otherwise :func:`accord.merge` merges the models."""
    return plan.combine.tensorwise and plan.combine.needs.task_vectors(has_base)


def _with_density(plan: MethodPlan, options: Mapping[str, Any], density: float) -> dict:
    """``options`` with ``density`` as the combiner's option of that name, if it has one."""
    if "density" in options:
        raise ConfigError("options: density is select_checkpoints' density=...; leave it out")
    return {**options, **({"density": density} if "density" in plan.combine.defaults else {})}


def _check_method(
    method: str, base: Any, options: Mapping[str, Any], density: float, count: int
) -> None:
    """Refuse, before any work: a method that is neither an alignment nor a combiner, a
    task-vector merge without a base, and options (or ``density``) its records refuse."""
    try:
        plan = plan_methods(method)
        has_base = base is not None
        if plan.combine.needs.task_vectors(has_base):
            problem = plan.combine.needs.base_problem(f"method {method!r}", has_base)
            if problem:
                raise ConfigError(problem)
        if _sweeps_scales(plan, has_base):
            check_inputs(plan.combine, count, has_base)
            _task_vector_options(plan.combine, _with_density(plan, options, density), count)
        else:
            check_options(plan, options, count)
    except MergeError as exc:
        raise ConfigError(str(exc)) from None


def _base_state(base: str | os.PathLike[str] | Checkpoint | nn.Module | None) -> StateDict | None:
    if base is None:
        return None
    if isinstance(base, (str, os.PathLike)):
        base = load_checkpoint(base)
    model = base.model if isinstance(base, Checkpoint) else base
    return {n: t.detach().cpu() for n, t in model.state_dict().items()}


def select_checkpoints(
    experts: Sequence[Expert | str | os.PathLike[str] | Sequence[Any]],
    data: DataSplits,
    *,
    method: str = "ties",
    base: str | os.PathLike[str] | Checkpoint | nn.Module | None = None,
    scales: Sequence[float] = (1.0,),
    density: float = 0.2,
    options: Mapping[str, Any] | None = None,
    grid: str = "aligned",
    hard_fraction: float = 0.1,
    el2n_step: int = 0,
    device: str = "cpu",
) -> Selection:
    """Merge each candidate combination of the experts' checkpoints and choose the one whose
    merged model has the best validation accuracy (the first of equals).

    ``experts``: store entries (their kept steps, then the entry), checkpoint lists in
    training order, or :class:`Expert` s. ``method``: a combiner of task vectors around
    ``base`` (``λ`` from ``scales`` and the choice per candidate on validation; ``density``
    for a combiner with that option, such as TIES), or an alignment or other combiner, each
    with ``options`` (see the module docstring, which also defines the diagnostics of every
    row). The method and its options are checked before any work.
    """
    _check_method(method, base, options or {}, density, len(experts))
    experts = [e if isinstance(e, Expert) else expert_from_store(e, data, device) for e in experts]
    base_state = _base_state(base)
    candidates = _candidates(experts, grid)
    if not 0 <= el2n_step < min(len(e.checkpoints) for e in experts):
        raise ConfigError(f"el2n_step={el2n_step}: not a checkpoint index of every expert")
    records = [
        [_record(e, c, k, data, device) for k, c in enumerate(e.checkpoints)] for e in experts
    ]
    hard = _hard_masks(experts, el2n_step, hard_fraction, data, device)
    rows = []
    for indices in candidates:
        models = [e.checkpoints[k].model for e, k in zip(experts, indices, strict=True)]
        merged = _merged_models(
            models, base_state, method, scales, density, options or {}, data, device
        )
        row = _evaluate_candidate(experts, records, indices, merged, hard, el2n_step, data, device)
        if base_state is not None:
            states = [{n: t.cpu() for n, t in m.state_dict().items()} for m in models]
            row |= task_vector_diagnostics(base_state, states, density)
        rows.append(row)
    chosen = max(range(len(rows)), key=lambda k: (rows[k]["merged_val_accuracy"], -k))
    config = {"scales": list(scales), "density": density, "options": dict(options or {})}
    return Selection(
        method,
        grid,
        rows,
        chosen,
        hard_fraction,
        [e.steps[el2n_step] for e in experts],
        {**config, "experts": [str(e.checkpoints[-1].path) for e in experts]},
    )
