"""NP Merge: learned, parameter-wise interpolation of aligned models.

Orozco Camacho, Horoi, Wolf, Belilovsky, "Non-Uniform Parameter-Wise Model Merging"
(arXiv:2412.15467, 2024). After alignment, every floating-point parameter tensor θ (shape S)
gets a coefficient-logit tensor ``a`` of shape ``(N, *S)``; the merged parameter is

    θ = Σ_i softmax_i(a) ⊙ θ_i            (N = 2: σ(a)·θ_0 + (1 − σ(a))·θ_1)

with ``a = 0`` at the start, which is the plain average. Only the logits train (Adam); the
aligned parameters are frozen constants. The loss is cross-entropy on labels,
KL(ensemble ‖ merged) to the teachers' averaged logits when there are no labels, or
``ce+kl``: cross-entropy on targets half the label, half the ensemble's distribution trusted
by the probability p it gives the label, p·ensemble + (1 − p)·label (labels smoothed by the
ensemble where it is sure of the right answer, the label alone where it is sure of a wrong
one). ``crop_padding`` trains on random shifted crops of the calibration images, fresh every
pass. ``schedule="cosine"`` lowers Adam's learning rate after each pass along a half cosine,
lr·(1 + cos(π·e/E))/2 for pass e + 1 of E; ``"constant"`` (the default) keeps it.

``granularity="channel"`` trains one logit per output channel (row) of each parameter instead,
broadcast over the rest of the tensor (a 1-d parameter keeps one per entry): far fewer
coefficients to fit on the calibration set.

``scheme="pairwise"`` (the paper's route for N > 2) trains one sigmoid logit tensor per stage
between the running merge and the next model. Memory: the logits and Adam's two moments are 3
tensors of each model's size per model (joint) or per stage (pairwise), next to the N (or 2)
stacked copies of the aligned parameters; with ``granularity="channel"`` those 3 hold one value
per output channel of each weight instead.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from accord._finite import first_non_finite
from accord.batchnorm import is_batchnorm
from accord.combine.average import average_states, weighted_mean
from accord.data import batches, random_crops
from accord.errors import MergeError
from accord.registry import (
    POSITIVE,
    CombineContext,
    Combined,
    Limits,
    Needs,
    Option,
    combiner,
    lookup,
)

LOSSES = ("ce", "kl", "ce+kl")
SCHEMES = ("joint", "pairwise")
GRANULARITIES = ("parameter", "channel")
SCHEDULES = ("constant", "cosine")

Weigh = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class NPMergeResult:
    """The merged state dict and how the coefficients were learned.

    ``coefficients[name]`` has shape ``(N, *param.shape)``: the weight of each original model
    in the merged parameter (summing to 1 over the first axis). ``losses`` holds one value per
    step, all stages concatenated. ``memory_bytes`` is measured on the tensors allocated for
    training (the largest stage for ``scheme="pairwise"``): ``parameters`` (the stacked frozen
    copies), ``logits`` and ``optimizer`` (Adam's state after its first step; 0 if none ran).
    """

    state: dict[str, torch.Tensor]
    losses: list[float]
    coefficients: dict[str, torch.Tensor]
    stages: list[dict[str, Any]]
    memory_bytes: dict[str, int] = field(default_factory=dict)


@dataclass
class _Task:
    """What every stage shares: the functional model, the data and the training settings."""

    probe: nn.Module
    buffers: dict[str, torch.Tensor]
    dtypes: dict[str, torch.dtype]
    data: Any
    loss: str
    teachers: Sequence[nn.Module]
    epochs: int
    max_samples: int | None
    lr: float
    device: torch.device
    progress: bool
    validation: Any = None
    granularity: str = "parameter"
    crop_padding: int = 0
    schedule: str = "constant"
    seed: int = 0


def _check_arguments(
    states: Sequence[Mapping[str, torch.Tensor]],
    data: Any,
    teachers: Sequence[nn.Module] | None,
    given: Mapping[str, Any],
) -> None:
    """Every problem with the arguments (``given``: the record's options by name), raised at
    once before any work."""
    record = lookup("combine", "npmerge")
    problems = []
    for name, value in given.items():  # the ranges and choices of the record, at once
        problem = record.option(name).problem(value)
        if problem is not None:
            problems.append(f"{name}={value!r}: {problem}")
    if len(states) < 2:
        problems.append(f"NP Merge needs at least 2 aligned state dicts, got {len(states)}")
    for index, state in enumerate(states):
        found = first_non_finite(state)
        if found is not None:
            problems.append(f"state {index}: tensor {found[0]!r} has {found[1]}")
    if data is None or (hasattr(data, "__len__") and len(data) == 0):
        problems.append("NP Merge needs a calibration set (data=...)")
    if given["loss"] != "ce" and not teachers:
        problems.append(f"loss={given['loss']!r} needs the base models as teachers=[...]")
    if problems:
        raise MergeError("; ".join(problems))


def _parameters(
    model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The floating parameters that get coefficients, and each tied alias's trained name."""
    trained: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.is_floating_point():
            continue
        if id(param) in first:
            aliases[name] = first[id(param)]
            continue
        first[id(param)] = name
        trained[name] = param
        for index, state in enumerate(states):
            if name not in state:
                raise MergeError(f"state {index} has no parameter {name!r} (the model has)")
            if state[name].shape != param.shape:
                raise MergeError(
                    f"parameter {name!r} has shape {tuple(state[name].shape)} in state {index} "
                    f"but {tuple(param.shape)} in the model"
                )
    if not trained:
        raise MergeError(f"{type(model).__name__} has no floating-point parameters to merge")
    return trained, aliases


def _weighted(
    states: Sequence[Mapping[str, torch.Tensor]], name: str, weights: torch.Tensor
) -> torch.Tensor:
    """``Σ_i w_i ⊙ θ_i`` in float64, summed as :func:`average_states` sums, so that uniform
    weights give its result bit for bit."""
    return weighted_mean([state[name] for state in states], weights).to(states[0][name].dtype)


def _split(batch: Any, loss: str, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, labels)`` of a batch; labels are required by the cross-entropy loss."""
    pair = isinstance(batch, tuple | list)
    inputs = batch[0] if pair else batch
    labels = batch[1] if pair and len(batch) > 1 else None
    if loss != "kl" and labels is None:
        raise MergeError(
            f"NP Merge: batch {index} of the calibration data has no labels, which "
            f"loss={loss!r} "
            "needs; "
            "use loss='kl' with teachers=[...] to distil the ensemble instead"
        )
    return inputs, labels


def _stream(task: _Task) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """``(pass, inputs, labels)`` over ``epochs`` passes of the data (passes counted from 1),
    cut at ``max_samples`` samples in total."""
    seen = 0
    if task.max_samples == 0:
        return
    crops = torch.Generator().manual_seed(task.seed)
    for epoch in range(task.epochs):
        count = 0
        for batch in batches(task.data):
            count += 1
            inputs, labels = _split(batch, task.loss, count - 1)
            if task.crop_padding:
                inputs = _cropped(inputs, task.crop_padding, crops, count - 1)
            if task.max_samples is not None:
                inputs = inputs[: task.max_samples - seen]
                labels = None if labels is None else labels[: task.max_samples - seen]
            seen += len(inputs)
            yield epoch + 1, inputs, labels
            if task.max_samples is not None and seen >= task.max_samples:
                return
        if count == 0:
            raise MergeError(
                f"NP Merge needs a calibration set (data=...): pass {epoch + 1} gave no batches "
                "(a one-shot iterator cannot be read twice: give a list or a DataLoader)"
            )


def _cropped(
    inputs: torch.Tensor, padding: int, generator: torch.Generator, index: int
) -> torch.Tensor:
    """Random shifted crops of an image batch, each channel padded with its smallest value in
    the batch (the background)."""
    if inputs.dim() != 4 or not inputs.is_floating_point():
        raise MergeError(
            f"NP Merge: crop_padding needs image batches N×C×H×W of floats; batch {index} of "
            f"the calibration data has shape {tuple(inputs.shape)} ({inputs.dtype}): "
            "use crop_padding=0"
        )
    return random_crops(inputs, padding, generator, inputs.amin(dim=(0, 2, 3)))


def _class_rows(logits: Any) -> torch.Tensor:
    """Model outputs as ``(rows, classes)``: the last axis holds the classes."""
    logits = getattr(logits, "logits", logits)
    return logits.reshape(-1, logits.shape[-1]).float()


def _loss(task: _Task, outputs: Any, inputs: torch.Tensor, labels: Any) -> torch.Tensor:
    """Cross-entropy on ``labels``, KL(teachers' averaged logits ‖ merged), or (``ce+kl``)
    cross-entropy on targets half the label, half p·teachers + (1 − p)·label per row, where p
    is the teachers' probability of the label: (1 − p/2) of cross-entropy plus p/2 of KL to
    the teachers, up to p/2 of the teachers' entropy, which no coefficient changes."""
    logits = _class_rows(outputs)
    if task.loss == "ce":
        return F.cross_entropy(logits, labels.to(task.device).reshape(-1))
    with torch.no_grad():
        teacher = torch.stack([_class_rows(t(inputs)) for t in task.teachers]).mean(0)
    if task.loss == "ce+kl":
        target = labels.to(task.device).reshape(-1)
        hard = F.one_hot(target, logits.shape[-1]).to(logits)
        # an ensemble of models trained on skewed parts of the data can be far below what
        # the labels teach; its distribution where it is wrong pulled NP Merge 7 points down
        ensemble = F.softmax(teacher, -1)
        trust = ensemble.gather(1, target.unsqueeze(1))
        soft = trust * ensemble + (1 - trust) * hard
        return F.cross_entropy(logits, (hard + soft) / 2)
    return F.kl_div(
        F.log_softmax(logits, -1),
        F.log_softmax(teacher, -1),
        reduction="batchmean",
        log_target=True,
    )


@contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout) but the BatchNorms, which normalise by the
    batch as in training; train mode restored afterwards."""
    model.eval()
    for module in model.modules():
        if is_batchnorm(module):
            module.train()
    try:
        yield
    finally:
        model.train()


@torch.no_grad()
def _accuracy(task: _Task, params: Mapping[str, torch.Tensor], buffers: dict) -> float:
    """Accuracy of the merged parameters on the validation batches, BatchNorm on batch
    statistics as the coefficients were trained (a reset afterwards gives nearly the same)."""
    correct = total = 0
    with _batch_statistics(task.probe):
        for index, batch in enumerate(batches(task.validation)):
            inputs, labels = _split(batch, "ce", index)
            outputs = functional_call(task.probe, {**params, **buffers}, (inputs.to(task.device),))
            found = _class_rows(outputs).argmax(-1)
            correct += (found == labels.to(task.device).reshape(-1)).sum().item()
            total += found.numel()
    if total == 0:
        raise MergeError("NP Merge: the validation data gave no batches")
    return correct / total


def _non_finite(
    step: int,
    loss: torch.Tensor,
    logits: Mapping[str, torch.Tensor],
    constants: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
) -> MergeError:
    """The error for a non-finite loss, saying where non-finite values are."""
    bad = [n for n in logits if not (logits[n].isfinite().all() and constants[n].isfinite().all())]
    if bad:
        where = f"parameters with non-finite logits or weights: {', '.join(bad)}"
    elif inputs.is_floating_point() and not inputs.isfinite().all():
        where = "the input batch has non-finite values"
    else:
        where = (
            "the logits and weights of every parameter are finite, so it arose in the forward "
            f"pass, from the first layer ({next(iter(logits))!r}) on"
        )
    return MergeError(
        f"NP Merge step {step}: the loss is {loss.item()}; {where}. "
        "Check the calibration data, or lower lr=..."
    )


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _logit_shape(shape: torch.Size, granularity: str) -> tuple[int, ...]:
    """The shape of a parameter's coefficient logits (per model): the parameter's, or with
    ``granularity="channel"`` one per output channel, broadcast over the other axes."""
    if granularity == "channel" and len(shape) > 1:
        return (shape[0],) + (1,) * (len(shape) - 1)
    return tuple(shape)


def _train_stage(
    task: _Task,
    constants: dict[str, torch.Tensor],
    logits: dict[str, torch.Tensor],
    weigh: Weigh,
    desc: str,
) -> dict[str, Any]:
    """Train ``logits`` in place on θ = Σ_i weigh(a)_i ⊙ constants_i; the stage's record.

    With validation data, the accuracy after every pass (and at the start, pass 0) is recorded
    and the logits of the best pass are kept."""
    optimizer = torch.optim.Adam(list(logits.values()), lr=task.lr)
    rates = [
        task.lr * (1 + math.cos(math.pi * e / task.epochs)) / 2
        if task.schedule == "cosine"
        else task.lr
        for e in range(task.epochs)
    ]
    buffers = {k: v.clone() for k, v in task.buffers.items()}  # BN train mode writes into them
    record: dict[str, Any] = {"steps": 0, "samples": 0, "losses": [], "validation": []}
    record["memory"] = {"parameters": _nbytes(constants.values()), "logits": 0, "optimizer": 0}
    best: dict[str, torch.Tensor] = {}

    def merged() -> dict[str, torch.Tensor]:
        return {n: (weigh(a) * constants[n]).sum(0).to(task.dtypes[n]) for n, a in logits.items()}

    def validate() -> None:
        if task.validation is None:
            return
        record["validation"].append(_accuracy(task, merged(), buffers))
        if record["validation"][-1] > max(record["validation"][:-1], default=-1.0):
            best.update({n: a.detach().clone() for n, a in logits.items()})

    validate()
    done = 0
    for epoch, inputs, labels in tqdm(_stream(task), desc=desc, disable=not task.progress):
        if epoch != done + 1:  # a pass has ended
            validate()
            done = epoch - 1
            for group in optimizer.param_groups:
                group["lr"] = rates[done]
        step, inputs = record["steps"] + 1, inputs.to(task.device)
        params = merged()
        value = _loss(
            task, functional_call(task.probe, {**params, **buffers}, (inputs,)), inputs, labels
        )
        if not value.isfinite():
            raise _non_finite(step, value, logits, constants, inputs)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        grads = {n: a.grad for n, a in logits.items() if a.grad is not None}
        if grads and not torch.stack([g.isfinite().all() for g in grads.values()]).all():
            name = next(n for n, g in grads.items() if not g.isfinite().all())
            raise MergeError(
                f"NP Merge step {step}: the gradient of the coefficients of {name!r} is not "
                "finite; check the calibration data, or lower lr=..."
            )
        optimizer.step()
        record["steps"], record["samples"] = step, record["samples"] + len(inputs)
        record["losses"].append(value.item())
        if step == 1:
            state = [t for s in optimizer.state.values() for t in s.values()]
            record["memory"].update(logits=_nbytes(logits.values()), optimizer=_nbytes(state))
    if record["steps"]:
        validate()
    if best:
        with torch.no_grad():
            for name, value in best.items():
                logits[name].copy_(value)
    record["kept_pass"] = (
        max(range(len(record["validation"])), key=record["validation"].__getitem__)
        if record["validation"]
        else None
    )
    return record


def _joint(
    task: _Task, states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """One softmax over all N models; the weights ``softmax(a)`` in float64."""
    constants = {
        n: torch.stack([s[n] for s in states]).to(task.device, _compute(task.dtypes[n]))
        for n in names
    }
    logits = {
        n: torch.zeros(
            len(states), *_logit_shape(c.shape[1:], task.granularity), device=task.device
        ).requires_grad_()
        for n, c in constants.items()
    }
    record = _train_stage(task, constants, logits, lambda a: torch.softmax(a, 0), "NP Merge")
    record["models"] = list(range(len(states)))
    weights = {
        n: torch.softmax(a.detach().cpu().double(), 0).expand(constants[n].shape).clone()
        for n, a in logits.items()
    }
    return weights, [record]


def _sigmoid_pair(a: torch.Tensor) -> torch.Tensor:
    # σ(−a) rather than 1 − σ(a): exact in the tails where σ(a) rounds to 1.
    return torch.stack([torch.sigmoid(a), torch.sigmoid(-a)])


def _pairwise(
    task: _Task, states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Successive pairs: stage k merges the running merge of models 0..k−1 with model k.

    Stage k's logit starts at log(k), so σ = k/(k+1) and every stage starts at the plain
    average of models 0..k (successive averaging with σ = 1/2 would give model k weight 1/2).
    Effective weights: w_{0..k−1} ← σ ⊙ w_{0..k−1}, w_k = 1 − σ.
    """
    weights = {n: torch.ones(1, *states[0][n].shape, dtype=torch.float64) for n in names}
    records = []
    for k in range(1, len(states)):
        constants = {
            n: torch.stack([_weighted(states[:k], n, weights[n]), states[k][n]]).to(
                task.device, _compute(task.dtypes[n])
            )
            for n in names
        }
        logits = {
            n: torch.full(
                _logit_shape(states[0][n].shape, task.granularity), math.log(k), device=task.device
            ).requires_grad_()
            for n in names
        }
        record = _train_stage(
            task, constants, logits, _sigmoid_pair, f"NP Merge {k}/{len(states) - 1}"
        )
        record["models"] = list(range(k + 1))
        records.append(record)
        for n, a in logits.items():
            pair = _sigmoid_pair(a.detach().cpu().double().expand(states[0][n].shape))
            weights[n] = torch.cat([weights[n] * pair[0], pair[1:]])
    return weights, records


def _compute(dtype: torch.dtype) -> torch.dtype:
    """Train in at least float32, whatever the parameters' precision."""
    return torch.promote_types(dtype, torch.float32)


@contextmanager
def _teaching(teachers: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Teachers in eval mode on ``device``; their training flags restored afterwards."""
    flags = [t.training for t in teachers]
    for teacher in teachers:
        teacher.to(device).eval()
    try:
        yield
    finally:
        for teacher, flag in zip(teachers, flags, strict=True):
            teacher.train(flag)


def np_merge(
    model: nn.Module,
    states: Sequence[Mapping[str, torch.Tensor]],
    data: Any,
    *,
    loss: str = "ce+kl",
    teachers: Sequence[nn.Module] | None = None,
    scheme: str = "joint",
    epochs: int = 7,
    max_samples: int | None = None,
    lr: float = 0.025,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    validation: Any = None,
    granularity: str = "parameter",
    crop_padding: int = 0,
    schedule: str = "constant",
) -> NPMergeResult:
    """Merge N aligned state dicts of ``model``'s architecture with learned coefficients.

    ``model`` is a template (weights unused, never modified); ``data`` yields ``(inputs,
    labels)`` batches, or bare inputs with ``loss="kl"``; ``"kl"`` and ``"ce+kl"`` (the default)
    need the base models as ``teachers``, ``"ce"`` needs none. ``scheme="joint"``: one softmax over
    all models; ``"pairwise"``: successive pairs as in the paper, stage k's logit starting at
    log k so that every stage starts at the plain average of its models (σ = 1/2 would give the
    last model weight 1/2). With ``epochs=0`` or ``max_samples=0`` the joint result is
    :func:`average_states` bit for bit (pairwise: to rounding). Training runs ``epochs`` passes
    over ``data``, at most ``max_samples`` samples per stage; ``seed`` fixes dropout. With
    ``validation`` batches ``(inputs, labels)``, the accuracy at the start and after every pass
    is measured there (BatchNorm on batch statistics, as trained) and each stage keeps the
    coefficients of its best pass (early stopping): the stages' ``validation`` and
    ``kept_pass`` say which. ``granularity="channel"``: one logit per output channel (row)
    of each parameter, broadcast over its other axes (1-d parameters: one per entry);
    ``coefficients`` still have each parameter's full shape. ``schedule="cosine"``: pass e + 1
    of ``epochs`` trains at lr·(1 + cos(π·e/epochs))/2; ``"constant"``: at lr throughout.

    The coefficients are trained with BatchNorm normalising by batch statistics (the model
    runs in train mode); the returned buffers are the plain averages, untouched by training,
    and the running statistics are then reset by the caller (merge's repair step).

    >>> states = [nn.Linear(2, 2).state_dict() for _ in range(2)]
    >>> data = [(torch.randn(8, 2), torch.randint(2, (8,)))]
    >>> result = np_merge(nn.Linear(2, 2), states, data, loss="ce", progress=False)
    >>> tuple(result.coefficients["weight"].shape), len(result.losses)  # one loss an epoch
    ((2, 2, 2), 7)
    """
    states = list(states)
    given = {
        "loss": loss,
        "scheme": scheme,
        "epochs": epochs,
        "max_samples": max_samples,
        "lr": lr,
        "granularity": granularity,
        "crop_padding": crop_padding,
        "schedule": schedule,
    }
    _check_arguments(states, data, teachers, given)
    params, aliases = _parameters(model, states)
    base = average_states(states)
    device = torch.device(device)
    task = _Task(
        probe=copy.deepcopy(model).to(device).train(),
        buffers={k: v.to(device) for k, v in base.items() if k not in params and k not in aliases},
        dtypes={n: p.dtype for n, p in params.items()},
        data=data,
        loss=loss,
        teachers=list(teachers or []),
        epochs=epochs,
        max_samples=max_samples,
        lr=lr,
        device=device,
        progress=progress,
        validation=validation,
        granularity=granularity,
        crop_padding=crop_padding,
        schedule=schedule,
        seed=seed,
    )
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng, _teaching(task.teachers, device):
        torch.manual_seed(seed)
        train = _joint if scheme == "joint" else _pairwise
        weights, records = train(task, states, list(params))
    return _result(states, base, aliases, weights, records)


def _result(
    states: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str],
    weights: Mapping[str, torch.Tensor],
    records: Sequence[dict[str, Any]],
) -> NPMergeResult:
    """The merged state (learned weights on parameters, plain averages elsewhere), the
    per-model weights and the stages' records."""
    state = dict(base)
    for name in [*weights, *aliases]:
        key = aliases.get(name, name)
        state[name] = _weighted(states, key, weights[key])
    memory = {k: max(r["memory"][k] for r in records) for k in records[0]["memory"]}
    stages = [
        {
            "models": r["models"],
            "steps": r["steps"],
            "samples": r["samples"],
            "loss": r["losses"][-1] if r["losses"] else None,
            "validation": r["validation"],
            "kept_pass": r["kept_pass"],
        }
        for r in records
    ]
    losses = [v for r in records for v in r["losses"]]
    coefficients = {n: w.float() for n, w in weights.items()}
    return NPMergeResult(state, losses, coefficients, stages, memory)


# Adam's first steps move every logit by about lr whatever its gradient, so one short epoch
# only perturbs the average. On 10,000 images with loss="ce", validation and test peaked after
# 5 passes at N = 2 and N = 4 and fell after (the coefficients over-fit); with "ce+kl" (targets
# half the label, half the ensemble) the curve goes on rising to pass 7 and ends above ce's
# best on validation at N = 2 and N = 4: hence ce+kl and 7 epochs. Distilling where the
# ensemble is wrong too cost 7 points on models trained on Dirichlet(0.5) parts of the data
# (ensemble 60 %), so each row trusts the ensemble by the probability it gives the label:
# level with keeping the label alone where the ensemble's top class is wrong on the ResNet20s,
# ahead of it by 0.5 on validation across the quick bench's model sets, never behind by more
# than noise. A cosine decay of the rate over the
# passes (schedule="cosine") went on rising to pass 7 on the ResNet20s but cost 2–4 points on
# those Dirichlet models, which need the full rate to move far from the start: the rate stays
# constant, and early stopping on validation guards against over-fitting. The CCA start
# stays: after 5 passes the permutation start (N = 2) and the ZipIt! start (N = 2 and 4) were
# within 0.1 point of it on validation, and loss="kl" was behind ce. At N = 2 the joint
# softmax's two logits move apart by 2·lr (a sigmoid's by lr), so joint at 0.025 steps as
# pairwise at 0.05; 0.025 beat 0.05 on validation at N = 2 and N = 4 (BENCHMARKS.md,
# "Measurements behind design choices").
@combiner(
    "npmerge",
    paper="Orozco Camacho et al., Non-Uniform Parameter-Wise Model Merging, arXiv:2412.15467",
    label="NP Merge, joint softmax",
    options=(
        Option(
            "loss",
            str,
            "ce+kl",
            "ce on the labels, kl to the ensemble (no labels), or ce+kl (targets half the "
            "label, half the ensemble trusted by its probability of the label)",
            choices=LOSSES,
        ),
        Option("scheme", str, "joint", "one softmax, or pairwise stages", choices=SCHEMES),
        Option("epochs", int, 7, "passes over the calibration data", Limits(0), grid=(0,)),
        Option("lr", float, 0.025, "Adam's learning rate", POSITIVE),
        Option("max_samples", int, None, "samples per stage at most", Limits(0), nullable=True),
        Option(
            "granularity",
            str,
            "parameter",
            "one coefficient per parameter entry, or per output channel",
            choices=GRANULARITIES,
        ),
        Option(
            "crop_padding",
            int,
            0,
            "random shifted crops of the calibration images, padded by this many pixels",
            Limits(0),
        ),
        Option(
            "schedule",
            str,
            "constant",
            "Adam's learning rate after each pass: constant, or a half cosine to 0",
            choices=SCHEDULES,
        ),
    ),
    needs=Needs(data=True, labels=True),
    tensorwise=False,
    default_align="cca",
    repair_after=False,
    compare=6,
)
def combine_npmerge(
    states: Sequence[Mapping[str, torch.Tensor]],
    context: CombineContext,
    *,
    loss: str,
    scheme: str,
    epochs: int,
    lr: float,
    max_samples: int | None,
    granularity: str,
    crop_padding: int,
    schedule: str,
) -> Combined:
    """The record's function: :func:`np_merge` of the aligned states, the models as teachers;
    the report holds its options, loss curve, stages, memory and each parameter's mean weight
    per model. (An untrained start, ``epochs=0``, is ``options="auto"``'s other candidate.)"""
    if context.data is None:
        raise MergeError("NP Merge needs a calibration set: pass data=... (training batches)")
    options = {
        "loss": loss,
        "scheme": scheme,
        "epochs": epochs,
        "lr": lr,
        "granularity": granularity,
        "crop_padding": crop_padding,
        "schedule": schedule,
    }
    outcome = np_merge(
        context.models[0],
        states,
        batches(context.data),
        teachers=context.models,
        device=context.device,
        progress=context.progress,
        validation=None if context.validation is None else batches(context.validation),
        max_samples=max_samples,
        **options,
    )
    weights = {k: c.flatten(1).mean(1).tolist() for k, c in outcome.coefficients.items()}
    report = {
        "options": {**options, "max_samples": max_samples},
        "losses": outcome.losses,
        "stages": outcome.stages,
        "mean_weights": weights,
        "memory_bytes": outcome.memory_bytes,
    }
    return Combined(outcome.state, report, outcome.coefficients)
