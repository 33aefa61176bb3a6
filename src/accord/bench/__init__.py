"""Benchmarks of accord, built only on its public functions.

* :func:`run_quality`: test accuracy of every merge method against N (``accord bench quality``);
* :func:`run_speed`: time and memory of each stage, scaling in N and width, and the precision
  of the statistics (``accord bench speed``);
* :func:`render_benchmarks_md`: BENCHMARKS.md from their JSON (``accord bench markdown``).
"""

from accord.bench.cli import add_bench_parser
from accord.bench.markdown import render_benchmarks_md
from accord.bench.quality import ModelPlan, QualityPlan, Setting, quality_plan, run_quality
from accord.bench.speed import SpeedCase, SpeedPlan, run_speed, speed_plan

__all__ = [
    "ModelPlan",
    "QualityPlan",
    "Setting",
    "SpeedCase",
    "SpeedPlan",
    "add_bench_parser",
    "quality_plan",
    "render_benchmarks_md",
    "run_quality",
    "run_speed",
    "speed_plan",
]
