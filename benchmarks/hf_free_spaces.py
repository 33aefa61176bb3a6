"""Free spaces of every Hugging Face family the tests trace (issue 16): per tiny random builder
of ``tests/_hf_models.py`` (seed 0, a batch of 2), how many of its spec's spaces are free.

Prints one line per family and writes ``{family: [free, spaces]}`` as JSON to OUT, so that
two checkouts can be compared (run each with its own ``src`` and ``tests``):

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/hf_free_spaces.py OUT.json [FAMILY ...]
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

import accord

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _hf_models import (  # the tests' builders
    BUILDERS,
    FURTHER_BUILDERS,
    MORE_BUILDERS,
    SURVEY_BUILDERS,
    Logits,
)


def free_spaces(names: list[str]) -> dict[str, list[int]]:
    families = {**BUILDERS, **MORE_BUILDERS, **FURTHER_BUILDERS, **SURVEY_BUILDERS}
    counts = {}
    for name in names or list(families):
        torch.manual_seed(0)
        model, inputs = families[name]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = accord.trace(Logits(model).eval(), inputs(2))
        counts[name] = [len(spec.free_spaces), len(spec.spaces)]
        print(name, *counts[name], flush=True)
    return counts


if __name__ == "__main__":
    out, *names = sys.argv[1:]
    Path(out).write_text(json.dumps(free_spaces(names), indent=1) + "\n")
