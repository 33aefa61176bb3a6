"""Speed benchmark: wall time and peak memory of each merge stage, scaling in N and width.

Each case (ResNet20 of one width, N randomly initialised models: speed does not depend on
training; images in inverse proportion to the width) runs in a fresh process, so its memory
peaks start from a clean slate, on one torch thread unless the plan says otherwise (the
CPU-time ratios then hold however other processes share the cores):

* the statistics pass (:func:`accord.collect_statistics` as merges run it: float32 chunk
  products, channels-last convolutions on the CPU, BatchNorms fused into the convolutions
  before them, in-place ReLUs and adds: :mod:`accord.trace.lean`; the same with
  ``precision="float64"``; and the default without the BatchNorm-output blocks, as methods
  whose maps are permutations collect it) against plain ``torch.no_grad`` forward passes of
  the models as given over the same batches (their ratio is the pass's overhead), and
  against accord's own forward
  (``inference_mode``, channels-last on the CPU), in wall time and in CPU time of the
  process, the fastest of ``repeats`` alternated runs (the float64 and spaces-only variants
  run in the first repeat only: they are minutes at width 4). Each pass runs, as in a merge, the
  program exported by the trace (:func:`accord.shared_exports`): exporting is a fixed cost
  of the merge, timed as its trace stage;
* a whole CCA merge, end to end (trace, statistics, match, apply, average, BatchNorm reset),
  alternated with the passes above: its seconds over the plain forward's are what the
  reference's 33.2 s over 19.0 s (1.75×) compare with; its stage times come from
  ``MergeResult.report["timings"]`` (``combine`` = averaging, ``repair`` = BatchNorm reset)
  of the fastest repeat, but its statistics stage (``statistics_in_merge``), which is the
  fastest of its repeats in wall and in CPU seconds (``report["cpu_timings"]``), as the
  standalone passes are; and one NP Merge aligned by CCA reusing the statistics (its
  ``combine`` is the coefficient training);
* memory: resident set size (RSS) sampled every 2 ms in a thread; a stage's peak is the most
  RSS seen during it above the RSS when it started (stage boundaries inside a merge are
  reconstructed from the reported durations, so they are exact to the gaps between stages).
  On a CUDA device (``--device cuda``) the models and batches live on it, every clock read
  waits for its queued kernels, and each pass also reports its peak of allocated device
  memory above what was allocated when it started (``peak_device_mib``).

The precision check compares, on the same activations, accord's shifted one-pass covariances
(float64 and float32 chunk products) with a naive float32 ``E[xxᵀ] − μμᵀ`` accumulated over the
same batches, all against an exact two-pass float64 reference.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import accord
from accord._io import write_json
from accord._layout import channels_last, wants_channels_last
from accord.bench._common import machine_info, today
from accord.bench.precision import precision_check
from accord.errors import AccordError

MIB = 1 << 20
# The CCA Merge reference code measured beside accord (issue #19): the whole merge's seconds
# over the plain forward's are what accord's merge ratio compares with, not rerun here.
REFERENCE = {
    "what": "The CCA Merge reference code, measured beside accord on this 2-core CPU "
    "(ResNet20, the first 10,000 training images, batch 500)",
    "source": "issue #19",
    "forward_seconds": 19.0,
    "merge_seconds": 33.2,
    "target": 0.75,
}
DEFAULT_SAMPLES = 1024
# the collect_statistics variants timed, by name ("default": as merges collect them)
STATISTICS_PASSES: dict[str, dict[str, Any]] = {
    "default": {},
    "float64": {"precision": "float64"},
    "spaces_only": {"batchnorms": False},
}
# each pass's name among the stages
STAGE_NAMES = {
    "default": "statistics",
    "float64": "statistics_float64",
    "spaces_only": "statistics_spaces_only",
}


@dataclass(frozen=True)
class SpeedCase:
    """N models of one architecture and width."""

    arch: str
    width: float
    models: int
    # images per pass; None: the plan's
    samples: int | None = None


@dataclass(frozen=True)
class SpeedPlan:
    """The cases and the data of one speed run; written into its JSON."""

    dataset: str
    samples: int
    batch_size: int
    cases: tuple[SpeedCase, ...]
    ridge: float
    command: str
    repeats: int = 2
    isolate: bool = True
    # the statistics passes run the program the trace exported, as in a merge (files written
    # before this field existed re-exported in every pass)
    export_shared: bool = True
    device: str = "cpu"
    # torch threads of each case's process (None: torch's default): CPU seconds of one thread
    # do not count the other threads' waits, which grow when other processes share the cores
    threads: int | None = 1


def speed_plan(
    dataset: str | None = None, samples: int | None = None, device: str = "cpu"
) -> SpeedPlan:
    """ResNet20: N = 2, 4, 8 at width 1, and widths 1, 2, 4 at N = 2, on ``device``; each
    width over images in inverse proportion to it (twice ``samples`` at width 1, half at
    width 4), so the pass of the smallest models is seconds long, not one second of noise."""
    samples = samples or DEFAULT_SAMPLES
    by_models = [SpeedCase("resnet20", 1, n, 2 * samples) for n in (2, 4, 8)]
    by_width = [SpeedCase("resnet20", w, 2, round(2 * samples / w)) for w in (2, 4)]
    return SpeedPlan(
        dataset=dataset or accord.default_dataset(),
        samples=samples,
        batch_size=256,
        cases=(*by_models, *by_width),
        ridge=accord.ALIGNMENTS["cca"].defaults["ridge"],
        command="accord bench speed" + ("" if device == "cpu" else f" --device {device}"),
        device=device,
    )


def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int | None:
    """This process's resident set size in bytes (None where /proc is unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * _page_size()
    except (OSError, IndexError, ValueError):
        return None


