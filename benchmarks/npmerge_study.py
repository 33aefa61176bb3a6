"""NP Merge at the ensemble (issue 17, item 3): which start, parametrisation, learning rate,
number of passes, early stopping and BatchNorm handling bring NP Merge to the ensemble.

Trains (or loads from ``--store``) ``--models`` ResNet20×1 with BatchNorm on Fashion-MNIST
(28×28, one channel; :data:`TRAIN`, two epochs since four did not fit the shared machine;
every model sees all 54,000 training images; seeds 0, 1, …), then merges them with each
variant. Calibration: the first ``--samples`` training images (labelled, as a
user would have them); validation: the dataset's validation split (6,000 images, apart from
every training image); test: the test split, which chooses nothing. Each variant is
``align:option=value,...``: the alignment NP Merge starts from (``merge`` for
``accord.merge(method="npmerge")`` with its defaults), then :func:`accord.combine.np_merge`
options (``epochs``, ``lr``, ``loss``, ``scheme``, ``granularity``,
``crop_padding``, ``schedule``), ``val=1`` (early stopping on the
validation split, the validation and test accuracy after every pass printed; the test
curve chooses nothing: it shows what ``epochs=E`` without early stopping would reach, E up
to the passes run, as the calibration order is fixed) and ``models=K`` (merge the first K of
the ``--models``, all by default, so that N = 2 and N = 4 share one store); ``epochs=0`` is
the aligned average. Every merged model's BatchNorm statistics are reset on the calibration
images; the ``no reset`` column keeps the averaged running statistics NP Merge returns.
``--aligned DIR`` keeps each start's aligned states there, so that later runs skip the
alignment; ``--no-test-curve`` skips the per-pass test measurement (test is still measured
once, on the kept coefficients).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/npmerge_study.py \
        --store benchmarks/cache/npmerge-study permutation:epochs=0 cca:epochs=3
    ... --models 4 cca:epochs=3,models=2 cca:epochs=3   # N = 2 and N = 4 of one model set
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any
from unittest import mock

import torch
from torch import nn

import accord
from accord.combine import np_merge, npmerge
from accord.data import DataSplits, make_loader

TRAIN = accord.TrainConfig(epochs=2, lr=0.05)
NUMBERS = {
    "epochs": int,
    "lr": float,
    "val": int,
    "models": int,
    "crop_padding": int,
}


def trained_models(store: str, count: int, data: DataSplits) -> list[nn.Module]:
    """``count`` ResNet20×1 (seeds 0…count−1), trained once and kept in ``store``."""
    request = accord.ModelSetRequest(
        arch="resnet20",
        dataset="fashion-mnist",
        seeds=tuple(range(count)),
        model={"width": 1},
        train=TRAIN,
    )
    checkpoints = accord.train_model_set(request, store, progress=False, data=data)
    return [c.model for c in checkpoints]


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``align:key=value,...`` as ``(align, options)``; numbers parsed by :data:`NUMBERS`."""
    align, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = NUMBERS.get(key, str)(value)
    return align, options


def study_setup(
    store: str, count: int, samples: int, batch_size: int
) -> tuple[DataSplits, list[nn.Module], Any]:
    """Fashion-MNIST, the ``count`` trained models of ``store`` and a loader of the first
    ``samples`` training images (the calibration data of every study on these models)."""
    torch.manual_seed(0)
    data = accord.load_dataset("fashion-mnist")
    models = trained_models(store, count, data)
    calibration = make_loader(data.train.subset(torch.arange(samples)), batch_size=batch_size)
    return data, models, calibration


def accuracy(model: nn.Module, data: Any) -> float:
    return 100 * accord.evaluate(model, data).accuracy


