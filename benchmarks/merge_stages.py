"""The whole CCA merge stage by stage beside a plain forward of the same models (issue 19, item 2).

The issue's side-by-side workload: two trained ResNet20×1 with BatchNorm (the first
``--models`` checkpoints of ``--store``, sorted by name), the first ``--samples`` training
images of Fashion-MNIST in a loader of batches of ``--batch-size`` (as a user passes data),
float32, one torch thread. Alternately, ``--repeats`` times:

* *forward*: a plain forward of every model over the loader (``torch.no_grad``, eval mode, the
  models as given): the cost the reference's 19.0 s measured;
* *merge*: ``accord.merge(models, loader, "cca")`` with its defaults (a BatchNorm reset as the
  repair), end to end, and the seconds of each of its stages from its report (``timings``:
  wall, ``cpu_timings``: CPU seconds of the process): trace, statistics, match, apply,
  combine (averaging and the BatchNorm targets), repair (the BatchNorm reset); *other* is the
  rest of the end-to-end time (the checks of models and data before any stage).

Each figure is the fastest of the repeats, in wall and in CPU seconds separately (other
processes on the cores only slow a run down; CPU seconds hardly move with them). The
reference's whole merge took 33.2 s for a 19.0 s forward (1.75×, issue 19); the target, 0.75×
of its time, is 1.31× the forward. Writes ``--out`` (JSON, atomically), which
``accord bench markdown`` renders into BENCHMARKS.md.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/merge_stages.py \
        --store /work/cache/np-store --out benchmarks/results/merge-stages.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import accord
from accord._io import write_json
from accord.bench._common import machine_info, today
from accord.bench.speed import REFERENCE
from accord.data import make_loader

STAGES = ("trace", "statistics", "match", "apply", "combine", "repair")


def checkpoints(store: str, count: int) -> list[Path]:
    """The first ``count`` checkpoints of ``store``, sorted by directory name."""
    root = Path(store)
    directories = (
        sorted(p for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    )
    if len(directories) < count:
        raise SystemExit(
            f"{store} holds {len(directories)} checkpoints, {count} asked for: train the "
            f"ResNet20s once with python benchmarks/npmerge_study.py --store {store} --models 4 "
            "(they are kept there), or pass --store with a folder of accord checkpoints"
        )
    return directories[:count]


def timed(run: Callable[[], Any]) -> tuple[dict[str, float], Any]:
    """Wall and CPU seconds of ``run()`` (this process, all threads) and what it returned."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}, result


def plain_forward(models: Sequence[nn.Module], loader: Any) -> None:
    """Every model over every batch, as given (eval mode, ``torch.no_grad``)."""
    with torch.no_grad():
        for inputs, _ in loader:
            for model in models:
                model(inputs)


def merge_run(models: Sequence[nn.Module], loader: Any) -> dict[str, Any]:
    """One default CCA merge: end-to-end seconds and each stage's from its report."""
    timing, merged = timed(lambda: accord.merge(models, loader, "cca"))
    wall, cpu = merged.report["timings"], merged.report["cpu_timings"]
    stages = {s: {"seconds": wall[s], "cpu_seconds": cpu[s]} for s in STAGES if s in wall}
    stages["other"] = {
        "seconds": timing["seconds"] - sum(wall.values()),
        "cpu_seconds": timing["cpu_seconds"] - sum(cpu.values()),
    }
    return {**timing, "stages": stages, "repair": merged.report["repair"]}


def fastest(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    return {
        "seconds": min(r["seconds"] for r in runs),
        "cpu_seconds": min(r["cpu_seconds"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="benchmarks/cache/npmerge-study", help="model store")
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/merge-stages.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = accord.load_dataset("fashion-mnist")
    chosen = checkpoints(args.store, args.models)
    models = [accord.load_checkpoint(d).model.eval() for d in chosen]
    loader = make_loader(data.train.subset(torch.arange(args.samples)), args.batch_size)
    plain_forward(models, [next(iter(loader))])  # warm-up: allocations, kernel choice
    forwards, merges = [], []
    start = time.perf_counter()
    for repeat in range(args.repeats):
        forwards.append(timed(lambda: plain_forward(models, loader))[0])
        merges.append(merge_run(models, loader))
        print(f"repeat {repeat}: forward {forwards[-1]}, merge {merges[-1]}", flush=True)
    forward, merge = fastest(forwards), fastest(merges)
    stages = {s: fastest([m["stages"][s] for m in merges]) for s in merges[0]["stages"]}
    target = REFERENCE["target"] * REFERENCE["merge_seconds"] / REFERENCE["forward_seconds"]
    document = {
        "benchmark": "merge-stages",
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/merge_stages.py "
        f"--store {args.store} --models {args.models} --samples {args.samples} "
        f"--batch-size {args.batch_size} --repeats {args.repeats} --out {args.out}",
        "date": today(),
        "machine": machine_info(),
        "seconds": time.perf_counter() - start,
        "config": {
            "checkpoints": [d.name for d in chosen],
            "models": args.models,
            "samples": args.samples,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "repair": merges[0]["repair"],
        },
        "forward": {**forward, "repeats": forwards},
        "merge": {**merge, "repeats": merges},
        "stages": stages,
        "merge_over_forward": {
            "wall": merge["seconds"] / forward["seconds"],
            "cpu": merge["cpu_seconds"] / forward["cpu_seconds"],
        },
        "stages_over_forward": {
            s: {
                "wall": t["seconds"] / forward["seconds"],
                "cpu": t["cpu_seconds"] / forward["cpu_seconds"],
            }
            for s, t in stages.items()
        },
        "reference": {**REFERENCE, "target_over_forward": target},
    }
    write_json(args.out, document)
    print(
        f"forward {forward['cpu_seconds']:.2f} s CPU, merge {merge['cpu_seconds']:.2f} s CPU: "
        f"{document['merge_over_forward']['cpu']:.2f}x (target {target:.2f}x)"
    )


if __name__ == "__main__":
    main()
