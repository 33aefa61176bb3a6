"""Distributed statistics worker: ``torchrun --nproc-per-node 2 _dist_stats_worker.py OUT_DIR``.

Every rank builds the same models and data; rank 0 saves the all-reduced statistics of each
case to ``OUT_DIR/<case>.safetensors``; a rank that raises writes ``OUT_DIR/<case>-rank<r>.txt``.
:func:`cases` is also what the single-process side of the test runs, so both sides see
identical inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import distributed as dist
from torch import nn

from accord.errors import StatisticsError
from accord.spec import FeatureSpace, FoldedNorm, Observation, Spec
from accord.statistics import collect_statistics


def conv_bn_models(num_models: int = 3) -> list[nn.Module]:
    """Conv → BN → ReLU → Conv → ReLU → Linear, with non-trivial BN running statistics."""
    models = []
    for seed in range(num_models):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 5, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(5 * 4 * 4, 3),
        )
        norm = model[1]
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
        models.append(model)
    return models


def conv_bn_spec() -> Spec:
    return Spec(
        [
            FeatureSpace(
                "c1", 6, batchnorms=(FoldedNorm("1", "0"),), observe=(Observation("_2", 1),)
            ),
            FeatureSpace("c2", 5, observe=(Observation("_4", 1),)),
        ]
    )


def blocks_spec() -> Spec:
    """c1's 6 channels as 3 features of 2 entries each (as attention heads are observed)."""
    return Spec(
        [
            FeatureSpace("c1", 3, observe=(Observation("_2", 1, None, 2),)),
            FeatureSpace("c2", 5, observe=(Observation("_4", 1),)),
        ]
    )


def cases(rank: int = 0, world: int = 1) -> dict[str, dict[str, Any]]:
    """Keyword arguments of collect_statistics per case, for this rank.

    ``many``: 7 uneven batches, cut by max_samples; ``many-float64``: the same with float64
    products of the models as given (exact to rounding); ``blocks-float64``: the same with
    a space of blocks (its entrywise covariances); ``one``: one batch, so rank 1 has none;
    ``sharded``: each rank is given its own share of the batches; ``nan``: a NaN in batch 1.
    All but the float64 ones use the default float32 products.
    """
    generator = torch.Generator().manual_seed(0)
    sizes = [9, 4, 7, 12, 5, 8, 3]
    batches = [(torch.randn(n, 3, 6, 6, generator=generator) + 2, torch.zeros(n)) for n in sizes]
    poisoned = [(x.clone(), y) for x, y in batches]
    poisoned[1][0][2, 0, 3, 3] = float("nan")
    common = {"models": conv_bn_models(), "spec": conv_bn_spec(), "progress": False}
    return {
        "many": {**common, "data": batches, "pairs": "all", "max_samples": 40, "reference": 1},
        "many-float64": {
            **common,
            "data": batches,
            "pairs": "all",
            "max_samples": 40,
            "reference": 1,
            "precision": "float64",
            "channels_last": False,
            "fuse_batchnorms": False,
        },
        "blocks-float64": {
            **common,
            "spec": blocks_spec(),
            "data": batches,
            "pairs": "all",
            "max_samples": 40,
            "reference": 1,
            "precision": "float64",
            "channels_last": False,
            "fuse_batchnorms": False,
        },
        "one": {**common, "data": batches[:1]},
        "sharded": {**common, "data": batches[rank::world], "sharded": True},
        "nan": {**common, "data": poisoned},
    }


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name, kwargs in cases(rank, dist.get_world_size()).items():
        try:
            stats = collect_statistics(**kwargs)
        except StatisticsError as exc:  # every rank must raise, none may hang
            (out / f"{name}-rank{rank}.txt").write_text(str(exc))
            continue
        if rank == 0:
            stats.save(out / f"{name}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
