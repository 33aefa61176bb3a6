"""Seeded training of model sets, in the shape of the CCA Merge recipe.

SGD (momentum 0.9, weight decay 5e-4) with a learning rate that rises linearly from 0 over the
first ``warmup`` fraction of the steps, then falls linearly to 0, optionally on random shifted
crops of each batch (``crop_padding``, drawn from the model's seed). Model k of a set is trained
from seed k on part k of the training set under a split mode (``iid``: all of it), from a fresh
initialisation or from a stored checkpoint (``init``: fine-tuning experts from one base).

Intermediate checkpoints (``keep``: every K steps or epochs of the one run, same schedule) are
stored inside the model's store entry, ``<entry>/steps/step-000120/``, each a checkpoint that
:func:`accord.load_checkpoint` loads; the entry appears with all of them in one rename.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from accord._outputs import check_output, write_folder
from accord.checkpoint import WEIGHTS, Checkpoint, load_checkpoint, weights_digest
from accord.data import DataSplits, load_dataset, make_loader, random_crops, split_indices
from accord.errors import ConfigError
from accord.evaluate import evaluate
from accord.store import (
    CHECKPOINT_KIND,
    SNAPSHOTS,
    find_entry,
    snapshot_name,
    store_entry,
    write_checkpoint,
)
from accord.zoo import build_model


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; part of the store key, so changing one trains anew."""

    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.1
    crop_padding: int = 0  # random crops after padding by this many pixels; 0: none

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ConfigError(
                f"crop padding {self.crop_padding}: give 0 (no crops) or a positive pixel count"
            )


def warmup_then_decay(total_steps: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear 0 → 1 over the warm-up, then 1 → 0."""
    warm = max(1, round(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return factor


KEEP_UNITS = ("step", "epoch")


@dataclass(frozen=True)
class Keep:
    """Keep an intermediate checkpoint every ``every`` optimiser steps or epochs (``unit``)."""

    every: int
    unit: str = "step"

    def __post_init__(self) -> None:
        if self.unit not in KEEP_UNITS:
            raise ConfigError(f"keep unit {self.unit!r}: choose 'step' or 'epoch'")
        if self.every < 1:
            raise ConfigError(f"keep every {self.every} {self.unit}s: give a positive count")

    @classmethod
    def parse(cls, text: str) -> Keep:
        """``"50"`` or ``"50s"``: every 50 steps; ``"2e"``: every 2 epochs."""
        unit = {"s": "step", "e": "epoch"}.get(text[-1:].lower(), "step")
        count = text[:-1] if text[-1:].lower() in ("s", "e") else text
        try:
            return cls(int(count), unit)
        except ValueError:
            raise ConfigError(
                f"--keep-every {text!r}: expected a count of steps (50 or 50s) or epochs (2e)"
            ) from None


Snapshot = Callable[[nn.Module, int, float], None]  # (model, step, epochs done) at a kept point


def train_model(
    model: nn.Module,
    data: DataSplits,
    indices: Sequence[int] | None,
    config: TrainConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = True,
    keep: Keep | None = None,
    snapshot: Snapshot | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``data.train`` (restricted to ``indices``) and return it.

    With ``keep``, ``snapshot(model, step, epochs)`` is called at every kept point before the
    last step (the trained model is the last point); the model is back in train mode after.
    """
    train = data.train if indices is None else data.train.subset(indices)
    loader = make_loader(train, batch_size=config.batch_size, shuffle=True, seed=seed)
    model.to(device).train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=True,
    )
    total = config.epochs * len(loader)
    crops = torch.Generator().manual_seed(seed)
    background = train.images.amin(dim=(0, 2, 3))  # per channel: what a crop shifts in
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay(total, config.warmup))
    step = 0
    for epoch in range(config.epochs):
        bar = tqdm(
            loader,
            desc=f"seed {seed} epoch {epoch + 1}/{config.epochs}",
            leave=False,
            disable=not progress,
        )
        for inputs, labels in bar:
            inputs = random_crops(inputs, config.crop_padding, crops, background)
            inputs, labels = inputs.to(device), labels.to(device)
            loss = F.cross_entropy(model(inputs), labels)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"seed {seed}: training diverged at step {step + 1} of {total} (epoch "
                    f"{epoch + 1}, learning rate {schedule.get_last_lr()[0]:.3g}, loss "
                    f"{loss.item()}); lower lr (peak {config.lr}) or lengthen the warm-up"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if keep and keep.unit == "step" and step % keep.every == 0 and step < total:
                _take_snapshot(model, snapshot, step, step / len(loader))
        if keep and keep.unit == "epoch" and (epoch + 1) % keep.every == 0 and step < total:
            _take_snapshot(model, snapshot, step, epoch + 1.0)
    return model.eval()


def _take_snapshot(model: nn.Module, snapshot: Snapshot | None, step: int, epochs: float) -> None:
    if snapshot is not None:
        snapshot(model.eval(), step, epochs)
        model.train()


@dataclass(frozen=True)
class ModelSetRequest:
    """What to train: an architecture on a dataset, one model per seed, under a split mode."""

    arch: str
    dataset: str
    seeds: tuple[int, ...]
    split: str = "iid"
    alpha: float = 0.5
    split_seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    limit: int | None = None
    data_dir: str | None = None
    keep: Keep | None = None
    init: str | None = None  # a stored checkpoint to start every model from


