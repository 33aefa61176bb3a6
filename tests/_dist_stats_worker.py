"""Distributed statistics worker: ``torchrun --nproc-per-node 2 _dist_stats_worker.py OUT_DIR``.

Every rank builds the same models and data; rank 0 saves the all-reduced statistics of each
case to ``OUT_DIR/<case>.safetensors``. :func:`cases` is also what the single-process side of
the test runs, so both sides see identical inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import distributed as dist
from torch import nn

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


def cases() -> dict[str, dict[str, Any]]:
    """Keyword arguments of collect_statistics per case (7 uneven batches; a single batch)."""
    generator = torch.Generator().manual_seed(0)
    sizes = [9, 4, 7, 12, 5, 8, 3]
    batches = [(torch.randn(n, 3, 6, 6, generator=generator) + 2, torch.zeros(n)) for n in sizes]
    common = {"models": conv_bn_models(), "spec": conv_bn_spec(), "progress": False}
    return {
        "many": {**common, "data": batches, "pairs": "all", "max_samples": 40, "reference": 1},
        "one": {**common, "data": batches[:1]},
    }


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    for name, kwargs in cases().items():
        stats = collect_statistics(**kwargs)
        if dist.get_rank() == 0:
            stats.save(out / f"{name}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
