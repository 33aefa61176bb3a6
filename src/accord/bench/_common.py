"""What every benchmark records: the machine, the date, and summaries of repeated values."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Platform, processor, CPU count, torch version and threads, and the load average of
    the machine when called: what a timing depends on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
    }
    if hasattr(os, "getloadavg"):  # other processes on the cores inflate every timing
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.startswith("cuda") and torch.cuda.is_available():
        info["accelerator"] = torch.cuda.get_device_name(torch.device(device))
    return info


def today() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def summary(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}``; std is the sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "std": None, "values": []}
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "values": values}


def by_panel(
    results: Sequence[dict[str, Any]],
) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
    """Quality results grouped by (architecture, setting) in first-seen order, sorted by N."""
    panels = dict.fromkeys((r["arch"], r["setting"]) for r in results)
    return [
        (
            panel,
            sorted(
                (r for r in results if (r["arch"], r["setting"]) == panel),
                key=lambda r: r["num_models"],
            ),
        )
        for panel in panels
    ]


def row_names(results: Sequence[dict[str, Any]]) -> list[str]:
    """The row names of some configurations' results, in first-seen order (a row such as
    NP Merge's pairwise scheme exists only for some N)."""
    return list(dict.fromkeys(row["name"] for result in results for row in result["rows"]))


def cell(result: dict[str, Any], name: str, split: str = "test") -> dict[str, Any]:
    """The summary of row ``name`` of one configuration's result on ``split`` (an empty
    summary when that configuration has no such row)."""
    row = next((row for row in result["rows"] if row["name"] == name), None)
    return summary([]) if row is None else row[split]


def _machine(document: Mapping[str, Any]) -> str:
    m = document["machine"]
    extra = f", {m['accelerator']}" if m.get("accelerator") else ""
    if "load_average_1min" in m:
        extra += f"; 1-minute load average {m['load_average_1min']} when the run ended"
    return (
        f"{m['platform']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, Python {m['python']}, device {m['device']}{extra}"
    )


def run_facts(document: Mapping[str, Any], seconds: str) -> list[str]:
    """The lines every benchmark section opens with: command, date, machine, wall time."""
    return [
        f"- command: `{document['command']}`",
        f"- date: {document['date']}",
        f"- machine: {_machine(document)}",
        f"- wall time: {seconds}",
    ]
