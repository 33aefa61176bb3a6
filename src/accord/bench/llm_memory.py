"""``accord bench llm-memory``: peak resident memory and CPU time of ``accord llm-merge`` next
to mergekit's ``mergekit-yaml``, on the same checkpoints and the same mergekit YAML configs.

Three random Llama checkpoints are written by ``save_pretrained`` in bfloat16 (a base and two
fine-tunes, base + small noise; about 0.97 GB each at the default sizes) into a temporary
folder; each merge runs in a fresh process, whose peak RSS and user + system CPU time come
from ``os.wait4`` (its waited-for children included). mergekit is run when ``--mergekit``
names its ``mergekit-yaml`` (or one is on the PATH), and its outputs are compared with
accord's tensor by tensor: the count of entries that differ and the largest difference.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from accord._io import write_text
from accord._table import format_table
from accord.bench._common import machine_info, run_facts, today

# Each method's mergekit config: the models' parameters and the global ones.
CONFIGS: dict[str, dict[str, Any]] = {
    "ties": {"model": {"weight": 0.5, "density": 0.5}, "global": {"normalize": True}},
    "task_arithmetic": {"model": {"weight": 0.5}, "global": {}},
}


@dataclass(frozen=True)
class LLMMemoryPlan:
    """The checkpoints' Llama sizes (defaults: about 0.97 GB in bfloat16 each), the noise of
    the fine-tunes (times each base tensor's standard deviation), the methods, the compute
    and output dtypes of the configs, and the threads of each merge process."""

    name: str = "llm-memory"
    vocab: int = 32000
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 8
    heads: int = 32
    kv_heads: int = 4
    noise: float = 0.1
    methods: tuple[str, ...] = ("ties", "task_arithmetic")
    dtype: str = "float32"
    out_dtype: str = "bfloat16"
    threads: int = 1
    repeats: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def quick_plan() -> LLMMemoryPlan:
    """A tiny plan (seconds): the same steps on small checkpoints, for tests."""
    return LLMMemoryPlan(
        name="llm-memory-quick",
        vocab=512,
        hidden=64,
        intermediate=160,
        layers=2,
        heads=4,
        kv_heads=2,
    )


def build_checkpoints(plan: LLMMemoryPlan, folder: Path) -> dict[str, Path]:
    """The base and two fine-tunes (base + noise) of ``plan``'s Llama, by ``save_pretrained``
    in bfloat16, under ``folder``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=plan.vocab,
        hidden_size=plan.hidden,
        intermediate_size=plan.intermediate,
        num_hidden_layers=plan.layers,
        num_attention_heads=plan.heads,
        num_key_value_heads=plan.kv_heads,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    paths = {name: folder / name for name in ("base", "ft1", "ft2")}
    model.save_pretrained(paths["base"])
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    for seed, name in enumerate(("ft1", "ft2"), start=1):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.named_parameters():
                origin = base[key].float()
                scale = plan.noise * float(origin.std()) if origin.numel() > 1 else plan.noise
                noise = torch.randn(origin.shape, generator=generator) * max(scale, 1e-3)
                param.copy_(origin + noise)
        model.save_pretrained(paths[name])
    return paths


def mergekit_config(plan: LLMMemoryPlan, method: str, paths: Mapping[str, Path]) -> str:
    """The mergekit YAML both tools run for ``method``."""
    settings = CONFIGS[method]
    lines = [f"merge_method: {method}", f"base_model: {paths['base']}", "models:"]
    for name in ("ft1", "ft2"):
        lines += [f"  - model: {paths[name]}", "    parameters:"]
        lines += [f"      {key}: {value}" for key, value in settings["model"].items()]
    if settings["global"]:
        lines.append("parameters:")
        lines += [f"  {key}: {str(v).lower()}" for key, v in settings["global"].items()]
    lines += [f"dtype: {plan.dtype}", f"out_dtype: {plan.out_dtype}"]
    return "\n".join(lines) + "\n"


# Runs the command given as its arguments and prints the rusage of that one process. A child's
# ru_maxrss starts at the high-water mark of the memory it was forked with, so the measured
# command is forked from this small launcher, never from the large benchmark process.
_LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(process.pid, 0)
print(json.dumps({
    "status": os.waitstatus_to_exitcode(status),
    "peak_rss_mib": usage.ru_maxrss / 1024,
    "cpu_seconds": usage.ru_utime + usage.ru_stime,
    "wall_seconds": time.perf_counter() - start,
}))
"""


def measure(command: Sequence[str], threads: int) -> dict[str, Any]:
    """Run ``command`` in a fresh process: its peak RSS (MiB; Linux's ``ru_maxrss``), user +
    system CPU seconds and wall seconds; RuntimeError with its last output if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *command],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    measured = json.loads(lines[-1]) if done.returncode == 0 and lines else {"status": -1}
    if measured.pop("status") != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return measured


def compare_outputs(first: Path, second: Path) -> dict[str, Any]:
    """Tensor by tensor: how many entries differ between two checkpoints, the largest
    difference, and the tensors that differ (in float32)."""
    from accord.checkpoint import open_checkpoint

    one, two = open_checkpoint(first).state, open_checkpoint(second).state
    differing, entries, largest, total = [], 0, 0.0, 0
    for name in one:
        a, b = one[name].float(), two[name].float()
        count = int((a != b).sum())
        total += a.numel()
        if count:
            differing.append(name)
            entries += count
            largest = max(largest, float((a - b).abs().max()))
    return {
        "tensors": len(list(one)),
        "entries": total,
        "differing_tensors": len(differing),
        "differing_entries": entries,
        "max_abs_difference": largest,
        "same_names": sorted(one) == sorted(two),
    }


def _accord_command(config: Path, out: Path) -> list[str]:
    main = "import sys; from accord.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", main, "llm-merge", str(config), str(out), "--quiet"]


