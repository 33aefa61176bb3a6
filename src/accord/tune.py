"""Hyper-parameters chosen on a validation split, reusing one statistics pass.

Statistics do not depend on hyper-parameters, so they are collected once and every candidate
is only matched, applied, repaired and evaluated. The grids are the records' (each option's
``grid``): the alignment's options are chosen first, its maps averaged (cheap); then the
combiner's, each candidate combining the chosen alignment. A combiner's grid lists the values
tried besides the one given (or its default), which is tried first and wins ties. The test set
is never looked at.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from accord.errors import MergeError
from accord.evaluate import evaluate
from accord.registry import DEFAULT_COMBINE, MethodPlan, lookup


def candidates(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every option combination of ``grid`` ([{}] when it is empty)."""
    names = sorted(grid)
    return [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(grid[n] for n in names))
    ]


def merge_tuned(
    merge: Callable[..., Any],
    models: Sequence[nn.Module],
    data: Any,
    plan: MethodPlan,
    validation: Any,
    *,
    device: str = "cpu",
    base: Any = None,
    **merge_arguments: Any,
) -> Any:
    """The merge whose options score best on ``validation`` among the records' grids.

    ``merge`` is :func:`accord.merge`, called once per candidate with ``merge_arguments``
    (spec, reference, repair, statistics, options given...) and the candidate's options.
    The alignment's options are tuned first, on averaged merges (without ``base``), then the
    combiner's (with it). The result's report gains ``"tuning"``: each candidate and its
    validation accuracy.
    """
    if validation is None:
        raise MergeError(
            "options='auto' chooses hyper-parameters on a validation split: pass validation=..."
        )
    own = {k: v for k, v in merge_arguments.items() if k in plan.combine.defaults}
    rest = {k: v for k, v in merge_arguments.items() if k not in own}
    aligned = _tune_alignment(merge, models, data, plan, validation, device, rest)
    if plan.combine is lookup("combine", DEFAULT_COMBINE):
        return aligned
    chosen = {name: aligned.report["options"][name] for name in plan.align.grid()}
    rest = {**rest, **chosen}
    rest.setdefault("statistics", aligned.statistics)
    rest.setdefault("spec", aligned.spec)
    grid = {
        name: tuple(dict.fromkeys((own.get(name, plan.combine.defaults[name]), *values)))
        for name, values in plan.combine.grid().items()
    }
    runs = []
    for options in candidates(grid):
        result = merge(
            models,
            data,
            align=plan.align.name,
            combine=plan.combine.name,
            validation=validation,
            device=device,
            base=base,
            **rest,
            **{**own, **options},
        )
        runs.append((evaluate(result.model, validation, device).accuracy, options, result))
    trials = [{"options": options, "val_accuracy": score} for score, options, _ in runs]
    result = max(runs, key=lambda run: run[0])[2]  # on a tie, the first: the given options
    result.report["tuning"] = [*aligned.report["tuning"], *trials]
    result.report["method"] = plan.name
    return result


def _tune_alignment(
    merge: Callable[..., Any],
    models: Sequence[nn.Module],
    data: Any,
    plan: MethodPlan,
    validation: Any,
    device: str,
    merge_arguments: dict[str, Any],
) -> Any:
    """The averaged merge whose alignment options score best on ``validation``."""
    merge_arguments = dict(merge_arguments)
    best, trials = None, []
    for options in candidates(plan.align.grid()):
        try:
            result = merge(
                models,
                data,
                align=plan.align.name,
                validation=validation,
                device=device,
                **{**merge_arguments, **options},
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
        raise MergeError(f"no candidate options of {plan.align.name!r} could merge: {trials}")
    result = best[1]
    result.report["tuning"] = trials
    result.report["method"] = plan.name
    return result
