"""Quality benchmark: test accuracy of every merge method against N, setting and model set.

For each architecture and data setting, a pool of ``max(N)`` models is trained per model set
(seeds ``start … start + max(N) − 1``, cached in the model store); merging N models takes the
pool's first N. Under ``iid`` every model sees all training data; under ``dirichlet`` the
pool's models are trained on the parts of one Dirichlet(α) split of the training set among
``max(N)`` models, so any N of them saw differently distributed data. Every configuration
runs :func:`accord.run_merge` with ``method="all"`` and ``options="auto"``: one
statistics pass shared by all methods, hyper-parameters chosen on the validation split.
Two variants reuse that pass: NP Merge's successive pairwise scheme (for N > 2; the default
is one joint softmax) and, for networks with BatchNorm, CCA Merge with the BatchNorms'
γ/β transformed by the dense maps instead of folded into the convolutions (DESIGN.md §4).
Two studies follow (:mod:`accord.bench.studies`): joint CCA against the star for
``joint_sizes``, and partial merging (accuracy against parameters kept) for N = 2 in each
architecture's first setting. Accuracies are on the test split, which chooses nothing.

The full plan adds the CCA Merge paper's task settings (``TASK_SETTINGS``): models trained on
disjoint class subsets (``classes``, N = 2 and 4) and on the 80/20 split (N = 2), a pool of N
models per N, all with the same frozen class head (the zoo's ``class_embeddings``) so that
their outputs can be merged; each row also gets its test accuracy on each model's task
(:func:`accord.evaluate_tasks`), its ``test`` accuracy being the joint one.

A run is resumable (:mod:`accord.bench.resume`): its units (:func:`plan_units`: the merges
of N models of one model set, with the figures and partial-merging run where it has them, or
the joint study of them) are each written as soon as done under a digest of
:func:`unit_key`, and the JSON is written from the units done (:func:`write_quality`).
"""

from __future__ import annotations

import copy
import inspect
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import accord
from accord._io import write_json
from accord.bench._common import machine_info, summary, today
from accord.bench.figures import accuracy_versus_models, interpolation_figure
from accord.bench.resume import Budget, UnitFiles
from accord.bench.studies import (
    JOINT_METHODS,
    joint_entry,
    joint_once,
    partial_entry,
    partial_once,
)
from accord.figures import canonical_correlation_spectra, coefficient_histograms
from accord.workflow import MergeOutcome, calibration_loader, compared_methods


def _row_labels() -> dict[str, str]:
    """Display names of the result rows (the JSON uses the keys): the records' labels of the
    compared methods, with the variants this benchmark adds."""
    aligned = "aligned by {start}"  # filled per results file (npmerge_start)
    labels = {"base": "base models (mean)", "ensemble": "ensemble (logit average)"}
    for name in compared_methods():
        record = accord.ALIGNMENTS.get(name) or accord.COMBINERS[name]
        labels[name] = record.label if name in accord.ALIGNMENTS else f"{record.label} ({aligned})"
    labels["npmerge_pairwise"] = f"NP Merge, pairwise ({aligned})"
    labels["cca_transform"] = f"{accord.ALIGNMENTS['cca'].label}, BatchNorm transformed, not folded"
    return labels


ROW_LABELS = _row_labels()
# Curves of the interpolation figure: the method whose alignment is used (None: unaligned).
CURVES = {"direct": None, "permutation": "permutation", "cca": "cca"}


@dataclass(frozen=True)
class ModelPlan:
    """One architecture to train: zoo name, its config, optimisation and data size;
    ``settings``: the labels of the plan's data settings it runs (empty: every one)."""

    arch: str
    model: dict[str, Any]
    train: accord.TrainConfig
    limit: int | None = None
    settings: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        width = self.model.get("width", 1)
        return f"{self.arch}-w{width:g}" + ("-bn" if self.model.get("batch_norm") else "")


