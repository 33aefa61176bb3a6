"""The statistics pass inside ``accord.merge`` against the same pass alone (issue 19).

The speed bench's models and data (ResNet20 of one width, N randomly initialised models, the
first 1,024 training images in batches of 256): alternately, ``accord.collect_statistics`` as
the bench times it (after a trace in one ``shared_exports`` block, so it runs the exported
program) and a whole CCA merge with a BatchNorm reset, whose report gives its statistics
stage's seconds (``timings``) and CPU seconds (``cpu_timings``). Prints each repeat and the
fastest of each, CPU seconds of the process (all threads) first: they hardly move when other
processes share the cores, wall seconds do.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/statistics_in_merge.py WIDTH [N] [REPEATS]
"""

from __future__ import annotations

import json
import sys
import time

import accord
from accord.bench.speed import SpeedCase, _batches, _models, speed_plan


def main(width: float, models_count: int = 2, repeats: int = 3) -> None:
    plan = speed_plan()
    data = accord.load_dataset(plan.dataset)
    case = SpeedCase("resnet20", width, models_count)
    models, batches = _models(case, data, "cpu"), _batches(plan, data)
    spec = accord.trace(models[0], batches[0][0][:2])
    runs: dict[str, list[dict[str, float]]] = {"standalone": [], "in_merge": []}
    for _ in range(repeats):
        with accord.shared_exports():
            accord.trace(models[0], batches[0][0][:2])
            wall, cpu = time.perf_counter(), time.process_time()
            accord.collect_statistics(models, batches, spec, progress=False)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        runs["standalone"].append({"cpu_seconds": cpu, "seconds": wall})
        merged = accord.merge(models, batches, "cca", repair="bn-reset", ridge=plan.ridge)
        report = merged.report
        runs["in_merge"].append(
            {
                "cpu_seconds": report["cpu_timings"]["statistics"],
                "seconds": report["timings"]["statistics"],
            }
        )
    summary = {
        "width": width,
        "models": models_count,
        "samples": plan.samples,
        "batch_size": plan.batch_size,
        **{
            name: {
                "cpu_seconds": min(r["cpu_seconds"] for r in found),
                "seconds": min(r["seconds"] for r in found),
                "repeats": found,
            }
            for name, found in runs.items()
        },
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(float(sys.argv[1]), *(int(a) for a in sys.argv[2:]))
