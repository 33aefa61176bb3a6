"""BENCHMARKS.md, generated from the results JSON so that its numbers always match them."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from accord._table import format_table
from accord.bench._common import by_panel, cell, row_names, run_facts, summary
from accord.bench.llm_memory import render_llm_memory
from accord.bench.quality import ROW_LABELS, npmerge_start
from accord.bench.select import render_select
from accord.bench.skill import render_skill

HEADER = """# Benchmarks

Every number on this page is generated from the JSON files in `{results}` by
`accord.bench.render_benchmarks_md` (`accord bench markdown`); do not edit it by hand. To
reproduce: `accord bench quality --quick` (minutes), `accord bench quality` (hours on 2 CPU
cores; resumable: `--max-minutes M` stops it, the same command again continues; trained models
are cached in the model store), `accord bench speed`, `python benchmarks/merge_stages.py`
(minutes; its command is in its section), `accord bench skill [--quick]`,
`accord bench select [--quick]` (seconds, one thread),
`accord bench llm-memory` (minutes; next to mergekit when installed), then
`accord bench markdown`. Accuracies are on the test
split, which chooses nothing: every hyper-parameter (CCA's ridge, ZipIt!'s α and β, the
alignment NP Merge starts from, whether NP Merge keeps its trained weights) is chosen on the
validation split.

Timings depend on what else runs on the cores: each section gives the machine and its load
average, and the CPU time of the process next to the wall time where it matters. On a 2-core
machine a second busy process slows torch's two-thread kernels far more than twofold.
"""

INTERPOLATION_NOTE = (
    "Interpolation figures: test accuracy and loss on the straight line from model 0 (α = 0) "
    "to model 1 (α = 1), unaligned (*direct*) and with model 1 aligned to model 0 by "
    "permutation or by CCA, BatchNorm statistics reset on the calibration examples at every "
    "point, the ends included (so under differing data an end can score above or below that "
    "base model with its own statistics); a star marks the "
    "method's merged model. A dense CCA map does not commute with ReLU or with per-channel "
    "BatchNorm, so CCA's α = 1 end is the *aligned* model 1, not model 1's function (its only "
    "use is to be averaged); a permutation is exact, so that path ends where the direct one does."
)


def _percent(cell: Mapping[str, Any]) -> str:
    if cell.get("mean") is None:
        return "-"
    if len(cell.get("values", [])) > 1:
        return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"
    return f"{100 * cell['mean']:.1f}"


def _figure(link: str, name: str, caption: str) -> list[str]:
    return ["", f"![{caption}]({link}/{name})", "", f"*{caption}*"]


def _quality_setup(config: Mapping[str, Any]) -> list[str]:
    archs = "; ".join(
        f"{a['arch']} {json.dumps(a['model'], sort_keys=True)}, {a['train']['epochs']} epochs "
        f"(lr {a['train']['lr']}, batch {a['train']['batch_size']}), "
        + (
            "all examples"
            if a["limit"] is None
            else f"limit {a['limit']} (that many training+"
            f"validation examples, and as many test examples)"
        )
        for a in config["architectures"]
    )
    settings = ", ".join(map(_setting, config["settings"]))
    pools = ", ".join(f"seeds {p[0]}–{p[-1]}" for p in config["pool_seeds"])
    return [
        f"- dataset: {config['dataset']}; architectures: {archs}",
        f"- data settings: {settings}; N = {', '.join(map(str, config['sizes']))}",
        f"- model sets: {pools} (N models = the first N of a set's pool)",
        f"- statistics, repair and NP Merge calibration: the first {config['samples']} "
        "training examples",
    ]


def _setting(setting: Mapping[str, Any]) -> str:
    text = setting["split"] + (
        f" (α = {setting['alpha']})" if setting["split"] == "dirichlet" else ""
    )
    if setting.get("sizes"):
        sizes = ", ".join(map(str, setting["sizes"]))
        text += f" (N = {sizes}: a pool of N models per N, each on its own part of the split"
        if setting.get("class_embeddings"):
            text += f"; frozen class head shared by the models, d = {setting['class_embeddings']}"
        text += ")"
    return text


TASKS_NOTE = (
    "Test accuracy in % on each model's task, the classes it was trained on (all of their "
    "examples under *classes*, 80 % of them under *80-20*), with the logits restricted to "
    "that task's classes, and jointly (all test examples, all classes). Every model has the "
    "same frozen class head (fixed random class embeddings, as the reference code's CLIP text "
    "embeddings), so their outputs can be merged. *base models*: model k on its own task k "
    "(joint: the mean of the models' own accuracies)."
)


def _task_table(result: Mapping[str, Any]) -> list[str]:
    """One configuration of a task setting: each row's accuracy per task, their mean, joint."""
    tasks = result["tasks"][0]  # every model set splits the same training data the same way
    headers = [
        "row",
        *(f"task {k} (classes {', '.join(map(str, c))})" for k, c in enumerate(tasks)),
        "task mean",
        "joint",
    ]
    rows = []
    for row in result["rows"]:
        cells = ["-"] * (len(tasks) + 1)
        if "tasks" in row:
            per_set = zip(*(task["values"] for task in row["tasks"]), strict=True)
            means = summary([sum(values) / len(values) for values in per_set])
            cells = [*(_percent(task) for task in row["tasks"]), _percent(means)]
        rows.append([_label(row["name"], [result]), *cells, _percent(row["test"])])
    title = f"### {result['arch']}, {result['setting']}, N = {result['num_models']}: per task"
    return ["", title, "", format_table(headers, rows, True)]


