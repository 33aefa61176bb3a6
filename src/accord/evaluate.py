"""Accuracy and loss of a model, of a logit-averaging ensemble, per task, and along a linear
path.

``data`` is anything that yields ``(inputs, labels)`` batches: a DataLoader, a list of
batches, or an :class:`accord.data.Dataset` (batched here).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from accord._layout import channels_last, wants_channels_last
from accord.batchnorm import reset_batchnorm
from accord.data import Dataset, batches

Batches = Iterable[Any]


@dataclass(frozen=True)
class Evaluation:
    """Top-1 accuracy (in [0, 1]) and mean cross-entropy over ``count`` examples."""

    accuracy: float
    loss: float
    count: int


def _evaluate_logits(
    forward: Any, data: Dataset | Batches, device: str | torch.device, desc: str, progress: bool
) -> Evaluation:
    correct, loss_sum, count = 0, 0.0, 0
    loader = batches(data)
    for inputs, labels in tqdm(loader, desc=desc, leave=False, disable=not progress):
        inputs, labels = inputs.to(device), labels.to(device)
        logits = forward(inputs)
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
        count += int(labels.numel())
    if count == 0:
        raise ValueError("evaluation data is empty")
    return Evaluation(correct / count, loss_sum / count, count)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | Batches,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Evaluation:
    """Accuracy and loss of ``model`` (in eval mode) on ``data``. On a CPU the pass runs 2-d
    convolutions channels-last (:mod:`accord._layout`: cheaper, the same logits up to
    rounding); the weights are given back as they were."""
    was_training = model.training
    model.to(device).eval()
    try:
        with channels_last([model], wants_channels_last(device)):
            return _evaluate_logits(model, data, device, "evaluate", progress)
    finally:
        model.train(was_training)


def evaluate_ensemble(
    models: Sequence[nn.Module],
    data: Dataset | Batches,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Evaluation:
    """Accuracy and loss of the ensemble that averages the models' logits."""
    return evaluate_with_ensemble(models, data, device, progress)[1]


