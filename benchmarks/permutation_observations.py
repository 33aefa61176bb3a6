"""Where permutation matching observes a residual stream (issue 17, item 2): at every block
output of the stream (accord's trace), or at one point per stream as the CCA Merge reference
does (its ResNet graph hooks each stage's output, the input of the next stage or of the
pooling: the last block output).

Loads ``--models`` ResNet20×1 trained by :func:`npmerge_study.trained_models` (Fashion-MNIST,
two epochs, seeds 0, 1, …; the store's entries are keyed by the size of the set, so
``--models`` must be the size it was trained with), then merges each pair of ``--pairs`` with
``accord.merge(method="permutation")`` (its defaults: REPAIR as ``repair="auto"`` chooses)
on the first ``--samples`` training images, once per variant of the traced spec
(``--method`` merges by another alignment, e.g. ``cca``, with the same observations):

- ``every``: the spec as traced: a stream's statistics pool every block output;
- ``last``: each space observed at several points keeps its last one only (the reference);
- ``first``: keeps its first one only (the stem's ReLU, the first block of a stage).

Prints the test accuracy (the dataset's test split, 10,000 images) of every merge.

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks python benchmarks/permutation_observations.py \\
        --store /work/cache/np-store --models 4 --pairs 0,1 2,3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import accord
from accord.spec import Observation, Spec
from npmerge_study import accuracy, study_setup

VARIANTS: dict[str, Callable[[tuple[Observation, ...]], tuple[Observation, ...]]] = {
    "every": lambda observe: observe,
    "last": lambda observe: observe[-1:],
    "first": lambda observe: observe[:1],
}


def observed_at(spec: Spec, variant: str) -> Spec:
    """``spec`` with every space's observations cut down as ``variant`` says."""
    for space in spec.free_spaces:
        kept = VARIANTS[variant](space.observe)
        if kept != space.observe:
            spec = spec.replace_space(space.name, observe=kept)
    return spec


def observation_count(spec: Spec) -> int:
    return sum(len(space.observe) for space in spec.free_spaces)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="benchmarks/cache/npmerge-study", help="model store")
    parser.add_argument("--models", type=int, default=2, help="size of the trained model set")
    parser.add_argument("--pairs", nargs="+", default=["0,1"], help="model indices, a,b")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--method", default="permutation", help="alignment merged [%(default)s]")
    args = parser.parse_args(argv)
    data, models, calibration = study_setup(args.store, args.models, args.samples, args.batch_size)
    example = next(iter(calibration))[0][:2]
    for pair in args.pairs:
        chosen = [models[int(k)] for k in pair.split(",")]
        bases = " / ".join(f"{accuracy(m, data.test):.2f}" for m in chosen)
        print(f"pair {pair}: bases {bases} % test", flush=True)
        traced = accord.trace(chosen[0], example)
        for variant in args.variants:
            clock = time.perf_counter()
            spec = observed_at(traced, variant)
            merged = accord.merge(chosen, calibration, method=args.method, spec=spec).model
            print(
                f"pair {pair} {args.method} {variant}: {observation_count(spec)} observations, "
                f"{accuracy(merged, data.test):.2f} % test "
                f"({time.perf_counter() - clock:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