def _quality_tables(results: Sequence[Mapping[str, Any]]) -> list[str]:
    lines: list[str] = []
    for panel, chosen in by_panel(results):
        headers = ["row", *(f"N = {r['num_models']}" for r in chosen)]
        rows = []
        for name in row_names(chosen):
            rows.append([_label(name, chosen), *(_percent(cell(r, name)) for r in chosen)])
        ridges = ["/".join(f"{o['ridge']:g}" for o in r["options"].get("cca", [])) for r in chosen]
        rows.append(["CCA ridge chosen (per set)", *ridges])
        epochs = [
            "/".join(str(o["epochs"]) for o in r["options"].get("npmerge", []) if "epochs" in o)
            for r in chosen
        ]
        if any(epochs):
            rows.append(["NP Merge epochs kept (per set)", *epochs])
        lines += ["", f"### {panel[0]}, {panel[1]}", "", format_table(headers, rows, True)]
        lines += ["", "Best merge by mean test accuracy: " + "; ".join(map(_best, chosen)) + "."]
        for result in chosen:
            if "tasks" in result:
                lines += [] if TASKS_NOTE in lines else ["", TASKS_NOTE]
                lines += _task_table(result)
    return lines


def _label(name: str, results: Sequence[Mapping[str, Any]]) -> str:
    """A row's display name; NP Merge's names the alignment it started from in ``results``."""
    starts = sorted({npmerge_start(result) for result in results})
    return ROW_LABELS.get(name, name).replace("{start}", "/".join(starts))


def _best(result: Mapping[str, Any]) -> str:
    merges = [row for row in result["rows"] if row["name"] not in ("base", "ensemble")]
    best = max(merges, key=lambda row: row["test"]["mean"])
    ensemble = cell(result, "ensemble")["mean"]
    return (
        f"N = {result['num_models']}: {_label(best['name'], [result])} "
        f"{100 * best['test']['mean']:.1f} (ensemble {100 * ensemble:.1f})"
    )


def _barriers(figures: Mapping[str, Any]) -> list[str]:
    rows = []
    for tag, entry in figures["pairs"].items():
        for curve, values in entry["curves"].items():
            rows.append(
                [tag, curve, f"{100 * values['accuracy_barrier']:.1f}", values["loss_barrier"]]
            )
    if not rows:
        return []
    headers = ["models", "path", "accuracy barrier (points)", "loss barrier"]
    caption = (
        "Barriers of the interpolation paths (largest drop below the straight line between the "
        "path's ends). The CCA path ends at the aligned model 1, which is weaker than model 1 "
        "(see above), so its barrier is measured against a lower line and is not comparable:"
    )
    return ["", caption, "", format_table(headers, rows, True)]


