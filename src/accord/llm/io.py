"""Lazy reading and streaming, atomic writing of Hugging Face checkpoints (safetensors shards).

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or several shards
listed by ``model.safetensors.index.json`` (a directory of shards without an index works too).
Nothing is read eagerly: :class:`LazyState` opens the shard holding a tensor with
``safetensors.safe_open`` when the tensor is asked for, so a merge holds a few tensors at once.

Writing streams too: the safetensors header (names, dtypes, shapes, byte offsets) is known
before any tensor is computed, so each shard is written header first and then tensor by tensor.
The whole output (shards, index, config, tokenizer files) is filled in a staging folder beside
the target and renamed onto it at the end by :func:`accord._outputs.write_folder`, whose rules
decide what may be overwritten; a failure removes the staging folder, so no partial output is
ever left.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import torch
from pydantic import ByteSize, Field, TypeAdapter, ValidationError
from safetensors import SafetensorError, safe_open
from torch import Tensor

from accord._io import read_json
from accord._outputs import write_folder
from accord.errors import ConfigError, ModelError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CHECKPOINT_KIND = "hf-checkpoint"  # the kind of output folder save_checkpoint writes
DEFAULT_SHARD_SIZE = "2GB"

# What a merge copies from its tokenizer source: mergekit's list (generation_config.json and the
# chat templates included), with the vocabularies of GPT-2's and BERT's tokenizers.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "video_preprocessor_config.json",
)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, shape and dtype, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class LazyState(Mapping[str, Tensor]):
    """A read-only state dict over safetensors shards; a tensor is read when it is asked for."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files  # tensor name -> shard holding it

    def __getitem__(self, name: str) -> Tensor:
        path = self._files[name]
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of tensor ``name`` (along its first axis), read alone: the file
        is mapped only while they are copied, so what was read leaves no resident pages."""
        with safe_open(self._files[name], framework="pt") as handle:
            return handle.get_slice(name)[start:stop]

    def file(self, name: str) -> Path:
        """The shard holding ``name``."""
        return self._files[name]

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of ``name`` from the shard header."""
        with safe_open(self._files[name], framework="pt") as handle:
            view = handle.get_slice(name)
            return TensorInfo(name, tuple(view.get_shape()), _DTYPES[view.get_dtype()])


@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face causal LM on disk: its directory, ``config.json`` and lazy state."""

    path: Path
    config: dict[str, Any]
    state: LazyState


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory; ModelError naming the file when unreadable."""
    path = Path(directory) / CONFIG
    config = read_json(path, ModelError, missing="a checkpoint needs its config.json")
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return config


def open_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint without reading any tensor.

    Every shard named by the index must exist and hold the tensors the index gives it
    (ModelError naming the file); without an index, every ``*.safetensors`` file is read.
    """
    path = Path(directory)
    if not path.is_dir():
        raise ModelError(f"{path} is not a directory; expected a Hugging Face checkpoint folder")
    config = read_config(path)
    index = path / INDEX
    files = _indexed_files(path, index) if index.exists() else _scanned_files(path)
    return Checkpoint(path, config, LazyState(files))


def _indexed_files(directory: Path, index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{index} is not a safetensors index (no 'weight_map'): {exc}") from exc
    files = {name: directory / shard for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
        held = set(_shard_keys(shard))
        listed = [name for name, where in files.items() if where == shard]
        missing = [name for name in listed if name not in held]
        if missing:
            raise ModelError(f"{shard} lacks tensor {missing[0]!r} that {index.name} places there")
    return files


def _scanned_files(directory: Path) -> dict[str, Path]:
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ModelError(f"{directory} holds no *.safetensors file (and no {INDEX})")
    files: dict[str, Path] = {}
    for shard in shards:
        for name in _shard_keys(shard):
            if name in files:
                raise ModelError(f"tensor {name!r} is in both {files[name]} and {shard}")
            files[name] = shard
    return files


def _shard_keys(shard: Path) -> list[str]:
    """The tensor names of ``shard`` in name order: without an index they set the order of the
    output tensors, which must not vary between runs."""
    if not shard.exists():
        raise ModelError(f"shard {shard} is missing; the checkpoint is incomplete")
    try:
        with safe_open(shard, framework="pt") as handle:
            return sorted(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"shard {shard} cannot be read: {exc}") from exc


def load_state_and_config(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every tensor of a checkpoint in memory, and its config: ``(state, config)``."""
    checkpoint = open_checkpoint(directory)
    return {name: checkpoint.state[name] for name in checkpoint.state}, checkpoint.config


_SIZE = TypeAdapter(Annotated[ByteSize, Field(gt=0)])


def parse_size(value: int | str) -> int:
    """Bytes from a positive integer or a size such as ``500MB``, ``2GB`` or ``1.5GiB`` (decimal
    and binary units, read by pydantic's ByteSize); ValueError saying what is expected."""
    expected = "expected a positive number of bytes or a size such as 500MB, 2GB or 1.5GiB"
    if isinstance(value, bool):  # YAML's true/false, which ByteSize would read as 1 and 0 bytes
        raise ValueError(f"{value!r} is not a size; {expected}")
    try:
        return int(_SIZE.validate_python(value))
    except ValidationError:
        raise ValueError(f"{value!r} is not a size; {expected}") from None


def plan_shards(infos: Sequence[TensorInfo], shard_size: int) -> list[list[TensorInfo]]:
    """Tensors split in order into shards of at most ``shard_size`` bytes (a larger tensor gets
    a shard of its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def tokenizer_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The :data:`TOKENIZER_FILES` present in ``directory``."""
    paths = [Path(directory) / name for name in TOKENIZER_FILES]
    return [path for path in paths if path.is_file()]


