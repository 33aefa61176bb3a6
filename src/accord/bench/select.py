"""Checkpoint-selection benchmark: do experts' early checkpoints merge better than their last?

One base MLP is trained on every class; ``experts`` experts are fine-tuned from it, each on its
own disjoint subset of the classes (``accord.split_indices`` mode ``classes``), keeping a
checkpoint every ``keep_every`` epochs of one run. At each training length the experts' k-th
checkpoints are merged by task arithmetic and by TIES (:func:`accord.select_checkpoints`, ``λ``
chosen on validation at each length) and the merged model is scored on all classes. Repeated
over ``repeats`` independent class splits and seeds. The selection picks the length by merged
validation accuracy; its test accuracy is compared with the last checkpoint's. The test split
chooses nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import accord
from accord._io import write_json, write_with
from accord._table import format_table
from accord.analysis.selection import select_checkpoints
from accord.analysis.selection_report import selection_document
from accord.bench._common import machine_info, run_facts, summary, today

# The study merges by these two combiners (a design choice); their labels are the records'.
METHODS = {name: accord.COMBINERS[name].label for name in ("task_arithmetic", "ties")}


@dataclass(frozen=True)
class SelectPlan:
    """Everything one run does; written into its JSON."""

    name: str
    dataset: str
    width: int
    depth: int
    base_epochs: int
    expert_epochs: int
    keep_every: int
    lr: float
    finetune_lr: float
    batch_size: int
    experts: int
    repeats: int
    scales: Mapping[str, tuple[float, ...]]
    density: float
    hard_fraction: float
    command: str


def select_plan(quick: bool = False, dataset: str = "digits") -> SelectPlan:
    """The ``--quick`` plan or the full one (each run's time is in its JSON, ``seconds``)."""
    return SelectPlan(
        name="select-quick" if quick else "select",
        dataset=dataset,
        width=64,
        depth=2,
        base_epochs=1,
        expert_epochs=6 if quick else 20,
        keep_every=1,
        lr=0.05,
        finetune_lr=0.02,
        batch_size=32,
        experts=5,
        repeats=2 if quick else 6,
        scales={
            "task_arithmetic": (0.2, 0.3, 0.5, 0.7, 1.0),
            "ties": (0.5, 0.7, 1.0, 1.5, 2.0, 3.0),
        },
        density=0.2,
        hard_fraction=0.1,
        command="accord bench select" + (" --quick" if quick else ""),
    )


def _models(
    plan: SelectPlan, repeat: int, store: str | os.PathLike[str], data: accord.DataSplits
) -> tuple[Path, list[Path]]:
    """The base and the experts of repeat ``repeat`` (trained, or loaded from ``store``)."""
    model = {"width": plan.width, "depth": plan.depth}
    common = {"arch": "mlp", "dataset": plan.dataset, "model": model}
    base = accord.train_model_set(
        accord.ModelSetRequest(
            seeds=(100 + repeat,),
            train=accord.TrainConfig(
                epochs=plan.base_epochs, lr=plan.lr, batch_size=plan.batch_size
            ),
            **common,
        ),
        store,
        progress=False,
        data=data,
    )[0]
    experts = accord.train_model_set(
        accord.ModelSetRequest(
            seeds=tuple(range(10 * repeat, 10 * repeat + plan.experts)),
            split="classes",
            split_seed=repeat,
            init=str(base.path),
            keep=accord.Keep(plan.keep_every, "epoch"),
            train=accord.TrainConfig(
                epochs=plan.expert_epochs, lr=plan.finetune_lr, batch_size=plan.batch_size
            ),
            **common,
        ),
        store,
        progress=False,
        data=data,
    )
    return base.path, [e.path for e in experts]


def run_select(
    plan: SelectPlan,
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Run ``plan`` on one thread; write ``out/<plan.name>.json`` and its figure."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        data = accord.load_dataset(plan.dataset, data_dir)
        runs, bases = [], []
        for repeat in range(plan.repeats):
            base, experts = _models(plan, repeat, store, data)
            model = accord.load_checkpoint(base).model
            scores = {s: accord.evaluate(model, getattr(data, s)).accuracy for s in ("val", "test")}
            bases.append({"repeat": repeat, **{f"{s}_accuracy": a for s, a in scores.items()}})
            for method in METHODS:
                selection = select_checkpoints(
                    experts,
                    data,
                    method=method,
                    base=base,
                    scales=plan.scales[method],
                    density=plan.density,
                    hard_fraction=plan.hard_fraction,
                )
                runs.append({"repeat": repeat, **selection_document(selection)})
        seconds = time.perf_counter() - start
        machine = machine_info()
    finally:
        torch.set_num_threads(threads)
    document = {
        "benchmark": "select",
        "command": plan.command,
        "date": today(),
        "machine": machine,
        "config": asdict(plan),
        "seconds": seconds,
        "base": bases,
        "runs": runs,
        "summary": summarise(runs),
    }
    write_json(Path(out) / f"{plan.name}.json", document)
    plot_select(document, Path(out) / f"{plan.name}.png")
    return document


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per method: per training length (epochs) the summaries over repeats of the experts'
    own-class validation accuracy, the merged validation and test accuracy, hard-example
    accuracies; and the chosen length against the last."""
    result: dict[str, Any] = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        lengths = [row["epochs"][0] for row in mine[0]["rows"]]
        per_length = []
        for k, epochs in enumerate(lengths):
            rows = [run["rows"][k] for run in mine]
            per_length.append(
                {
                    "epochs": epochs,
                    "expert_own_val": summary(
                        [np.mean(r["expert_own_val_accuracy"]) for r in rows]
                    ),
                    "merged_val": summary([r["merged_val_accuracy"] for r in rows]),
                    "merged_test": summary([r["merged_test_accuracy"] for r in rows]),
                    "hard_expert": summary([np.mean(r["hard"]["expert_accuracy"]) for r in rows]),
                    "hard_merged": summary([np.mean(r["hard"]["merged_accuracy"]) for r in rows]),
                    "sign_conflict": summary([r["sign_conflict"] for r in rows]),
                }
            )
        chosen = [run["rows"][run["chosen"]] for run in mine]
        result[method] = {
            "per_length": per_length,
            "chosen_epochs": [row["epochs"][0] for row in chosen],
            "chosen_test": summary([row["merged_test_accuracy"] for row in chosen]),
            "last_test": summary([run["rows"][-1]["merged_test_accuracy"] for run in mine]),
        }
    return result


def plot_select(document: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """One panel per method: experts' own-class validation accuracy and the merged model's
    validation and test accuracy (all classes) against training length, mean ± std."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8), layout="constrained")
    axes = figure.subplots(1, len(METHODS), sharey=True)
    for ax, (method, label) in zip(axes, METHODS.items(), strict=True):
        per_length = document["summary"][method]["per_length"]
        xs = [p["epochs"] for p in per_length]
        curves = {
            "experts, own classes (val)": ("expert_own_val", "--"),
            "merged, all classes (val)": ("merged_val", "-"),
            "merged, all classes (test)": ("merged_test", "-"),
            "merged, experts' hard train examples": ("hard_merged", ":"),
        }
        for name, (key, style) in curves.items():
            mean = np.array([p[key]["mean"] for p in per_length])
            std = np.array([p[key]["std"] for p in per_length])
            (line,) = ax.plot(xs, mean, style, marker=".", label=name)
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        base = np.mean([b["test_accuracy"] for b in document["base"]])
        ax.axhline(base, color="grey", linestyle=":", label="base (test)")
        ax.set(xlabel="expert fine-tuning (epochs)", title=label)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def _pct(cell: Mapping[str, Any]) -> str:
    return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"


def _verdict(method_summary: Mapping[str, Any]) -> str:
    """Where the mean merged test accuracy peaks, against the last checkpoint (paired over
    repeats), in words."""
    per_length = method_summary["per_length"]
    best = max(per_length, key=lambda p: p["merged_test"]["mean"])
    if best is per_length[-1]:
        return "Mean merged test accuracy peaks at the last checkpoint."
    pairs = zip(best["merged_test"]["values"], per_length[-1]["merged_test"]["values"], strict=True)
    gaps = [100 * (a - b) for a, b in pairs]
    gap = summary(gaps)
    return (
        f"Mean merged test accuracy peaks at epoch {best['epochs']:g}: paired over repeats, "
        f"{gap['mean']:.1f} ± {gap['std']:.1f} points above the last checkpoints', higher in "
        f"{sum(g > 0 for g in gaps)} of {len(gaps)} repeats, lower in {sum(g < 0 for g in gaps)}."
    )


def render_select(document: Mapping[str, Any], link: str) -> str:
    """The Markdown section of one checkpoint-selection run."""
    c = document["config"]
    lines = [
        f"## Checkpoint selection: `{c['name']}`",
        "",
        *run_facts(document, f"{document['seconds']:.0f} s"),
        f"- data: {c['dataset']}; base: MLP width {c['width']}, depth {c['depth']}, "
        f"{c['base_epochs']} epochs on all classes (lr {c['lr']:g}); {c['experts']} experts "
        f"fine-tuned from it on disjoint class subsets, {c['expert_epochs']} epochs "
        f"(lr {c['finetune_lr']:g}, batch {c['batch_size']}), a checkpoint kept every "
        f"{c['keep_every']} epochs; {c['repeats']} repeats (class split and seeds)",
        f"- merges: task arithmetic (λ from {c['scales']['task_arithmetic']}) and TIES "
        f"(density {c['density']:g}, λ from {c['scales']['ties']}), λ chosen on validation at "
        f"every length; hard examples: the top {100 * c['hard_fraction']:g} % of each expert's "
        "training examples by EL2N at its first kept checkpoint",
        "",
        "Accuracy (%, mean ± std over repeats) at each expert training length: the experts' "
        "own classes (validation), the merged model on all classes (validation, test) and on "
        "the experts' hard training examples; *sign conflict*: among the entries that two or "
        "more trimmed task vectors keep, the share whose signs disagree. The base scores "
        f"{_pct(summary([b['test_accuracy'] for b in document['base']]))} % on the test split.",
    ]
    for method, label in METHODS.items():
        s = document["summary"][method]
        rows = [
            [
                f"{p['epochs']:g}",
                _pct(p["expert_own_val"]),
                _pct(p["merged_val"]),
                _pct(p["merged_test"]),
                f"{_pct(p['hard_expert'])} → {_pct(p['hard_merged'])}",
                f"{p['sign_conflict']['mean']:.3f}",
            ]
            for p in s["per_length"]
        ]
        headers = ["epochs", "experts (own)", "merged val", "merged test"]
        headers += ["hard train: expert → merged", "sign conflict"]
        lines += ["", f"### {label}", "", format_table(headers, rows, True), ""]
        lines.append(
            f"Chosen by merged validation: epochs {s['chosen_epochs']}, merged test "
            f"{_pct(s['chosen_test'])} %; the last checkpoints merge to {_pct(s['last_test'])} %. "
            + _verdict(s)
        )
    lines += ["", f"![checkpoint selection]({link}/{c['name']}.png)"]
    return "\n".join(lines)