def render_quality(document: Mapping[str, Any], link: str) -> str:
    """The section of one quality run."""
    seconds = document["seconds"]
    studies = f", studies {seconds['studies']:.0f} s" if "studies" in seconds else ""
    spent = (
        f"{seconds['total']:.0f} s (training {seconds['training']:.0f} s, merging "
        f"{seconds['merging']:.0f} s, figures {seconds['figures']:.0f} s{studies})"
    )
    if "units" in document:  # a resumable run: its configurations may span several runs
        spent += ", summed over the configurations"
    lines = [f"## Quality: `{document['config']['name']}`", "", *run_facts(document, spent)]
    lines += _unfinished(document)
    lines += _quality_setup(document["config"])
    lines += [
        "",
        "Test accuracy in %: mean ± sample standard deviation over the model sets (each set's "
        "value is in the JSON). *base models* is the mean of the N merged models' own accuracies; "
        "the *ensemble* averages their logits (N times the cost). Every method aligns the models "
        "to model 0 and averages them (NP Merge: with weights learned per parameter on the "
        "calibration examples, starting from the plain average, which it keeps instead when the "
        "learned weights score lower on the validation split: *epochs kept* 0), then resets "
        "BatchNorm statistics (REPAIR for networks without BatchNorm). By default the "
        "BatchNorms of spaces with dense maps (CCA, ZipIt!) are folded into their convolutions "
        "and given the models' transformed statistics; the *BatchNorm transformed* row (N = 2) "
        "applies CCA's maps to γ and β instead, as the reference code does.",
    ]
    lines += _quality_tables(document["results"])
    figures = document["figures"]
    if figures["accuracy"]:
        lines += _figure(link, figures["accuracy"], "Test accuracy against the number of models")
    lines += ["", INTERPOLATION_NOTE]
    for tag, entry in figures["pairs"].items():
        files = entry["files"]
        lines += _figure(link, files["interpolation"], f"{tag}: linear paths, models 0 and 1")
        if "spectra" in files:
            lines += _figure(link, files["spectra"], f"{tag}: canonical correlations per space")
        lines += _figure(link, files["npmerge"], f"{tag}: NP Merge's learned coefficients")
    lines += _barriers(figures)
    lines += _joint(document.get("joint", []))
    lines += _partial(document.get("partial", []), link)
    return "\n".join(lines)


def _unfinished(document: Mapping[str, Any]) -> list[str]:
    """A run stopped before its end (files written before runs were resumable are complete):
    what is missing, and how to continue."""
    missing = document.get("missing", [])
    if not missing:
        return []
    units = document["units"]
    return [
        "",
        f"**Partial run: {units['done']} of {units['total']} configurations (model sets) done.** "
        "Only the configurations whose every model set is done are shown; missing: "
        f"{', '.join(f'`{label}`' for label in missing)}. Run `{document['command']}` again "
        "(same options) to continue.",
    ]


