"""Merging stored checkpoints end to end: what ``accord merge`` and the demo run.

Loads the checkpoints and the dataset they were trained on, merges them with one method or
all of them (one statistics pass shared by every data-driven method), evaluates on the
validation and test splits, and writes each merged model as a checkpoint with a report, the
whole output folder at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from accord._io import write_json
from accord._outputs import check_output, write_folder
from accord.batchnorm import needs_batchnorm_statistics
from accord.checkpoint import Checkpoint, load_checkpoint
from accord.config import MergeConfig
from accord.data import DataSplits, make_loader
from accord.errors import ConfigError
from accord.evaluate import evaluate, evaluate_with_ensemble
from accord.merge import (
    MergeResult,
    check_base,
    check_models,
    check_options,
    choose_reference,
    merge,
    request_plan,
)
from accord.models import is_hf_folder, uses_user_models
from accord.registry import (
    ALIGNMENTS,
    COMBINERS,
    MethodPlan,
    plan_methods,
    task_vector_combiners,
)
from accord.report import merge_figures, write_merge_report
from accord.spec import Spec
from accord.statistics import collect_statistics
from accord.store import checkpoint_dataset, write_checkpoint
from accord.trace import trace
from accord.trace.programs import shared_exports

MERGE_OUTPUT = "merge-output"  # the kind of output folder accord merge writes and overwrites


def compared_methods() -> tuple[str, ...]:
    """The methods of ``--method all``, in the order of the comparison table: every record with
    a ``compare`` place (the baselines, then CCA Merge and NP Merge)."""
    records = [r for r in (*ALIGNMENTS.values(), *COMBINERS.values()) if r.compare is not None]
    return tuple(r.name for r in sorted(records, key=lambda r: r.compare))


def needs_data(plan: MethodPlan) -> bool:
    """Whether a merge by ``plan`` needs data (its alignment's statistics, or its combiner's
    calibration batches)."""
    return plan.align.needs.data or plan.combine.needs.data


@dataclass
class MethodOutcome:
    """One merged model's accuracies and report."""

    method: str
    val_accuracy: float
    test_accuracy: float
    result: MergeResult
    seconds: float


@dataclass
class MergeOutcome:
    """Base models, ensemble and every merge of one ``accord merge`` run."""

    checkpoints: list[Checkpoint]
    base: list[tuple[float, float]]
    ensemble: tuple[float, float]
    methods: list[MethodOutcome] = field(default_factory=list)

    def rows(self) -> list[list[Any]]:
        """Table rows: name, validation accuracy, test accuracy."""
        rows: list[list[Any]] = [
            [f"base model {i}", val, test] for i, (val, test) in enumerate(self.base)
        ]
        rows.append([f"ensemble of {len(self.base)}", *self.ensemble])
        rows += [[f"merge: {m.method}", m.val_accuracy, m.test_accuracy] for m in self.methods]
        return rows


Request = tuple[str | None, str | None, str | None]  # merge's method, align and combine


def merge_requests(config: MergeConfig) -> list[tuple[Request, MethodPlan]]:
    """The merges to run: the comparison's methods (with a base, and the combiners of task
    vectors), or the one ``config`` asks for, checked against ``config.base`` and its options
    against their records (:func:`accord.merge.check_options`), before any work."""
    if config.method == "all":
        if config.options not in ("auto", {}):
            raise ConfigError(
                "options: with method 'all' give 'auto' or none (they differ per method)"
            )
        if config.align is not None or config.combine is not None:
            raise ConfigError("align, combine: with method 'all' give neither (it runs each)")
        names = compared_methods()
        if config.base is not None:
            names += task_vector_combiners(len(config.models))
        return [((name, None, None), plan_methods(name)) for name in names]
    request = (config.method, config.align, config.combine)
    given = config.options if isinstance(config.options, dict) else {}
    # an unknown name or an option out of its range fails here, before any work
    plan, options = request_plan(*request, given)
    check_options(plan, options, len(config.models))
    needs = plan.combine.needs.base
    if needs == "yes" and config.base is None:
        raise ConfigError(
            f"combine {plan.combine.name!r} merges task vectors against the model the others "
            "were fine-tuned from: give that model with --base PATH (base: in a config file)"
        )
    if needs == "no" and config.base is not None:
        raise ConfigError(
            f"base {config.base}: combine {plan.combine.name!r} merges no task vectors, so it "
            "takes no base; leave --base out, or choose a combiner of task vectors ("
            f"{', '.join(task_vector_combiners(len(config.models)))})"
        )
    return [(request, plan)]