def write_checkpoint(
    directory: str | os.PathLike[str],
    config: dict[str, Any],
    infos: Sequence[TensorInfo],
    produce: Callable[[TensorInfo], Tensor | Iterable[Tensor]],
    *,
    kind: str = CHECKPOINT_KIND,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
    on_tensor: Callable[[str], None] | None = None,
    extra_files: Sequence[Path] = (),
) -> Path:
    """Write a checkpoint whose tensors ``produce(info)`` computes one at a time, atomically:
    a tensor, or its row blocks in order (each written as soon as it comes).

    Shards of at most ``shard_size`` (bytes, or a size such as ``500MB`` or ``1.5GiB``) are
    named like Hugging Face's (``model-00001-of-00002.safetensors`` plus an index;
    ``model.safetensors`` alone when one shard suffices). ``config.json`` is written with its
    ``dtype`` entry set to the tensors' floating dtype; ``extra_files`` (a tokenizer's) are
    copied beside it. The folder is a ``kind`` output of :func:`accord._outputs.write_folder`:
    checked before any tensor is computed (OutputError naming the folder when it is, holds or
    lies in one of ``inputs``, cannot be written, or exists and is not a ``kind`` folder accord
    wrote, or exists without ``overwrite``), and replaced whole once the new one is complete.
    """
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise ConfigError(f"shard_size: {exc}") from None

    def fill(staging: Path) -> None:
        _write_shards(staging, infos, produce, shard_bytes, on_tensor)
        (staging / CONFIG).write_text(_json(_with_dtype(config, infos)), encoding="utf-8")
        for path in extra_files:
            shutil.copyfile(path, staging / path.name)

    return write_folder(directory, kind, fill, overwrite=overwrite, inputs=inputs)


def _with_dtype(config: dict[str, Any], infos: Sequence[TensorInfo]) -> dict[str, Any]:
    """``config`` with its dtype entries set to the tensors' floating dtype."""
    floating = [info.dtype for info in infos if info.dtype.is_floating_point]
    config = dict(config)
    if floating:  # both spellings where present: transformers 4 reads torch_dtype
        name = str(floating[0]).removeprefix("torch.")
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = name
    return config


def _json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"


def _write_shards(
    staging: Path,
    infos: Sequence[TensorInfo],
    produce: Callable[[TensorInfo], Tensor | Iterable[Tensor]],
    shard_size: int,
    on_tensor: Callable[[str], None] | None,
) -> None:
    shards = plan_shards(infos, shard_size)
    count = len(shards)
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        name = SINGLE if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        with open(staging / name, "wb") as handle:
            handle.write(_header(shard))
            for info in shard:
                _write_tensor(handle, info, produce(info))
                weight_map[info.name] = name
                if on_tensor is not None:
                    on_tensor(info.name)
    if count > 1:
        total = sum(info.nbytes for info in infos)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / INDEX).write_text(_json(index), encoding="utf-8")


def _header(shard: Sequence[TensorInfo]) -> bytes:
    """The safetensors header: u64 length, then JSON padded with spaces to 8-byte alignment."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in shard:
        entries[info.name] = {
            "dtype": _CODES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_tensor(handle: BinaryIO, info: TensorInfo, produced: Tensor | Iterable[Tensor]) -> None:
    """Write a tensor, or its row blocks one by one, after checking each against the header."""
    if isinstance(produced, Tensor):
        _check_produced(info, produced, tuple(produced.shape))
        _write_bytes(handle, produced)
        return
    rows = 0
    for block in produced:
        if block.dim() == 0:
            raise ModelError(f"tensor {info.name!r}: a row block has no rows (0-dimensional)")
        rows += block.shape[0]
        _check_produced(info, block, (max(rows, info.shape[0]), *block.shape[1:]))
        _write_bytes(handle, block)
    _check_produced(info, None, (rows, *info.shape[1:]))


def _write_bytes(handle: BinaryIO, tensor: Tensor) -> None:
    handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _check_produced(info: TensorInfo, tensor: Tensor | None, shape: tuple[int, ...]) -> None:
    """ModelError unless ``shape`` and ``tensor``'s dtype (when given) are the header's."""
    if shape != info.shape or (tensor is not None and tensor.dtype != info.dtype):
        dtype = tensor.dtype if tensor is not None else info.dtype
        raise ModelError(
            f"tensor {info.name!r}: computed {shape} {dtype}, the planned header says "
            f"{info.shape} {info.dtype}"
        )


def save_checkpoint(
    directory: str | os.PathLike[str],
    state: Mapping[str, Tensor],
    config: dict[str, Any],
    *,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write an in-memory (or lazy) state dict and its config as a checkpoint, atomically, by
    :func:`write_checkpoint`'s rules (``overwrite`` replaces only a checkpoint this function
    wrote).

    A tied ``lm_head.weight`` is left out, as ``save_pretrained`` does.
    """
    tied = bool(config.get("tie_word_embeddings", False))
    names = [name for name in state if not (tied and name == "lm_head.weight")]
    if isinstance(state, LazyState):
        infos = [state.info(name) for name in names]
    else:
        infos = [TensorInfo(n, tuple(state[n].shape), state[n].dtype) for n in names]
    return write_checkpoint(
        directory,
        config,
        infos,
        lambda info: state[info.name],
        shard_size=shard_size,
        overwrite=overwrite,
    )