@dataclass(frozen=True)
class Setting:
    """How the training data is divided among a pool's models (``accord.split_indices``).

    ``sizes``: for the paper's task settings (``classes``, ``80-20``), where each model has its
    own task, a pool of exactly N models is trained on an N-way split for each N of
    ``sizes`` (empty: one pool of the plan's largest N serves every N). ``class_embeddings``:
    the zoo option that gives the models one frozen class head (embedding dimension), so
    that models trained on different classes can be merged.
    """

    split: str
    alpha: float = 0.5
    sizes: tuple[int, ...] = ()
    class_embeddings: int | None = None

    @property
    def label(self) -> str:
        return f"dirichlet{self.alpha:g}" if self.split == "dirichlet" else self.split


# Embedding dimension of the task settings' shared class head (CLIP's text embeddings: 512).
SHARED_HEAD_DIM = 64
TASK_SETTINGS = (
    Setting("classes", sizes=(2, 4), class_embeddings=SHARED_HEAD_DIM),
    Setting("80-20", sizes=(2,), class_embeddings=SHARED_HEAD_DIM),
)


@dataclass(frozen=True)
class QualityPlan:
    """Everything one quality run does; written into its JSON."""

    name: str
    dataset: str
    architectures: tuple[ModelPlan, ...]
    sizes: tuple[int, ...]
    settings: tuple[Setting, ...]
    seed_starts: tuple[int, ...]
    samples: int
    curve_steps: int
    command: str
    joint_sizes: tuple[int, ...] = ()
    data_dir: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        config = asdict(self)
        config.pop("data_dir")
        config["pool_seeds"] = [list(self.seeds(start)) for start in self.seed_starts]
        return config

    def seeds(self, start: int, size: int | None = None) -> tuple[int, ...]:
        """A pool's seeds: ``size`` of them, by default the largest N of the plan."""
        return tuple(range(start, start + (size or max(self.sizes + self.joint_sizes))))


def quality_plan(
    quick: bool = False, dataset: str | None = None, sets: int | None = None
) -> QualityPlan:
    """The ``--quick`` plan (minutes on 2 cores) or the full one (hours there).

    The task settings (:data:`TASK_SETTINGS`) are in the full plan only: they would add more
    than half again to the quick one's time (``--settings classes,80-20`` runs them).

    ``dataset`` defaults to :func:`accord.default_dataset` (Fashion-MNIST, else digits);
    ``sets`` overrides the number of independent model sets.
    """
    name = dataset or accord.default_dataset()
    small = name == "digits"  # 1,797 8×8 images: more epochs, no limit
    settings = (Setting("iid"), Setting("dirichlet", alpha=0.5))
    if quick:
        vgg = ModelPlan(
            "vgg11",
            {"width": 0.25 if small else 0.125, "batch_norm": True},
            accord.TrainConfig(epochs=20 if small else 4, lr=0.05),
            limit=None if small else 6000,
        )
        # without BatchNorm (REPAIR, not a reset; it trains with a lower peak rate and twice
        # the epochs), iid only: the quick guard on the merges of networks without BatchNorm
        # (issue 17)
        vgg_plain = ModelPlan(
            "vgg11",
            {"width": 0.25 if small else 0.125, "batch_norm": False, "xavier_init": True},
            replace(vgg.train, epochs=2 * vgg.train.epochs, lr=0.02),
            vgg.limit,
            settings=("iid",),
        )
        plan = QualityPlan(
            # another dataset's figures go to their own file beside the default's
            name="quality-quick" if name == "fashion-mnist" else f"quality-quick-{name}",
            dataset=name,
            architectures=(vgg, vgg_plain),
            sizes=(2, 4),
            settings=settings,
            seed_starts=(0, 10),
            samples=2000,
            curve_steps=6,
            command="accord bench quality --quick",
            joint_sizes=(3, 4),
        )
    else:
        train = accord.TrainConfig(epochs=40 if small else 4, lr=0.05)
        limit = None if small else 12000
        plan = QualityPlan(
            name="quality" if name == "fashion-mnist" else f"quality-{name}",
            dataset=name,
            architectures=(
                ModelPlan("resnet20", {"width": 1}, train, limit),
                ModelPlan("vgg11", {"width": 0.25, "batch_norm": True}, train, limit),
                # without BatchNorm: REPAIR, not a reset, and a lower peak rate to train
                ModelPlan(
                    "vgg11",
                    {"width": 0.25, "batch_norm": False, "xavier_init": True},
                    replace(train, lr=0.02),
                    limit,
                ),
            ),
            sizes=(2, 3, 4),
            settings=settings + TASK_SETTINGS,
            seed_starts=(0, 10),
            samples=2000,
            curve_steps=6,
            command="accord bench quality",
            joint_sizes=(3, 4),
        )
    if sets is not None:
        command = f"{plan.command} --sets {sets}"
        plan = replace(plan, seed_starts=tuple(10 * k for k in range(sets)), command=command)
    return plan


