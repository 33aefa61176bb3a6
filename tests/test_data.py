"""Tests of accord.data: IDX and CIFAR readers, the registry, normalisation and split modes."""

from __future__ import annotations

import doctest
import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import accord.data.splits
from accord.data import (
    DATASETS,
    SPLIT_MODES,
    Dataset,
    default_dataset,
    load_dataset,
    make_loader,
    read_idx,
    resolve_root,
    split_indices,
)
from accord.errors import DataError

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
_NUM_TRAIN, _NUM_TEST = 50, 20
_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    """Write ``array`` (uint8 or int32) as an IDX file, gzipped if ``gz`` (then ``path.gz``)."""
    stored = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, _IDX_CODES[stored.dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + stored.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def unique_images(num: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random uint8 images whose first two pixels encode their index, so rows are distinct."""
    images = np.random.default_rng(seed).integers(0, 256, (num, *shape), dtype=np.uint8)
    flat = images.reshape(num, -1)
    flat[:, 0], flat[:, 1] = np.arange(num) % 256, np.arange(num) // 256
    return images


def write_mnist(root: Path, *, gz: bool) -> dict[str, np.ndarray]:
    """Write a tiny MNIST-style folder (4×4 images) and return the arrays written."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": unique_images(_NUM_TRAIN, (4, 4), seed=1),
        "train-labels-idx1-ubyte": (np.arange(_NUM_TRAIN) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": unique_images(_NUM_TEST, (4, 4), seed=2),
        "t10k-labels-idx1-ubyte": (np.arange(_NUM_TEST)[::-1] % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(root / stem, array, gz=gz)
    return arrays


def write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(folder: Path) -> dict[str, np.ndarray]:
    """Write a tiny ``cifar-10-batches-py`` folder with byte keys, as the real one has."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    data = {
        f"data_batch_{i}": rng.integers(0, 256, (3, 3072), dtype=np.uint8) for i in (1, 2, 3, 4, 5)
    }
    data["test_batch"] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    labels = {name: rng.integers(0, 10, len(batch)).tolist() for name, batch in data.items()}
    for name, batch in data.items():
        write_pickle(
            folder / name, {b"batch_label": name.encode(), b"data": batch, b"labels": labels[name]}
        )
    names = [f"class{i}".encode() for i in range(10)]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return {"data": data, "labels": labels}


def write_cifar100(folder: Path) -> None:
    """Write a tiny ``cifar-100-python`` folder (fine and coarse labels, byte keys)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    for name, num in (("train", 6), ("test", 2)):
        batch = {
            b"data": rng.integers(0, 256, (num, 3072), dtype=np.uint8),
            b"fine_labels": rng.integers(0, 100, num).tolist(),
            b"coarse_labels": rng.integers(0, 20, num).tolist(),
        }
        write_pickle(folder / name, batch)
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    write_pickle(folder / "meta", meta)


def standardised(train: np.ndarray, other: np.ndarray, max_value: float) -> np.ndarray:
    """``other`` scaled to [0, 1], standardised per channel with ``train``'s statistics."""
    train, other = train / max_value, other / max_value
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    return (other - mean) / train.std(axis=(0, 2, 3), keepdims=True)


def rows(images: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images.flatten(1)}


# --- IDX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips_uint8_and_big_endian_int32(tmp_path: Path, gz: bool) -> None:
    images = unique_images(5, (3, 2), seed=0)
    table = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 100_000
    assert np.array_equal(read_idx(write_idx(tmp_path / "images", images, gz=gz)), images)
    result = read_idx(write_idx(tmp_path / "table", table, gz=gz))
    assert result.dtype == np.int32
    assert result.dtype.isnative
    assert np.array_equal(result, table)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_rejects_truncated_payload(tmp_path: Path, gz: bool) -> None:
    path = write_idx(tmp_path / "cut-images-idx3-ubyte", unique_images(5, (3, 3), 0), gz=False)
    payload = path.read_bytes()[:-7]
    path.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(DataError, match=r"cut-images-idx3-ubyte.*45 data bytes.*38"):
        read_idx(path)


def test_read_idx_rejects_truncated_gzip_stream(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-images-idx3-ubyte", unique_images(50, (8, 8), 0), gz=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*gzip.*download it again"):
        read_idx(path)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x00", "magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x00", "type code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "cut short"),
        (b"", "magic"),
    ],
)
def test_read_idx_rejects_bad_header(tmp_path: Path, payload: bytes, why: str) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=f"bad.idx.*{why}"):
        read_idx(path)


def test_read_idx_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


