"""What makes accord's passes over data cheap on a CPU (issue 19, item 2).

1. ``modes``: CPU seconds of forward passes of one model over the speed bench's data (the
   first 1,024 training images, batches of 256) under ``torch.no_grad`` or
   ``torch.inference_mode``, with the weights as given (NCHW) or 2-d convolutions
   channels-last (:mod:`accord._layout`), in eval mode (statistics, evaluation, REPAIR) and
   train mode (the BatchNorm reset): ResNet20 of the given width and VGG11×0.25 with
   BatchNorm.
2. ``passes``: REPAIR of two VGG11×0.25 without BatchNorm merged by permutation, and
   ``accord.evaluate`` of a ResNet20, as accord runs them (channels-last on the CPU)
   against the models as given (``wants_channels_last`` switched off in those modules).

Every variant alternates with the others; each prints every repeat and its fastest, CPU
seconds of the process (they hardly move when other processes share the cores).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/forward_passes.py modes [WIDTH] [REPEATS]
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/forward_passes.py passes [WIDTH] [REPEATS]
"""

from __future__ import annotations

import copy
import importlib
import itertools
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import accord
from accord._layout import channels_last
from accord.bench.speed import _batches, speed_plan

repair_module = importlib.import_module("accord.repair")
evaluate_module = importlib.import_module("accord.evaluate")


def _cpu(run: Callable[[], object]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def _model(
    data: accord.DataSplits, arch: str, width: float, seed: int = 0, **options: object
) -> nn.Module:
    torch.manual_seed(seed)
    return accord.build_model(
        arch,
        width=width,
        in_channels=data.in_channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
        **options,
    ).eval()


def _print(results: dict[tuple[str, ...], list[float]]) -> None:
    for key, seconds in results.items():
        print(" ".join(key), f"best {min(seconds):.3f}", [round(s, 3) for s in seconds])


def modes(data: accord.DataSplits, width: float, repeats: int) -> None:
    inputs = [x for x, _ in _batches(speed_plan(), data)]
    models = {
        f"resnet20 w{width:g}": _model(data, "resnet20", width),
        "vgg11-bn w0.25": _model(data, "vgg11", 0.25, batch_norm=True),
    }
    grads = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    variants = list(itertools.product(models, grads, ("nchw", "channels_last"), ("eval", "train")))
    results: dict[tuple[str, ...], list[float]] = {}

    def forward(model: nn.Module, grad: str, layout: str) -> None:
        with channels_last([model], layout == "channels_last"), grads[grad]():
            model(inputs[0])  # warm-up: the first call allocates and picks kernels
            results[key].append(_cpu(lambda: [model(x) for x in inputs]))

    for _ in range(repeats):
        for key in variants:
            name, grad, layout, mode = key
            results.setdefault(key, [])
            forward(models[name].train(mode == "train"), grad, layout)
    _print(results)


def passes(data: accord.DataSplits, width: float, repeats: int) -> None:
    batches = _batches(speed_plan(), data)
    vggs = [_model(data, "vgg11", 0.25, seed) for seed in range(2)]
    merged = accord.merge(vggs, batches, "permutation", repair="none")
    resnet = _model(data, "resnet20", width)

    def repair() -> None:
        model = copy.deepcopy(merged.model)
        repair_module.repair_activations(model, vggs, merged.transforms, merged.spec, batches)

    def evaluation() -> None:
        accord.evaluate(resnet, batches)

    results: dict[tuple[str, ...], list[float]] = {}
    for _ in range(repeats):
        for layout in ("as_given", "channels_last"):

            def wants(device: str | torch.device, layout: str = layout) -> bool:
                return layout == "channels_last" and torch.device(device).type == "cpu"

            repair_module.wants_channels_last = wants
            evaluate_module.wants_channels_last = wants
            results.setdefault(("REPAIR vgg11 w0.25 N=2", layout), []).append(_cpu(repair))
            key = (f"evaluate resnet20 w{width:g}", layout)
            results.setdefault(key, []).append(_cpu(evaluation))
    _print(results)


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    width, repeats = float(rest[0]) if rest else 1.0, int(rest[1]) if len(rest) > 1 else 3
    data = accord.load_dataset(accord.default_dataset())
    {"modes": modes, "passes": passes}[what](data, width, repeats)
