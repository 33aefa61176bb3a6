"""Matching: one transform per (model, free space) into the merged coordinates.

Each method lives in its own module (``accord/match/<name>.py``, whose docstring carries the
math) and registers its record there with one decorator (:func:`accord.registry.alignment`):
its name, paper, label, what it needs and its options. :func:`match` checks a request
completely, then runs the method.

>>> from accord.match import MATCHERS
>>> info = MATCHERS["cca"]
>>> print(f"needs data: {info.needs.data}, options: {sorted(info.defaults)}")
needs data: True, options: ['absolute_ridge', 'dead_below', 'dead_fallback', 'ridge']
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from accord._finite import first_non_finite
from accord.errors import MergeError
from accord.match._alignment import Alignment
from accord.match._common import block_correlation
from accord.registry import ALIGNMENTS, AlignMethod, check_option_names, lookup
from accord.spec import Spec
from accord.statistics import Statistics

# The alignments' records (:data:`accord.registry.ALIGNMENTS`), by the name accord has exported
MATCHERS = ALIGNMENTS

__all__ = ["MATCHERS", "Alignment", "block_correlation", "match", "matcher"]

# Every method module registers its record when imported: adding one is adding its file.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def match(
    method: str,
    spec: Spec,
    statistics: Statistics | None,
    states: Sequence[Mapping[str, Tensor]],
    *,
    reference: int = 0,
    **options: Any,
) -> Alignment:
    """Align the models' free spaces with ``method`` (a key of :data:`MATCHERS`).

    ``states`` are the models' state dicts (model ``reference`` is the target of star
    methods); ``statistics`` are their activation statistics (:func:`accord.collect_statistics`),
    required by data-driven methods. ``options`` override the method's defaults
    (``MATCHERS[method].defaults``). Everything is checked before any matching starts.
    """
    info = matcher(method)
    check_option_names(info, options)
    resolved = {**info.defaults, **options}
    _check_models(info, spec, statistics, states, reference)
    return info.function(spec, statistics, states, reference, **resolved)


def matcher(method: str) -> AlignMethod:
    """The record of alignment ``method``; MergeError listing the methods (with a suggestion)."""
    return lookup("align", method)


def _check_models(
    info: AlignMethod,
    spec: Spec,
    statistics: Statistics | None,
    states: Sequence[Mapping[str, Tensor]],
    reference: int,
) -> None:
    num_models = len(states)
    if num_models < 1:
        raise MergeError("match needs the state dict of at least one model")
    if isinstance(reference, bool) or not isinstance(reference, int):
        raise MergeError(f"reference={reference!r} must be a model index")
    if not 0 <= reference < num_models:
        raise MergeError(f"reference={reference} is not a model index (0..{num_models - 1})")
    for index, state in enumerate(states):
        found = first_non_finite(state)
        if found is not None:
            raise MergeError(
                f"state dict {index}: tensor {found[0]!r} has {found[1]}; models with NaN or "
                "inf weights cannot be matched"
            )
    if statistics is None:
        if info.needs.data:
            without = sorted(name for name, r in ALIGNMENTS.items() if not r.needs.data)
            raise MergeError(
                f"method {info.name!r} aligns features by their activations and needs data: "
                "collect statistics with accord.collect_statistics(models, spec, data) and pass "
                f"them, or use a method that needs none ({', '.join(without)})"
            )
        return
    _check_statistics(spec, statistics, num_models, reference)


def _check_statistics(spec: Spec, statistics: Statistics, num_models: int, reference: int) -> None:
    if statistics.num_models != num_models:
        raise MergeError(
            f"the statistics describe {statistics.num_models} models, {num_models} state dicts "
            "were given; collect statistics of exactly the models being merged"
        )
    # Two models share their one cross block whichever is the reference.
    if statistics.pairs != "all" and statistics.reference != reference and num_models > 2:
        raise MergeError(
            f"the statistics hold cross-covariances with model {statistics.reference} only; "
            f"match with reference={statistics.reference} or collect them with pairs='all'"
        )
    for space in spec.free_spaces:
        stats = statistics.spaces.get(space.name)
        observed = space.size * space.observed_block
        if stats is not None and stats.size != observed:
            each = "" if observed == space.size else f" of {space.observed_block} entries each"
            raise MergeError(
                f"space {space.name!r} has {space.size} features{each} but its statistics "
                f"have {stats.size}; collect statistics with this spec"
            )
    for kind, group in (("space", statistics.spaces), ("BatchNorm", statistics.norms)):
        for name, stats in group.items():
            found = stats.non_finite()
            if found is not None:
                raise MergeError(
                    f"the statistics of {kind} {name!r} are not finite ({found[0]} has "
                    f"{found[1]}); collect them again from finite models and inputs"
                )
