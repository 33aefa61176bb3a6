"""Merges with float32 against float64 statistics products (issue 19: the default precision
must not move a merge's accuracy by more than 0.1 point).

Loads accord checkpoints (e.g. the two ResNet20×1 of ``benchmarks/npmerge_study.py``'s store),
collects the statistics of the first 10,000 training images (batch 500) once per precision,
merges by permutation, ZipIt! and CCA with each (default options and repair) and prints the
test accuracy of every merge.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/precision_quality.py CKPT_A CKPT_B
"""

from __future__ import annotations

import json
import sys

from torch.utils.data import DataLoader, Subset

import accord

METHODS = ("permutation", "zipit", "cca")


def main(paths: list[str]) -> None:
    models = [accord.load_checkpoint(path).model for path in paths]
    data = accord.load_dataset(accord.load_checkpoint(paths[0]).config.get("dataset"))
    calibration = DataLoader(Subset(data.train, range(10_000)), batch_size=500)
    test = DataLoader(data.test, batch_size=1000)
    spec = accord.trace(models[0], next(iter(calibration))[0][:2])
    accuracy: dict[str, dict[str, float]] = {}
    for precision in ("float64", "float32"):
        stats = accord.collect_statistics(
            models, calibration, spec, precision=precision, progress=False
        )
        for method in METHODS:
            merged = accord.merge(models, calibration, method, spec=spec, statistics=stats)
            value = 100 * accord.evaluate(merged.model, test).accuracy
            accuracy.setdefault(method, {})[precision] = value
            print(f"{method:12s} {precision}: {value:.2f} % test", flush=True)
    print(json.dumps(accuracy))


if __name__ == "__main__":
    main(sys.argv[1:])