def _mergekit_command(mergekit: str, config: Path, out: Path) -> list[str]:
    return [mergekit, str(config), str(out), "--quiet", "--no-cuda"]


def find_mergekit(given: str | None) -> str | None:
    """``mergekit-yaml``: ``given``, else the one on the PATH, else None."""
    return given if given else shutil.which("mergekit-yaml")


def run_llm_memory(
    plan: LLMMemoryPlan,
    out: str | os.PathLike[str],
    *,
    mergekit: str | None = None,
    command: str = "accord bench llm-memory",
) -> dict[str, Any]:
    """Build the checkpoints, run each method with accord (and mergekit when found) in fresh
    processes, compare their outputs, and write ``<out>/<plan.name>.json``."""
    begun = time.perf_counter()
    mergekit = find_mergekit(mergekit)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="accord-llm-memory-") as temporary:
        folder = Path(temporary)
        paths = build_checkpoints(plan, folder)
        checkpoint_bytes = sum(p.stat().st_size for p in paths["base"].glob("*.safetensors"))
        for method in plan.methods:
            config = folder / f"{method}.yml"
            config.write_text(mergekit_config(plan, method, paths), encoding="utf-8")
            outputs = {"accord": folder / f"accord-{method}", "mergekit": folder / f"mk-{method}"}
            tools = {"accord": _accord_command(config, outputs["accord"])}
            if mergekit is not None:
                tools["mergekit"] = _mergekit_command(mergekit, config, outputs["mergekit"])
            entry: dict[str, Any] = {"method": method, "config": config.read_text()}
            for tool, argv in tools.items():
                measured = []
                for _ in range(plan.repeats):
                    shutil.rmtree(outputs[tool], ignore_errors=True)
                    measured.append(measure(argv, plan.threads))
                entry[tool] = {"runs": measured, **_best(measured)}
            if mergekit is not None:
                entry["comparison"] = compare_outputs(outputs["accord"], outputs["mergekit"])
            runs.append(entry)
    document = {
        "command": command,
        "date": today(),
        "machine": machine_info(),
        "seconds": time.perf_counter() - begun,
        "plan": asdict(plan),
        "checkpoint_bytes": checkpoint_bytes,
        "mergekit": _mergekit_version(mergekit),
        "runs": runs,
    }
    write_text(Path(out) / f"{plan.name}.json", json.dumps(document, indent=2) + "\n")
    return document