class MemorySampler:
    """Samples RSS every ``interval`` seconds in a daemon thread while it runs."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = current_rss()
            if rss is not None:
                self.samples.append((time.perf_counter(), rss))
            time.sleep(self.interval)

    def __enter__(self) -> MemorySampler:
        rss = current_rss()
        if rss is not None:  # a first sample before anything is measured
            self.samples.append((time.perf_counter(), rss))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_above(self, start: float, stop: float) -> float | None:
        """MiB of the highest RSS in [start, stop] above the last RSS seen at ``start``."""
        before = [rss for t, rss in self.samples if t <= start]
        during = [rss for t, rss in self.samples if start <= t <= stop]
        if not before or not during:
            return None
        return max(0, max(during) - before[-1]) / MIB


def _models(case: SpeedCase, data: accord.DataSplits, device: str) -> list[nn.Module]:
    models = []
    for seed in range(case.models):
        torch.manual_seed(seed)
        models.append(
            accord.build_model(
                case.arch,
                width=case.width,
                in_channels=data.in_channels,
                image_size=data.image_size,
                num_classes=data.num_classes,
            )
            .to(device)
            .eval()
        )
    return models


def _batches(
    plan: SpeedPlan, data: accord.DataSplits, samples: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``samples`` (default: the plan's) training images and labels, in batches."""
    images, labels = data.train[torch.arange(samples or plan.samples)]
    images, labels = images.to(plan.device), labels.to(plan.device)
    return list(zip(images.split(plan.batch_size), labels.split(plan.batch_size), strict=True))