@torch.no_grad()
def evaluate_with_ensemble(
    models: Sequence[nn.Module],
    data: Dataset | Batches,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[list[Evaluation], Evaluation]:
    """Each model's evaluation and their logit-averaging ensemble's, from one forward pass
    of each model per batch (what :func:`evaluate` and :func:`evaluate_ensemble` give),
    channels-last on a CPU as :func:`evaluate` runs."""
    flags = [m.training for m in models]
    for model in models:
        model.to(device).eval()
    tallies = [[0, 0.0] for _ in range(len(models) + 1)]  # correct, summed loss
    count = 0
    loader = tqdm(batches(data), desc="evaluate", leave=False, disable=not progress)
    try:
        with channels_last(models, wants_channels_last(device)):
            for inputs, labels in loader:
                inputs, labels = inputs.to(device), labels.to(device)
                logits = [m(inputs).float() for m in models]
                logits.append(torch.stack(logits).mean(dim=0))
                for tally, output in zip(tallies, logits, strict=True):
                    tally[0] += int((output.argmax(dim=1) == labels).sum())
                    tally[1] += float(F.cross_entropy(output, labels, reduction="sum"))
                count += int(labels.numel())
    finally:
        for model, flag in zip(models, flags, strict=True):
            model.train(flag)
    if count == 0:
        raise ValueError("evaluation data is empty")
    evaluations = [Evaluation(correct / count, loss / count, count) for correct, loss in tallies]
    return evaluations[:-1], evaluations[-1]


@dataclass(frozen=True)
class TaskEvaluation:
    """Accuracies (in [0, 1]) of a model whose classes are divided into tasks.

    ``tasks[k]``: on the ``counts[k]`` examples of task k's classes, the prediction being the
    largest logit among those classes only; ``joint``: on all ``count`` examples, over all
    classes (:class:`Evaluation`'s accuracy).
    """

    tasks: tuple[float, ...]
    joint: float
    counts: tuple[int, ...]
    count: int


@torch.no_grad()
def evaluate_tasks(
    model: nn.Module | Sequence[nn.Module],
    data: Dataset | Batches,
    tasks: Sequence[Sequence[int]],
    device: str | torch.device = "cpu",
) -> TaskEvaluation:
    """Accuracy of ``model`` on each task (its classes' examples, logits restricted to its
    classes) and jointly. A sequence of models is their logit-averaging ensemble.

    ``tasks``: class indices per task, e.g. :func:`accord.data.task_classes` of the split the
    models were trained on. ValueError for an empty task, a class outside the logits or a task
    without examples in ``data``. Channels-last on a CPU as :func:`evaluate` runs.
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    flags = [m.training for m in models]
    for member in models:
        member.to(device).eval()
    masks: torch.Tensor | None = None
    correct, counts = [0] * len(tasks), [0] * len(tasks)
    joint, count = 0, 0
    try:
        with channels_last(models, wants_channels_last(device)):
            for inputs, labels in batches(data):
                inputs, labels = inputs.to(device), labels.to(device)
                logits = torch.stack([m(inputs).float() for m in models]).mean(dim=0)
                if masks is None:
                    masks = _task_masks(tasks, logits.shape[1], logits.device)
                joint += int((logits.argmax(dim=1) == labels).sum())
                count += int(labels.numel())
                for k, mask in enumerate(masks):
                    members = mask[labels]
                    restricted = logits[members].masked_fill(~mask, -torch.inf)
                    correct[k] += int((restricted.argmax(dim=1) == labels[members]).sum())
                    counts[k] += int(members.sum())
    finally:
        for member, flag in zip(models, flags, strict=True):
            member.train(flag)
    if count == 0:
        raise ValueError("evaluation data is empty")
    missing = [k for k, n in enumerate(counts) if n == 0]
    if missing:
        found = ", ".join(f"task {k} {list(tasks[k])}" for k in missing)
        raise ValueError(f"the evaluation data has no example of {found}")
    accuracies = tuple(c / n for c, n in zip(correct, counts, strict=True))
    return TaskEvaluation(accuracies, joint / count, tuple(counts), count)


def _task_masks(
    tasks: Sequence[Sequence[int]], num_classes: int, device: torch.device
) -> torch.Tensor:
    """(tasks, num_classes) booleans: which logits each task keeps."""
    masks = torch.zeros(len(tasks), num_classes, dtype=torch.bool, device=device)
    for k, classes in enumerate(tasks):
        classes = [int(c) for c in classes]
        outside = [c for c in classes if not 0 <= c < num_classes]
        if not classes or outside:
            problem = f"classes {outside} are outside" if outside else "has no class out of"
            raise ValueError(
                f"task {k} {problem} the model's {num_classes} logits; give each task "
                f"class indices in 0..{num_classes - 1}"
            )
        masks[k, classes] = True
    return masks


def interpolate_states(
    state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 − alpha)·a + alpha·b`` for floating tensors; integer buffers are taken from ``a``."""
    return {
        key: torch.lerp(value, state_b[key], alpha) if value.is_floating_point() else value.clone()
        for key, value in state_a.items()
    }


@dataclass(frozen=True)
class InterpolationCurve:
    """Evaluations along ``(1 − α)·θ_a + α·θ_b`` and the loss barrier of that path.

    The barrier is ``max_α [L(α) − ((1 − α) L(0) + α L(1))]``, and likewise for the accuracy
    (``accuracy_barrier`` is the largest drop below the line between the endpoints).
    """

    alphas: list[float]
    evaluations: list[Evaluation]

    @property
    def losses(self) -> list[float]:
        return [e.loss for e in self.evaluations]

    @property
    def accuracies(self) -> list[float]:
        return [e.accuracy for e in self.evaluations]

    @property
    def loss_barrier(self) -> float:
        first, last = self.losses[0], self.losses[-1]
        line = [(1 - a) * first + a * last for a in self.alphas]
        return max(loss - ref for loss, ref in zip(self.losses, line, strict=True))

    @property
    def accuracy_barrier(self) -> float:
        first, last = self.accuracies[0], self.accuracies[-1]
        line = [(1 - a) * first + a * last for a in self.alphas]
        return max(ref - acc for acc, ref in zip(self.accuracies, line, strict=True))


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Dataset | Batches,
    *,
    steps: int = 11,
    repair_data: Dataset | Batches | None = None,
    device: str | torch.device = "cpu",
) -> InterpolationCurve:
    """Evaluate the linear path from ``model_a`` (α = 0) to ``model_b`` (α = 1).

    With ``repair_data``, each interpolated model's BatchNorm statistics are recomputed on it
    first (without it, interior points of BatchNorm networks are badly calibrated).
    """
    alphas = [i / (steps - 1) for i in range(steps)]
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    probe = copy.deepcopy(model_a)
    evaluations = []
    for alpha in alphas:
        probe.load_state_dict(interpolate_states(state_a, state_b, alpha))
        if repair_data is not None:
            reset_batchnorm(probe, repair_data, device=device)
        evaluations.append(evaluate(probe, data, device=device))
    return InterpolationCurve(alphas, evaluations)
