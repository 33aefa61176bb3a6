"""Why CCA Merge loses on networks without BatchNorm: a rerunnable diagnostic (issue 17).

Trains (or loads from ``--store``) VGG11×width without BatchNorm on Fashion-MNIST padded to
32×32 and repeated to 3 channels, initialised as the CCA Merge reference code does
(xavier-uniform with the ReLU gain, zero bias), one thread; then merges the first N models
(N = 2, 4) with identity, permutation and CCA under several ridges and repair modes, all from
one statistics pass on the first ``--samples`` training images, and prints test accuracy
beside the ensemble (the models' logits averaged).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cca_without_batchnorm.py \
        --store /tmp/accord-nobn --limit 12000 --epochs 4 --lr 0.02

The CCA Merge reference recipe (all 54,000 training images, random crops, batch 500), one
seed per process with ``--train``, then the merges::

    ... cca_without_batchnorm.py --store /tmp/accord-nobn-ref --limit all --epochs 6 \
        --lr 0.08 --batch-size 500 --crop-padding 4 --train 0
    ... (the same options) --sizes 2,4

With accord's trainer (Nesterov momentum) peak lr 0.08 diverged to NaN on 18,000 images
(--limit 20000); 0.04 trained, to 71–75 % test in 6 epochs, with many dead ReLUs
(design-measurements.json). ``--limit 12000 --epochs 6 --lr 0.02 --batch-size 128
--crop-padding 4`` trains to 84–87 % in 3–5 minutes a model, with few. Other merges:
``--variants 'permutation;cca:ridge=10/none;cca/aligned'`` (``method[:key=value,...][/repair]``).
At peak lr 0.08, batch 500, warm-up 0.1, on 30,000 images (``--limit 30000``) accord's trainer
trains (seeds 0, 1: 79.4 and 62.9 % test, 11–14 minutes a model) with most ReLUs of several
layers nearly dead; the reference code's schedule (``train_logits``) warms up linearly over its
first 5 epochs, not a short fraction. With that warm-up (``--warmup 0.83``) seeds 0, 2, 3
train to 88.5, 87.4, 87.9 % test (10 minutes a model) with at most 10 % of any space nearly
dead, the issue's healthy models; seed 1 collapsed to 21.6 % (the reference keeps its best
epoch on test, accord's trainer the last): ``--seeds 0,2,3`` merges the others.

Dead units and the dead_fallback choice: ``--dead-units`` prints, per space and model, the
percentage of nearly dead features (variance below 1 % of the space's mean: what CCA's
``dead_fallback`` counts) and of dead ones; ``--variants ''`` stops there. Every merge is
scored on the validation split (held-out training images: choose with it) and on test.
``--checkpoints A,B,...`` takes accord checkpoints (e.g. a BatchNorm set) instead::

    ... cca_without_batchnorm.py --store STORE RECIPE --dead-units --sizes 2 --json OUT.json \
        --variants 'cca;cca:dead_fallback=0.3;cca:dead_fallback=0.2;cca:dead_below=0.01;permutation'

A rerun with the same ``--json`` skips the merges already there; ``dead_fallback`` values that
permute the same spaces are merged once.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import accord
import accord.match.cca
from accord._io import write_json
from accord.data import Dataset, DataSplits, make_loader
from accord.match import Alignment
from accord.repair import repair_activations

WARMUP = accord.TrainConfig().warmup  # models trained with it keep their first tags


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


def checkpoint_set(folders: list[str]) -> tuple[list[nn.Module], DataSplits]:
    """Accord checkpoints (e.g. a BatchNorm set for comparison) and their dataset, all of it:
    calibration, validation and test then come from the full splits (the validation split may
    hold images one of the models trained on when they were trained on a subset)."""
    checkpoints = [accord.load_checkpoint(folder) for folder in folders]
    config = checkpoints[0].config
    data = accord.load_dataset(config["key"]["dataset"])
    model = config["model"]
    if model.get("in_channels", data.in_channels) == 3 and data.in_channels == 1:
        data = padded_rgb(data)
    return [c.model.eval() for c in checkpoints], data


def trained_model(args: argparse.Namespace, data: DataSplits, seed: int) -> nn.Module:
    """Model ``seed`` from the store, or trained and saved there."""
    config = {"width": args.width, "batch_norm": False, "in_channels": 3, "image_size": 32}
    # batch and crops appear only when not the first runs' (128, none), whose tags stay valid
    batch = f"-b{args.batch_size}" if args.batch_size != 128 else ""
    crops = f"-crop{args.crop_padding}" if args.crop_padding else ""
    warmup = f"-wu{args.warmup:g}" if args.warmup != WARMUP else ""
    limit = args.limit or "all"
    recipe = f"n{limit}-e{args.epochs}-lr{args.lr:g}{batch}{crops}{warmup}"
    tag = f"vgg11-w{args.width:g}-nobn-{recipe}-s{seed}"
    path = Path(args.store) / f"{tag}.pt"
    model = accord.build_model("vgg11", **config)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    reference_init(model, seed)
    train = accord.TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        crop_padding=args.crop_padding,
        warmup=args.warmup,
    )
    clock = time.perf_counter()
    # channels-last: a training step is about 1.4× faster on one CPU thread (3.4 → 2.5 s)
    accord.train_model(
        model.to(memory_format=torch.channels_last), data, None, train, seed=seed, progress=False
    )
    model = model.to(memory_format=torch.contiguous_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    accuracy = accord.evaluate(model, data.test).accuracy
    print(f"trained seed {seed}: test {accuracy:.4f} in {time.perf_counter() - clock:.0f}s")
    return model.eval()


def variants(quick: bool) -> list[tuple[str, str, str, dict]]:
    """``(label, method, repair, options)`` of every merge compared."""
    rows = [  # the comparisons of issue 17 first: the log has them if a run is cut short
        ("permutation + REPAIR", "permutation", "repair", {}),
        ("CCA default + REPAIR", "cca", "repair", {}),
        ("CCA default, no repair", "cca", "none", {}),
        ("ZipIt! default + REPAIR", "zipit", "repair", {}),
        ("identity + REPAIR", "identity", "repair", {}),
    ]
    if quick:
        return rows
    for ridge in (0.1, 10.0):  # around the default 1
        rows.append((f"CCA ridge={ridge:g} + REPAIR", "cca", "repair", {"ridge": ridge}))
    rows.append(("CCA absolute_ridge=1 + REPAIR", "cca", "repair", {"absolute_ridge": 1.0}))
    return rows


NUMBERS = {
    "ridge": float,
    "absolute_ridge": float,
    "undetermined": float,
    "dead_fallback": float,
    "dead_below": float,
}


def spliced(permuted: set[str]):
    """``accord.match`` giving the spaces in ``permuted`` activation matching's permutations
    and every other space CCA's maps: where along the network CCA gains or loses."""
    module = importlib.import_module("accord.merge")  # accord.merge is the function
    original = module.match

    def match(name, spec, statistics, states, **options):
        cca = original(name, spec, statistics, states, **options)
        perm = original("permutation", spec, statistics, states, reference=options["reference"])
        transforms = [
            {s: (p[s] if s in permuted else c[s]) for s in c}
            for c, p in zip(cca.transforms, perm.transforms, strict=True)
        ]
        return Alignment(transforms, cca.report)

    return mock.patch.object(module, "match", match)