# --- MNIST-style folders and the registry ---------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_matches_independent_normalisation(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz=gz)
    splits = load_dataset("mnist", tmp_path, val_fraction=0.0)
    train, test = (
        arrays["train-images-idx3-ubyte"][:, None],
        arrays["t10k-images-idx3-ubyte"][:, None],
    )
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 4)
    assert splits.class_names == tuple("0123456789")
    assert splits.train.images.dtype == torch.float32
    assert splits.train.labels.dtype == torch.int64
    assert len(splits.val) == 0
    np.testing.assert_allclose(splits.train.images, standardised(train, train, 255), atol=1e-5)
    np.testing.assert_allclose(splits.test.images, standardised(train, test, 255), atol=1e-5)
    assert splits.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # row-major (N, C, H, W) strides, not the channel stride 1 that torch reads as
    # channels-last (see accord.data.datasets._to_unit)
    for images in (splits.train.images, splits.test.images):
        assert images.stride() == torch.empty(images.shape).stride()


def test_fashion_mnist_reads_any_folder_with_the_idx_files(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    splits = load_dataset("fashion-mnist", tmp_path)
    assert splits.class_names[0] == "T-shirt/top"
    assert splits.class_names[-1] == "Ankle boot"


def test_idx_labels_out_of_range_name_the_file(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(_NUM_TEST, 12, np.uint8), gz=False)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*0\.\.9"):
        load_dataset("mnist", tmp_path)


def test_idx_label_count_mismatch_names_the_file(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=False)
    with pytest.raises(DataError, match=f"train-labels-idx1-ubyte.*expected {_NUM_TRAIN} labels"):
        load_dataset("mnist", tmp_path)


def test_validation_split_is_disjoint_deterministic_and_leaves_test_alone(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    splits = load_dataset("mnist", tmp_path, val_fraction=0.2, seed=5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, _NUM_TEST)
    train_rows, val_rows = rows(splits.train.images), rows(splits.val.images)
    assert len(train_rows) == 40
    assert len(val_rows) == 10
    assert not train_rows & val_rows
    again = load_dataset("mnist", tmp_path, val_fraction=0.2, seed=5)
    assert torch.equal(again.val.images, splits.val.images)
    assert torch.equal(again.train.labels, splits.train.labels)
    other = load_dataset("mnist", tmp_path, val_fraction=0.2, seed=6)
    assert rows(other.val.images) != val_rows
    assert torch.equal(other.test.labels, splits.test.labels)
    # Train statistics are those of the train part only: it is exactly standardised.
    assert splits.train.images.mean().abs() < 1e-5
    assert (splits.train.images.std(correction=0) - 1).abs() < 1e-5


def test_limit_caps_train_and_test_the_same_way_for_every_seed(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    first = load_dataset("mnist", tmp_path, limit=10, seed=0)
    second = load_dataset("mnist", tmp_path, limit=10, seed=1)
    assert len(first.train) + len(first.val) == 10
    assert len(first.test) == 10
    assert torch.equal(first.test.labels, second.test.labels)
    assert len(load_dataset("mnist", tmp_path, limit=10_000).test) == _NUM_TEST


@pytest.mark.parametrize(
    ("options", "match"),
    [({"val_fraction": 1.0}, "val_fraction"), ({"limit": 0}, "limit")],
)
def test_bad_options_are_rejected(tmp_path: Path, options: dict, match: str) -> None:
    write_mnist(tmp_path, gz=True)
    with pytest.raises(DataError, match=match):
        load_dataset("mnist", tmp_path, **options)


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    assert "nowhere" in str(info.value)
    assert "ACCORD_DATA" in str(info.value)


@pytest.mark.parametrize(("name", "expected"), [("mnist", "t10k-images"), ("cifar10", "cifar-10")])
def test_missing_files_say_where_to_put_them(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DataError, match=f"{name}.*not found.*{expected}.*--data-dir"):
        load_dataset(name, tmp_path)


def test_accord_data_overrides_the_default_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ACCORD_DATA", raising=False)
    assert resolve_root("mnist") == Path("/usr/share/datasets/mnist")
    monkeypatch.setenv("ACCORD_DATA", str(tmp_path))
    assert resolve_root("mnist") == tmp_path / "mnist"
    assert resolve_root("mnist", tmp_path / "mine") == tmp_path / "mine"
    write_mnist(tmp_path / "mnist", gz=True)
    assert len(load_dataset("mnist").test) == _NUM_TEST


def test_default_dataset_falls_back_to_digits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACCORD_DATA", str(tmp_path))
    assert default_dataset() == "digits"
    write_mnist(tmp_path / "fashion-mnist", gz=False)
    assert default_dataset() == "fashion-mnist"


@pytest.mark.parametrize("call", [load_dataset, resolve_root])
def test_unknown_dataset_lists_valid_names(call) -> None:
    with pytest.raises(DataError, match=r"'fashon-mnist'.*did you mean 'fashion-mnist'") as info:
        call("fashon-mnist")
    assert all(name in str(info.value) for name in DATASETS)


def test_dataset_names_are_the_documented_ones() -> None:
    assert DATASETS == ("cifar10", "cifar100", "digits", "fashion-mnist", "mnist")


# --- CIFAR ----------------------------------------------------------------------------------


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_load_cifar10(tmp_path: Path, point_at_folder: bool) -> None:
    written = write_cifar10(tmp_path / "cifar-10-batches-py")
    root = tmp_path / "cifar-10-batches-py" if point_at_folder else tmp_path
    splits = load_dataset("cifar10", root, val_fraction=0.0)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, 32)
    assert splits.class_names == tuple(f"class{i}" for i in range(10))
    assert len(splits.train) == 15
    train = np.concatenate([written["data"][f"data_batch_{i}"] for i in range(1, 6)])
    train = train.reshape(-1, 3, 32, 32)
    test = written["data"]["test_batch"].reshape(-1, 3, 32, 32)
    np.testing.assert_allclose(splits.test.images, standardised(train, test, 255), atol=1e-5)
    assert splits.test.labels.tolist() == written["labels"]["test_batch"]
    assert splits.train.labels[:3].tolist() == written["labels"]["data_batch_1"]


def test_load_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "cifar-100-python")
    splits = load_dataset("cifar100", tmp_path, val_fraction=0.0)
    assert splits.num_classes == 100
    assert splits.class_names[:2] == ("fine0", "fine1")
    assert (len(splits.train), len(splits.test)) == (6, 2)
    assert splits.train.images.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cifar_pickle_names_the_file(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    batch = folder / "data_batch_3"
    cut = batch.read_bytes()[:100] if damage == "truncated" else b"\x00not a pickle at all"
    batch.write_bytes(cut)
    with pytest.raises(DataError, match=r"data_batch_3.*cannot be unpickled"):
        load_dataset("cifar10", tmp_path)


def test_cifar_batch_of_wrong_shape_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"test_batch.*uint8 N×3072.*\(2, 100\)"):
        load_dataset("cifar10", tmp_path)


def test_cifar_meta_without_names_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder)
    write_pickle(folder / "meta", {b"coarse_label_names": []})
    with pytest.raises(DataError, match=r"meta.*'fine_label_names'"):
        load_dataset("cifar100", folder)