def _data_for(request: ModelSetRequest) -> DataSplits:
    return load_dataset(request.dataset, request.data_dir, limit=request.limit)


def train_model_set(
    request: ModelSetRequest,
    store: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    data: DataSplits | None = None,
) -> list[Checkpoint]:
    """Train (or reuse from ``store``) one model per seed; return their checkpoints in order.

    A model whose full configuration (architecture, data, split, part, seed, optimisation, the
    starting checkpoint's weights, the kept steps) is already in the store is loaded, not
    trained again. Each new model is staged and renamed into the store whole, with its kept
    intermediate checkpoints; staging folders of killed runs are removed.
    """
    data = data or _data_for(request)
    parts = split_indices(
        data.train.labels,
        len(request.seeds),
        request.split,
        alpha=request.alpha,
        seed=request.split_seed,
    )
    init = load_checkpoint(request.init) if request.init else None
    model_config = _model_config(request, data, init)
    checkpoints = []
    for part, seed in enumerate(request.seeds):
        key = _store_key(request, model_config, part, seed, init)
        label = (
            f"{request.dataset}-{request.arch}-{request.split}{part}of{len(request.seeds)}-s{seed}"
        )
        path = store_entry(store, key, label)
        checkpoint = find_entry(path, key)
        if checkpoint is None:
            check_output(path, CHECKPOINT_KIND, overwrite=False)  # an unwritable store fails now
            torch.manual_seed(seed)
            model = build_model(**model_config)
            if init is not None:
                model.load_state_dict(init.model.state_dict())
            run = _Run(request, data, parts[part].tolist(), seed, key, model, device, progress)
            write_folder(path, CHECKPOINT_KIND, run.fill, overwrite=False)
            checkpoint = find_entry(path, key)
            assert checkpoint is not None  # just written
        checkpoints.append(checkpoint)
    return checkpoints


@dataclass(frozen=True)
class _Run:
    """One model's training run, written into a staging folder with its kept steps."""

    request: ModelSetRequest
    data: DataSplits
    indices: list[int]
    seed: int
    key: dict[str, Any]
    model: nn.Module
    device: str | torch.device
    progress: bool

    def fill(self, staging: Path) -> None:
        config = self.request.train
        train_model(
            self.model,
            self.data,
            self.indices,
            config,
            seed=self.seed,
            device=self.device,
            progress=self.progress,
            keep=self.request.keep,
            snapshot=lambda snapshot, step, epochs: self.write(staging, snapshot, step, epochs),
        )
        steps = config.epochs * math.ceil(len(self.indices) / config.batch_size)
        self.write(staging, self.model.cpu(), steps, float(config.epochs), final=True)

    def write(
        self, staging: Path, model: nn.Module, step: int, epochs: float, final: bool = False
    ) -> None:
        folder = staging if final else staging / SNAPSHOTS / snapshot_name(step)
        folder.mkdir(parents=True, exist_ok=final)
        info = {"key": self.key, "progress": {"step": step, "epochs": epochs}}
        write_checkpoint(model, folder, {**info, **_metrics(model, self.data, self.device)})


def _model_config(
    request: ModelSetRequest, data: DataSplits, init: Checkpoint | None
) -> dict[str, Any]:
    """The zoo config of the models: the data's shape and the request's options, or, when
    fine-tuning, the starting checkpoint's (which must agree with both)."""
    config = {
        "name": request.arch,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "num_classes": data.num_classes,
        **request.model,
    }
    if init is None:
        return config
    stored = init.config["model"]
    clashes = {k: (v, stored.get(k)) for k, v in config.items() if stored.get(k) != v}
    if clashes:
        found = ", ".join(f"{k}: asked {a!r}, stored {b!r}" for k, (a, b) in clashes.items())
        raise ConfigError(
            f"--init {init.path}: that checkpoint's model differs from the request ({found}); "
            "leave out the model options to fine-tune it as it is"
        )
    return dict(stored)


def _store_key(
    request: ModelSetRequest,
    model_config: dict[str, Any],
    part: int,
    seed: int,
    init: Checkpoint | None,
) -> dict[str, Any]:
    key = {
        "arch": request.arch,
        "model": {k: v for k, v in model_config.items() if k != "name"},
        "dataset": request.dataset,
        "limit": request.limit,
        "split": {
            "mode": request.split,
            "models": len(request.seeds),
            "part": part,
            "alpha": request.alpha if request.split == "dirichlet" else None,
            "seed": request.split_seed,
        },
        "seed": seed,
        "train": asdict(request.train),
    }
    # absent unless asked for, so the keys of models trained without them stay as they were
    if not request.train.crop_padding:
        del key["train"]["crop_padding"]
    if request.keep is not None:
        key["keep"] = asdict(request.keep)
    if init is not None:
        key["init"] = {WEIGHTS: weights_digest(init.path / WEIGHTS)}
    return key


def _metrics(model: nn.Module, data: DataSplits, device: str | torch.device) -> dict[str, Any]:
    val, test = evaluate(model, data.val, device), evaluate(model, data.test, device)
    metrics = {
        "val_accuracy": val.accuracy,
        "val_loss": val.loss,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
    }
    return {"metrics": metrics}


def checkpoint_paths(checkpoints: Sequence[Checkpoint]) -> list[Path]:
    return [c.path for c in checkpoints]
