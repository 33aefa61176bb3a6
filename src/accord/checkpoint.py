"""The checkpoint type of accord's vision models and of Hugging Face LLMs: a folder of
``config.json`` and safetensors weights, opened without reading a tensor.

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` or several shards
listed by ``model.safetensors.index.json`` (a folder of shards without an index works too).
:class:`LazyState` opens the shard holding a tensor with ``safetensors.safe_open`` when the
tensor is asked for, so an LLM merge holds a few tensors at once.

The config says which model it is. An accord vision checkpoint's ``"model"`` entry is a zoo
config (``build_model(**config["model"])``) and its ``"weights_sha256"`` entry the digest of
``model.safetensors``: :attr:`Checkpoint.model` builds the module from them on first use,
checking the weights against both. A Hugging Face config (``architectures``, sizes) is read by
:mod:`accord.llm`, which works on the state itself. Writers differ by format:
:func:`accord.store.save_checkpoint` (a zoo module, one file and its digest) and
:func:`accord.llm.save_checkpoint` (shards streamed tensor by tensor).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from accord._io import read_json
from accord.errors import CheckpointError
from accord.zoo import build_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
WEIGHTS_SHA256 = "weights_sha256"

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
DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}  # safetensors' header codes


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

    def __contains__(self, name: object) -> bool:  # Mapping's would read the tensor
        return name in self._files

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


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint folder: its ``path``, ``config.json`` and ``state``, read lazily.

    ``model`` is an accord vision checkpoint's module (eval mode), built from its config and
    weights when first asked for; :func:`accord.load_checkpoint` builds it at once.
    """

    path: Path
    config: dict[str, Any]
    state: LazyState

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def model(self) -> nn.Module:
        """The zoo model of ``config["model"]`` holding the weights; CheckpointError naming the
        file and the first offending tensor when they do not match, or when their bytes changed
        since accord wrote them."""
        return _build_model(self)


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder; CheckpointError naming the file when it is
    missing, broken or not a JSON object."""
    path = Path(directory) / CONFIG
    config = read_json(
        path,
        CheckpointError,
        missing=f"{directory} is not a checkpoint (it needs its config.json)",
        broken="the checkpoint is damaged: restore it or write it again",
    )
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def open_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint folder without reading any tensor.

    Every shard named by the index must exist and hold the tensors the index gives it
    (CheckpointError naming the file); without an index the weights are ``model.safetensors``
    where it exists (other files beside it, such as saved statistics, are not the model's),
    else every ``*.safetensors`` file.
    """
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a directory; expected a checkpoint folder (config.json and "
            f"{WEIGHTS} or its shards)"
        )
    config = read_config(path)
    index = path / INDEX
    files = _indexed_files(path, index) if index.exists() else _scanned_files(path)
    return Checkpoint(path, config, LazyState(files))


def load_state_and_config(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every tensor of a checkpoint in memory, and its config: ``(state, config)``."""
    checkpoint = open_checkpoint(directory)
    return {name: checkpoint.state[name] for name in checkpoint.state}, checkpoint.config


def load_checkpoint(directory: str | os.PathLike[str], device: str = "cpu") -> Checkpoint:
    """Open an accord vision checkpoint and build its model (eval mode) on ``device`` now.

    Weights that do not match the config (missing, unexpected or misshapen tensors, a corrupt
    file, bytes changed since they were written) raise CheckpointError naming the file and the
    first offending key. Checkpoints written before accord recorded the weights' digest load
    without that check.
    """
    checkpoint = open_checkpoint(directory)
    checkpoint.model.to(device)
    return checkpoint


def weights_digest(path: Path) -> str:
    """The SHA-256 (hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _build_model(checkpoint: Checkpoint) -> nn.Module:
    described = checkpoint.config.get("model")
    if not isinstance(described, dict):
        raise CheckpointError(
            f"{checkpoint.path / CONFIG} has no 'model' entry describing the architecture: it "
            "is not an accord vision checkpoint (a Hugging Face folder loads as a module with "
            "accord.load_user_model)"
        )
    model = build_model(**described)
    weights = checkpoint.path / WEIGHTS
    _check_state(
        model, checkpoint.state, weights
    )  # names the tensor at fault, so before the digest
    _check_digest(weights, checkpoint.config.get(WEIGHTS_SHA256))
    try:
        state = dict(checkpoint.state.items())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} cannot be read ({exc}); the file is corrupt") from exc
    model.load_state_dict(state)
    return model.eval()


def _check_digest(weights: Path, recorded: str | None) -> None:
    if recorded is None:
        return
    actual = weights_digest(weights)
    if actual != recorded:
        raise CheckpointError(
            f"{weights} has sha256 {actual[:16]}..., its config.json records {recorded[:16]}...: "
            "the weights changed after accord wrote them (a damaged disk or copy, or an edit); "
            f"restore the file from a backup, or delete {weights.parent} and train or merge again"
        )


def _check_state(model: nn.Module, state: LazyState, weights: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config.json: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; the entry is inconsistent, delete it to retrain"
        )
    for key, tensor in expected.items():
        shape = state.info(key).shape
        if shape != tuple(tensor.shape):
            raise CheckpointError(
                f"{weights}: tensor {key!r} has shape {shape}, config.json "
                f"describes {tuple(tensor.shape)}; delete the entry to retrain"
            )


def _indexed_files(directory: Path, index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index} is not a safetensors index (no 'weight_map'): {exc}"
        ) from exc
    files = {name: directory / shard for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
        held = set(_shard_keys(shard))
        listed = [name for name, where in files.items() if where == shard]
        missing = [name for name in listed if name not in held]
        if missing:
            raise CheckpointError(
                f"{shard} lacks tensor {missing[0]!r} that {index.name} places there"
            )
    return files


def _scanned_files(directory: Path) -> dict[str, Path]:
    single = directory / WEIGHTS
    shards = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(
            f"{directory} holds no *.safetensors file ({WEIGHTS}, or shards listed by {INDEX}); "
            "the checkpoint is incomplete"
        )
    files: dict[str, Path] = {}
    for shard in shards:
        for name in _shard_keys(shard):
            if name in files:
                raise CheckpointError(f"tensor {name!r} is in both {files[name]} and {shard}")
            files[name] = shard
    return files


def _shard_keys(shard: Path) -> list[str]:
    """The tensor names of ``shard`` in name order: without an index they set the order of the
    output tensors, which must not vary between runs."""
    if not shard.exists():
        raise CheckpointError(f"shard {shard} is missing; the checkpoint is incomplete")
    try:
        with safe_open(shard, framework="pt") as handle:
            return sorted(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"shard {shard} cannot be read ({exc}); the file is corrupt") from exc