def parse_variant(text: str) -> tuple[str, str, str, dict]:
    """``method[:key=value,...][/repair]`` (e.g. ``cca:ridge=0.01/none``; repair defaults to
    REPAIR) as a :func:`variants` row."""
    spec, _, repair = text.partition("/")
    method, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = NUMBERS.get(key, str)(value)
    return text, method, repair or "repair", options


def merge_variant(models, loader, method, spec, repair, stats, options):
    """``accord.merge``; ``repair="aligned"``: REPAIR whose targets are the statistics of
    the aligned models themselves (as Jordan et al. measure the endpoints), not each model's
    own statistics carried into the merged coordinates by its map (the library's)."""
    options = dict(options)
    if "undetermined" in options:  # a study of CCA's tie threshold (accord.match.cca)
        with mock.patch.object(accord.match.cca, "UNDETERMINED", options.pop("undetermined")):
            return merge_variant(models, loader, method, spec, repair, stats, options)
    if "permute" in options:  # e.g. permute=features.0+features.3: those spaces permuted
        with spliced(set(options.pop("permute").split("+"))):
            return merge_variant(models, loader, method, spec, repair, stats, options)
    if repair != "aligned":
        return accord.merge(
            models, loader, method, spec, repair=repair, statistics=stats, **options
        )
    merged = accord.merge(models, loader, method, spec, repair="none", statistics=stats, **options)
    aligned = []
    for model, state in zip(models, merged.aligned, strict=True):
        aligned.append(copy.deepcopy(model))
        aligned[-1].load_state_dict(state)
    identities = [{} for _ in models]
    repair_activations(merged.model, aligned, identities, merged.spec, loader)
    return merged


