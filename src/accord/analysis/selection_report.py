"""The report of a checkpoint selection (:mod:`accord.analysis.selection`): its table, JSON,
figure (expert vs merged accuracy per step, and the diagnostics) and ``accord select``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from accord._io import write_json, write_text, write_with
from accord._table import format_table
from accord.analysis.selection import GRIDS, Selection, select_checkpoints
from accord.checkpoint import load_checkpoint
from accord.errors import ConfigError
from accord.registry import task_vector_combiners
from accord.store import checkpoint_dataset

TABLE_HEADERS = [
    "steps",
    "expert val (own classes)",
    "merged val",
    "merged test",
    "λ",
    "cosine",
    "sign conflict",
    "hard: expert → merged",
    "hard share of late",
]


def _table_row(row: Mapping[str, Any], chosen: bool) -> list[Any]:
    def mean(values: Iterable[float | None]) -> float | None:
        present = [v for v in values if v is not None and v == v]
        return float(np.mean(present)) if present else None

    def fmt(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    hard = row["hard"]
    return [
        "/".join(map(str, row["steps"])) + (" *" if chosen else ""),
        fmt(mean(row["expert_own_val_accuracy"])),
        fmt(row["merged_val_accuracy"]),
        fmt(row["merged_test_accuracy"]),
        "-" if row["scale"] is None else f"{row['scale']:g}",
        fmt(row.get("mean_cosine")),
        fmt(row.get("sign_conflict")),
        f"{fmt(mean(hard['expert_accuracy']))} → {fmt(mean(hard['merged_accuracy']))}",
        fmt(mean(hard["late_share"])),
    ]


def selection_table(selection: Selection) -> list[list[Any]]:
    """Rows for :func:`accord._table.format_table` with :data:`TABLE_HEADERS`; the chosen
    candidate's steps are starred."""
    return [_table_row(row, k == selection.chosen) for k, row in enumerate(selection.rows)]


def _x(row: Mapping[str, Any]) -> float:
    """A candidate's position on the training axis: its experts' mean epochs (steps when the
    checkpoints do not record epochs)."""
    epochs = row["epochs"]
    return float(np.mean(epochs if None not in epochs else row["steps"]))


def plot_selection(selection: Selection, path: str | os.PathLike[str]) -> None:
    """Expert accuracy (own classes, each expert) and merged accuracy (validation) against
    training length, with the chosen candidate marked; right: the diagnostics."""
    from matplotlib.figure import Figure

    rows = sorted(selection.rows, key=_x)
    xs = [_x(r) for r in rows]
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = figure.subplots(1, 2)
    for i in range(len(rows[0]["steps"])):
        ys = [r["expert_own_val_accuracy"][i] for r in rows]
        left.plot(xs, ys, "--", marker=".", label=f"expert {i} (own classes)")
    left.plot(xs, [r["merged_val_accuracy"] for r in rows], "-o", color="k", label="merged")
    best = selection.best
    left.plot([_x(best)], [best["merged_val_accuracy"]], "*", ms=16, color="C3", label="chosen")
    left.set(xlabel="training length (epochs)", ylabel="validation accuracy")
    left.set_title(f"{selection.method}: expert vs merged accuracy", fontsize=9)
    left.legend(fontsize=7)
    series = {
        "hard: expert": [np.mean(r["hard"]["expert_accuracy"]) for r in rows],
        "hard: merged": [np.mean(r["hard"]["merged_accuracy"]) for r in rows],
    }
    if "sign_conflict" in rows[0]:
        series["sign conflict"] = [r["sign_conflict"] for r in rows]
        series["mean cosine"] = [r["mean_cosine"] for r in rows]
    for name, ys in series.items():
        right.plot(xs, ys, marker=".", label=name)
    right.set(xlabel="training length (epochs)", ylabel="rate / accuracy")
    right.set_title("diagnostics (hard: top EL2N examples)", fontsize=9)
    right.legend(fontsize=7)
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def selection_document(selection: Selection) -> dict[str, Any]:
    """The JSON form of a selection."""
    return {
        "method": selection.method,
        "grid": selection.grid,
        "chosen": selection.chosen,
        "hard_fraction": selection.hard_fraction,
        "el2n_steps": selection.el2n_steps,
        "config": selection.config,
        "rows": selection.rows,
    }


def write_selection(selection: Selection, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``selection.json``, ``selection.md`` (the table) and ``selection.png`` under
    ``out``, each atomically."""
    root = Path(out)
    paths = {"json": root / "selection.json", "markdown": root / "selection.md"}
    paths["figure"] = root / "selection.png"
    write_json(paths["json"], selection_document(selection))
    best = selection.best
    lines = [
        f"# Checkpoint selection: {selection.method}",
        "",
        f"Chosen (best merged validation accuracy): steps {best['steps']}, merged validation "
        f"{best['merged_val_accuracy']:.4f}, test {best['merged_test_accuracy']:.4f}.",
        "",
        format_table(TABLE_HEADERS, selection_table(selection), True),
        "",
        "![expert vs merged accuracy](selection.png)",
    ]
    write_text(paths["markdown"], "\n".join(lines) + "\n")
    plot_selection(selection, paths["figure"])
    return paths


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers such as 0.5,1") from None


def add_select_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``accord select EXPERT...`` to the ``accord`` subparsers ``sub``."""
    p = sub.add_parser(
        "select",
        help="which experts' checkpoints to merge: merge each step, pick by merged validation",
        description="Merge candidate combinations of experts' checkpoints and pick the one whose "
        "merged model scores best on the validation split (Horoi et al., 2025).",
    )
    p.add_argument("experts", nargs="+", help="store entries trained with --keep-every")
    p.add_argument(
        "--method",
        default="ties",
        help=f"a combiner of task vectors (with --base: {', '.join(task_vector_combiners())}), "
        "or an alignment or another combiner [%(default)s]",
    )
    p.add_argument("--base", default=None, help="the checkpoint the experts were tuned from")
    p.add_argument(
        "--scales",
        type=_floats,
        default="1",  # argparse passes a text default through type: (1.0,)
        help="λ candidates, comma-separated [%(default)s]",
    )
    p.add_argument(
        "--density",
        type=float,
        default=0.2,
        help="the density of a combiner that has one (TIES...) and of the diagnostics' trimming "
        "[%(default)s]",
    )
    p.add_argument("--grid", choices=GRIDS, default="aligned", help="[%(default)s]")
    p.add_argument("--hard-fraction", type=float, default=0.1, help="[%(default)s]")
    p.add_argument(
        "--el2n-step", type=int, default=0, help="checkpoint index for EL2N [%(default)s]"
    )
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="selection", help="output folder [%(default)s]")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    p.add_argument("--device", default="cpu", help="torch device")
    p.set_defaults(func=_cmd_select)
    return p


def _cmd_select(args: argparse.Namespace) -> int:
    import yaml

    options = {}
    for pair in args.option:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    finals = [load_checkpoint(e, args.device) for e in args.experts]
    data = checkpoint_dataset(finals, args.data_dir)
    selection = select_checkpoints(
        args.experts,
        data,
        method=args.method,
        base=args.base,
        scales=args.scales,
        density=args.density,
        options=options,
        grid=args.grid,
        hard_fraction=args.hard_fraction,
        el2n_step=args.el2n_step,
        device=args.device,
    )
    write_selection(selection, args.out)
    print(format_table(TABLE_HEADERS, selection_table(selection)))
    print(f"chosen: steps {selection.best['steps']} (* above); written to {args.out}")
    return 0
