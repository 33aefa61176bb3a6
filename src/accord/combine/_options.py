"""Options that several combiners share, each written once: the per-model ``weight``,
``density``, ``drop_rate``, ``epsilon`` and ``gamma``, the scale ``λ``, ``normalize`` and the
``rescale`` of pruned entries (whose default and choices differ per combiner)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accord.registry import FINITE, FRACTION, PROBABILITY, Needs, Option

WEIGHT = Option("weight", float, 1.0, "each model's weight", FINITE, per_model=True)
SCALE = Option("scale", float, 1.0, "λ multiplying the merged task vector", FINITE)
DENSITY = Option(
    "density",
    float,
    0.2,
    "fraction of entries kept",
    FRACTION,
    grid=(0.1, 0.2, 0.5),
    per_model=True,
    why="it is the share of each task vector's entries kept: 0 would keep none",
)
DROP_RATE = Option(
    "drop_rate",
    float,
    0.9,
    "probability of a drop",
    PROBABILITY,
    grid=(0.5, 0.9),
    per_model=True,
    why="it is a probability, and the kept entries are rescaled by 1/(1 − drop_rate), which "
    "1 would divide by 0",
)
EPSILON = Option(
    "epsilon",
    float,
    0.15,
    "keep probabilities spread over density ± epsilon",
    PROBABILITY,
    per_model=True,
)
GAMMA = Option(
    "gamma", float, 0.01, "fraction of largest entries dropped", PROBABILITY, per_model=True
)
# The rescalings of randomly pruned entries; the first is the default.
RANDOM_RESCALES = ("expectation", "l1", "none")
MAGNITUDE_RESCALES = ("none", "l1")

TASK_VECTORS = Needs(base="yes")


def model_value(value: float | Sequence[float], i: int) -> float:
    """Model ``i``'s value of a per-model option given as one value for all or one per model."""
    return float(value if isinstance(value, (int, float)) else value[i])


def value_problem(option: Option, value: Any) -> str | None:
    """``name=value: expected …`` when ``value`` is not valid for ``option``, else None: how the
    public functions (:func:`accord.combine.della.della`, ...), called without their record,
    check their arguments against it."""
    problem = option.problem(value)
    return None if problem is None else f"{option.name}={value}: {problem}"


def check_value(option: Option, value: Any) -> None:
    """ValueError when ``value`` is not valid for ``option`` (see :func:`value_problem`)."""
    problem = value_problem(option, value)
    if problem is not None:
        raise ValueError(problem)


def normalize(default: bool) -> Option:
    """``normalize``: divide by the (agreeing) weights' sum."""
    return Option("normalize", bool, default, "divide by the (agreeing) weights' sum")


# ``normalize`` of a combiner whose variants differ in its default
# (:func:`accord.combine._variants.register_variants` gives each variant its own).
NORMALIZE = normalize(False)


def rescale(choices: tuple[str, ...]) -> Option:
    """``rescale`` of the pruned entries, ``choices[0]`` by default."""
    return Option("rescale", str, choices[0], "rescaling of the kept entries", choices=choices)