def with_state(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.eval()


class Remembering(nn.Module):
    """A teacher that answers an input it has seen (the calibration batches come back in the
    same order every pass, and a teacher in eval mode is deterministic) from memory: loss=kl
    and ce+kl then run each teacher once per calibration batch, not once per pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)
        self.seen: dict[tuple[Any, ...], torch.Tensor] = {}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        flat = inputs.flatten()
        key = (tuple(inputs.shape), flat.sum().item(), flat[::97].sum().item())
        if key not in self.seen:
            self.seen[key] = self.model(inputs)
        return self.seen[key]


@contextmanager
def test_curve(test: Any, curve: list[float]) -> Iterator[None]:
    """Wherever NP Merge measures validation accuracy (after every pass), ``curve`` gets the
    test accuracy of the same coefficients, measured the same way (BatchNorm on batch
    statistics)."""
    measure = npmerge._accuracy

    def both(task: Any, params: Any, buffers: Any) -> float:
        curve.append(measure(dataclasses.replace(task, validation=test), params, buffers))
        return measure(task, params, buffers)

    with mock.patch.object(npmerge, "_accuracy", both):
        yield


def percents(values: Sequence[float]) -> str:
    return "/".join(f"{100 * v:.1f}" for v in values)


def run_variant(
    text: str,
    models: list[nn.Module],
    data: DataSplits,
    calibration: Any,
    aligned: dict[tuple[str, int], list[dict[str, torch.Tensor]]],
    settings: argparse.Namespace,
) -> list[str]:
    """One table row: variant, N, passes kept, val, test after a reset, test without, seconds."""
    clock = time.perf_counter()
    align, options = parse_variant(text)
    models = models[: options.pop("models", len(models))]
    count = str(len(models))
    if align == "merge":  # the library's route and defaults, nothing chosen here
        merged = accord.merge(models, calibration, method="npmerge", **options).model
        val, test = accuracy(merged, data.val), accuracy(merged, data.test)
        seconds = f"{time.perf_counter() - clock:.0f}"
        return [text, count, "-", f"{val:.2f}", f"{test:.2f}", "-", seconds]
    if (align, len(models)) not in aligned:  # the averaging merge's states, BN targets included
        aligned[align, len(models)] = aligned_states(models, calibration, align, settings)
    early = options.pop("val", 0)
    tests: list[float] = []
    with test_curve(data.test, tests) if settings.test_curve else nullcontext():
        result = np_merge(
            models[0],
            aligned[align, len(models)],
            calibration,
            teachers=[Remembering(m) for m in models],
            progress=False,
            validation=data.val if early else None,
            **options,
        )
    unreset = with_state(models[0], result.state)
    merged = accord.reset_batchnorm(copy.deepcopy(unreset), calibration)
    kept = result.stages[-1]["kept_pass"]
    curve = result.stages[-1]["validation"]
    stage_tests = tests[-len(curve) :] if curve else []
    tested = f"; test {percents(stage_tests)}" if stage_tests else ""
    passes = f"{kept} (val {percents(curve)}{tested})" if early else "all"
    return [
        text,
        count,
        passes,
        f"{accuracy(merged, data.val):.2f}",
        f"{accuracy(merged, data.test):.2f}",
        f"{accuracy(unreset, data.test):.2f}",
        f"{time.perf_counter() - clock:.0f}",
    ]


def aligned_states(
    models: list[nn.Module], calibration: Any, align: str, settings: argparse.Namespace
) -> list[dict[str, torch.Tensor]]:
    """The aligned states of the averaging merge with ``align``, read from ``--aligned`` when
    an earlier run kept them there."""
    path = settings.aligned and os.path.join(settings.aligned, f"{align}-{len(models)}.pt")
    if path and os.path.exists(path):
        return torch.load(path)
    states = accord.merge(models, calibration, align=align).aligned
    if path:
        os.makedirs(settings.aligned, exist_ok=True)
        torch.save(states, path + ".tmp")
        os.replace(path + ".tmp", path)
    return states


def table(rows: Sequence[Sequence[str]]) -> str:
    passes = "passes kept (val %, test % per pass)"
    head = ["variant", "N", passes, "val %", "test %", "no reset", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", default=["merge:", "permutation:epochs=3"])
    parser.add_argument("--store", default="benchmarks/cache/npmerge-study", help="model store")
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--aligned", default=None, help="folder keeping the aligned states")
    parser.add_argument("--test-curve", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    data, models, calibration = study_setup(args.store, args.models, args.samples, args.batch_size)
    bases = [accuracy(m, data.test) for m in models]
    print(f"bases {' / '.join(f'{b:.2f}' for b in bases)} % test")
    for count in sorted({parse_variant(v)[1].get("models", len(models)) for v in args.variants}):
        ensemble = 100 * accord.evaluate_ensemble(models[:count], data.test).accuracy
        print(f"ensemble of {count}: {ensemble:.2f} % test")
    rows: list[list[str]] = []
    aligned: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}
    for variant in args.variants:
        rows.append(run_variant(variant, models, data, calibration, aligned, args))
        print(" | ".join(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