# --- digits, Dataset and loaders ------------------------------------------------------------


def test_digits_loads_with_a_fixed_test_split() -> None:
    splits = load_dataset("digits")
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 8)
    assert splits.train.images.shape[1:] == (1, 8, 8)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert len(splits.test) == 359
    # The seed moves the validation carve (and so the normalisation), never the test examples.
    assert torch.equal(load_dataset("digits", seed=3).test.labels, splits.test.labels)


def test_dataset_indexing_and_subset() -> None:
    data = Dataset(torch.arange(24.0).reshape(6, 1, 2, 2), torch.arange(6))
    image, label = data[2]
    assert image.shape == (1, 2, 2)
    assert label.item() == 2
    part = data.subset(np.array([4, 1]))
    assert part.labels.tolist() == [4, 1]
    assert torch.equal(part.images[0], data.images[4])
    with pytest.raises(DataError, match="N×C×H×W"):
        Dataset(torch.zeros(3, 4), torch.zeros(3))


def test_make_loader_is_deterministic_and_covers_every_example() -> None:
    data = Dataset(torch.randn(10, 1, 2, 2), torch.arange(10))
    plain = [labels.tolist() for _, labels in make_loader(data, batch_size=4)]
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    first = [
        y for _, ys in make_loader(data, batch_size=4, shuffle=True, seed=1) for y in ys.tolist()
    ]
    again = [
        y for _, ys in make_loader(data, batch_size=4, shuffle=True, seed=1) for y in ys.tolist()
    ]
    other = [
        y for _, ys in make_loader(data, batch_size=4, shuffle=True, seed=2) for y in ys.tolist()
    ]
    assert first == again
    assert first != other
    assert sorted(first) == list(range(10))
    images, _ = next(iter(make_loader(data, batch_size=4)))
    assert images.shape == (4, 1, 2, 2)


