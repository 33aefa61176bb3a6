"""Checkpoints (safetensors weights + a JSON config that rebuilds the model) and the model store.

A checkpoint is a directory holding ``model.safetensors`` and ``config.json``; the config's
``"model"`` entry is a zoo config (``build_model(**config["model"])``) and its
``"weights_sha256"`` entry the digest of the weights file, checked on load. Directories are
written under a hidden staging name and renamed (:mod:`accord._outputs`), so a reader never
sees half a checkpoint. The store is a folder of checkpoints named by a digest of their
training configuration, so the same configuration is never trained twice; hidden folders in it
are never models.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from accord._io import read_json, write_json
from accord._outputs import write_folder
from accord.errors import StoreError
from accord.zoo import build_model, model_config

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CHECKPOINT_FORMAT = 1
CHECKPOINT_KIND = "checkpoint"  # the kind of output folder save_checkpoint writes
WEIGHTS_SHA256 = "weights_sha256"
SNAPSHOTS = "steps"  # the folder of a store entry that holds its intermediate checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and its full JSON config."""

    path: Path
    model: nn.Module
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name


def save_checkpoint(
    model: nn.Module,
    directory: str | os.PathLike[str],
    info: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` and ``{"model": model_config(model), **info}`` to ``directory``, atomically.

    An existing directory is refused unless ``overwrite``; it is then replaced whole, and only
    if accord wrote it as a checkpoint (see :func:`accord._outputs.check_output`).
    """
    return write_folder(
        directory,
        CHECKPOINT_KIND,
        lambda staging: write_checkpoint(model, staging, info),
        overwrite=overwrite,
    )


def write_checkpoint(model: nn.Module, directory: Path, info: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``config.json`` (with the weights' digest) into the
    existing folder ``directory``; :func:`save_checkpoint` makes that folder appear at once."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    digest = weights_digest(directory / WEIGHTS)
    config = {"format": CHECKPOINT_FORMAT, "model": model_config(model), **info}
    write_json(directory / CONFIG, {**config, WEIGHTS_SHA256: digest})


def weights_digest(path: Path) -> str:
    """The SHA-256 (hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON config of a checkpoint; StoreError naming the file when it is missing or broken."""
    path = Path(directory) / CONFIG
    config = read_json(
        path,
        StoreError,
        missing=f"{directory} is not an accord checkpoint",
        broken="delete the entry to retrain",
    )
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise StoreError(f"{path} has no 'model' entry describing the architecture")
    return config


def load_checkpoint(directory: str | os.PathLike[str], device: str = "cpu") -> Checkpoint:
    """Rebuild the model from ``config.json`` and load ``model.safetensors`` into it.

    Weights that do not match the config (missing, unexpected or misshapen tensors, a corrupt
    file, bytes changed since they were written) raise StoreError naming the file and the first
    offending key. Checkpoints written before accord recorded the weights' digest load
    without that check.
    """
    path = Path(directory)
    config = read_config(path)
    model = build_model(**config["model"])
    weights = path / WEIGHTS
    if not weights.is_file():
        raise StoreError(f"{weights} does not exist; the checkpoint is incomplete")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise StoreError(f"{weights} cannot be read ({exc}); the file is corrupt") from exc
    _check_state(model, state, weights)  # names the tensor at fault, so before the digest
    _check_digest(weights, config.get(WEIGHTS_SHA256))
    model.load_state_dict(state)
    return Checkpoint(path, model.to(device).eval(), config)


def _check_digest(weights: Path, recorded: str | None) -> None:
    if recorded is None:
        return
    actual = weights_digest(weights)
    if actual != recorded:
        raise StoreError(
            f"{weights} has sha256 {actual[:16]}..., its config.json records {recorded[:16]}...: "
            "the weights changed after accord wrote them (a damaged disk or copy, or an edit); "
            f"restore the file from a backup, or delete {weights.parent} and train or merge again"
        )


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], weights: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise StoreError(
            f"{weights} does not match its config.json: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; the entry is inconsistent, delete it to retrain"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise StoreError(
                f"{weights}: tensor {key!r} has shape {tuple(state[key].shape)}, config.json "
                f"describes {tuple(tensor.shape)}; delete the entry to retrain"
            )


def config_digest(config: dict[str, Any]) -> str:
    """A short stable digest of a JSON-serialisable configuration."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def store_entry(store: str | os.PathLike[str], key: dict[str, Any], label: str) -> Path:
    """The store directory for a training configuration ``key``: ``<label>-<digest>``."""
    return Path(store) / f"{label}-{config_digest(key)}"


def find_entry(path: Path, key: dict[str, Any]) -> Checkpoint | None:
    """The stored checkpoint at ``path`` if it was trained with ``key``; None if absent.

    An entry that exists but does not load, or whose recorded key differs, is an error, not
    something to train over silently.
    """
    if not path.exists():
        return None
    checkpoint = load_checkpoint(path)
    if checkpoint.config.get("key") != key:
        raise StoreError(
            f"{path / CONFIG} was trained with another configuration than its name says; "
            "delete the entry to retrain"
        )
    return checkpoint


def list_checkpoints(store: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint directories directly inside ``store``, sorted by name.

    Hidden folders (a name starting with ``.``: staging folders of writers, running or killed)
    are never models.
    """
    root = Path(store)
    if not root.is_dir():
        raise StoreError(f"model store {root} does not exist; train models with `accord train`")
    return sorted(
        p for p in root.iterdir() if not p.name.startswith(".") and (p / CONFIG).is_file()
    )


def snapshot_name(step: int) -> str:
    """The folder name of the intermediate checkpoint after ``step`` optimiser steps."""
    return f"step-{step:07d}"


def training_steps(directory: str | os.PathLike[str]) -> list[Path]:
    """A stored model's checkpoints in training order: the intermediate ones kept by
    ``accord train --keep-every`` (``<entry>/steps/step-…``), then the entry itself.

    Each is a checkpoint folder; its ``config.json`` records ``progress`` (``step``,
    ``epochs``) when it was written by a training run that kept steps.
    """
    entry = Path(directory)
    read_config(entry)  # not a checkpoint: StoreError naming the file
    kept = entry / SNAPSHOTS
    steps = sorted(kept.iterdir()) if kept.is_dir() else []
    return [*(p for p in steps if not p.name.startswith(".") and (p / CONFIG).is_file()), entry]


def checkpoint_dataset(
    checkpoints: list[Checkpoint], data_dir: str | os.PathLike[str] | None = None
) -> Any:
    """The dataset (same name and size limit) the checkpoints were trained on.

    Checkpoints trained on different datasets cannot be evaluated together: StoreError.
    """
    from accord.data import load_dataset

    sources = {
        (c.config.get("key", {}).get("dataset"), c.config.get("key", {}).get("limit"))
        for c in checkpoints
    }
    if len(sources) != 1 or None in next(iter(sources))[:1]:
        found = {
            str(c.path): "dataset {}, limit {}".format(
                c.config.get("key", {}).get("dataset"), c.config.get("key", {}).get("limit")
            )
            for c in checkpoints
        }
        raise StoreError(
            "the checkpoints must come from `accord train` on one dataset with one size limit; "
            f"found {found}"
        )
    name, limit = sources.pop()
    return load_dataset(name, data_dir, limit=limit)
