"""Data-split modes: which training examples each model of a set sees.

Every mode returns one sorted index array per model into the given labels; the same labels,
mode and seed give the same arrays. :func:`task_classes` names each model's task, the classes
it was trained on most, for evaluation per task (:func:`accord.evaluate_tasks`).

- ``iid``: every model sees all the data (models differ only by initialisation).
- ``classes``: the classes are shuffled and dealt in contiguous groups; each model gets every
  example of its classes, so the models' class sets are disjoint.
- ``dirichlet``: each class's examples are partitioned among the models in proportions drawn
  from Dirichlet(alpha); small alpha gives skewed splits, large alpha near-equal ones.
- ``80-20``: two models; the sorted classes are cut into two halves; model 0 gets 80 % of each
  first-half class and 20 % of each second-half class, model 1 the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from accord.data._common import unknown_choice
from accord.errors import DataError

SPLIT_MODES: tuple[str, ...] = ("80-20", "classes", "dirichlet", "iid")
_MAJOR_SHARE = 0.8


def split_indices(
    labels: np.ndarray | torch.Tensor,
    num_models: int,
    mode: str,
    *,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split the examples with these ``labels`` among ``num_models`` models by ``mode``.

    ``alpha`` is the Dirichlet concentration (``dirichlet`` mode only). Returns ``num_models``
    sorted int64 index arrays. Example::

        >>> [idx.tolist() for idx in split_indices(np.array([0, 1, 0, 1]), 2, "classes")]
        [[0, 2], [1, 3]]
    """
    if mode not in _MODES:
        raise unknown_choice("split mode", mode, SPLIT_MODES)
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"split mode {mode!r} needs a 1-D integer label array, got {labels.dtype} "
            f"of shape {labels.shape}."
        )
    if num_models < 1:
        raise DataError(f"split mode {mode!r} needs at least one model, got {num_models}.")
    rng = np.random.default_rng(seed)
    return _MODES[mode](labels, num_models, alpha, rng)


def task_classes(labels: np.ndarray | torch.Tensor, parts: list[np.ndarray]) -> list[np.ndarray]:
    """Each model's task: the sorted classes of which its part holds more examples than any
    other part (the first such part on a tie).

    Under ``classes`` these are the model's own classes; under ``80-20``, those it has 80 % of.
    Example::

        >>> labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
        >>> [t.tolist() for t in task_classes(labels, split_indices(labels, 2, "80-20"))]
        [[0], [1]]
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = np.stack([(labels[part][:, None] == classes).sum(axis=0) for part in parts])
    owners = counts.argmax(axis=0)
    return [classes[owners == model] for model in range(len(parts))]


def _iid(
    labels: np.ndarray, num_models: int, _alpha: float, _rng: np.random.Generator
) -> list[np.ndarray]:
    return [np.arange(len(labels)) for _ in range(num_models)]


def _classes(
    labels: np.ndarray, num_models: int, _alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    classes = np.unique(labels)
    if num_models > len(classes):
        raise DataError(
            f"split mode 'classes' gives each model its own classes, but there are "
            f"{len(classes)} classes for {num_models} models; use fewer models or another mode."
        )
    groups = np.array_split(rng.permutation(classes), num_models)
    return [np.flatnonzero(np.isin(labels, group)) for group in groups]


def _dirichlet(
    labels: np.ndarray, num_models: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    if not alpha > 0:
        raise DataError(f"split mode 'dirichlet' needs alpha > 0, got {alpha}.")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_models)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_models, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.append(chunk)
    return [_sorted_union(part) for part in parts]


def _eighty_twenty(
    labels: np.ndarray, num_models: int, _alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    classes = np.unique(labels)
    if num_models != 2 or len(classes) < 2:
        raise DataError(
            f"split mode '80-20' needs exactly 2 models and at least 2 classes, got "
            f"{num_models} models and {len(classes)} classes; use 'dirichlet' or 'classes' "
            "for other cases."
        )
    first_half = set(np.array_split(classes, 2)[0].tolist())
    parts: list[list[np.ndarray]] = [[], []]
    for cls in classes:
        members = rng.permutation(np.flatnonzero(labels == cls))
        major = round(_MAJOR_SHARE * len(members))
        # Model 0 takes the major share of the first half, model 1 of the second half.
        owner = 0 if cls in first_half else 1
        parts[owner].append(members[:major])
        parts[1 - owner].append(members[major:])
    return [_sorted_union(part) for part in parts]


def _sorted_union(chunks: list[np.ndarray]) -> np.ndarray:
    # The empty seed keeps the dtype int64 when a model receives no chunk at all.
    return np.sort(np.concatenate([np.empty(0, dtype=np.int64), *chunks]))


_MODES: dict[str, Callable[[np.ndarray, int, float, np.random.Generator], list[np.ndarray]]] = {
    "80-20": _eighty_twenty,
    "classes": _classes,
    "dirichlet": _dirichlet,
    "iid": _iid,
}