def _joint(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Star CCA against joint CCA (GCCA), per architecture, setting and N."""
    if not entries:
        return []
    rows = []
    for entry in entries:
        cells = {row["name"]: row for row in entry["rows"]}
        rows.append(
            [
                f"{entry['arch']}, {entry['setting']}",
                str(entry["num_models"]),
                *(_percent(cells[name]["test"]) for name in ("cca", "gcca")),
                *("/".join(f"{r:g}" for r in cells[name]["ridge"]) for name in ("cca", "gcca")),
            ]
        )
    headers = [
        "models",
        "N",
        "CCA, star (model 0)",
        "joint CCA (GCCA)",
        "ridge star",
        "ridge joint",
    ]
    caption = (
        "Joint CCA against the star: the first N models of each set merged by CCA Merge onto "
        'model 0 and by generalised CCA into one shared space (`align="gcca"`, no reference), '
        "each with its ridge chosen on validation, on one statistics pass. Test accuracy in %:"
    )
    return [
        "",
        "### Joint CCA against the star",
        "",
        caption,
        "",
        format_table(headers, rows, True),
    ]


def _partial(entries: Sequence[Mapping[str, Any]], link: str) -> list[str]:
    """Partial merging: accuracy against parameters kept, for k = 0 … K spaces merged."""
    lines: list[str] = []
    for entry in entries:
        tag = f"{entry['arch']}, {entry['setting']}"
        rows = [
            [
                str(point["stop_at"]),
                f"{point['parameters']:,}",
                f"{point['parameters'] / entry['points'][-1]['parameters']:.2f}",
                _percent(point["test"]),
            ]
            for point in entry["points"]
        ]
        caption = (
            f"Partial merging, {tag}: the CCA merge of {entry['num_models']} models with only "
            f"the first k of its {entry['spaces']} feature spaces merged (`accord.merge(..., "
            "stop_at=k)`), the rest kept per model and the logits averaged; k = 0 is the "
            "ensemble, k = all one merged model. Test accuracy in %:"
        )
        headers = ["k", "parameters kept", "× one model", "test accuracy"]
        lines += ["", f"### Partial merging: {tag}", "", caption, ""]
        lines += [format_table(headers, rows, True)]
        lines += _figure(link, entry["figure"], f"{tag}: accuracy against parameters kept")
    return lines


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


# The statistics passes (:data:`accord.bench.speed.STATISTICS_PASSES`) by stage name and
# ratio key, and the stages of the whole merge.
SPEED_PASSES = {
    "statistics": "default",
    "statistics_float64": "float64",
    "statistics_spaces_only": "spaces_only",
}
MERGE_STAGES = ["trace", "statistics_in_merge", "match", "apply", "average", "repair"]


def _seconds(stages: Mapping[str, Any], name: str) -> str:
    return f"{stages[name]['seconds']:.2f}" if name in stages else "-"


def _ratio(ratios: Mapping[str, Any], key: str) -> str:
    return f"{ratios[key]['wall']:.2f} / {ratios[key]['cpu']:.2f}" if key in ratios else "-"


def _reference_note(reference: Mapping[str, Any] | None) -> str:
    """The reference code's whole merge over its forward, which the merge ratio compares with."""
    if not reference:
        return ""
    ratio = reference["merge_seconds"] / reference["forward_seconds"]
    return (
        f"{reference['what']}: {reference['merge_seconds']:g} s end to end for a "
        f"{reference['forward_seconds']:g} s forward of both models, {ratio:.2f}× "
        f"({reference['source']}); {reference['target']:g}× of it, the target, is "
        f"{reference['target'] * ratio:.2f}× the forward. The reference code is not available "
        "to rerun here, so that ratio is the comparison. "
    )


def render_speed(document: Mapping[str, Any]) -> str:
    """The section of one speed run."""
    pass_rows, merge_rows, memory_rows, device_rows = [], [], [], []
    memory_names = [*SPEED_PASSES, *MERGE_STAGES[:1], *MERGE_STAGES[2:], "npmerge_training"]
    for case in document["cases"]:
        label = f"{case['arch']} w{case['width']:g} N={case['models']}"
        if case["samples"] != document["config"]["samples"]:
            label += f" ({case['samples']:,} images)"
        stages, ratio = case["stages"], case["statistics_over_forward"]
        fast = case.get("statistics_over_forward_fast", {})
        pass_rows.append(
            [label, f"{case['parameters_per_model']:,}", f"{case['forward']['seconds']:.2f}"]
            + [f"{case['forward_fast']['seconds']:.2f}" if "forward_fast" in case else "-"]
            + [_seconds(stages, s) for s in SPEED_PASSES]
            + [_ratio(ratio, "default"), _ratio(fast, "default")]
            + [_ratio(ratio, p) for p in ("float64", "spaces_only")]
        )
        merge_rows.append(
            [label, f"{case['forward']['seconds']:.2f}"]
            + [_seconds(stages, s) for s in MERGE_STAGES]
            + [f"{case['merge']['seconds']:.2f}" if "merge" in case else "-"]
            + [_ratio(case, "merge_over_forward") if "merge_over_forward" in case else "-"]
            + [_seconds(stages, "npmerge_training")]
        )
        memory_rows.append(
            [label]
            + [_mib(stages[s]["peak_rss_mib"]) if s in stages else "-" for s in memory_names]
            + [_mib(case["process_peak_rss_mib"])]
        )
        device_rows.append(
            [label]
            + [_mib(case["forward"].get("peak_device_mib"))]
            + [_mib(stages[s].get("peak_device_mib")) if s in stages else "-" for s in SPEED_PASSES]
        )
    config = document["config"]
    lines = [
        "## Speed",
        "",
        *run_facts(document, f"{document['seconds']:.0f} s"),
        f"- data: the first {config['samples']} training images of {config['dataset']} "
        "(where a case names another number, that many) in "
        f"batches of {config['batch_size']}; randomly initialised models; CCA ridge "
        f"{config['ridge']}; NP Merge: its default options (`accord.merge`) over the same "
        f"images; forward, statistics and whole merges: the fastest of {config['repeats']} "
        "alternated repeats (all are in the JSON; the float64 and spaces-only passes of runs "
        "with threads set ran once)"
        + (f"; {config['threads']} torch thread(s) per case" if config.get("threads") else ""),
        "",
        "The statistics pass, in seconds. *forward*: plain `torch.no_grad` passes of the N "
        "models as given over the images; *forward (accord)*: the same under "
        "`torch.inference_mode` with channels-last convolutions (how accord runs its passes on "
        "a CPU); *statistics*: `accord.collect_statistics` as merges run it (the default: each "
        "shifted chunk's products in float32, summed in float64); *statistics_float64*: with "
        '`precision="float64"`; *statistics_spaces_only*: the default without the '
        "BatchNorm-output blocks (what `permutation` collects: only dense maps need them). "
        "Ratios are statistics / forward, in wall time / in the process's CPU time; the "
        "CPU-time ratio is the one to trust when other processes share the cores. "
        + (
            "Every pass runs the program the merge's trace exported (exporting is the trace "
            "stage's cost)."
            if document["config"].get("export_shared", False)
            else "Every pass includes tracing the models, a fixed cost that more samples amortise."
        ),
        "",
        format_table(
            [
                "case",
                "params/model",
                "forward",
                "forward (accord)",
                *SPEED_PASSES,
                "ratio (wall / CPU)",
                "ratio to accord's forward",
                "f64 ratio",
                "spaces-only ratio",
            ],
            pass_rows,
            True,
        ),
        "",
        "A whole CCA merge (`accord.merge(models, batches, 'cca', repair='bn-reset')`: no spec, "
        "no statistics given), in seconds per stage (*average*: combining, *repair*: the "
        "BatchNorm reset), end to end, and over the plain forward (wall / CPU). "
        + _reference_note(document.get("reference"))
        + "*npmerge_training*: NP Merge's coefficient training.",
        "",
        format_table(
            [
                "case",
                "forward",
                *MERGE_STAGES,
                "whole merge",
                "merge / forward",
                "npmerge_training",
            ],
            merge_rows,
            True,
        ),
        "",
        "Peak resident memory above the stage's start (MiB; sampled every 2 ms; each case in a "
        "fresh process, whose overall peak is the last column):",
        "",
        format_table(["case", *memory_names, "process peak"], memory_rows, True),
    ]
    if any(row[1] != "-" for row in device_rows):
        lines += [
            "",
            "Peak allocated device memory above the pass's start (MiB):",
            "",
            format_table(["case", "forward", *SPEED_PASSES], device_rows, True),
        ]
    lines += _precision(document["precision"])
    return "\n".join(lines)


# The stages of a whole merge (``benchmarks/merge_stages.py``) as its report names them, with
# what each one does.
MERGE_STAGE_ROWS = {
    "trace": "trace (export, spaces)",
    "statistics": "statistics pass",
    "match": "matching",
    "apply": "apply the maps",
    "combine": "average, BatchNorm targets",
    "repair": "repair (BatchNorm reset)",
    "other": "checks before the stages",
}


def render_merge_stages(document: Mapping[str, Any]) -> str:
    """The section of one ``benchmarks/merge_stages.py`` run: a whole default CCA merge stage
    by stage beside a plain forward of the same models over the same data (issue 19)."""
    forward, config, reference = document["forward"], document["config"], document["reference"]

    def row(label: str, timing: Mapping[str, float]) -> list[str]:
        wall = timing["seconds"] / forward["seconds"]
        cpu = timing["cpu_seconds"] / forward["cpu_seconds"]
        seconds, cpu_seconds = f"{timing['seconds']:.2f}", f"{timing['cpu_seconds']:.2f}"
        return [label, seconds, cpu_seconds, f"{wall:.2f} / {cpu:.2f}"]

    rows = [row("plain forward of the models", forward)]
    rows += [row(label, document["stages"][s]) for s, label in MERGE_STAGE_ROWS.items()]
    rows.append(row("**whole merge**", document["merge"]))
    ratio = reference["merge_seconds"] / reference["forward_seconds"]
    return "\n".join(
        [
            "## Whole merge by stage",
            "",
            *run_facts(document, f"{document['seconds']:.0f} s"),
            f"- models: {', '.join(config['checkpoints'])}; data: the first "
            f"{config['samples']:,} training images in batches of {config['batch_size']} (a "
            f"loader); repair {config['repair']!r}; the fastest of {config['repeats']} "
            "alternated repeats, in wall and in CPU seconds separately",
            "",
            "`accord.merge(models, loader, 'cca')` with its defaults, each stage's seconds from "
            "its report (`timings`, `cpu_timings`), beside a plain forward (`torch.no_grad`, "
            "the models as given) of the same models over the same data; the last column is "
            "over that forward (wall / CPU). The CCA Merge reference code took "
            f"{reference['merge_seconds']:g} s for a {reference['forward_seconds']:g} s "
            f"forward ({ratio:.2f}×, {reference['source']}); {reference['target']:g}× of its "
            f"time, the target, is {reference['target_over_forward']:.2f}× the forward.",
            "",
            format_table(["stage", "seconds", "CPU seconds", "/ forward"], rows, True),
        ]
    )


# Covariance estimates of the precision check, with their column labels.
KINDS = {"accord_float64": "f64", "accord_float32": "f32", "naive_float32": "naive"}


def _precision(precision: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            s["space"],
            s["features"],
            f"{s['samples']:,}",
            *(f"{s[kind]['normwise']:.1e}" for kind in KINDS),
            *(f"{s[kind]['variance']:.1e}" for kind in KINDS),
        ]
        for s in precision["spaces"]
    ]
    headers = [
        "space",
        "C",
        "samples",
        *(f"{KINDS[k]} ‖ΔC‖/‖C‖" for k in KINDS),
        *(f"{KINDS[k]} max Δvar/var" for k in KINDS),
    ]
    worst = precision["max"]
    return [
        "",
        f"### Covariance precision ({precision['arch']} w{precision['width']:g}, "
        f"{precision['inputs']} inputs)",
        "",
        "Relative error against an exact two-pass float64 covariance: accord's shifted "
        'one-pass sums with float64 products (f64, `precision="float64"`) and with float32 '
        "chunk products summed in float64 (f32, the default), and a naive float32 "
        "E[xxᵀ] − μμᵀ over the same "
        "batches (naive). Worst space: "
        + "; ".join(
            f"{KINDS[k]} {worst[k]['normwise']:.1e} normwise, {worst[k]['variance']:.1e} on a "
            "variance"
            for k in KINDS
        )
        + ".",
        "",
        format_table(headers, rows, True),
    ]


