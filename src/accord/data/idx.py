"""Read IDX files (the MNIST and Fashion-MNIST format), gzip-compressed or plain.

An IDX file is a 4-byte magic number (two zero bytes, an element type code, the number of
dimensions), one big-endian uint32 per dimension, then the elements in C order.
"""

from __future__ import annotations

import errno
import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from accord.data._common import RawData, check_labels
from accord.errors import DataError

# Element type code (third magic byte) -> numpy dtype; multi-byte types are big-endian.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file into a native-endian array of the shape its header declares.

    Compression is detected from the content, so ``x.gz`` and ``x`` both work.
    Raises FileNotFoundError if the file is missing and DataError if its header is invalid or
    its payload length does not match the header (a truncated or damaged file).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise _corrupt(path, "it does not start with an IDX magic number (00 00 type ndim)")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise _corrupt(path, f"its element type code 0x{code:02x} is not an IDX type")
    if ndim == 0:
        raise _corrupt(path, "its header declares zero dimensions")
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise _corrupt(path, f"its header for {ndim} dimensions is cut short")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - offset != expected:
        raise _corrupt(
            path,
            f"its header declares shape {shape} ({expected} data bytes) "
            f"but it holds {len(raw) - offset} data bytes",
        )
    data = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def find_idx_file(root: Path, stem: str) -> Path:
    """Return ``root/stem.gz`` or ``root/stem``, whichever exists (gzip first)."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(root / f"{stem}.gz"))


def idx_folder_complete(root: Path) -> bool:
    """Whether ``root`` holds all four MNIST-style IDX files (gzipped or plain)."""
    return all(
        (root / f"{stem}.gz").is_file() or (root / stem).is_file() for stem in IDX_FILES.values()
    )


def load_idx_folder(root: Path, class_names: tuple[str, ...]) -> RawData:
    """Read the four MNIST-style IDX files in ``root`` (uint8 images N×1×H×W).

    Raises FileNotFoundError naming the first missing file and DataError for damaged ones.
    """
    paths = {key: find_idx_file(root, stem) for key, stem in IDX_FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for part in ("train", "test"):
        images = arrays[f"{part}_images"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{paths[f'{part}_images']}: expected uint8 images of shape N×H×W, found "
                f"{images.dtype} {images.shape}; it is not an image file, download it again."
            )
        arrays[f"{part}_images"] = images[:, None]
        arrays[f"{part}_labels"] = check_labels(
            arrays[f"{part}_labels"], len(images), len(class_names), str(paths[f"{part}_labels"])
        )
    return RawData(**arrays, class_names=class_names, max_value=255.0)


def _read_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, f"its gzip stream is damaged ({exc})") from exc


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(
        f"{path} is not a valid IDX file: {why}. It is probably truncated or damaged; "
        "download it again (or reinstall the package that provides it)."
    )