def merge_inputs(config: MergeConfig) -> list[str]:
    """The files and folders a merge reads (the models and the base), which its output must
    never replace."""
    return [*config.models, *([config.base] if config.base is not None else [])]


def calibration_loader(data: DataSplits, config: MergeConfig) -> Any:
    """The first ``config.samples`` training examples (fixed), in batches."""
    train = data.train
    if config.samples is not None and config.samples < len(train):
        train = train.subset(torch.arange(config.samples))
    return make_loader(train, batch_size=config.batch_size)


@shared_exports()  # one export of the architecture for the trace and every method's merge
def run_merge(config: MergeConfig, progress: bool = True) -> MergeOutcome:
    """Run the merge described by ``config``; write outputs when ``config.output`` is set."""
    requests = merge_requests(config)
    if uses_user_models(config.models, config.model) or config.data is not None:
        raise ConfigError(
            "Hugging Face folders, --model and --data are merged by "
            "accord.models.merging.run_user_merge (accord merge chooses it); run_merge merges "
            "checkpoints of accord train on the dataset they were trained on"
        )
    if config.input_shape is not None:
        raise ConfigError(
            "input_shape (--input-shape) is for --model: a checkpoint of accord train is traced "
            "on its own dataset's images"
        )
    if config.base is not None and is_hf_folder(config.base):
        raise ConfigError(
            f"base {config.base} is a Hugging Face model folder but the models are checkpoints "
            "of accord train: give the checkpoint they were fine-tuned from (accord train "
            "--init BASE)"
        )
    if config.output:  # a bad output folder fails now, not after the merge
        check_output(
            config.output, MERGE_OUTPUT, overwrite=config.overwrite, inputs=merge_inputs(config)
        )
    checkpoints = [load_checkpoint(p, device=config.device) for p in config.models]
    models: list[nn.Module] = [c.model for c in checkpoints]
    names = [str(c.path) for c in checkpoints]
    check_models(models, names)  # before the evaluation passes
    base = None
    if config.base is not None:
        base = load_checkpoint(config.base, device=config.device).model
        check_base(base, models, f"the base ({config.base})", names)
    data = checkpoint_dataset(checkpoints, config.data_dir)
    loader = calibration_loader(data, config)
    val, val_ensemble = evaluate_with_ensemble(models, data.val, config.device)
    test, test_ensemble = evaluate_with_ensemble(models, data.test, config.device)
    base_accuracy = [(v.accuracy, t.accuracy) for v, t in zip(val, test, strict=True)]
    outcome = MergeOutcome(
        checkpoints, base_accuracy, (val_ensemble.accuracy, test_ensemble.accuracy)
    )
    reference = choose_reference(models, config.reference, data.val, config.device)
    spec = trace(models[0], next(iter(loader))[0][:2])
    merges = merge_each(models, loader, requests, spec, reference, config, progress, base, data.val)
    for plan, result, seconds in merges:
        start = time.perf_counter()
        val = evaluate(result.model, data.val, config.device).accuracy
        test = evaluate(result.model, data.test, config.device).accuracy
        seconds += time.perf_counter() - start
        outcome.methods.append(MethodOutcome(plan.name, val, test, result, seconds))
    if config.output:
        write_outcome(outcome, config)
    return outcome


