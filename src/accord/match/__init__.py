"""Matching: one transform per (model, free space) into the merged coordinates.

Each method lives in its own module (``accord/match/<name>.py``, whose docstring carries the
math) and registers itself with one decorator line (:func:`register`): its name, paper,
whether it needs activation statistics, and its options with their defaults. :func:`match`
checks a request completely, then runs the method.

>>> from accord.match import MATCHERS
>>> for name, info in sorted(MATCHERS.items()):
...     print(f"{name:16} needs data: {info.needs_data!s:5} options: {info.options}")
cca              needs data: True  options: {'ridge': 0.1, 'absolute_ridge': None}
identity         needs data: False options: {}
ot               needs data: True  options: {}
permutation      needs data: True  options: {}
weight_matching  needs data: False options: {'seed': 0, 'max_iter': 100}
zipit            needs data: True  options: {'alpha': 0.3, 'beta': 0.125}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from accord._finite import first_non_finite
from accord.errors import MergeError, did_you_mean
from accord.match import cca, identity, ot, permutation, weight_matching, zipit
from accord.match._registry import MATCHERS, Alignment, MatcherInfo, register
from accord.spec import Spec
from accord.statistics import Statistics

# The method modules register themselves when imported.
__all__ = [
    "MATCHERS",
    "Alignment",
    "MatcherInfo",
    "cca",
    "check_option_names",
    "identity",
    "match",
    "ot",
    "permutation",
    "register",
    "weight_matching",
    "zipit",
]


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
    (``MATCHERS[method].options``). Everything is checked before any matching starts.
    """
    info = matcher(method)
    resolved = _resolve_options(info, options)
    _check_models(info, spec, statistics, states, reference)
    return info.function(spec, statistics, states, reference, **resolved)


def matcher(method: str) -> MatcherInfo:
    """The registered method ``method``; MergeError listing the methods (with a suggestion)."""
    if isinstance(method, str) and method in MATCHERS:
        return MATCHERS[method]
    hint = did_you_mean(str(method), MATCHERS)
    raise MergeError(
        f"unknown matching method {method!r}{hint}; methods: {', '.join(sorted(MATCHERS))}"
    )


def check_option_names(method: str, names: Iterable[str], accepted: Mapping[str, Any]) -> None:
    """MergeError naming each of ``names`` that is not an option of ``method`` (with the
    closest accepted one) and listing the ``accepted`` ones."""
    unknown = [name for name in names if name not in accepted]
    if unknown:
        listed = ", ".join(sorted(accepted)) or "none"
        hints = [f"{name!r}{did_you_mean(name, accepted)}" for name in unknown]
        raise MergeError(
            f"method {method!r} has no option {', '.join(hints)}; accepted options: {listed}"
        )


def _resolve_options(info: MatcherInfo, options: Mapping[str, Any]) -> dict[str, Any]:
    check_option_names(info.name, options, info.options)
    return {**info.options, **options}


def _check_models(
    info: MatcherInfo,
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
        if info.needs_data:
            raise MergeError(
                f"method {info.name!r} aligns features by their activations and needs data: "
                "collect statistics with accord.collect_statistics(models, spec, data) and pass "
                "them, or use a method that needs none (weight_matching, identity)"
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
        if stats is not None and stats.size != space.size:
            raise MergeError(
                f"space {space.name!r} has {space.size} features but its statistics have "
                f"{stats.size}; collect statistics with this spec"
            )
    for kind, group in (("space", statistics.spaces), ("BatchNorm", statistics.norms)):
        for name, stats in group.items():
            found = stats.non_finite()
            if found is not None:
                raise MergeError(
                    f"the statistics of {kind} {name!r} are not finite ({found[0]} has "
                    f"{found[1]}); collect them again from finite models and inputs"
                )
