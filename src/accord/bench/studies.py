"""Two studies the quality benchmark adds to its method comparison (issue #17, items 4 and 5).

* **Joint CCA against the star** (:func:`joint_study`): for each N of ``plan.joint_sizes``,
  the first N models of every model set merged by CCA Merge aligned to model 0 (star) and by
  joint CCA (``gcca``: one shared space, no reference), each with its ridge chosen on the
  validation split, on one statistics pass with every pair's cross-covariances.
* **Partial merging** (:func:`partial_study`): the CCA merge of N = 2 models (its options as
  the comparison chose them) cut after k = 0 … K feature spaces (``accord.merge(stop_at=k)``):
  test accuracy against the parameters the partially merged model keeps, from the ensemble
  (k = 0, 2× the parameters) to one merged model (k = K).

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


def _joint_once(
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


def joint_study(
    plan: Any,
    pools: Sequence[Sequence[accord.Checkpoint]],
    names: tuple[str, str],
    merge_config: Any,
    device: str,
) -> list[dict[str, Any]]:
    """One entry per N of ``plan.joint_sizes``: val/test accuracy of star and joint CCA."""
    entries = []
    for size in plan.joint_sizes:
        runs = [
            _joint_once(pool[:size], merge_config(plan, pool[:size], device), device)
            for pool in pools
        ]
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
        entries.append({"arch": names[0], "setting": names[1], "num_models": size, "rows": rows})
    return entries


def _partial_once(
    outcome: MergeOutcome, config: accord.MergeConfig, device: str
) -> tuple[list[int], list[tuple[float, float]], int]:
    """Parameters kept and (val, test) accuracy for k = 0 … K, and K, of one model set."""
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
    return kept, accuracies, spaces


def partial_study(
    plan: Any,
    outcomes: Sequence[MergeOutcome],
    names: tuple[str, str],
    merge_config: Any,
    out: Path,
    device: str,
) -> dict[str, Any]:
    """The partial-merging curve of CCA over k for these (N = 2) merges, and its figure."""
    runs = [_partial_once(o, merge_config(plan, o.checkpoints, device), device) for o in outcomes]
    kept, _, spaces = runs[0]
    points = [
        {
            "stop_at": k,
            "parameters": kept[k],
            "val": summary([run[1][k][0] for run in runs]),
            "test": summary([run[1][k][1] for run in runs]),
        }
        for k in range(spaces + 1)
    ]
    tag = f"{names[0]}-{names[1]}"
    path = out / f"{plan.name}-partial-{tag}.png"
    title = (
        f"{tag}: CCA merge of {len(outcomes[0].checkpoints)} models, first k of {spaces} "
        "feature spaces merged (mean over model sets)"
    )
    partial_figure(points, path, title)
    return {
        "arch": names[0],
        "setting": names[1],
        "num_models": len(outcomes[0].checkpoints),
        "method": "cca",
        "spaces": spaces,
        "points": points,
        "figure": path.name,
    }
