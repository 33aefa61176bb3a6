"""The dataset registry: find a dataset's files, load it, carve validation, normalise."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from accord.data._common import RawData, unknown_choice
from accord.data.cifar import load_cifar10, load_cifar100
from accord.data.digits import load_digits
from accord.data.idx import IDX_FILES, idx_folder_complete, load_idx_folder
from accord.errors import DataError

DEFAULT_ROOT = Path("/usr/share/datasets")
ENV_VAR = "ACCORD_DATA"
# `limit` keeps the same examples whatever the seed, so runs with different seeds share a test set.
_LIMIT_SEED = 0

_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_IDX_LIST = ", ".join(f"{stem}.gz" for stem in IDX_FILES.values())
_ELSEWHERE = (
    "or pass --data-dir (the folder itself) or set ACCORD_DATA (its parent: "
    "$ACCORD_DATA/{name} is read)."
)


@dataclass(frozen=True)
class _Source:
    load: Callable[[Path], RawData]
    install: str  # how to get the files; formatted with {root} and {name}


_SOURCES: dict[str, _Source] = {
    "cifar10": _Source(
        load_cifar10,
        "Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and "
        "extract it in {root} (giving {root}/cifar-10-batches-py/data_batch_1 ...), " + _ELSEWHERE,
    ),
    "cifar100": _Source(
        load_cifar100,
        "Download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and "
        "extract it in {root} (giving {root}/cifar-100-python/train ...), " + _ELSEWHERE,
    ),
    "digits": _Source(lambda _root: load_digits(), "Reinstall scikit-learn, which bundles it."),
    "fashion-mnist": _Source(
        lambda root: load_idx_folder(root, _FASHION_CLASSES),
        "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs to "
        f"{DEFAULT_ROOT}/fashion-mnist), or put {_IDX_LIST} in a folder and point --data-dir "
        "at it or ACCORD_DATA at its parent ($ACCORD_DATA/fashion-mnist is read).",
    ),
    "mnist": _Source(
        lambda root: load_idx_folder(root, tuple(str(d) for d in range(10))),
        f"Put the MNIST files {_IDX_LIST} (gzipped or not) in {{root}}, " + _ELSEWHERE,
    ),
}
DATASETS: tuple[str, ...] = tuple(sorted(_SOURCES))


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split: float32 images N×C×H×W (normalised) and int64 labels N.

    Indexing with an int gives one example; with a list or tensor of indices, a batch.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.shape != (len(self.images),):
            raise DataError(
                f"a Dataset needs images N×C×H×W and labels of shape N, got images "
                f"{tuple(self.images.shape)} and labels {tuple(self.labels.shape)}."
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(
        self, i: int | Sequence[int] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Dataset:
        """Return the examples at ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return Dataset(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DataSplits:
    """A dataset's train, validation and test splits and what a model needs to know of it."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    class_names: tuple[str, ...]


def resolve_root(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Return where dataset ``name`` is read from.

    ``root`` if given, else ``$ACCORD_DATA/<name>`` if ACCORD_DATA is set, else
    ``/usr/share/datasets/<name>``.
    """
    _source(name)
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) / name if env else DEFAULT_ROOT / name


def default_dataset() -> str:
    """Return ``"fashion-mnist"`` if its files exist at its resolved root, else ``"digits"``."""
    return "fashion-mnist" if idx_folder_complete(resolve_root("fashion-mnist")) else "digits"


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
) -> DataSplits:
    """Load dataset ``name`` (one of DATASETS) from ``root`` (see :func:`resolve_root`).

    ``limit`` keeps that many training and test examples (a fixed random subset, the same for
    every seed). ``val_fraction`` of the training examples, chosen by ``seed``, become the
    validation split; the test split is never touched. Images are scaled to [0, 1], then each
    channel is standardised with the mean and std of the remaining training split.
    """
    source = _source(name)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}.")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of examples or None, got {limit}.")
    path = resolve_root(name, root)
    try:
        raw = source.load(path)
    except FileNotFoundError as exc:
        hint = source.install.format(root=path, name=name)
        raise DataError(f"{name}: {exc.filename} not found. {hint}") from None
    images, labels = _first(raw.train_images, raw.train_labels, limit)
    test_images, test_labels = _first(raw.test_images, raw.test_labels, limit)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    num_val = round(val_fraction * len(labels))
    val, train = order[:num_val].sort().values, order[num_val:].sort().values
    if len(train) == 0:
        raise DataError(
            f"{name}: no training examples left after carving {num_val} for validation; "
            "raise limit or lower val_fraction."
        )
    images, labels = _to_unit(images, raw.max_value), torch.from_numpy(labels)
    parts = [(images[train], labels[train]), (images[val], labels[val])]
    parts.append((_to_unit(test_images, raw.max_value), torch.from_numpy(test_labels)))
    var, mean = torch.var_mean(parts[0][0], dim=(0, 2, 3), correction=0)
    # A constant channel (std 0) is left unscaled rather than divided by zero.
    std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    for x, _ in parts:
        x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    train_set, val_set, test_set = (Dataset(x, y) for x, y in parts)
    return DataSplits(
        name=name,
        train=train_set,
        val=val_set,
        test=test_set,
        num_classes=len(raw.class_names),
        in_channels=images.shape[1],
        image_size=images.shape[2],
        class_names=raw.class_names,
    )


def make_loader(
    dataset: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """Return a single-process loader of (images, labels) batches.

    Shuffling draws from a generator seeded with ``seed``, so the order of every epoch is
    reproducible. Whole batches are taken with one tensor index rather than collated per item.
    """
    generator = torch.Generator().manual_seed(seed)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(order, batch_size=batch_size, drop_last=False)
    return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=0)


def batches(data: Dataset | Iterable[Any], batch_size: int = 512) -> Iterable[Any]:
    """``data`` as an iterable of ``(inputs, labels)`` batches: a :class:`Dataset` is batched
    (in order), anything else (a DataLoader, a list of batches) is returned as it is."""
    if isinstance(data, Dataset):
        return make_loader(data, batch_size=batch_size)
    return data


def _source(name: str) -> _Source:
    if name not in _SOURCES:
        raise unknown_choice("dataset", name, DATASETS)
    return _SOURCES[name]


def _to_unit(images: np.ndarray, max_value: float) -> torch.Tensor:
    # torch converts uint8 to float32 faster than numpy does; the copy keeps the
    # in-place normalisation off the arrays the reader returned. Row-major strides: a
    # one-channel array made by ``[:, None]`` has channel stride 1, which torch reads as
    # channels-last, and torch 2.13's CPU backward of a strided 1×1 convolution on
    # channels-last inputs corrupts the heap when it runs on one thread.
    unit = torch.from_numpy(images).to(torch.float32, memory_format=torch.contiguous_format)
    return unit.div_(max_value)


def _first(
    images: np.ndarray, labels: np.ndarray, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    if limit is None or limit >= len(labels):
        return images, labels
    keep = np.sort(np.random.default_rng(_LIMIT_SEED).permutation(len(labels))[:limit])
    return images[keep], labels[keep]
