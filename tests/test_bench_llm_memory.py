"""``accord bench llm-memory``: the measured runs, the configs both tools read, the rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from accord.bench import llm_memory
from accord.bench.llm_memory import (
    LLMMemoryPlan,
    measure,
    mergekit_config,
    quick_plan,
    render_llm_memory,
    run_llm_memory,
)
from accord.bench.markdown import render_benchmarks_md
from accord.llm.mergekit import translate_mergekit_config


def test_the_config_is_mergekits_and_accord_reads_it(tmp_path: Path) -> None:
    paths = {name: tmp_path / name for name in ("base", "ft1", "ft2")}
    for path in paths.values():
        path.mkdir()
    text = mergekit_config(LLMMemoryPlan(), "ties", paths)
    assert "merge_method: ties" in text and "density: 0.5" in text and "normalize: true" in text
    config = translate_mergekit_config(yaml.safe_load(text))
    assert config["method"] == "ties" and config["parameters"]["normalize"] is True
    assert config["base"] == str(paths["base"]) and len(config["models"]) == 2


def test_measure_reports_the_peak_of_the_command_alone() -> None:
    # the benchmark process holds a 200 MB tensor; the measured command does not inherit it
    import torch

    held = torch.ones(50_000_000)
    small = measure(["python3", "-c", "pass"], threads=1)
    big = measure(
        ["python3", "-c", "b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096])"], 1
    )
    assert small["peak_rss_mib"] < 100 < 250 < big["peak_rss_mib"]
    assert held.sum() > 0
    with pytest.raises(RuntimeError, match="failed"):
        measure(["python3", "-c", "raise SystemExit(3)"], threads=1)


@pytest.mark.slow
def test_quick_run_writes_a_rendered_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llm_memory.shutil, "which", lambda name: None)  # no mergekit
    plan = quick_plan()
    document = run_llm_memory(plan, tmp_path)
    stored = json.loads((tmp_path / f"{plan.name}.json").read_text())
    assert [run["method"] for run in stored["runs"]] == ["ties", "task_arithmetic"]
    assert all(run["accord"]["peak_rss_mib"] > 0 for run in stored["runs"])
    assert stored["mergekit"] is None and "comparison" not in stored["runs"][0]
    assert "| ties " in render_llm_memory(document)


def _document() -> dict[str, Any]:
    run = {"peak_rss_mib": 900.0, "cpu_seconds": 30.0, "wall_seconds": 31.0}
    kit = {"peak_rss_mib": 2900.0, "cpu_seconds": 100.0, "wall_seconds": 101.0}
    return {
        "command": "accord bench llm-memory",
        "date": "2026-12-07T02:00:00+00:00",
        "machine": {
            "platform": "Linux",
            "processor": "x86_64",
            "cpu_count": 2,
            "torch": "2.13.0",
            "torch_threads": 1,
            "python": "3.11",
            "device": "cpu",
        },
        "seconds": 600.0,
        "plan": {**LLMMemoryPlan().__dict__, "methods": ["ties"]},
        "checkpoint_bytes": 967_000_000,
        "mergekit": "0.1.5",
        "runs": [
            {
                "method": "ties",
                "accord": {"runs": [run], **run},
                "mergekit": {"runs": [kit], **kit},
                "comparison": {
                    "tensors": 3,
                    "entries": 1000,
                    "differing_tensors": 1,
                    "differing_entries": 10,
                    "max_abs_difference": 0.001,
                    "same_names": True,
                },
            }
        ],
    }


def test_render_puts_accord_next_to_mergekit(tmp_path: Path) -> None:
    (tmp_path / "llm-memory.json").write_text(json.dumps(_document()))
    page = render_benchmarks_md(tmp_path)
    assert "## LLM merge memory: `llm-memory`" in page
    row = next(line for line in page.splitlines() if line.startswith("| ties"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:6] == ["ties", "900", "2900", "30.0", "100.0", "0.30"]
    assert "10 differ (1 %)" in cells[6]
    assert "0.97 GB each" in page