def only_settings(plan: QualityPlan, labels: Sequence[str]) -> QualityPlan:
    """``plan`` with only the data settings named by their labels (``iid``, ``dirichlet0.5``,
    and the task settings ``classes``, ``80-20`` even where the plan leaves them out, as the
    quick one does); its command says so. ValueError naming an unknown label and the known."""
    known = {s.label: s for s in (*plan.settings, *TASK_SETTINGS)}
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known settings: {', '.join(known)}")
    command = f"{plan.command} --settings {','.join(labels)}"
    return replace(plan, settings=tuple(known[label] for label in labels), command=command)


def settings_of(plan: QualityPlan, architecture: ModelPlan) -> tuple[Setting, ...]:
    """The data settings of ``plan`` that ``architecture`` runs."""
    return tuple(
        s for s in plan.settings if not architecture.settings or s.label in architecture.settings
    )


def train_pool(
    plan: QualityPlan,
    architecture: ModelPlan,
    setting: Setting,
    start: int,
    store: str | os.PathLike[str],
    *,
    device: str,
    progress: bool,
    size: int | None = None,
) -> list[accord.Checkpoint]:
    """The pool of ``size`` (default ``max(N)``) models of one model set, trained on a
    ``size``-way split (or loaded from ``store``)."""
    model = dict(architecture.model)
    if setting.class_embeddings is not None:
        model["class_embeddings"] = setting.class_embeddings
    request = accord.ModelSetRequest(
        arch=architecture.arch,
        dataset=plan.dataset,
        seeds=plan.seeds(start, size),
        split=setting.split,
        alpha=setting.alpha,
        model=model,
        train=architecture.train,
        limit=architecture.limit,
        data_dir=plan.data_dir,
    )
    return accord.train_model_set(request, store, device=device, progress=progress)


def merge_config(plan: QualityPlan, models: Sequence[str], device: str) -> accord.MergeConfig:
    """Every method on the checkpoints ``models``, options chosen on the validation split."""
    return accord.MergeConfig(
        models=list(models),
        method="all",
        options="auto",
        samples=plan.samples,
        device=device,
        data_dir=plan.data_dir,
    )


Calibrated = tuple[accord.DataSplits, Any]


def calibration(plan: QualityPlan, outcome: MergeOutcome, device: str) -> Calibrated:
    """``(dataset splits, calibration batches)`` exactly as the merge of ``outcome`` used."""
    data = accord.checkpoint_dataset(list(outcome.checkpoints), plan.data_dir)
    return data, calibration_loader(
        data, merge_config(plan, [str(c.path) for c in outcome.checkpoints], device)
    )


def _row(name: str, val: Sequence[float], test: Sequence[float]) -> dict[str, Any]:
    return {"name": name, "val": summary(val), "test": summary(test)}


