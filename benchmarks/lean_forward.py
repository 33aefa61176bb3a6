"""The statistics pass with and without accord.trace.lean's cheaper forward (issue 19).

In one process, R rounds, alternately: plain ``torch.no_grad`` forward passes of the speed
bench's models (ResNet20 of one width, N randomly initialised models) over the first SAMPLES
training images, ``accord.collect_statistics`` as before (no BatchNorm fused, no in-place
operators) and as merges run it now; CPU seconds of the process for each, then the minimum,
the median and the median over the forward's median. One process and alternation keep the
comparison fair on a machine other jobs share (single runs move by 10-20 % there).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lean_forward.py WIDTH N SAMPLES ROUNDS
"""

import importlib
import statistics
import sys
import time

import torch

import accord
from accord.bench.speed import SpeedCase, _batches, _models, forward_pass, speed_plan

collect = importlib.import_module("accord.statistics.collect")
lean_in_place = collect.in_place


def main(width: float, models_count: int, samples: int, rounds: int) -> None:
    torch.set_num_threads(1)
    plan = speed_plan()
    data = accord.load_dataset(plan.dataset)
    models = _models(SpeedCase("resnet20", width, models_count, samples), data, "cpu")
    batches = _batches(plan, data, samples)
    spec = accord.trace(models[0], batches[0][0][:2])

    def stats(lean: bool) -> float:
        collect.in_place = lean_in_place if lean else (lambda module, reader: 0)
        with accord.shared_exports():
            accord.trace(models[0], batches[0][0][:2])
            start = time.process_time()
            accord.collect_statistics(models, batches, spec, progress=False, fuse_batchnorms=lean)
            return time.process_time() - start

    found: dict[str, list[float]] = {"forward": [], "before": [], "lean": []}
    for repeat in range(rounds):
        found["forward"].append(forward_pass(models, batches, False)["cpu_seconds"])
        for name in ("before", "lean") if repeat % 2 == 0 else ("lean", "before"):
            found[name].append(stats(name == "lean"))
        print({k: round(v[-1], 3) for k, v in found.items()}, flush=True)
    forward = statistics.median(found["forward"])
    for name, seconds in found.items():
        median = statistics.median(seconds)
        ratio = median / forward
        print(f"{name} min {min(seconds):.3f} median {median:.3f} median/forward {ratio:.3f}")


if __name__ == "__main__":
    main(float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