def canonical_correlations(stats, x: int, y: int) -> torch.Tensor:
    """The canonical correlations of models x and y in one space, on the directions each
    model's features span numerically (eigenvalues above 1e-9 of the largest): a ridge would
    shrink them, and a rank-deficient space (the first convolution's pre-activations of 3
    repeated input channels span at most 10 directions) gives noise above 1 without the cut."""

    def whitening(covariance: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(covariance.double())
        kept = values > 1e-9 * values.max()
        return vectors[:, kept] * values[kept].rsqrt()

    sxy = stats.covariance(x, y).double()
    wx, wy = whitening(stats.covariance(x, x)), whitening(stats.covariance(y, y))
    return torch.linalg.svdvals(wx.T @ sxy @ wy)


def diagnose(
    models: list[nn.Module], loader, data: DataSplits, spec, stats, size: int
) -> dict[str, object]:
    """Where the CCA merge loses: each CCA-aligned model alone (a dense map before a ReLU
    changes its function), and each space's canonical correlations (mean over the non-reference
    models; the fraction above 0.9)."""
    merged = accord.merge(models, loader, "cca", spec, repair="none", statistics=stats)
    alone = []
    for model, state in zip(models, merged.aligned, strict=True):
        aligned = copy.deepcopy(model)
        aligned.load_state_dict(state)
        alone.append(accord.evaluate(aligned, data.test).accuracy)
    print(f"N={size} CCA-aligned models alone: " + " ".join(f"{100 * a:.1f}" for a in alone))
    spaces = {}
    for space in merged.spec.free_spaces:
        if space.name not in stats.spaces:
            continue
        space_stats = stats.spaces[space.name]
        pooled = torch.cat([canonical_correlations(space_stats, 0, i) for i in range(1, size)])
        spaces[space.name] = figures = {
            "mean": float(pooled.mean()),
            "above_0.9": float((pooled > 0.9).double().mean()),
            "median": float(pooled.median()),
        }
        print(
            f"N={size} {space.name:14s} canonical correlations: mean {figures['mean']:.3f}, "
            f"median {figures['median']:.3f}, > 0.9: {100 * figures['above_0.9']:.0f} %"
        )
    return {"aligned_alone": alone, "canonical_correlations": spaces}


def dead_units(stats, spec) -> dict[str, list[dict[str, float]]]:
    """Per free space and model: the fraction of nearly dead features (variance below
    ``accord.match.cca.NEARLY_DEAD`` of the space's mean, what ``dead_fallback`` counts) and
    of dead ones (variance ≤ 1e-10 of the largest, what CCA always pairs outside its solve)."""
    counts = {}
    for space in spec.free_spaces:
        if space.name not in stats.spaces:
            continue
        space_stats = stats.spaces[space.name]
        counts[space.name] = rows = []
        for i in range(space_stats.num_models):
            covariance = space_stats.covariance(i, i).double()
            variance = torch.diagonal(covariance)
            rows.append(
                {
                    "nearly_dead": accord.match.cca.nearly_dead_fraction(covariance),
                    "dead": float((variance <= 1e-10 * variance.max()).double().mean()),
                }
            )
    return counts


def print_dead_units(label: str, counts: dict[str, list[dict[str, float]]]) -> None:
    for space, rows in counts.items():
        nearly = " ".join(f"{100 * r['nearly_dead']:3.0f}" for r in rows)
        dead = " ".join(f"{100 * r['dead']:3.0f}" for r in rows)
        print(f"{label} {space:20s} nearly dead % per model: {nearly}   dead %: {dead}")


def fallback_spaces(counts, spec, fraction: float, size: int) -> list[str]:
    """``space/i`` of every (space, model i ≠ 0) that ``dead_fallback=fraction`` permutes
    (star around model 0; orthogonal and permutation-only spaces never count)."""
    chosen = []
    for space in spec.free_spaces:
        if space.name not in counts or space.maps in ("orthogonal", "permutation"):
            continue
        rows = counts[space.name]
        for i in range(1, size):
            if max(rows[0]["nearly_dead"], rows[i]["nearly_dead"]) >= fraction:
                chosen.append(f"{space.name}/{i}")
    return chosen


def same_merge_key(method, repair, options, counts, spec, size) -> str:
    """Variants that differ only in a ``dead_fallback`` permuting the same spaces merge the
    same: one key for them (no fallback at all: the key of CCA without the option)."""
    options = dict(options)
    fraction = options.pop("dead_fallback", None)
    if fraction is not None and method == "cca":
        permuted = fallback_spaces(counts, spec, fraction, size)
        if permuted:
            options["permuted"] = "+".join(permuted)
    return json.dumps([method, repair, sorted(options.items())])


def _limit(text: str) -> int | None:
    return None if text == "all" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="/tmp/accord-nobn")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument(
        "--limit",
        type=_limit,
        default=12000,
        help="training (and test) images, or all (54,000 train + 6,000 validation, 10,000 test)",
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--crop-padding", type=int, default=0, help="random crops (4: usual)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=WARMUP,
        help="fraction of the steps over which the learning rate rises linearly to its peak "
        "(the reference's train_logits: 5 of 6 epochs, 0.83)",
    )
    parser.add_argument(
        "--train", default=None, metavar="SEEDS", help="only train (or find) these seeds: 0,1"
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="merge the models of these seeds, the first N for size N (default 0, 1, ...): "
        "e.g. 0,2 to leave out a seed whose training collapsed",
    )
    parser.add_argument("--samples", type=int, default=10000, help="statistics/repair images")
    parser.add_argument("--sizes", default="2,4")
    parser.add_argument("--quick", action="store_true", help="fewer variants")
    parser.add_argument(
        "--variants",
        default=None,
        help="these merges instead, ';'-separated: method[:key=value,...][/repair], "
        "e.g. 'cca:ridge=0.01/none;permutation'",
    )
    parser.add_argument(
        "--repair-samples",
        type=int,
        default=None,
        help="REPAIR on the first this many images (default: --samples)",
    )
    parser.add_argument(
        "--json",
        default=None,
        help="write the figures here too, after every merge; a rerun skips merges already there",
    )
    parser.add_argument(
        "--checkpoints",
        default=None,
        help="merge these accord checkpoint folders (comma-separated) instead of trained VGGs",
    )
    parser.add_argument(
        "--dead-units",
        action="store_true",
        help="count nearly dead and dead features per space and model (then merge, unless "
        "--variants is empty)",
    )
    parser.add_argument(
        "--observe",
        choices=("post", "pre"),
        default="post",
        help="observe each space after its ReLU (accord's default) or before it",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="also each CCA-aligned model alone and the canonical correlations per space",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.checkpoints:
        models, data = checkpoint_set(args.checkpoints.split(","))
    else:
        data = padded_rgb(accord.load_dataset("fashion-mnist", limit=args.limit))
        if args.train is not None:
            for seed in (int(s) for s in args.train.split(",")):
                trained_model(args, data, seed)
            return
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else range(max(sizes))
        models = [trained_model(args, data, seed) for seed in seeds]
    base = [accord.evaluate(m, data.test).accuracy for m in models]
    print("base test accuracies:", " ".join(f"{a:.4f}" for a in base))
    print(f"validation {len(data.val)} images, test {len(data.test)}")
    calibration = data.train.subset(range(min(args.samples, len(data.train))))
    loader = make_loader(calibration, batch_size=500)
    spec = accord.trace(models[0], calibration.images[:2], observe=args.observe)
    repair_images = calibration.subset(
        range(min(args.repair_samples or args.samples, len(calibration)))
    )
    repair_loader = make_loader(repair_images, batch_size=500)
    if args.variants is not None:
        rows = [parse_variant(text) for text in args.variants.split(";") if text]
    else:
        rows = variants(args.quick)
    done = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    results: dict[str, dict[str, float]] = done.get("results", {})
    validation: dict[str, dict[str, float]] = done.get("validation", {})
    diagnoses: dict[str, object] = done.get("diagnoses", {})
    dead: dict[str, object] = done.get("dead_units", {})

    def save() -> None:
        if args.json:
            figures = {
                "args": vars(args),
                "base": base,
                "validation_images": len(data.val),
                "test_images": len(data.test),
                "results": results,
                "validation": validation,
                "diagnoses": diagnoses,
                "dead_units": dead,
            }
            write_json(args.json, figures)  # atomic: a run cut short leaves the last whole file

    for size in sizes:
        todo = [row for row in rows if f"N={size}" not in results.get(row[0], {})]
        todo_ensemble = f"N={size}" not in results.get("ensemble", {})
        if not todo and not todo_ensemble and (f"N={size}" in dead or not args.dead_units):
            continue
        chosen = models[:size]
        if f"N={size}" not in results.get("ensemble", {}):  # the logit average: the ceiling
            validation.setdefault("ensemble", {})[f"N={size}"] = accord.evaluate_ensemble(
                chosen, data.val
            ).accuracy
            accuracy = accord.evaluate_ensemble(chosen, data.test).accuracy
            results.setdefault("ensemble", {})[f"N={size}"] = accuracy
            print(f"N={size} {'ensemble (logit average)':36s} {100 * accuracy:5.1f}", flush=True)
            save()
        clock = time.perf_counter()
        # every pair: ZipIt! matches all models' features jointly
        stats = accord.collect_statistics(
            chosen, loader, spec, max_samples=args.samples, progress=False, pairs="all"
        )
        print(f"N={size}: statistics in {time.perf_counter() - clock:.0f}s")
        if args.diagnose:
            diagnoses[f"N={size}"] = diagnose(chosen, loader, data, spec, stats, size)
        counts = dead_units(stats, spec)
        if args.dead_units:
            dead[f"N={size}"] = counts
            print_dead_units(f"N={size}", counts)
            save()
        merged_before: dict[str, tuple[float, float]] = {}
        for label, method, repair, options in rows:
            key = same_merge_key(method, repair, options, counts, spec, size)
            if f"N={size}" in results.get(label, {}):
                merged_before.setdefault(
                    key, (validation[label][f"N={size}"], results[label][f"N={size}"])
                )
                continue
            if key in merged_before:  # e.g. a dead_fallback that permutes no space
                val_accuracy, accuracy = merged_before[key]
                validation.setdefault(label, {})[f"N={size}"] = val_accuracy
                results.setdefault(label, {})[f"N={size}"] = accuracy
                print(f"N={size} {label:36s} {100 * accuracy:5.1f}  (the same merge as before)")
                save()
                continue
            clock = time.perf_counter()
            merged = merge_variant(chosen, repair_loader, method, spec, repair, stats, options)
            val_accuracy = accord.evaluate(merged.model, data.val).accuracy
            accuracy = accord.evaluate(merged.model, data.test).accuracy
            merged_before[key] = (val_accuracy, accuracy)
            validation.setdefault(label, {})[f"N={size}"] = val_accuracy
            results.setdefault(label, {})[f"N={size}"] = accuracy
            save()
            seconds = time.perf_counter() - clock
            print(
                f"N={size} {label:36s} {100 * accuracy:5.1f}  (validation "
                f"{100 * val_accuracy:.1f}; {seconds:.0f}s)",
                flush=True,
            )
            spaces = merged.report.get("spaces", {})
            permuted = [
                s for s, entry in spaces.items() if "permutation" in entry.get("method", "")
            ]
            if method == "cca" and permuted:
                print(f"  permuted: {' '.join(permuted)}", flush=True)
    save()


if __name__ == "__main__":
    main()