def summarise(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows (base mean, ensemble, each method, then the variants' rows) of one configuration's
    model sets (:func:`merge_set`'s records): val and test accuracy over the sets."""
    rows = [
        _row(
            "base",
            [sum(v for v, _ in r["base"]) / len(r["base"]) for r in records],
            [sum(t for _, t in r["base"]) / len(r["base"]) for r in records],
        ),
        _row("ensemble", [r["ensemble"][0] for r in records], [r["ensemble"][1] for r in records]),
    ]
    for index, method in enumerate(records[0]["methods"]):
        results = [r["methods"][index] for r in records]
        rows.append(_row(method["name"], [m["val"] for m in results], [m["test"] for m in results]))
    for name in records[0]["extra"]:
        accuracies = [r["extra"][name] for r in records]
        rows.append(_row(name, [v for v, _ in accuracies], [t for _, t in accuracies]))
    return rows


def variant(
    outcome: MergeOutcome, calibrated: Calibrated, method: str, device: str, **options: Any
) -> tuple[float, float]:
    """Validation and test accuracy of another variant of one of the run's methods (same
    statistics, reference and calibration batches; options chosen on validation again,
    ``options`` fixed)."""
    run = next(m.result for m in outcome.methods if m.method == method)
    data, loader = calibrated
    result = accord.merge(
        [c.model for c in outcome.checkpoints],
        loader,
        method,
        run.spec,
        run.report["reference"],
        statistics=run.statistics,
        validation=data.val,
        device=device,
        options="auto",
        **options,
    )
    return (
        accord.evaluate(result.model, data.val, device).accuracy,
        accord.evaluate(result.model, data.test, device).accuracy,
    )


Tasks = tuple[list[list[int]], dict[str, tuple[float, ...]]]


def task_accuracies(outcome: MergeOutcome, calibrated: Calibrated, device: str) -> Tasks:
    """Each model's task (:func:`accord.task_classes` of the split it was trained on, read
    from its store key) and test accuracy per task (logits restricted to the task's classes)
    of the base models (model k on its own task k), the ensemble and every merge of the run."""
    data = calibrated[0]
    split = outcome.checkpoints[0].config["key"]["split"]
    parts = accord.split_indices(
        data.train.labels,
        split["models"],
        split["mode"],
        alpha=split["alpha"] or 0.5,  # None: the mode takes no alpha
        seed=split["seed"],
    )
    every = accord.task_classes(data.train.labels, parts)
    tasks = [every[c.config["key"]["split"]["part"]].tolist() for c in outcome.checkpoints]
    models = [c.model for c in outcome.checkpoints]
    own = tuple(
        accord.evaluate_tasks(model, data.test, [task], device).tasks[0]
        for model, task in zip(models, tasks, strict=True)
    )
    accuracies = {
        "base": own,
        "ensemble": accord.evaluate_tasks(models, data.test, tasks, device).tasks,
    }
    for method in outcome.methods:
        evaluation = accord.evaluate_tasks(method.result.model, data.test, tasks, device)
        accuracies[method.method] = evaluation.tasks
    return tasks, accuracies


def interpolation_curves(
    plan: QualityPlan, outcome: MergeOutcome, calibrated: Calibrated, device: str
) -> dict[str, dict[str, Any]]:
    """Paths from model 0 to model 1: unaligned, and aligned by permutation and by CCA.

    Each point's BatchNorm statistics are reset on the calibration data first. A dense CCA
    map does not commute with ReLU or with per-channel BatchNorm, so CCA's α = 1 end is not
    model 1's function: it is the aligned model 1, whose only use is to be averaged.
    """
    checkpoints = outcome.checkpoints
    data, repair = calibrated
    results = {m.method: m.result for m in outcome.methods}
    curves = {}
    for name, method in CURVES.items():
        ends = [c.model for c in checkpoints[:2]]
        if method is not None:
            ends = [copy.deepcopy(checkpoints[0].model) for _ in range(2)]
            for end, state in zip(ends, results[method].aligned[:2], strict=True):
                end.load_state_dict(state)
        curve = accord.interpolation_curve(
            *ends, data.test, steps=plan.curve_steps, repair_data=repair, device=device
        )
        curves[name] = {
            "alphas": curve.alphas,
            "accuracy": curve.accuracies,
            "loss": curve.losses,
            "accuracy_barrier": curve.accuracy_barrier,
            "loss_barrier": curve.loss_barrier,
        }
    return curves


def figures_for(
    plan: QualityPlan,
    outcome: MergeOutcome,
    calibrated: Calibrated,
    tag: str,
    out: Path,
    device: str,
) -> dict[str, Any]:
    """Interpolation curves, CCA spectra and NP Merge histograms of one N = 2 merge."""
    curves = interpolation_curves(plan, outcome, calibrated, device)
    merged = {m.method: m.test_accuracy for m in outcome.methods if m.method in CURVES}
    paths = {
        "interpolation": out / f"{plan.name}-interpolation-{tag}.png",
        "spectra": out / f"{plan.name}-spectra-{tag}.png",
        "npmerge": out / f"{plan.name}-npmerge-{tag}.png",
    }
    title = f"{tag}: models 0 and 1 of model set 0"
    interpolation_figure(curves, merged, paths["interpolation"], title)
    cca = next(m.result for m in outcome.methods if m.method == "cca")
    if not canonical_correlation_spectra(cca.report["spaces"], paths["spectra"], title):
        del paths["spectra"]
    npmerge = next(m.result for m in outcome.methods if m.method == "npmerge")
    coefficient_histograms(npmerge.coefficients, paths["npmerge"])
    return {
        "curves": curves,
        "files": {k: p.name for k, p in paths.items()},
    }


def _chosen_options(report: Mapping[str, Any]) -> dict[str, Any]:
    """A merge's options; for NP Merge, its alignment's, the alignment it started from and
    the epochs it kept."""
    options = dict(report.get("options", {}))
    if "npmerge" in report:
        options["epochs"] = report["npmerge"]["options"]["epochs"]
        options["align"] = report["alignment"]
    return options


def npmerge_start(result: Mapping[str, Any]) -> str:
    """The alignment NP Merge started from in one configuration of a results file: recorded
    with its options, or CCA (the default then) in files written before it was recorded."""
    chosen = result.get("options", {}).get("npmerge") or [{}]
    return str(chosen[0].get("align", "cca"))


def add_task_rows(configuration: dict[str, Any], tasks: Sequence[Tasks]) -> None:
    """Add each model set's tasks (``"tasks"``: the classes of model k's task per set) and,
    to each row they measure, its test accuracy per task over the sets (``"tasks"``: one
    summary per task; a row's joint accuracy is its ``"test"``)."""
    configuration["tasks"] = [classes for classes, _ in tasks]
    for row in configuration["rows"]:
        if row["name"] in tasks[0][1]:
            per_set = [accuracies[row["name"]] for _, accuracies in tasks]
            row["tasks"] = [summary(values) for values in zip(*per_set, strict=True)]


# Bumped when what a unit records changes, so that units written before are run again.
UNIT_FORMAT = 1


@dataclass(frozen=True)
class Unit:
    """One unit of a quality run, kept in a file of its own as soon as it is done
    (:mod:`accord.bench.resume`): the merges of N = ``size`` models of one model set (pool
    seeds from ``start``; ``kind="merge"``, with the figures of model set 0 for N = 2 and the
    partial-merging study where ``partial``), or the joint-CCA study of them
    (``kind="joint"``). ``pool_size``: a task setting's pool of exactly N models (None: the
    plan's largest N)."""

    kind: str
    architecture: ModelPlan
    setting: Setting
    pool_size: int | None
    size: int
    start: int
    figures: bool = False
    partial: bool = False

    @property
    def names(self) -> tuple[str, str]:
        return self.architecture.label, self.setting.label

    @property
    def configuration(self) -> tuple[str, str, str, int]:
        """What the unit is one model set of: kind, architecture, setting and N."""
        return self.kind, *self.names, self.size

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.names[0]}-{self.names[1]}-n{self.size}-s{self.start}"


def plan_units(plan: QualityPlan) -> list[Unit]:
    """Every unit of ``plan`` in the order a run does them: per architecture and setting, the
    merges of each N (model set by model set), then the joint study of each of its N."""
    units = []
    for architecture in plan.architectures:
        settings = settings_of(plan, architecture)
        for setting in settings:
            # a task setting trains a pool per N, each model on its own part of an N-way split
            groups = [(n, (n,)) for n in setting.sizes] or [(None, plan.sizes)]
            for pool_size, sizes in groups:
                for size in sizes:
                    for start in plan.seed_starts:
                        pair = size == 2
                        first = start == plan.seed_starts[0]
                        partial = pair and setting == settings[0]
                        units.append(
                            Unit(
                                "merge",
                                architecture,
                                setting,
                                pool_size,
                                size,
                                start,
                                pair and first,
                                partial,
                            )
                        )
            if not setting.sizes:  # the joint study takes the pool's first 3, 4... models
                for size in plan.joint_sizes:
                    for start in plan.seed_starts:
                        units.append(Unit("joint", architecture, setting, None, size, start))
    return units


def _is_off(value: Any) -> bool:
    return value is None or value is False or (type(value) is int and value == 0)


def _records_key(names: Sequence[str]) -> dict[str, Any]:
    """The defaults and tuning grids of the method records ``names`` (alignments and
    combiners): what ``options="auto"`` starts from and tries."""
    key = {}
    for name in sorted(set(names)):
        record = accord.ALIGNMENTS.get(name) or accord.COMBINERS[name]
        # an option that is off by default (None, False, 0) changes no result: adding one
        # keeps the units already done
        defaults = {k: v for k, v in record.defaults.items() if not _is_off(v)}
        entry = {"defaults": defaults, "grid": record.grid()}
        if name in accord.COMBINERS:
            entry |= {"align": record.default_align, "repair": record.repair_after}
        key[name] = entry
    return key


def _methods_key(kind: str) -> dict[str, Any]:
    """Accord's defaults that a unit of ``kind`` depends on: the records of the methods it runs
    (every compared method and what it aligns with, or the joint study's), the comparison's
    methods and :func:`accord.merge`'s defaults."""
    if kind == "joint":
        names = [*JOINT_METHODS, accord.registry.DEFAULT_COMBINE]
        compared: tuple[str, ...] = ()
    else:
        compared = compared_methods()
        plans = [accord.registry.plan_methods(name) for name in compared]
        names = [record.name for plan in plans for record in (plan.align, plan.combine)]
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(accord.merge).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    return {"records": _records_key(names), "compared": compared, "merge": defaults}


def unit_key(plan: QualityPlan, unit: Unit, device: str) -> dict[str, Any]:
    """Everything that determines a unit's result: the plan entry (architecture, training,
    data setting, the pool's seeds, N, calibration examples, figures), the merge's settings,
    accord's version and method defaults, and the device."""
    config = merge_config(plan, ["model 0", "model 1"], device)
    settings = config.model_dump(exclude={"models", "device", "data_dir"})
    architecture = asdict(unit.architecture)
    del architecture["settings"]  # which settings it runs, not how
    return {
        "format": UNIT_FORMAT,
        "accord": accord.__version__,
        "kind": unit.kind,
        "dataset": plan.dataset,
        "architecture": architecture,
        "setting": asdict(unit.setting),
        "seeds": plan.seeds(unit.start, unit.pool_size),
        "num_models": unit.size,
        "merge": settings,
        "methods": _methods_key(unit.kind),
        "curve_steps": plan.curve_steps if unit.figures else None,
        "partial": unit.partial,
        "device": device,
    }


def merge_set(
    plan: QualityPlan,
    unit: Unit,
    pool: Sequence[accord.Checkpoint],
    out: Path,
    device: str,
    progress: bool,
) -> dict[str, Any]:
    """The record of a merge unit: the first N models of one model set merged by every method,
    with the variants (for a task setting, the accuracies per task), and the figures and the
    partial-merging run where the unit has them."""
    clock = time.perf_counter()
    checkpoints = pool[: unit.size]
    config = merge_config(plan, [str(c.path) for c in checkpoints], device)
    outcome = accord.run_merge(config, progress)
    calibrated = calibration(plan, outcome, device)
    extra = {}
    if unit.size > 2:  # two models: pairwise is the joint scheme
        extra["npmerge_pairwise"] = variant(
            outcome, calibrated, "npmerge", device, scheme="pairwise"
        )
    spaces = outcome.methods[0].result.spec.spaces
    if unit.size == 2 and any(s.batchnorms for s in spaces):
        extra["cca_transform"] = variant(outcome, calibrated, "cca", device, batchnorm="transform")
    record: dict[str, Any] = {
        "models": [str(c.path) for c in checkpoints],
        "base": outcome.base,
        "ensemble": outcome.ensemble,
        "methods": [
            {
                "name": m.method,
                "val": m.val_accuracy,
                "test": m.test_accuracy,
                "options": _chosen_options(m.result.report),
            }
            for m in outcome.methods
        ],
        "extra": extra,
    }
    if unit.setting.sizes:
        record["tasks"] = task_accuracies(outcome, calibrated, device)
    seconds = {"merging": time.perf_counter() - clock}
    if unit.figures:
        clock = time.perf_counter()
        tag = f"{unit.names[0]}-{unit.names[1]}"
        record["figures"] = figures_for(plan, outcome, calibrated, tag, out, device)
        seconds["figures"] = time.perf_counter() - clock
    if unit.partial:
        clock = time.perf_counter()
        record["partial"] = partial_once(outcome, config, device)
        seconds["studies"] = time.perf_counter() - clock
    record["seconds"] = seconds
    return record


def joint_set(
    plan: QualityPlan, unit: Unit, pool: Sequence[accord.Checkpoint], device: str
) -> dict[str, Any]:
    """The record of a joint unit: star and joint CCA of one model set's first N models."""
    clock = time.perf_counter()
    checkpoints = pool[: unit.size]
    models = [str(c.path) for c in checkpoints]
    runs = joint_once(checkpoints, merge_config(plan, models, device), device)
    return {
        "models": models,
        "methods": runs,
        "seconds": {"studies": time.perf_counter() - clock},
    }


def run_unit(
    plan: QualityPlan,
    unit: Unit,
    pool: Sequence[accord.Checkpoint],
    out: Path,
    device: str,
    progress: bool,
) -> dict[str, Any]:
    """The record of ``unit`` (its models: ``pool``)."""
    if unit.kind == "joint":
        return joint_set(plan, unit, pool, device)
    return merge_set(plan, unit, pool, out, device, progress)


def units_folder(plan: QualityPlan, out: str | os.PathLike[str]) -> Path:
    """Where a run of ``plan`` keeps its finished units: ``<out>/<plan.name>-units``."""
    return Path(out) / f"{plan.name}-units"


@dataclass
class QualityProgress:
    """Which units of a run are done (their records by label) and which remain."""

    done: dict[str, dict[str, Any]]
    remaining: list[Unit]


def quality_progress(
    plan: QualityPlan, out: str | os.PathLike[str], device: str = "cpu"
) -> QualityProgress:
    """The units of ``plan`` already done in ``out`` (with today's defaults) and the rest."""
    files = UnitFiles(units_folder(plan, out))
    done, remaining = {}, []
    for unit in plan_units(plan):
        record = files.load(unit.label, unit_key(plan, unit, device))
        if record is None:
            remaining.append(unit)
        else:
            done[unit.label] = record
    return QualityProgress(done, remaining)


def run_quality(
    plan: QualityPlan,
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    device: str = "cpu",
    progress: bool = True,
    budget: Budget | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run ``plan``: train or load the pools, merge, draw; write ``out/<plan.name>.json``.

    Each unit (:func:`plan_units`) is written to ``out/<plan.name>-units/`` as soon as it is
    done, and a unit done before with the same key (:func:`unit_key`) is not run again
    (``fresh``: every unit is). The run stops starting units once ``budget`` is spent; the
    JSON then holds the configurations whose every model set is done and lists the missing
    units (``"complete": false``). Running the same plan again continues."""
    budget = budget or Budget()
    root = Path(out)
    files = UnitFiles(units_folder(plan, root))
    units = plan_units(plan)
    pools: dict[tuple[str, str, int | None, int], list[accord.Checkpoint]] = {}
    for unit in units:
        key = unit_key(plan, unit, device)
        if not fresh and files.load(unit.label, key) is not None:
            continue
        if budget.spent():
            break
        clock = time.perf_counter()
        pool_key = (*unit.names, unit.pool_size, unit.start)
        if pool_key not in pools:
            pools[pool_key] = train_pool(
                plan,
                unit.architecture,
                unit.setting,
                unit.start,
                store,
                device=device,
                progress=progress,
                size=unit.pool_size,
            )
        training = time.perf_counter() - clock
        record = run_unit(plan, unit, pools[pool_key], root, device, progress)
        record["seconds"]["training"] = training
        files.save(unit.label, key, record)
        budget.done += 1
        if progress:
            print(f"quality: {unit.label} done", flush=True)
    return write_quality(plan, root, device)


def _sum_seconds(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    seconds = {"training": 0.0, "merging": 0.0, "figures": 0.0, "studies": 0.0}
    for record in records:
        for stage, spent in record["seconds"].items():
            seconds[stage] += spent
    return seconds


def write_quality(plan: QualityPlan, out: Path, device: str) -> dict[str, Any]:
    """Write ``out/<plan.name>.json`` and the accuracy, partial-merging figures from the units
    of ``plan`` done in ``out``: every configuration whose model sets are all done; the rest
    listed as ``"missing"`` (``"complete"`` false)."""
    state = quality_progress(plan, out, device)
    groups: dict[tuple[str, str, str, int], list[Unit]] = {}
    for unit in plan_units(plan):
        groups.setdefault(unit.configuration, []).append(unit)
    results, figures, joint, partial = [], {}, [], []
    for (kind, arch, setting, size), group in groups.items():
        records = [state.done.get(unit.label) for unit in group]
        if any(record is None for record in records):
            continue
        names = (arch, setting)
        if kind == "joint":
            joint.append(joint_entry([r["methods"] for r in records], names, size))
            continue
        results.append(_configuration(names, size, records))
        if group[0].figures:
            figures[f"{arch}-{setting}"] = records[0]["figures"]
        if group[0].partial:
            runs = [r["partial"] for r in records]
            partial.append(partial_entry(plan, runs, names, size, out))
    clock = time.perf_counter()
    accuracy = out / f"{plan.name}-accuracy.png"
    if results:
        title = f"{plan.dataset}: test accuracy of merging N models (mean ± std over model sets)"
        starts = "/".join(sorted({npmerge_start(result) for result in results}))
        labels = {name: label.replace("{start}", starts) for name, label in ROW_LABELS.items()}
        accuracy_versus_models(results, labels, accuracy, title)
    seconds = _sum_seconds(list(state.done.values()))
    seconds["figures"] += time.perf_counter() - clock
    seconds["total"] = sum(seconds.values())
    document = {
        "benchmark": "quality",
        "command": plan.command,
        "date": today(),
        "machine": machine_info(device),
        "config": plan.to_json(),
        "complete": not state.remaining,
        "missing": [unit.label for unit in state.remaining],
        "units": {"done": len(state.done), "total": len(state.done) + len(state.remaining)},
        "seconds": seconds,
        "results": results,
        "joint": joint,
        "partial": partial,
        "figures": {"accuracy": accuracy.name if results else None, "pairs": figures},
    }
    write_json(out / f"{plan.name}.json", document)
    return document


def _configuration(
    names: tuple[str, str], size: int, records: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """One configuration's result from its model sets' records."""
    options = {
        method["name"]: [r["methods"][k]["options"] for r in records]
        for k, method in enumerate(records[0]["methods"])
    }
    configuration = {
        "arch": names[0],
        "setting": names[1],
        "num_models": size,
        "models": [r["models"] for r in records],
        "rows": summarise(records),
        "options": options,
        "seconds": sum(r["seconds"]["merging"] for r in records),
    }
    if "tasks" in records[0]:
        add_task_rows(configuration, [r["tasks"] for r in records])
    return configuration
