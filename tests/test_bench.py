"""Micro runs of the benchmarks (digits, tiny models, 1 epoch) and BENCHMARKS.md from them."""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest

import accord
from accord.bench import (
    ModelPlan,
    QualityPlan,
    Setting,
    SpeedCase,
    add_bench_parser,
    quality,
    quality_plan,
    render_benchmarks_md,
    run_quality,
    run_speed,
    speed_plan,
)
from accord.bench.markdown import render_design, render_speed
from accord.bench.quality import ROW_LABELS, only_settings, settings_of, train_pool
from accord.bench.resume import Budget, digest
from accord.registry import COMBINERS

MICRO = QualityPlan(
    name="quality-micro",
    dataset="digits",
    architectures=(
        ModelPlan("mlp", {"width": 16, "depth": 1}, accord.TrainConfig(epochs=1, batch_size=64)),
        # BatchNorm: the folded and the transformed BatchNorm routes are both merged
        ModelPlan(
            "vgg11",
            {"width": 0.0625, "batch_norm": True},
            accord.TrainConfig(epochs=1, batch_size=64),
        ),
    ),
    sizes=(2, 3),
    settings=(Setting("iid"),),
    seed_starts=(0,),
    samples=200,
    curve_steps=3,
    command="pytest",
    joint_sizes=(3,),
)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One micro quality run and one micro speed run into the same results folder."""
    root = tmp_path_factory.mktemp("bench")
    run_quality(MICRO, root / "store", root / "results", progress=False)
    speed = replace(
        speed_plan("digits", samples=64),
        batch_size=32,
        cases=(SpeedCase("resnet20", 0.25, 2),),
        isolate=False,
    )
    run_speed(speed, root / "results", progress=False)
    return root


def test_quality_json_has_every_row_with_mean_std_values(results: Path) -> None:
    document = json.loads((results / "results" / "quality-micro.json").read_text())
    assert document["machine"]["cpu_count"] >= 1 and document["machine"]["torch"]
    configuration, three, vgg, vgg_three = document["results"]
    assert (configuration["arch"], configuration["setting"]) == ("mlp-w16", "iid")
    assert (vgg["arch"], vgg_three["arch"]) == ("vgg11-w0.0625-bn", "vgg11-w0.0625-bn")
    assert [c["num_models"] for c in (configuration, three, vgg, vgg_three)] == [2, 3, 2, 3]
    # NP Merge's pairwise scheme is its own row for N > 2 only; the BatchNorm routes are
    # compared for N = 2 on networks with BatchNorm
    names = [name for name in ROW_LABELS if name not in ("npmerge_pairwise", "cca_transform")]
    assert [row["name"] for row in configuration["rows"]] == names
    assert [row["name"] for row in three["rows"]] == [*names, "npmerge_pairwise"]
    assert [row["name"] for row in vgg["rows"]] == [*names, "cca_transform"]
    assert [row["name"] for row in vgg_three["rows"]] == [*names, "npmerge_pairwise"]
    for row in configuration["rows"] + three["rows"] + vgg["rows"] + vgg_three["rows"]:
        test = row["test"]
        assert len(test["values"]) == 1 and test["mean"] == test["values"][0]
        assert test["std"] == 0.0 and 0.0 <= test["mean"] <= 1.0
    assert configuration["options"]["cca"][0]["ridge"] > 0
    [npmerge] = configuration["options"]["npmerge"]
    assert npmerge["ridge"] > 0 and npmerge["epochs"] in (
        0,
        COMBINERS["npmerge"].defaults["epochs"],
    )
    files = document["figures"]["pairs"]["mlp-w16-iid"]["files"]
    for name in [document["figures"]["accuracy"], *files.values()]:
        assert (results / "results" / name).read_bytes()[:4] == b"\x89PNG"
    curves = document["figures"]["pairs"]["mlp-w16-iid"]["curves"]
    assert set(curves) == {"direct", "permutation", "cca"}
    # A permutation is exact: its path ends at model 1's own accuracy, like the direct path.
    assert curves["permutation"]["accuracy"][-1] == curves["direct"]["accuracy"][-1]


def test_quality_json_has_the_joint_and_partial_studies(results: Path) -> None:
    document = json.loads((results / "results" / "quality-micro.json").read_text())
    joint = document["joint"]
    assert [(e["arch"], e["num_models"]) for e in joint] == [
        ("mlp-w16", 3),
        ("vgg11-w0.0625-bn", 3),
    ]
    for entry in joint:
        assert [row["name"] for row in entry["rows"]] == ["cca", "gcca"]
        assert all(
            0.0 <= row["test"]["mean"] <= 1.0 and row["ridge"][0] > 0 for row in entry["rows"]
        )
    by_arch = {(r["arch"], r["num_models"]): r for r in document["results"]}
    for entry in document["partial"]:
        points = entry["points"]
        assert [p["stop_at"] for p in points] == list(range(entry["spaces"] + 1))
        kept = [p["parameters"] for p in points]
        assert kept[0] == 2 * kept[-1] and all(a >= b for a, b in itertools.pairwise(kept))
        # the ends are the ensemble and the full CCA merge of the comparison
        rows = {row["name"]: row["test"]["mean"] for row in by_arch[(entry["arch"], 2)]["rows"]}
        assert points[0]["test"]["mean"] == pytest.approx(rows["ensemble"], abs=0.005)
        assert points[-1]["test"]["mean"] == pytest.approx(rows["cca"], abs=0.005)
        assert (results / "results" / entry["figure"]).read_bytes()[:4] == b"\x89PNG"
    text = render_benchmarks_md(results / "results", link="results")
    assert "### Joint CCA against the star" in text
    assert "### Partial merging: vgg11-w0.0625-bn, iid" in text


def test_trained_pools_are_reused_from_the_store(results: Path) -> None:
    before = sorted(p.name for p in (results / "store").iterdir())
    pool = train_pool(
        MICRO,
        MICRO.architectures[0],
        Setting("iid"),
        0,
        results / "store",
        device="cpu",
        progress=False,
    )
    assert sorted(p.name for p in (results / "store").iterdir()) == before
    assert [c.path.name for c in pool] == [name for name in before if "-mlp-" in name]


def test_speed_json_times_every_stage_and_the_precision(results: Path) -> None:
    document = json.loads((results / "results" / "speed.json").read_text())
    [case] = document["cases"]
    assert set(case["stages"]) == {
        "statistics",
        "statistics_float64",
        "statistics_spaces_only",
        "trace",
        "statistics_in_merge",
        "match",
        "apply",
        "average",
        "repair",
        "npmerge_training",
    }
    for timing in ("forward", "forward_fast", "merge"):
        assert case[timing]["seconds"] > 0 and case[timing]["cpu_seconds"] > 0
        assert len(case[timing]["repeats"]) == document["config"]["repeats"]
    # the merge's own pass, the fastest of its repeats as the standalone pass is
    in_merge = case["stages"]["statistics_in_merge"]
    assert in_merge["cpu_seconds"] == min(r["cpu_seconds"] for r in in_merge["repeats"])
    assert len(in_merge["repeats"]) == document["config"]["repeats"]
    assert document["config"]["device"] == document["machine"]["device"] == "cpu"
    assert "peak_device_mib" not in case["forward"]  # measured on CUDA devices only
    for ratios in (case["statistics_over_forward"], case["statistics_over_forward_fast"]):
        assert set(ratios) == {"default", "float64", "spaces_only"}
        assert all(r["cpu"] > 0 and r["wall"] > 0 for r in ratios.values())
    # the whole merge runs a statistics pass and more
    merge = case["merge_over_forward"]
    assert merge["cpu"] == case["merge"]["cpu_seconds"] / case["forward"]["cpu_seconds"]
    assert document["reference"]["merge_seconds"] > document["reference"]["forward_seconds"]
    worst = document["precision"]["max"]
    assert worst["accord_float64"]["normwise"] < 1e-10
    assert worst["accord_float64"]["normwise"] < worst["accord_float32"]["normwise"] < 1e-4
    assert worst["naive_float32"]["normwise"] > worst["accord_float64"]["normwise"]


def test_benchmarks_md_numbers_come_from_the_json(results: Path) -> None:
    text = render_benchmarks_md(results / "results", link="results")
    quality = json.loads((results / "results" / "quality-micro.json").read_text())
    cca = next(r for r in quality["results"][0]["rows"] if r["name"] == "cca")
    row = next(line for line in text.splitlines() if line.startswith("| CCA Merge"))
    assert f"{100 * cca['test']['mean']:.1f}" in row
    assert "](results/quality-micro-accuracy.png)" in text
    speed = json.loads((results / "results" / "speed.json").read_text())
    case = speed["cases"][0]
    for ratio in (case["statistics_over_forward"]["default"], case["merge_over_forward"]):
        assert f"| {ratio['wall']:.2f} / {ratio['cpu']:.2f} " in text
    assert "1.75× (issue #19)" in text
    assert "Covariance precision" in text
    assert "| NP Merge epochs kept (per set) " in text
    assert "device memory" not in text


def test_speed_markdown_shows_device_memory_when_measured(results: Path) -> None:
    """A run on a CUDA device (peak_device_mib per pass) gets its device-memory table."""
    speed = json.loads((results / "results" / "speed.json").read_text())
    [case] = speed["cases"]
    case["forward"]["peak_device_mib"] = 12.0
    passes = {"statistics": 34.0, "statistics_float64": 23.0, "statistics_spaces_only": 29.0}
    for stage, mib in passes.items():
        case["stages"][stage]["peak_device_mib"] = mib
    table = render_speed(speed).split("Peak allocated device memory")[1]
    row = next(line for line in table.splitlines() if line.startswith("| resnet20 w0.25 N=2 "))
    assert [cell.strip() for cell in row.strip("|").split("|")][1:] == ["12", "34", "23", "29"]


def test_bench_parser_builds_the_plans_and_writes_markdown(results: Path, tmp_path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "quality", "--quick", "--sets", "2", "--dataset", "digits"])
    assert args.quick and args.sets == 2 and callable(args.func)
    plan = quality_plan(args.quick, args.dataset, args.sets)
    assert plan.seed_starts == (0, 10) and plan.sizes == (2, 4) and plan.joint_sizes == (3, 4)
    assert plan.name == "quality-quick-digits"  # beside, not over, the Fashion-MNIST figures
    assert plan.command == "accord bench quality --quick --sets 2"
    one = only_settings(plan, ["iid"])
    assert [s.label for s in one.settings] == ["iid"] and one.command.endswith("--settings iid")
    with pytest.raises(ValueError, match=r"dirichlet0\.5"):
        only_settings(plan, ["iid2"])
    out = tmp_path / "BENCHMARKS.md"
    args = parser.parse_args(
        ["bench", "markdown", "--results", str(results / "results"), "--out", str(out)]
    )
    assert args.func(args) == 0
    assert "## Quality: `quality-micro`" in out.read_text()


def test_design_measurements_carry_their_command_and_reach_benchmarks_md() -> None:
    root = Path(__file__).parent.parent
    document = json.loads(
        (root / "benchmarks" / "results" / "design-measurements.json").read_text("utf-8")
    )
    section = render_design(document)
    for entry in document["measurements"]:
        assert entry["command"] and entry["findings"] and entry["commit"]
        assert f"### {entry['choice']}" in section
    assert section in (root / "BENCHMARKS.md").read_text("utf-8")


def test_npmerge_rows_name_the_start_their_results_file_records() -> None:
    from accord.bench.markdown import _label
    from accord.bench.quality import npmerge_start

    recorded = {"options": {"npmerge": [{"align": "permutation", "epochs": 3}]}}
    older = {"options": {"npmerge": [{"ridge": 0.3, "epochs": 3}]}}  # written before the record
    assert npmerge_start(recorded) == "permutation"
    assert npmerge_start(older) == "cca"
    assert _label("npmerge", [recorded]).endswith("(aligned by permutation)")
    assert _label("npmerge_pairwise", [older, recorded]).endswith("(aligned by cca/permutation)")
    assert _label("cca", [recorded]) == accord.ALIGNMENTS["cca"].label


def test_speed_page_says_whether_the_passes_shared_the_trace_export() -> None:
    from accord.bench.markdown import render_speed
    from accord.bench.speed import speed_plan

    path = Path(__file__).parent.parent / "benchmarks" / "results" / "speed.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    document["config"].pop("export_shared", None)  # a file written before the field
    assert "includes tracing the models" in render_speed(document)
    document["config"]["export_shared"] = speed_plan().export_shared
    assert "runs the program the merge's trace exported" in render_speed(document)


def test_merge_stages_section_gives_each_stage_over_the_forward(tmp_path: Path) -> None:
    timing = {"seconds": 3.0, "cpu_seconds": 2.0}
    stages = ["trace", "statistics", "match", "apply", "combine", "repair", "other"]
    document = {
        "command": "python benchmarks/merge_stages.py",
        "date": "2026-12-08T00:00:00+00:00",
        "machine": accord.bench._common.machine_info(),
        "seconds": 60.0,
        "config": {
            "checkpoints": ["a", "b"],
            "samples": 10_000,
            "batch_size": 500,
            "repeats": 3,
            "repair": "bn-reset",
        },
        "forward": {"seconds": 10.0, "cpu_seconds": 8.0},
        "merge": {"seconds": 15.0, "cpu_seconds": 12.0},
        "stages": dict.fromkeys(stages, timing),
        "reference": {**accord.bench.speed.REFERENCE, "target_over_forward": 1.31},
    }
    (tmp_path / "merge-stages.json").write_text(json.dumps(document), encoding="utf-8")
    text = render_benchmarks_md(tmp_path)
    assert "## Whole merge by stage" in text and "1.31× the forward" in text
    assert "| **whole merge**" in text and "| 1.50 / 1.50 |" in text  # 15/10 wall, 12/8 CPU
    assert text.count("| 0.30 / 0.25 |") == len(stages)


def test_quick_plan_guards_networks_without_batchnorm_in_one_setting() -> None:
    plan = quality_plan(quick=True, dataset="fashion-mnist")
    with_bn, without = plan.architectures
    assert with_bn.model["batch_norm"] and not without.model["batch_norm"]
    assert [s.label for s in settings_of(plan, with_bn)] == ["iid", "dirichlet0.5"]
    assert [s.label for s in settings_of(plan, without)] == ["iid"]
    assert without.label == "vgg11-w0.125"


def _without_timings(value: object, name: str) -> object:
    """A results document without what differs between runs of one plan (timings, date,
    machine, the progress of the run), plan ``name`` written as ``PLAN``."""
    if isinstance(value, dict):
        dropped = {"seconds", "date", "machine", "units", "config", "command"}
        return {k: _without_timings(v, name) for k, v in value.items() if k not in dropped}
    if isinstance(value, list):
        return [_without_timings(v, name) for v in value]
    if isinstance(value, str):
        return value.replace(name, "PLAN")
    return value


def _spy(monkeypatch: pytest.MonkeyPatch, ran: list[str], interrupt: str | None = None) -> None:
    """Record the label of every unit run; raise KeyboardInterrupt (Ctrl-C) when ``interrupt``
    starts."""
    run_unit = getattr(quality.run_unit, "__wrapped__", quality.run_unit)  # not an earlier spy

    def spied(plan, unit, *args, **kwargs):  # type: ignore[no-untyped-def]
        ran.append(unit.label)
        if unit.label == interrupt:
            raise KeyboardInterrupt
        return run_unit(plan, unit, *args, **kwargs)

    spied.__wrapped__ = run_unit  # type: ignore[attr-defined]
    monkeypatch.setattr(quality, "run_unit", spied)


def test_an_interrupted_run_continues_to_the_uninterrupted_result(
    results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MLP of the micro plan (pools from the fixture's store) run one unit at a time:
    stopped by its budget, then by Ctrl-C, then to the end; the same document as the
    fixture's uninterrupted run, and only the unit whose plan entry changes runs again."""
    plan = replace(MICRO, name="quality-resumed", architectures=MICRO.architectures[:1])
    store, out = results / "store", tmp_path / "results"
    labels = [unit.label for unit in quality.plan_units(plan)]
    assert labels == [
        "merge-mlp-w16-iid-n2-s0",
        "merge-mlp-w16-iid-n3-s0",
        "joint-mlp-w16-iid-n3-s0",
    ]
    ran: list[str] = []
    _spy(monkeypatch, ran, interrupt=labels[2])
    first = run_quality(plan, store, out, progress=False, budget=Budget(units=1))
    assert ran == labels[:1]
    assert not first["complete"] and first["missing"] == labels[1:]
    assert first["units"] == {"done": 1, "total": 3}
    assert [(r["arch"], r["num_models"]) for r in first["results"]] == [("mlp-w16", 2)]
    assert first["joint"] == [] and len(first["partial"]) == 1
    text = render_benchmarks_md(out, link="results")
    assert "**Partial run: 1 of 3 configurations (model sets) done.**" in text
    assert "`merge-mlp-w16-iid-n3-s0`, `joint-mlp-w16-iid-n3-s0`" in text
    with pytest.raises(KeyboardInterrupt):
        run_quality(plan, store, out, progress=False)
    assert ran == labels  # the third was interrupted; the second is kept
    assert quality.quality_progress(plan, out).remaining == quality.plan_units(plan)[2:]
    ran.clear()
    _spy(monkeypatch, ran)
    resumed = run_quality(plan, store, out, progress=False)
    assert ran == labels[2:]
    assert resumed["complete"] and resumed["missing"] == []
    assert "Partial run" not in render_benchmarks_md(out, link="results")
    whole = json.loads((results / "results" / "quality-micro.json").read_text())
    mlp = {
        "results": whole["results"][:2],
        "joint": whole["joint"][:1],
        "partial": whole["partial"][:1],
        "figures": {
            "accuracy": whole["figures"]["accuracy"],
            "pairs": {"mlp-w16-iid": whole["figures"]["pairs"]["mlp-w16-iid"]},
        },
    }
    expected = _without_timings(mlp, "quality-micro")
    found = _without_timings({k: resumed[k] for k in mlp}, "quality-resumed")
    assert _close(found, expected)
    # a plan entry one unit depends on (the interpolation curves of model set 0, N = 2)
    ran.clear()
    changed = run_quality(replace(plan, curve_steps=4), store, out, progress=False)
    assert ran == labels[:1] and changed["complete"]
    curves = changed["figures"]["pairs"]["mlp-w16-iid"]["curves"]
    assert len(curves["direct"]["alphas"]) == 4
    assert len(list((out / "quality-resumed-units").iterdir())) == 3  # the old file replaced
    ran.clear()
    run_quality(replace(plan, curve_steps=4), store, out, progress=False)
    assert ran == []