@contextmanager
def _stopwatch(into: dict[str, float], device: torch.device) -> Iterator[None]:
    """Wall-clock ``start``/``stop`` and ``cpu`` seconds of this process (all its threads):
    CPU time hardly moves when other processes share the cores, wall time does. On CUDA the
    clocks are read once the device has run what was queued, and ``device_mib`` is the peak
    of allocated device memory above the allocation at the start."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    wall, cpu = time.perf_counter(), time.process_time()
    into["start"] = wall
    yield
    if cuda:
        torch.cuda.synchronize(device)
    into["stop"] = time.perf_counter()
    into["cpu"] = time.process_time() - cpu
    if cuda:
        into["device_mib"] = (torch.cuda.max_memory_allocated(device) - allocated) / MIB


def forward_pass(
    models: Sequence[nn.Module], batches: Sequence[Any], progress: bool, fast: bool = False
) -> dict[str, float]:
    """Wall and CPU seconds of forward passes of every model over every batch: plain ones
    (``torch.no_grad``, the models as given), or with ``fast`` accord's (``inference_mode``,
    channels-last convolutions on the CPU: :mod:`accord._layout`)."""
    device = batches[0][0].device
    layout = channels_last(models, fast and wants_channels_last(device))
    with layout, torch.inference_mode() if fast else torch.no_grad():
        for model in models:  # warm-up: the first call allocates and picks kernels
            model(batches[0][0])
        clock: dict[str, float] = {}
        with _stopwatch(clock, device):
            for inputs, _ in tqdm(batches, desc="forward", leave=False, disable=not progress):
                for model in models:
                    model(inputs)
    return _timing(clock)


def _timing(clock: dict[str, float]) -> dict[str, float]:
    timing = {"seconds": clock["stop"] - clock["start"], "cpu_seconds": clock["cpu"]}
    if "device_mib" in clock:
        timing["peak_device_mib"] = clock["device_mib"]
    return timing


def _merge_stages(
    sampler: MemorySampler, start: float, timings: dict[str, float], names: dict[str, str]
) -> dict[str, dict[str, float | None]]:
    """Per reported stage (renamed by ``names``; others skipped): seconds and peak RSS."""
    stages, clock = {}, start
    for stage, seconds in timings.items():
        if stage in names:
            peak = sampler.peak_above(clock, clock + seconds)
            stages[names[stage]] = {"seconds": seconds, "peak_rss_mib": peak}
        clock += seconds
    return stages


def _fastest(passes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of the repeats (for each of wall and CPU time): other processes on the
    cores only ever slow a pass down. Every repeat is kept too."""
    fastest: dict[str, Any] = {
        "seconds": min(p["seconds"] for p in passes),
        "cpu_seconds": min(p["cpu_seconds"] for p in passes),
    }
    for peak in ("peak_rss_mib", "peak_device_mib"):
        peaks = [p[peak] for p in passes if p.get(peak) is not None]
        if peaks:
            fastest[peak] = max(peaks)
    return {**fastest, "repeats": list(passes)}


def _passes(
    plan: SpeedPlan,
    models: list[nn.Module],
    batches: list[Any],
    spec: accord.Spec,
    sampler: MemorySampler,
    progress: bool,
) -> tuple[dict[str, dict[str, Any]], accord.Statistics, dict[str, Any]]:
    """Both forward passes, the statistics passes of :data:`STATISTICS_PASSES` and a whole
    CCA merge, alternated ``plan.repeats`` times: the fastest of each (by name: ``forward``,
    ``forward_fast``, the passes', ``merge``), the default statistics, and the fastest
    merge's stages."""
    runs: dict[str, list[dict[str, Any]]] = {}
    merges: list[tuple[float, float, dict[str, float]]] = []
    in_merge: list[dict[str, float]] = []
    device = torch.device(plan.device)
    for repeat in range(plan.repeats):
        runs.setdefault("forward", []).append(forward_pass(models, batches, progress))
        runs.setdefault("forward_fast", []).append(forward_pass(models, batches, progress, True))
        # as in a merge, the passes run the program its trace exported (untimed here: the
        # merge below times it as its trace stage)
        with accord.shared_exports():
            accord.trace(models[0], batches[0][0][:2])
            for name, arguments in STATISTICS_PASSES.items():
                if repeat and name != "default":  # the other variants once: minutes at w4
                    continue
                window: dict[str, float] = {}
                with _stopwatch(window, device):
                    stats = accord.collect_statistics(
                        models, batches, spec, device=plan.device, progress=progress, **arguments
                    )
                peak = sampler.peak_above(window["start"], window["stop"])
                runs.setdefault(name, []).append({**_timing(window), "peak_rss_mib": peak})
                if name == "default":
                    kept = stats
        window = {}
        with _stopwatch(window, device):  # no spec, no statistics: every stage runs
            cca = accord.merge(
                models, batches, "cca", repair="bn-reset", device=plan.device, ridge=plan.ridge
            )
        runs.setdefault("merge", []).append(_timing(window))
        merges.append((window["cpu"], window["start"], cca.report["timings"]))
        in_merge.append(
            {
                "seconds": cca.report["timings"]["statistics"],
                "cpu_seconds": cca.report["cpu_timings"]["statistics"],
            }
        )
    _, start, timings = min(merges, key=lambda merge: merge[0])
    names = {n: n for n in ("trace", "match", "apply", "repair")} | {"combine": "average"}
    stages = _merge_stages(sampler, start, timings, names)
    # the fastest of the repeats, as the standalone passes are: one merge's wall seconds
    # against the standalone pass's best of several read as an extra cost of the merge
    stages["statistics_in_merge"] = _fastest(in_merge)
    return {name: _fastest(r) for name, r in runs.items()}, kept, stages


