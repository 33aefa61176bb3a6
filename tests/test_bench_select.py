"""The checkpoint-selection benchmark: a reduced plan end to end, its JSON, figure and
Markdown section."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from accord.bench.markdown import render_benchmarks_md
from accord.bench.select import run_select, select_plan


def test_select_benchmark_writes_json_figure_and_section(tmp_path: Path) -> None:
    plan = dataclasses.replace(
        select_plan(quick=True), expert_epochs=3, experts=2, repeats=2, width=16, depth=1
    )
    document = run_select(plan, tmp_path / "store", tmp_path / "results")
    saved = json.loads((tmp_path / "results" / "select-quick.json").read_text())
    assert saved["summary"] == document["summary"]
    assert (tmp_path / "results" / "select-quick.png").stat().st_size > 0
    assert len(document["runs"]) == 2 * plan.repeats  # two methods per repeat
    for method in ("task_arithmetic", "ties"):
        lengths = document["summary"][method]["per_length"]
        assert [p["epochs"] for p in lengths] == [1.0, 2.0, 3.0]
        for point in lengths:
            assert len(point["merged_test"]["values"]) == plan.repeats
        runs = [r for r in document["runs"] if r["method"] == method]
        chosen = [r["rows"][r["chosen"]]["merged_val_accuracy"] for r in runs]
        assert chosen == [max(row["merged_val_accuracy"] for row in r["rows"]) for r in runs]
    text = render_benchmarks_md(tmp_path / "results", link="results")
    assert "## Checkpoint selection: `select-quick`" in text
    assert "![checkpoint selection](results/select-quick.png)" in text
    assert "peaks at" in text
