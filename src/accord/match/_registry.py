"""The table of matching methods: a name, the paper, whether it needs data, whether its maps
are always permutations, its options.

Registering a method is one decorator line in the method's own file. The options and their
defaults are written once, there; the function takes them as keyword-only arguments without
defaults, so the dispatcher (:func:`accord.match.match`) is the one place that fills them in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from accord.apply import Transform


@dataclass(frozen=True)
class Alignment:
    """What a matcher found: one transform per model and free space, and what it did.

    ``transforms[i][space]`` maps model i's features of ``space`` into the merged coordinates
    (for star methods, the reference's coordinates, so the reference gets identities).
    ``report[space]`` says which method was actually used (``"method"``), why it differs from
    the one asked for (``"notes"``) and its scores per aligned model (``"models"``).
    """

    transforms: list[dict[str, Transform]]
    report: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class MatcherInfo:
    """A registered method, called as ``function(spec, statistics, states, reference, **options)``.

    ``options`` are the defaults of its keyword-only options. ``permutations``: every map it
    returns is a permutation, so BatchNorms move with their channels exactly and the merge needs
    no BatchNorm-output statistics. ``aligns``: it finds the maps between models (a permuted
    copy of a model is brought back onto it); False for direct averaging.
    """

    name: str
    function: Callable[..., Alignment]
    paper: str
    needs_data: bool
    options: dict[str, Any]
    permutations: bool = False
    aligns: bool = True


MATCHERS: dict[str, MatcherInfo] = {}


def register(
    name: str,
    *,
    paper: str,
    needs_data: bool,
    permutations: bool = False,
    aligns: bool = True,
    **defaults: Any,
) -> Callable[[Callable[..., Alignment]], Callable[..., Alignment]]:
    """Register a matcher as ``name`` with option defaults ``defaults``.

    The function's keyword-only parameters must be exactly the option names, so that the
    options a user can pass and the ones the function reads cannot drift apart.
    """

    def attach(function: Callable[..., Alignment]) -> Callable[..., Alignment]:
        parameters = inspect.signature(function).parameters.values()
        keywords = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if keywords != set(defaults):
            raise TypeError(
                f"matcher {name!r}: keyword-only parameters {sorted(keywords)} differ from the "
                f"registered options {sorted(defaults)}"
            )
        if name in MATCHERS:
            raise TypeError(f"matcher {name!r} is registered twice")
        MATCHERS[name] = MatcherInfo(
            name, function, paper, needs_data, dict(defaults), permutations, aligns
        )
        return function

    return attach