def _close(found: object, expected: object) -> bool:
    """Same structure and text; numbers equal to 1e-9."""
    if isinstance(expected, dict):
        return (
            isinstance(found, dict)
            and found.keys() == expected.keys()
            and all(_close(found[k], v) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(found, list)
            and len(found) == len(expected)
            and all(_close(f, e) for f, e in zip(found, expected, strict=True))
        )
    if isinstance(expected, float):
        return isinstance(found, int | float) and found == pytest.approx(expected, abs=1e-9)
    return found == expected


def test_a_method_default_changes_the_keys_of_the_units_that_run_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    units = quality.plan_units(MICRO)
    before = {unit.label: quality.unit_key(MICRO, unit, "cpu") for unit in units}
    record = COMBINERS["npmerge"]
    epochs = next(o for o in record.options if o.name == "epochs")
    options = tuple(
        replace(o, default=epochs.default + 1) if o is epochs else o for o in record.options
    )
    monkeypatch.setitem(COMBINERS, "npmerge", replace(record, options=options))
    after = {unit.label: quality.unit_key(MICRO, unit, "cpu") for unit in units}
    changed = {label for label in before if digest(before[label]) != digest(after[label])}
    assert changed == {unit.label for unit in units if unit.kind == "merge"}
    assert any(unit.kind == "joint" for unit in units)
    # the number of calibration examples changes every unit
    fewer = replace(MICRO, samples=100)
    assert all(
        digest(quality.unit_key(fewer, unit, "cpu")) != digest(before[unit.label]) for unit in units
    )


def test_a_new_option_off_by_default_keeps_the_units_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    units = quality.plan_units(MICRO)
    before = {unit.label: digest(quality.unit_key(MICRO, unit, "cpu")) for unit in units}
    record = COMBINERS["npmerge"]
    epochs = next(o for o in record.options if o.name == "epochs")
    for off in (None, False, 0):
        added = replace(epochs, name="new_option", default=off, grid=())
        monkeypatch.setitem(COMBINERS, "npmerge", replace(record, options=(*record.options, added)))
        after = {unit.label: digest(quality.unit_key(MICRO, unit, "cpu")) for unit in units}
        assert after == before
    # switched on by default, it changes the units that run it
    added = replace(epochs, name="new_option", default=3, grid=())
    monkeypatch.setitem(COMBINERS, "npmerge", replace(record, options=(*record.options, added)))
    after = {unit.label: digest(quality.unit_key(MICRO, unit, "cpu")) for unit in units}
    assert {label for label in before if after[label] != before[label]} == {
        unit.label for unit in units if unit.kind == "merge"
    }


def test_status_lists_the_configurations_to_do(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    bounds = ["--status", "--max-minutes", "30", "--max-configurations", "2"]
    args = parser.parse_args(
        ["bench", "quality", "--quick", "--dataset", "digits", "--out", str(tmp_path), *bounds]
    )
    assert args.max_minutes == 30.0 and args.max_configurations == 2
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    total = len(quality.plan_units(quality_plan(True, "digits")))
    assert lines[0] == f"quality quality-quick-digits: 0 of {total} configurations done"
    assert lines[1] == "  to do: merge-vgg11-w0.25-bn-iid-n2-s0" and len(lines) == total + 1
    assert not (tmp_path / "quality-quick-digits.json").exists()  # nothing run, nothing written
