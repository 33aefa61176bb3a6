"""NP Merge's losses on the model sets of a quality bench run (issue 17, item 3): every
configuration and model set of ``--results`` (a ``quality*.json`` written by ``accord bench
quality``, its models in its store) merged by ``accord.merge(method="npmerge")`` with each
``--losses`` value and the other options at their defaults, on the run's calibration
examples; validation accuracy (chooses) and test accuracy (chooses nothing), in %.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/npmerge_losses.py \
        --results benchmarks/results/quality-quick.json --losses ce,ce+kl \
        --json benchmarks/cache/npmerge-losses.json

``--only`` keeps the configurations whose ``arch:setting:N`` ends with one of its values
(``dirichlet0.5:2,iid:4``). ``--json`` keeps each merge's figures as it ends; run again to
continue.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import accord
from accord._io import write_json


def merge_once(models: list[str], loss: str, samples: int, device: str) -> dict[str, Any]:
    """Validation and test accuracy of NP Merge with ``loss`` on ``models``, and the ensemble's."""
    clock = time.perf_counter()
    config = accord.MergeConfig(
        models=models, method="npmerge", options={"loss": loss}, samples=samples, device=device
    )
    outcome = accord.run_merge(config, progress=False)
    merged = outcome.methods[0]
    return {
        "val": merged.val_accuracy,
        "test": merged.test_accuracy,
        "ensemble": list(outcome.ensemble),
        "seconds": time.perf_counter() - clock,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, help="a quality bench results JSON")
    parser.add_argument("--losses", default="ce,ce+kl", help="comma-separated loss values")
    parser.add_argument("--only", default="", help="arch:setting:N suffixes to keep")
    parser.add_argument("--root", default=".", help="folder the results' model paths start from")
    parser.add_argument("--json", help="keep the figures here (resumable)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run = json.loads(Path(args.results).read_text())
    wanted = [w for w in args.only.split(",") if w]
    done: dict[str, Any] = {}
    if args.json and Path(args.json).exists():
        done = json.loads(Path(args.json).read_text())
    for configuration in run["results"]:
        tag = f"{configuration['arch']}:{configuration['setting']}:{configuration['num_models']}"
        if wanted and not any(tag.endswith(w) for w in wanted):
            continue
        for models in configuration["models"]:
            paths = [str(Path(args.root) / m) for m in models]
            for loss in args.losses.split(","):
                key = f"{tag}|{Path(models[0]).name}|{loss}"
                if key not in done:
                    done[key] = merge_once(paths, loss, run["config"]["samples"], args.device)
                    if args.json:  # atomically: a stopped run leaves the last whole file
                        write_json(args.json, done)
                figures = done[key]
                print(
                    f"{key}: val {100 * figures['val']:.2f} test {100 * figures['test']:.2f} "
                    f"(ensemble {100 * figures['ensemble'][1]:.1f}), {figures['seconds']:.0f} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
