"""Seeded training of model sets, in the shape of the CCA Merge recipe.

SGD (momentum 0.9, weight decay 5e-4) with a learning rate that rises linearly from 0 over the
first ``warmup`` fraction of the steps, then falls linearly to 0. Model k of a set is trained
from seed k on part k of the training set under a split mode (``iid``: all of it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from accord._outputs import check_output
from accord.data import DataSplits, load_dataset, make_loader, split_indices
from accord.evaluate import evaluate
from accord.store import CHECKPOINT_KIND, Checkpoint, find_entry, save_checkpoint, store_entry
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


def warmup_then_decay(total_steps: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear 0 → 1 over the warm-up, then 1 → 0."""
    warm = max(1, round(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return factor


def train_model(
    model: nn.Module,
    data: DataSplits,
    indices: Sequence[int] | None,
    config: TrainConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place on ``data.train`` (restricted to ``indices``) and return it."""
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
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay(total, config.warmup))
    for epoch in range(config.epochs):
        bar = tqdm(
            loader,
            desc=f"seed {seed} epoch {epoch + 1}/{config.epochs}",
            leave=False,
            disable=not progress,
        )
        for inputs, labels in bar:
            inputs, labels = inputs.to(device), labels.to(device)
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


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

    A model whose full configuration (architecture, data, split, part, seed, optimisation) is
    already in the store is loaded, not trained again. Each new model is staged and renamed into
    the store whole; staging folders of killed runs are removed.
    """
    data = data or _data_for(request)
    parts = split_indices(
        data.train.labels,
        len(request.seeds),
        request.split,
        alpha=request.alpha,
        seed=request.split_seed,
    )
    model_config = {
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "num_classes": data.num_classes,
        **request.model,
    }
    checkpoints = []
    for part, seed in enumerate(request.seeds):
        key = _store_key(request, model_config, part, seed)
        label = (
            f"{request.dataset}-{request.arch}-{request.split}{part}of{len(request.seeds)}-s{seed}"
        )
        path = store_entry(store, key, label)
        checkpoint = find_entry(path, key)
        if checkpoint is None:
            check_output(path, CHECKPOINT_KIND, overwrite=False)  # an unwritable store fails now
            torch.manual_seed(seed)
            model = build_model(request.arch, **model_config)
            train_model(
                model,
                data,
                parts[part].tolist(),
                request.train,
                seed=seed,
                device=device,
                progress=progress,
            )
            info = {"key": key, "metrics": _metrics(model, data, device)}
            save_checkpoint(model.cpu(), path, info)
            checkpoint = find_entry(path, key)
            assert checkpoint is not None  # just written
        checkpoints.append(checkpoint)
    return checkpoints


def _store_key(
    request: ModelSetRequest, model_config: dict[str, Any], part: int, seed: int
) -> dict[str, Any]:
    return {
        "arch": request.arch,
        "model": model_config,
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


def _metrics(model: nn.Module, data: DataSplits, device: str | torch.device) -> dict[str, float]:
    val, test = evaluate(model, data.val, device), evaluate(model, data.test, device)
    return {
        "val_accuracy": val.accuracy,
        "val_loss": val.loss,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
    }


def checkpoint_paths(checkpoints: Sequence[Checkpoint]) -> list[Path]:
    return [c.path for c in checkpoints]