def render_design(document: Mapping[str, Any]) -> str:
    """The section of measurements behind design choices (``design-measurements.json``)."""
    lines = ["## Measurements behind design choices", "", document["about"]]
    for entry in document["measurements"]:
        lines += ["", f"### {entry['choice']}", "", f"- commit: `{entry['commit']}`"]
        lines += [f"- command: {entry['command']}"]
        lines += [f"- {finding}" for finding in entry["findings"]]
    return "\n".join(lines)


def render_benchmarks_md(results_dir: str | os.PathLike[str], link: str | None = None) -> str:
    """BENCHMARKS.md from ``results_dir``'s ``quality*.json``, ``speed.json``,
    ``merge-stages.json``, ``skill-transfer*.json``, ``select*.json``, ``llm-memory*.json`` and
    ``design-measurements.json``.

    Figures are linked as ``link/<file>`` (default: ``results_dir`` as given, right for a
    BENCHMARKS.md in the directory that ``results_dir`` is relative to).
    """
    root = Path(results_dir)
    link = link if link is not None else root.as_posix()
    sections = [HEADER.format(results=root.as_posix())]
    for path in sorted(root.glob("quality*.json")):
        sections.append(render_quality(json.loads(path.read_text(encoding="utf-8")), link))
    speed = root / "speed.json"
    if speed.is_file():
        sections.append(render_speed(json.loads(speed.read_text(encoding="utf-8"))))
    stages = root / "merge-stages.json"
    if stages.is_file():
        sections.append(render_merge_stages(json.loads(stages.read_text(encoding="utf-8"))))
    for path in sorted(root.glob("skill-transfer*.json")):
        sections.append(render_skill(json.loads(path.read_text(encoding="utf-8"))))
    for path in sorted(root.glob("select*.json")):
        sections.append(render_select(json.loads(path.read_text(encoding="utf-8")), link))
    for path in sorted(root.glob("llm-memory*.json")):
        sections.append(render_llm_memory(json.loads(path.read_text(encoding="utf-8"))))
    design = root / "design-measurements.json"
    if design.is_file():
        sections.append(render_design(json.loads(design.read_text(encoding="utf-8"))))
    return "\n\n".join(sections) + "\n"
