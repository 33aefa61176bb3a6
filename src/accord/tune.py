"""Hyper-parameters chosen on a validation split, reusing one statistics pass.

Statistics do not depend on hyper-parameters, so they are collected once and every candidate
is only matched, applied, repaired and evaluated (NP Merge's trained candidate also trains).
The test set is never looked at.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from accord.combine.npmerge import NP_MERGE_OPTIONS
from accord.errors import MergeError
from accord.evaluate import evaluate

# The grids searched by options="auto"; methods without an entry have nothing to tune.
TUNING_GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "cca": {"ridge": (1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 10.0)},
    "zipit": {"alpha": (0.0, 0.1, 0.3, 0.5, 1.0), "beta": (0.0, 0.125, 0.5)},
}


def candidates(method: str) -> list[dict[str, Any]]:
    """Every option combination of ``method``'s grid ([{}] when it has none)."""
    grid = TUNING_GRIDS.get(method, {})
    names = sorted(grid)
    return [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(grid[n] for n in names))
    ]


def merge_tuned(
    merge: Callable[..., Any],
    models: Sequence[nn.Module],
    data: Any,
    method: str,
    validation: Any,
    *,
    device: str = "cpu",
    **merge_arguments: Any,
) -> Any:
    """The merge whose options score best on ``validation`` among :data:`TUNING_GRIDS`.

    ``merge`` is :func:`accord.merge`, called once per candidate with ``merge_arguments``
    (spec, reference, repair, statistics...) and the candidate's options.
    The result's report gains ``"tuning"``: each candidate and its validation accuracy.
    """
    if validation is None:
        raise MergeError(
            "options='auto' chooses hyper-parameters on a validation split: pass validation=..."
        )
    if method == "npmerge":
        return _npmerge_tuned(merge, models, data, validation, device, merge_arguments)
    best, trials = None, []
    for options in candidates(method):
        try:
            result = merge(
                models,
                data,
                method,
                validation=validation,
                device=device,
                **merge_arguments,
                **options,
            )
        except MergeError as exc:  # e.g. a ridge so small that CCA's solve breaks down
            trials.append({"options": options, "error": str(exc)})
            continue
        if merge_arguments.get("statistics") is None and result.statistics is not None:
            merge_arguments["statistics"] = result.statistics
            merge_arguments.setdefault("spec", result.spec)
        score = evaluate(result.model, validation, device).accuracy
        trials.append({"options": options, "val_accuracy": score})
        if best is None or score > best[0]:
            best = (score, result)
    if best is None:
        raise MergeError(f"no candidate options of {method!r} could merge: {trials}")
    result = best[1]
    result.report["tuning"] = trials
    return result


def _npmerge_tuned(
    merge: Callable[..., Any],
    models: Sequence[nn.Module],
    data: Any,
    validation: Any,
    device: str,
    merge_arguments: dict[str, Any],
) -> Any:
    """NP Merge from the alignment whose plain average scores best on ``validation``, or that
    plain average itself (``epochs=0``) when the trained coefficients score below it there.

    The training can end below its start (it fits the calibration examples, which may not be
    the distribution the validation split comes from); ``epochs=0`` is the one cheap candidate
    of NP Merge's own options, the others (lr, more epochs) would cost a training each. The
    report's ``"tuning"`` lists the alignment's candidates, then both NP Merge candidates.
    """
    np_options = {k: v for k, v in merge_arguments.items() if k in NP_MERGE_OPTIONS}
    rest = {k: v for k, v in merge_arguments.items() if k not in NP_MERGE_OPTIONS}
    align = rest.pop("align", "cca")
    aligned = merge_tuned(merge, models, data, align, validation, device=device, **rest)
    chosen = {name: aligned.report["options"][name] for name in TUNING_GRIDS.get(align, {})}
    rest.setdefault("statistics", aligned.statistics)
    rest.setdefault("spec", aligned.spec)
    epochs = np_options.pop("epochs", NP_MERGE_OPTIONS["epochs"])
    runs = []
    for candidate in dict.fromkeys((epochs, 0)):
        result = merge(
            models,
            data,
            "npmerge",
            validation=validation,
            device=device,
            align=align,
            **rest,
            **np_options,
            **chosen,
            epochs=candidate,
        )
        runs.append((evaluate(result.model, validation, device).accuracy, candidate, result))
    own = [{"options": {"epochs": c}, "val_accuracy": score} for score, c, _ in runs]
    result = max(runs, key=lambda run: run[0])[2]  # on a tie, the first: the trained one
    result.report["tuning"] = [*aligned.report["tuning"], *own]
    return result
