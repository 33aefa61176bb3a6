"""Read CIFAR-10 and CIFAR-100 from their standard python-pickle folders.

The folders are ``cifar-10-batches-py`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
``batches.meta``) and ``cifar-100-python`` (``train``, ``test``, ``meta``; fine labels), as
extracted from the archives at https://www.cs.toronto.edu/~kriz/cifar.html. Unpickling runs
code stored in the file: only load files from a source you trust.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accord.data._common import RawData, check_labels
from accord.errors import DataError

_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _Layout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int


_CIFAR10 = _Layout(
    folder="cifar-10-batches-py",
    train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test=("test_batch",),
    meta="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
)
_CIFAR100 = _Layout(
    folder="cifar-100-python",
    train=("train",),
    test=("test",),
    meta="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
)


def load_cifar10(root: str | os.PathLike[str]) -> RawData:
    """Read CIFAR-10 from ``root/cifar-10-batches-py`` or from ``root`` itself.

    Images are uint8 N×3×32×32. Raises FileNotFoundError naming the first missing
    file and DataError naming a damaged one.
    """
    return _load(Path(root), _CIFAR10)


def load_cifar100(root: str | os.PathLike[str]) -> RawData:
    """Read CIFAR-100 (100 fine labels) from ``root/cifar-100-python`` or from ``root`` itself.

    Images are uint8 N×3×32×32. Raises FileNotFoundError naming the first missing
    file and DataError naming a damaged one.
    """
    return _load(Path(root), _CIFAR100)


def _load(root: Path, layout: _Layout) -> RawData:
    folder = root / layout.folder if (root / layout.folder).is_dir() else root
    class_names = _class_names(folder / layout.meta, layout)
    train = [_read_batch(folder / name, layout) for name in layout.train]
    test = [_read_batch(folder / name, layout) for name in layout.test]
    return RawData(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=np.concatenate([images for images, _ in test]),
        test_labels=np.concatenate([labels for _, labels in test]),
        class_names=class_names,
        max_value=255.0,
    )


def _read_batch(path: Path, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data = np.asarray(_field(batch, "data", path))
    if data.ndim != 2 or data.shape[1] != _PIXELS or data.dtype != np.uint8:
        raise DataError(
            f"{path}: expected 'data' as uint8 N×{_PIXELS}, found {data.dtype} {data.shape}; "
            "the file is damaged or not a CIFAR batch, download it again."
        )
    labels = np.asarray(_field(batch, layout.label_key, path))
    labels = check_labels(labels, len(data), layout.num_classes, str(path))
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(path: Path, layout: _Layout) -> tuple[str, ...]:
    names = _field(_unpickle(path), layout.names_key, path)
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if len(names) != layout.num_classes:
        raise DataError(
            f"{path}: expected {layout.num_classes} class names, found {len(names)}; "
            "the file is damaged or from another dataset, download it again."
        )
    return names


def _unpickle(path: Path) -> dict[Any, Any]:
    with path.open("rb") as f:
        try:
            obj = pickle.load(f, encoding="bytes")
        # A damaged pickle can fail with almost any exception type.
        except Exception as exc:
            raise DataError(
                f"{path} cannot be unpickled ({type(exc).__name__}: {exc}); it is truncated "
                "or damaged, download and extract the archive again."
            ) from exc
    if not isinstance(obj, dict):
        raise DataError(
            f"{path} holds a {type(obj).__name__}, not a CIFAR dictionary; "
            "download and extract the archive again."
        )
    return obj


def _field(obj: dict[Any, Any], key: str, path: Path) -> Any:
    # Python-2 pickles read with encoding="bytes" have byte keys; re-pickled copies have str keys.
    for candidate in (key.encode(), key):
        if candidate in obj:
            return obj[candidate]
    raise DataError(
        f"{path} has no {key!r} entry (keys: {sorted(map(str, obj))}); "
        "it is not a CIFAR file of this dataset."
    )