def merge_each(
    models: list[nn.Module],
    data: Any,
    requests: list[tuple[Request, MethodPlan]],
    spec: Spec,
    reference: int,
    config: MergeConfig,
    progress: bool,
    base: nn.Module | None = None,
    validation: Any = None,
) -> Iterator[tuple[MethodPlan, MergeResult, float]]:
    """Each merge of ``requests`` on ``data`` with ``config``'s settings, as it finishes:
    its plan, result and seconds. One statistics pass serves every data-driven method; the
    ``base`` goes to the combiners that take one."""
    plans = [plan for _, plan in requests]
    shared = shared_statistics(models, data, spec, config, reference, plans, progress)
    for (method, align, combine), plan in requests:
        start = time.perf_counter()
        result = merge(
            models,
            data,
            method,
            spec,
            reference,
            config.repair,
            shared if needs_data(plan) else None,
            align=align,
            combine=combine,
            batchnorm=config.batchnorm,
            base=None if plan.combine.needs.base == "no" else base,
            validation=validation,
            device=config.device,
            options=config.options,
        )
        yield plan, result, time.perf_counter() - start


def shared_statistics(
    models: list[nn.Module],
    loader: Any,
    spec: Any,
    config: MergeConfig,
    reference: int,
    plans: list[MethodPlan],
    progress: bool,
) -> Any:
    """One statistics pass shared by every data-driven method (all pairs for ZipIt!, N > 2)."""
    if not any(needs_data(plan) for plan in plans):
        return None
    all_pairs = any(plan.align.needs.all_pairs for plan in plans)
    pairs = "all" if len(models) > 2 and all_pairs else "reference"
    return collect_statistics(
        models,
        loader,
        spec,
        device=config.device,
        reference=reference,
        pairs=pairs,
        progress=progress,
        batchnorms=any(
            needs_batchnorm_statistics(plan.align, config.batchnorm)
            for plan in plans
            if needs_data(plan)
        ),
    )


def write_outcome(outcome: MergeOutcome, config: MergeConfig) -> None:
    """Write each merged model (a checkpoint, report.json, report.md and figures) under
    ``config.output``, one subfolder per method when there are several; the folder appears
    complete, in one rename."""

    if not config.output:
        raise ConfigError("output: no folder given, so there is nowhere to write the merge")

    def fill(root: Path) -> None:
        several = len(outcome.methods) > 1
        for method in outcome.methods:
            folder = root / method.method if several else root
            folder.mkdir(exist_ok=True)
            _write_method(folder, outcome, method, config)

    write_folder(
        config.output, MERGE_OUTPUT, fill, overwrite=config.overwrite, inputs=merge_inputs(config)
    )


def _write_method(
    folder: Path, outcome: MergeOutcome, method: MethodOutcome, config: MergeConfig
) -> None:
    report = _report(outcome, method, config)
    info = {
        "key": outcome.checkpoints[0].config.get("key", {}),
        "merged_from": [str(c.path) for c in outcome.checkpoints],
        "metrics": {"val_accuracy": method.val_accuracy, "test_accuracy": method.test_accuracy},
    }
    write_checkpoint(method.result.model.cpu(), folder, info)
    write_json(folder / "report.json", report)
    figures = merge_figures(folder, report, method.result.coefficients)
    write_merge_report(folder, report, figures)


def _report(outcome: MergeOutcome, method: MethodOutcome, config: MergeConfig) -> dict[str, Any]:
    report = dict(method.result.report)
    report["accuracy"] = {
        "merged": {"val": method.val_accuracy, "test": method.test_accuracy},
        "base": [{"val": v, "test": t} for v, t in outcome.base],
        "ensemble": {"val": outcome.ensemble[0], "test": outcome.ensemble[1]},
    }
    report["models"] = [str(c.path) for c in outcome.checkpoints]
    report["config"] = config.model_dump()
    report["seconds"] = method.seconds
    return report
