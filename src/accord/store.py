"""Writing accord's vision checkpoints, and the model store.

A vision checkpoint is a folder holding ``model.safetensors`` and ``config.json``; the config's
``"model"`` entry is a zoo config (``build_model(**config["model"])``) and its
``"weights_sha256"`` entry the digest of the weights file, checked on load
(:func:`accord.checkpoint.load_checkpoint`, whose :class:`~accord.checkpoint.Checkpoint` is the
one type of vision and LLM checkpoints). Folders are written under a hidden staging name and
renamed (:mod:`accord._outputs`), so a reader never sees half a checkpoint. The store is a
folder of checkpoints named by a digest of their training configuration, so the same
configuration is never trained twice; hidden folders in it are never models.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from accord._io import write_json
from accord._outputs import write_folder
from accord.checkpoint import (
    CONFIG,
    WEIGHTS,
    WEIGHTS_SHA256,
    Checkpoint,
    load_checkpoint,
    read_config,
    weights_digest,
)
from accord.errors import StoreError
from accord.zoo import model_config

CHECKPOINT_FORMAT = 1
CHECKPOINT_KIND = "checkpoint"  # the kind of output folder save_checkpoint writes
SNAPSHOTS = "steps"  # the folder of a store entry that holds its intermediate checkpoints


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
    read_config(entry)  # not a checkpoint: CheckpointError naming the file
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
