"""Helpers shared by the dataset readers: the raw arrays they return and their checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from accord.errors import DataError, did_you_mean


@dataclass(frozen=True, eq=False)
class RawData:
    """A dataset as read from disk, before any splitting or normalisation.

    Images are N×C×H×W in their stored type with values in [0, max_value]; labels are int64 N.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    max_value: float


def check_labels(labels: np.ndarray, num_images: int, num_classes: int, source: str) -> np.ndarray:
    """Return ``labels`` as int64 after checking its shape and range; ``source`` names the file."""
    if labels.shape != (num_images,):
        raise DataError(
            f"{source}: expected {num_images} labels (one per image), found shape "
            f"{labels.shape}; the files do not belong together or one is damaged, "
            "download them again."
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{source}: labels must lie in 0..{num_classes - 1}, found "
            f"{labels.min()}..{labels.max()}; the file is damaged, download it again."
        )
    return labels


def unknown_choice(kind: str, name: str, valid: Sequence[str]) -> DataError:
    """Return the error for an unknown ``kind`` named ``name``, suggesting the closest valid one."""
    hint = did_you_mean(name, valid)
    return DataError(f"unknown {kind} {name!r}{hint}. Valid choices: {', '.join(valid)}.")
