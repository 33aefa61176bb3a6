"""Datasets for training and merging: Fashion-MNIST, MNIST, CIFAR-10/100, digits, and splits.

Example::

    splits = load_dataset("digits", limit=500)
    parts = split_indices(splits.train.labels, 2, "80-20")
    loader = make_loader(splits.train.subset(parts[0]), batch_size=64, shuffle=True)
"""

from accord.data.crops import random_crops
from accord.data.datasets import (
    DATASETS,
    Dataset,
    DataSplits,
    batches,
    default_dataset,
    load_dataset,
    make_loader,
    resolve_root,
)
from accord.data.idx import read_idx
from accord.data.splits import SPLIT_MODES, split_indices, task_classes

__all__ = [
    "DATASETS",
    "SPLIT_MODES",
    "DataSplits",
    "Dataset",
    "batches",
    "default_dataset",
    "load_dataset",
    "make_loader",
    "random_crops",
    "read_idx",
    "resolve_root",
    "split_indices",
    "task_classes",
]