def _over(timing: Mapping[str, float], base: Mapping[str, float]) -> dict[str, float]:
    return {
        "wall": timing["seconds"] / base["seconds"],
        "cpu": timing["cpu_seconds"] / base["cpu_seconds"],
    }


def run_case(plan: SpeedPlan, case: SpeedCase, progress: bool = False) -> dict[str, Any]:
    """Time and measure every stage of one case (see the module docstring)."""
    if plan.threads is not None and plan.device == "cpu":
        torch.set_num_threads(plan.threads)
    data = accord.load_dataset(plan.dataset)
    models, batches = _models(case, data, plan.device), _batches(plan, data, case.samples)
    spec = accord.trace(models[0], batches[0][0][:2])
    with MemorySampler() as sampler:
        runs, stats, merge_stages = _passes(plan, models, batches, spec, sampler, progress)
        stages: dict[str, dict[str, Any]] = {STAGE_NAMES[p]: runs[p] for p in STATISTICS_PASSES}
        stages.update(merge_stages)
        common = {"spec": spec, "statistics": stats, "repair": "bn-reset", "device": plan.device}
        start = time.perf_counter()
        # aligned by CCA, whose statistics these are
        npm = accord.merge(models, batches, "npmerge", align="cca", **common, ridge=plan.ridge)
        names = {"combine": "npmerge_training"}
        stages.update(_merge_stages(sampler, start, npm.report["timings"], names))
    forward = runs["forward"]
    return {
        **asdict(case),
        "parameters_per_model": sum(p.numel() for p in models[0].parameters()),
        "samples": sum(len(x) for x, _ in batches),
        "threads": torch.get_num_threads(),
        "forward": forward,
        "forward_fast": runs["forward_fast"],
        "statistics_over_forward": {p: _over(runs[p], forward) for p in STATISTICS_PASSES},
        "statistics_over_forward_fast": {
            p: _over(runs[p], runs["forward_fast"]) for p in STATISTICS_PASSES
        },
        "merge": runs["merge"],
        "merge_over_forward": _over(runs["merge"], forward),
        "stages": stages,
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _isolated(plan: SpeedPlan, case: SpeedCase, progress: bool) -> dict[str, Any]:
    """:func:`run_case` in a fresh Python process (clean memory peaks), or here.

    A plain interpreter rather than multiprocessing: it needs no ``__main__`` guard in the
    caller's script. The request goes in on stdin, the result comes back on stdout.
    """
    if not plan.isolate:
        return run_case(plan, case, progress)
    request = json.dumps({"plan": asdict(plan), "case": asdict(case), "progress": progress})
    code = "import accord.bench.speed as s; s.case_from_stdin()"
    done = subprocess.run(
        [sys.executable, "-c", code], input=request, stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        raise AccordError(f"speed case {case} failed in its process (exit {done.returncode})")
    return json.loads(done.stdout)


def case_from_stdin() -> None:
    """The child side of :func:`_isolated`: run the case read from stdin, print its JSON."""
    request = json.loads(sys.stdin.read())
    plan = request["plan"]
    plan = SpeedPlan(**{**plan, "cases": tuple(SpeedCase(**c) for c in plan["cases"])})
    result = run_case(plan, SpeedCase(**request["case"]), request["progress"])
    print(json.dumps(result))


def run_speed(
    plan: SpeedPlan, out: str | os.PathLike[str], *, progress: bool = True
) -> dict[str, Any]:
    """Run every case and the precision check; write ``out/speed.json``."""
    start = time.perf_counter()
    cases = []
    for case in tqdm(plan.cases, desc="speed cases", disable=not progress):
        cases.append(_isolated(plan, case, progress))
    first = plan.cases[0]
    precision = precision_check(plan.dataset, first.arch, first.width, plan.samples, progress)
    document = {
        "benchmark": "speed",
        "command": plan.command,
        "date": today(),
        "machine": machine_info(plan.device),
        "config": asdict(plan),
        "seconds": time.perf_counter() - start,
        "cases": cases,
        "reference": REFERENCE,
        "precision": precision,
    }
    write_json(Path(out) / "speed.json", document)
    return document
