"""Streaming, atomic writing of Hugging Face checkpoints (safetensors shards); reading is
:mod:`accord.checkpoint`'s, whose :class:`~accord.checkpoint.Checkpoint` (folder, config.json
and lazy state) serves vision and LLM checkpoints alike.

Writing streams too: the safetensors header (names, dtypes, shapes, byte offsets) is known
before any tensor is computed, so each shard is written header first and then tensor by tensor.
The whole output (shards, index, config, tokenizer files) is filled in a staging folder beside
the target and renamed onto it at the end by :func:`accord._outputs.write_folder`, whose rules
decide what may be overwritten; a failure removes the staging folder, so no partial output is
ever left.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import torch
from pydantic import ByteSize, Field, TypeAdapter, ValidationError
from torch import Tensor

from accord._outputs import write_folder
from accord.checkpoint import (
    CONFIG,
    DTYPE_CODES,
    INDEX,
    WEIGHTS,
    LazyState,
    TensorInfo,
)
from accord.errors import ConfigError, ModelError

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
        name = WEIGHTS if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
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
            "dtype": DTYPE_CODES[info.dtype],
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
