"""``accord bench``: the quality, speed and skill-transfer benchmarks, and BENCHMARKS.md from
their results."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from accord._io import write_text
from accord.bench.llm_memory import LLMMemoryPlan, quick_plan, run_llm_memory
from accord.bench.markdown import render_benchmarks_md
from accord.bench.quality import only_settings, quality_plan, quality_progress, run_quality
from accord.bench.resume import Budget
from accord.bench.select import run_select, select_plan
from accord.bench.skill import run_skill, skill_plan
from accord.bench.speed import DEFAULT_SAMPLES, run_speed, speed_plan

RESULTS = "benchmarks/results"


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``accord bench quality | speed | skill | select | llm-memory | markdown`` to the
    ``accord`` subparsers ``sub``."""
    p = sub.add_parser(
        "bench",
        help="benchmarks: quality, speed, skill transfer, checkpoint selection, LLM merge "
        "memory (JSON + figures), and BENCHMARKS.md from them",
    )
    kinds = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    q = kinds.add_parser(
        "quality",
        help="accuracy of every merge method against N models (trains models into --store)",
    )
    q.add_argument("--quick", action="store_true", help="the small plan: minutes on 2 cores")
    q.add_argument("--sets", type=int, default=None, help="independent model sets (seed ranges)")
    q.add_argument("--dataset", default=None, help="default: Fashion-MNIST, else digits")
    q.add_argument(
        "--settings",
        default=None,
        help="comma-separated data settings, e.g. iid or classes,80-20 [all the plan's]",
    )
    q.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no configuration after this many minutes; run again to continue",
    )
    q.add_argument(
        "--max-configurations",
        type=int,
        default=None,
        help="run at most this many configurations (model sets); run again to continue",
    )
    q.add_argument(
        "--status",
        action="store_true",
        help="say which configurations are done and which remain; run nothing",
    )
    q.add_argument(
        "--fresh", action="store_true", help="run every configuration again, even those done"
    )
    q.set_defaults(func=_cmd_quality)
    s = kinds.add_parser("speed", help="time and memory of each stage; scaling in N and width")
    s.add_argument("--samples", type=int, default=None, help=f"images per pass [{DEFAULT_SAMPLES}]")
    s.add_argument("--dataset", default=None, help="default: Fashion-MNIST, else digits")
    s.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each case on a CPU; 0: torch's default [1]",
    )
    s.set_defaults(func=_cmd_speed)
    k = kinds.add_parser(
        "skill",
        help="transfer of a task vector (addition) to a diverged receiver, with and without "
        "alignment (trains tiny Llamas into --store)",
    )
    k.add_argument("--quick", action="store_true", help="the small plan: minutes on one core")
    k.set_defaults(func=_cmd_skill)
    for command in (q, k):
        command.add_argument(
            "--store",
            default=os.environ.get("ACCORD_STORE", "models"),
            help="model store folder [%(default)s]",
        )
    for command in (q, s, k):
        command.add_argument("--out", default=RESULTS, help="results folder [%(default)s]")
        command.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--device", default="cpu", help="torch device for training and merging")
    s.add_argument("--device", default="cpu", help="torch device for the models and passes")
    q.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    _add_select(kinds)
    _add_llm_memory(kinds)
    m = kinds.add_parser("markdown", help="write BENCHMARKS.md from the results JSON")
    m.add_argument("--results", default=RESULTS, help="results folder [%(default)s]")
    m.add_argument("--out", default="BENCHMARKS.md", help="Markdown file [%(default)s]")
    m.set_defaults(func=_cmd_markdown)
    return p


def _add_select(kinds: Any) -> None:
    e = kinds.add_parser(
        "select",
        help="do experts' early checkpoints merge better? (task arithmetic, TIES; one thread)",
    )
    e.add_argument("--quick", action="store_true", help="the small plan: seconds")
    e.add_argument("--dataset", default="digits", help="[%(default)s]")
    e.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    e.add_argument(
        "--store",
        default=os.environ.get("ACCORD_STORE", "models"),
        help="model store folder [%(default)s]",
    )
    e.add_argument("--out", default=RESULTS, help="results folder [%(default)s]")
    e.set_defaults(func=_cmd_select)