def _best(measured: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The smallest peak and CPU time over repeats (what the noise of other processes adds
    to, never takes from)."""
    return {
        "peak_rss_mib": min(m["peak_rss_mib"] for m in measured),
        "cpu_seconds": min(m["cpu_seconds"] for m in measured),
        "wall_seconds": min(m["wall_seconds"] for m in measured),
    }


def _mergekit_version(mergekit: str | None) -> str | None:
    """mergekit's version, read with the Python of its ``mergekit-yaml``."""
    if mergekit is None:
        return None
    python = Path(mergekit).with_name("python")
    if not python.exists():
        return "unknown"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"]
    done = subprocess.run(probe, capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def render_llm_memory(document: Mapping[str, Any]) -> str:
    """The BENCHMARKS.md section of one llm-memory run."""
    plan = document["plan"]
    gb = document["checkpoint_bytes"] / 1e9
    rows = []
    for entry in document["runs"]:
        accord = entry["accord"]
        kit = entry.get("mergekit")
        compared = entry.get("comparison")
        rows.append(
            [
                entry["method"],
                f"{accord['peak_rss_mib']:.0f}",
                f"{kit['peak_rss_mib']:.0f}" if kit else "-",
                f"{accord['cpu_seconds']:.1f}",
                f"{kit['cpu_seconds']:.1f}" if kit else "-",
                f"{accord['cpu_seconds'] / kit['cpu_seconds']:.2f}" if kit else "-",
                _difference(compared),
            ]
        )
    headers = [
        "method",
        "accord peak RSS (MiB)",
        "mergekit peak RSS (MiB)",
        "accord CPU (s)",
        "mergekit CPU (s)",
        "CPU ratio",
        "outputs",
    ]
    lines = [
        f"## LLM merge memory: `{document['plan']['name']}`",
        "",
        *run_facts(document, f"{document['seconds']:.0f} s"),
        f"- checkpoints: three random Llamas ({plan['layers']} layers, hidden {plan['hidden']}, "
        f"MLP {plan['intermediate']}, vocabulary {plan['vocab']}, untied head), "
        f"{gb:.2f} GB each in bfloat16 by `save_pretrained`: a base and two fine-tunes "
        f"(base + Gaussian noise of {plan['noise']:g} times each tensor's standard deviation)",
        f"- configs: mergekit YAML, run unchanged by both tools (`accord llm-merge CONFIG OUT`, "
        f"`mergekit-yaml CONFIG OUT`, mergekit {document['mergekit'] or 'not installed'}), "
        f"`dtype: {plan['dtype']}`, `out_dtype: {plan['out_dtype']}`; each merge in a fresh "
        f"process with {plan['threads']} thread(s), the best of {plan['repeats']} run(s)",
        "",
        "Peak resident memory (MiB, `ru_maxrss` of the process, Python and torch included) and "
        "CPU time (user + system) of the whole command; *CPU ratio*: accord's over mergekit's; "
        "*outputs*: entries of accord's output that differ from mergekit's. TIES: mergekit's "
        "argsort orders the entries that tie at a density threshold arbitrarily, accord by "
        "position, and bfloat16 task vectors tie often, so the two may keep different entries "
        "there. mergekit with `dtype: float32` holds the models' tensors in float32; accord "
        "merges a block of rows at a time.",
        "",
        format_table(headers, rows, True),
    ]
    return "\n".join(lines)


def _difference(compared: Mapping[str, Any] | None) -> str:
    if compared is None:
        return "-"
    if not compared["differing_entries"]:
        return "identical"
    share = compared["differing_entries"] / compared["entries"]
    return (
        f"{compared['differing_entries']:,} differ ({100 * share:.2g} %), max "
        f"{compared['max_abs_difference']:.2g}"
    )
