"""Why CCA Merge loses on networks without BatchNorm: a rerunnable diagnostic (issue 17).

Trains (or loads from ``--store``) VGG11×width without BatchNorm on Fashion-MNIST padded to
32×32 and repeated to 3 channels, initialised as the CCA Merge reference code does
(xavier-uniform with the ReLU gain, zero bias), one thread; then merges the first N models
(N = 2, 4) with identity, permutation and CCA under several ridges and repair modes, all from
one statistics pass on the first ``--samples`` training images, and prints test accuracy.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cca_without_batchnorm.py \
        --store /tmp/accord-nobn --limit 12000 --epochs 4 --lr 0.02
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import accord
from accord.data import Dataset, DataSplits, make_loader


def padded_rgb(data: DataSplits) -> DataSplits:
    """28×28×1 images padded with black to 32×32 and repeated to 3 channels."""
    black = float(data.train.images.min())

    def convert(split: Dataset) -> Dataset:
        images = F.pad(split.images, (2, 2, 2, 2), value=black).repeat(1, 3, 1, 1)
        return Dataset(images.contiguous(), split.labels)

    return DataSplits(
        data.name,
        convert(data.train),
        convert(data.val),
        convert(data.test),
        data.num_classes,
        3,
        32,
        data.class_names,
    )


def reference_init(model: nn.Module, seed: int) -> nn.Module:
    """xavier-uniform weights with the ReLU gain and zero biases (the reference's VGG init)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight, gain=nn.init.calculate_gain("relu"))
            nn.init.zeros_(module.bias)
    return model


def trained_model(args: argparse.Namespace, data: DataSplits, seed: int) -> nn.Module:
    """Model ``seed`` from the store, or trained and saved there."""
    config = {"width": args.width, "batch_norm": False, "in_channels": 3, "image_size": 32}
    tag = f"vgg11-w{args.width:g}-nobn-n{args.limit}-e{args.epochs}-lr{args.lr:g}-s{seed}"
    path = Path(args.store) / f"{tag}.pt"
    model = accord.build_model("vgg11", **config)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    reference_init(model, seed)
    train = accord.TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    clock = time.perf_counter()
    accord.train_model(model, data, None, train, seed=seed, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    accuracy = accord.evaluate(model, data.test).accuracy
    print(f"trained seed {seed}: test {accuracy:.4f} in {time.perf_counter() - clock:.0f}s")
    return model.eval()


def variants(quick: bool) -> list[tuple[str, str, str, dict]]:
    """``(label, method, repair, options)`` of every merge compared."""
    rows = [
        ("identity + REPAIR", "identity", "repair", {}),
        ("permutation + REPAIR", "permutation", "repair", {}),
        ("CCA default + REPAIR", "cca", "repair", {}),
        ("CCA default, no repair", "cca", "none", {}),
    ]
    if quick:
        return rows
    for ridge in (0.3, 1.0, 3.0):
        rows.append((f"CCA ridge={ridge:g} + REPAIR", "cca", "repair", {"ridge": ridge}))
    for ridge in (1.0, 10.0):
        rows.append(
            (f"CCA absolute_ridge={ridge:g} + REPAIR", "cca", "repair", {"absolute_ridge": ridge})
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="/tmp/accord-nobn")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--limit", type=int, default=12000, help="training images")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=10000, help="statistics/repair images")
    parser.add_argument("--sizes", default="2,4")
    parser.add_argument("--quick", action="store_true", help="fewer variants")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = padded_rgb(accord.load_dataset("fashion-mnist", limit=args.limit))
    sizes = [int(s) for s in args.sizes.split(",")]
    models = [trained_model(args, data, seed) for seed in range(max(sizes))]
    base = [accord.evaluate(m, data.test).accuracy for m in models]
    print("base test accuracies:", " ".join(f"{a:.4f}" for a in base))
    calibration = data.train.subset(range(min(args.samples, len(data.train))))
    loader = make_loader(calibration, batch_size=500)
    results: dict[str, dict[str, float]] = {}
    for size in sizes:
        chosen = models[:size]
        clock = time.perf_counter()
        stats = accord.collect_statistics(chosen, loader, max_samples=args.samples, progress=False)
        print(f"N={size}: statistics in {time.perf_counter() - clock:.0f}s")
        for label, method, repair, options in variants(args.quick):
            clock = time.perf_counter()
            merged = accord.merge(
                chosen, loader, method, repair=repair, statistics=stats, **options
            )
            accuracy = accord.evaluate(merged.model, data.test).accuracy
            results.setdefault(label, {})[f"N={size}"] = accuracy
            seconds = time.perf_counter() - clock
            print(f"N={size} {label:36s} {100 * accuracy:5.1f}  ({seconds:.0f}s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