def _add_llm_memory(kinds: Any) -> None:
    e = kinds.add_parser(
        "llm-memory",
        help="peak memory and CPU time of accord llm-merge next to mergekit-yaml (3 x 0.97 GB "
        "Llamas; minutes)",
    )
    e.add_argument("--quick", action="store_true", help="tiny checkpoints: seconds")
    e.add_argument(
        "--mergekit", default=None, help="mergekit-yaml to compare with [the one on the PATH]"
    )
    e.add_argument(
        "--repeats", type=int, default=1, help="runs of each merge (best kept) [%(default)s]"
    )
    e.add_argument("--out", default=RESULTS, help="results folder [%(default)s]")
    e.set_defaults(func=_cmd_llm_memory)


def _cmd_llm_memory(args: argparse.Namespace) -> int:
    plan = replace(quick_plan() if args.quick else LLMMemoryPlan(), repeats=args.repeats)
    command = "accord bench llm-memory" + (" --quick" if args.quick else "")
    if args.repeats != 1:
        command += f" --repeats {args.repeats}"
    if args.mergekit:
        command += f" --mergekit {args.mergekit}"
    document = run_llm_memory(plan, args.out, mergekit=args.mergekit, command=command)
    print(f"llm-memory: {document['seconds']:.0f} s; written to {args.out}/{plan.name}.json")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    plan = select_plan(args.quick, args.dataset)
    document = run_select(plan, args.store, args.out, data_dir=args.data_dir)
    print(f"select: {document['seconds']:.0f} s; written to {args.out}/{plan.name}.json")
    return 0


def _cmd_quality(args: argparse.Namespace) -> int:
    plan = quality_plan(args.quick, args.dataset, args.sets)
    if args.settings:
        plan = only_settings(plan, args.settings.split(","))
    plan = replace(plan, data_dir=args.data_dir)
    if args.status:
        state = quality_progress(plan, args.out, args.device)
        total = len(state.done) + len(state.remaining)
        print(f"quality {plan.name}: {len(state.done)} of {total} configurations done")
        for unit in state.remaining:
            print(f"  to do: {unit.label}")
        return 0
    budget = Budget(args.max_minutes, args.max_configurations)
    document = run_quality(
        plan,
        args.store,
        args.out,
        device=args.device,
        progress=not args.quiet,
        budget=budget,
        fresh=args.fresh,
    )
    done, total = document["units"]["done"], document["units"]["total"]
    path = f"{args.out}/{plan.name}.json"
    if document["complete"]:
        print(f"quality: all {total} configurations done; written to {path}")
    else:
        print(
            f"quality: stopped with {done} of {total} configurations done (partial results "
            f"in {path}); {total - done} remain: run the same command again to continue"
        )
    return 0


def _cmd_speed(args: argparse.Namespace) -> int:
    plan = replace(
        speed_plan(args.dataset, args.samples, args.device), threads=args.threads or None
    )
    document = run_speed(plan, args.out, progress=not args.quiet)
    print(f"speed: {document['seconds']:.0f} s; written to {args.out}/speed.json")
    return 0


def _cmd_skill(args: argparse.Namespace) -> int:
    plan = skill_plan(args.quick)
    document = run_skill(plan, args.store, args.out, progress=not args.quiet)
    print(f"skill: {document['seconds']['total']:.0f} s; written to {args.out}/{plan.name}.json")
    return 0


def _cmd_markdown(args: argparse.Namespace) -> int:
    out = Path(args.out)
    link = Path(os.path.relpath(Path(args.results), out.parent or Path("."))).as_posix()
    write_text(out, render_benchmarks_md(args.results, link=link))
    print(f"written to {out}")
    return 0
