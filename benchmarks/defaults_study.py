"""Default options chosen from measurement (issue 17, item 2): every candidate of an alignment's
option grid (the record's ``grid``), merged on several model sets, scored on validation.

Model sets: ``resnet20-bn`` (ResNet20×1 with BatchNorm, Fashion-MNIST 28×28, the store and
training of ``benchmarks/npmerge_study.py``) and ``vgg11-nobn`` (VGG11×0.5 without BatchNorm,
Fashion-MNIST padded to 32×32×3, the store and training of
``benchmarks/cca_without_batchnorm.py``). For each set and N, one statistics pass (all pairs,
so every alignment can read it) on the first ``--samples`` training images; then every
candidate is merged by ``accord.merge`` (default repair) and evaluated on the validation
split (chooses) and the test split (reported, chooses nothing). The candidate with the best
mean validation accuracy over all sets and sizes is the measured default.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/defaults_study.py \
        --methods cca,zipit --json benchmarks/cache/defaults-study.json

``--only`` keeps some values of each grid (the study of this session's note:
``--sizes 2 --only "ridge=0.01,0.1,1,10;alpha=0.3,1;beta=0.125,0.5,1"``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import accord
from accord.data import DataSplits, make_loader
from accord.registry import lookup
from accord.tune import candidates

sys.path.insert(0, str(Path(__file__).parent))
import cca_without_batchnorm as nobn
import npmerge_study


def resnet20_bn(args: argparse.Namespace, count: int) -> tuple[list[nn.Module], DataSplits]:
    data = accord.load_dataset("fashion-mnist")
    return npmerge_study.trained_models(args.resnet_store, count, data), data


def vgg11_nobn(args: argparse.Namespace, count: int) -> tuple[list[nn.Module], DataSplits]:
    options = argparse.Namespace(
        store=args.vgg_store, width=0.5, limit=12000, epochs=4, lr=0.02, batch_size=128
    )
    data = nobn.padded_rgb(accord.load_dataset("fashion-mnist", limit=options.limit))
    return [nobn.trained_model(options, data, seed) for seed in range(count)], data


MODEL_SETS = {"resnet20-bn": resnet20_bn, "vgg11-nobn": vgg11_nobn}


def grid(method: str, only: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Every combination of the record's option grids (options without a grid keep their
    default), each grid restricted to the values in ``only`` that it holds."""
    record = lookup("align", method)
    grids = {
        o.name: [v for v in o.grid if o.name not in only or v in only[o.name]]
        for o in record.options
        if o.grid
    }
    return candidates(grids)


def parse_only(text: str) -> dict[str, list[float]]:
    """``"ridge=0.1,1;beta=0.5,1"`` as ``{"ridge": [0.1, 1.0], "beta": [0.5, 1.0]}``."""
    only = {}
    for item in filter(None, text.split(";")):
        name, _, values = item.partition("=")
        only[name] = [float(v) for v in values.split(",")]
    return only


def run_set(
    name: str, args: argparse.Namespace, sizes: Sequence[int], methods: Sequence[str]
) -> list[dict[str, Any]]:
    models, data = MODEL_SETS[name](args, max(args.models, *sizes))
    calibration = make_loader(data.train.subset(torch.arange(args.samples)), batch_size=500)
    val = data.val.subset(torch.arange(min(args.val_limit, len(data.val))))
    test = data.test.subset(torch.arange(min(args.test_limit, len(data.test))))
    rows = []
    for size in sizes:
        chosen = models[:size]
        ensemble = 100 * accord.evaluate_ensemble(chosen, test).accuracy
        stats = accord.collect_statistics(chosen, calibration, pairs="all", progress=False)
        for method in methods:
            for options in grid(method, parse_only(args.only)):
                clock = time.perf_counter()
                merged = accord.merge(chosen, calibration, method, statistics=stats, **options)
                row = {
                    "set": name,
                    "models": size,
                    "method": method,
                    "options": options,
                    "val": 100 * accord.evaluate(merged.model, val).accuracy,
                    "test": 100 * accord.evaluate(merged.model, test).accuracy,
                    "ensemble_test": ensemble,
                    "seconds": time.perf_counter() - clock,
                }
                rows.append(row)
                print(
                    f"{name} N={size} {method} {options}: val {row['val']:.2f} "
                    f"test {row['test']:.2f} ({row['seconds']:.0f}s)",
                    flush=True,
                )
    return rows


def best_by_mean_validation(rows: Sequence[dict[str, Any]], method: str) -> dict[str, Any]:
    """The candidate whose validation accuracy, averaged over every set and size, is highest."""
    scores: dict[str, list[float]] = {}
    for row in rows:
        if row["method"] == method:
            scores.setdefault(json.dumps(row["options"], sort_keys=True), []).append(row["val"])
    key = max(scores, key=lambda k: sum(scores[k]) / len(scores[k]))
    means = {k: sum(v) / len(v) for k, v in scores.items()}
    return {"options": json.loads(key), "mean_val": means[key], "means": means}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(MODEL_SETS))
    parser.add_argument("--sizes", default="2,4")
    parser.add_argument("--methods", default="cca,zipit")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--models", type=int, default=4, help="models in each set's store")
    parser.add_argument("--resnet-store", default="benchmarks/cache/npmerge-study")
    parser.add_argument("--vgg-store", default="benchmarks/cache/nobn")
    parser.add_argument("--only", default="", help='grid values kept: "ridge=0.1,1;beta=1"')
    parser.add_argument("--val-limit", type=int, default=2000, help="validation images")
    parser.add_argument("--test-limit", type=int, default=5000, help="test images")
    parser.add_argument("--json", default=None, help="write rows and choices here too")
    args = parser.parse_args()
    torch.manual_seed(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    rows = [row for name in args.sets.split(",") for row in run_set(name, args, sizes, methods)]
    chosen = {method: best_by_mean_validation(rows, method) for method in methods}
    for method, best in chosen.items():
        print(f"{method}: best by mean validation {best['options']} ({best['mean_val']:.2f} %)")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "rows": rows, "chosen": chosen}, indent=1)
        )


if __name__ == "__main__":
    main()