# --- split modes ----------------------------------------------------------------------------


def _labels(num_classes: int = 10, per_class: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _assert_partition(parts: list[np.ndarray], size: int) -> None:
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(size))
    assert all(np.array_equal(part, np.sort(part)) for part in parts)


def test_iid_gives_every_model_everything() -> None:
    labels = torch.as_tensor(_labels())
    parts = split_indices(labels, 3, "iid")
    assert len(parts) == 3
    assert all(np.array_equal(part, np.arange(500)) for part in parts)


def test_classes_mode_gives_disjoint_class_sets() -> None:
    labels = _labels()
    parts = split_indices(labels, 3, "classes", seed=4)
    _assert_partition(parts, len(labels))
    class_sets = [set(labels[part].tolist()) for part in parts]
    assert sorted(len(s) for s in class_sets) == [3, 3, 4]
    assert not (
        class_sets[0] & class_sets[1]
        or class_sets[0] & class_sets[2]
        or class_sets[1] & class_sets[2]
    )
    again = split_indices(labels, 3, "classes", seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_classes_mode_needs_enough_classes() -> None:
    with pytest.raises(DataError, match="3 classes for 4 models"):
        split_indices(np.array([0, 1, 2]), 4, "classes")


def test_dirichlet_mode_partitions_every_class() -> None:
    labels = _labels()
    parts = split_indices(labels, 4, "dirichlet", alpha=0.3, seed=2)
    _assert_partition(parts, len(labels))
    again = split_indices(labels, 4, "dirichlet", alpha=0.3, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # Large alpha gives near-equal shares, small alpha skewed ones.
    even = split_indices(labels, 4, "dirichlet", alpha=1e4, seed=2)
    assert all(abs(len(part) - 125) <= 10 for part in even)
    assert max(len(part) for part in parts) > 175
    with pytest.raises(DataError, match="alpha > 0"):
        split_indices(labels, 2, "dirichlet", alpha=0.0)


def test_eighty_twenty_mode_gives_the_documented_shares() -> None:
    labels = _labels()
    parts = split_indices(labels, 2, "80-20", seed=1)
    _assert_partition(parts, len(labels))
    for model, part in enumerate(parts):
        counts = np.bincount(labels[part], minlength=10)
        major, minor = (counts[:5], counts[5:]) if model == 0 else (counts[5:], counts[:5])
        assert (major == 40).all()
        assert (minor == 10).all()


@pytest.mark.parametrize("num_models", [1, 3])
def test_eighty_twenty_mode_needs_two_models(num_models: int) -> None:
    with pytest.raises(DataError, match="'80-20' needs exactly 2 models"):
        split_indices(_labels(), num_models, "80-20")


def test_unknown_split_mode_lists_valid_modes() -> None:
    with pytest.raises(DataError, match=r"'dirichlett'.*did you mean 'dirichlet'") as info:
        split_indices(_labels(), 2, "dirichlett")
    assert all(mode in str(info.value) for mode in SPLIT_MODES)


def test_split_rejects_non_integer_labels() -> None:
    with pytest.raises(DataError, match="1-D integer"):
        split_indices(np.zeros((3, 2), np.int64), 2, "iid")


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 9), min_size=1, max_size=200),
    num_models=st.integers(1, 6),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_is_a_partition_of_each_class(
    labels: list[int], num_models: int, alpha: float, seed: int
) -> None:
    array = np.array(labels)
    parts = split_indices(array, num_models, "dirichlet", alpha=alpha, seed=seed)
    assert len(parts) == num_models
    _assert_partition(parts, len(array))


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 9), min_size=1, max_size=200),
    num_models=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_classes_is_a_partition_by_class(labels: list[int], num_models: int, seed: int) -> None:
    array = np.array(labels)
    if num_models > len(set(labels)):
        with pytest.raises(DataError):
            split_indices(array, num_models, "classes", seed=seed)
        return
    parts = split_indices(array, num_models, "classes", seed=seed)
    _assert_partition(parts, len(array))
    class_sets = [set(array[part].tolist()) for part in parts]
    assert all(class_sets)
    assert sum(len(s) for s in class_sets) == len(set(labels))


def test_split_docstring_example_runs() -> None:
    assert doctest.testmod(accord.data.splits).failed == 0


# --- the real data, when installed ----------------------------------------------------------


@pytest.mark.skipif(not _DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCORD_DATA", raising=False)
    splits = load_dataset("fashion-mnist", limit=1000)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (900, 100, 1000)
    assert set(splits.test.labels.tolist()) == set(range(10))
