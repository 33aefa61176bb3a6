"""Two studies the quality benchmark adds to its method comparison (issue #17, items 4 and 5).

* **Joint CCA against the star** (:func:`joint_once` per model set, :func:`joint_entry`
  over the sets): for each N of ``plan.joint_sizes``, the first N models of a model set
  merged by CCA Merge aligned to model 0 (star) and by joint CCA (``gcca``: one shared space,
  no reference), each with its ridge chosen on the validation split, on one statistics pass
  with every pair's cross-covariances.
* **Partial merging** (:func:`partial_once` per model set, :func:`partial_entry` over the
  sets): the CCA merge of N = 2 models (its options as
  the comparison chose them) cut after k = 0 … K feature spaces (``accord.merge(stop_at=k)``):
  test accuracy against the parameters the partially merged model keeps, from the ensemble
  (k = 0, 2× the parameters) to one merged model (k = K).

Each model set's run is one unit of the resumable quality run (:mod:`accord.bench.resume`).

Accuracies are on the test split, which chooses nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import accord
from accord.bench._common import summary
from accord.bench.figures import partial_figure
from accord.workflow import MergeOutcome, calibration_loader

JOINT_METHODS = ("cca", "gcca")


def _accuracies(model: Any, data: accord.DataSplits, device: str) -> tuple[float, float]:
    return (
        accord.evaluate(model, data.val, device).accuracy,
        accord.evaluate(model, data.test, device).accuracy,
    )


def joint_once(
    checkpoints: Sequence[accord.Checkpoint], config: accord.MergeConfig, device: str
) -> dict[str, dict[str, Any]]:
    """``{method: {"val", "test", "ridge"} or {"error"}}`` of the star and the joint CCA
    merge (a merge that fails is recorded with its message, as the comparison's are)."""
    data = accord.checkpoint_dataset(list(checkpoints), config.data_dir)
    loader = calibration_loader(data, config)
    models = [c.model for c in checkpoints]
    found: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}
    for method in ("gcca", "cca"):  # gcca first: its pass holds every pair, which cca reuses
        try:
            result = accord.merge(
                models,
                loader,
                method,
                validation=data.val,
                max_samples=config.samples,
                device=device,
                options="auto",
                **shared,
            )
        except accord.MergeError as error:
            found[method] = {"error": str(error)}
            continue
        shared = {"spec": result.spec, "statistics": result.statistics}
        val, test = _accuracies(result.model, data, device)
        found[method] = {"val": val, "test": test, "ridge": result.report["options"]["ridge"]}
    return found


def joint_entry(
    runs: Sequence[dict[str, dict[str, Any]]], names: tuple[str, str], size: int
) -> dict[str, Any]:
    """The study's entry for N = ``size``: val/test accuracy of star and joint CCA over the
    model sets' runs (:func:`joint_once`)."""
    rows = []
    for method in JOINT_METHODS:
        done = [run[method] for run in runs if "error" not in run[method]]
        rows.append(
            {
                "name": method,
                "val": summary([one["val"] for one in done]),
                "test": summary([one["test"] for one in done]),
                "ridge": [one["ridge"] for one in done],
                "errors": [run[method]["error"] for run in runs if "error" in run[method]],
            }
        )
    return {"arch": names[0], "setting": names[1], "num_models": size, "rows": rows}


def partial_once(outcome: MergeOutcome, config: accord.MergeConfig, device: str) -> dict[str, Any]:
    """``{"parameters", "accuracy", "spaces"}`` of one model set: parameters kept and
    (val, test) accuracy for k = 0 … K, and K."""
    cca = next(m.result for m in outcome.methods if m.method == "cca")
    data = accord.checkpoint_dataset(list(outcome.checkpoints), config.data_dir)
    loader = calibration_loader(data, config)
    models = [c.model for c in outcome.checkpoints]
    spaces = len(cca.spec.free_spaces)
    kept, accuracies = [], []
    for k in range(spaces + 1):
        result = accord.merge(
            models,
            loader,
            "cca",
            cca.spec,
            cca.report["reference"],
            statistics=cca.statistics,
            device=device,
            options=cca.report["options"],
            stop_at=k,
        )
        kept.append(result.report["partial"]["parameters"])
        accuracies.append(_accuracies(result.model, data, device))
    return {"parameters": kept, "accuracy": accuracies, "spaces": spaces}


def partial_entry(
    plan: Any,
    runs: Sequence[dict[str, Any]],
    names: tuple[str, str],
    size: int,
    out: Path,
) -> dict[str, Any]:
    """The partial-merging curve of CCA over k for the model sets' runs
    (:func:`partial_once`) of one N = ``size`` configuration, and its figure."""
    kept, spaces = runs[0]["parameters"], runs[0]["spaces"]
    points = [
        {
            "stop_at": k,
            "parameters": kept[k],
            "val": summary([run["accuracy"][k][0] for run in runs]),
            "test": summary([run["accuracy"][k][1] for run in runs]),
        }
        for k in range(spaces + 1)
    ]
    tag = f"{names[0]}-{names[1]}"
    path = out / f"{plan.name}-partial-{tag}.png"
    title = (
        f"{tag}: CCA merge of {size} models, first k of {spaces} "
        "feature spaces merged (mean over model sets)"
    )
    partial_figure(points, path, title)
    return {
        "arch": names[0],
        "setting": names[1],
        "num_models": size,
        "method": "cca",
        "spaces": spaces,
        "points": points,
        "figure": path.name,
    }
