"""The variants of a pruning combiner that differ only in TIES' sign election (``dare`` /
``dare_ties``, ``della`` / ``della_linear``, ``breadcrumbs`` / ``breadcrumbs_ties``): their
shared facts are written once and each variant adds its name, paper and label."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor

from accord.combine._options import normalize
from accord.registry import Option, combiner


@dataclass(frozen=True)
class Variant:
    """One registered variant: its name, paper and label, and whether it elects signs and
    merges disjointly as TIES does (also ``normalize``'s default)."""

    name: str
    paper: str
    label: str
    sign_election: bool


def register_variants(
    variants: Iterable[Variant],
    function: Callable[..., Tensor],
    options: tuple[Option, ...],
    rowwise: Callable[..., Any] | None = None,
    **record: Any,
) -> None:
    """Register each variant as a combiner whose function is ``function(sign_election, deltas,
    **options)`` with the variant's ``sign_election`` (so ``function`` takes it first,
    positional-only, then the record's options as keyword-only arguments), whose options are
    ``options`` with ``normalize`` defaulting to the variant's ``sign_election``, whose row form
    is ``rowwise(options, sign_election=...)`` (see :func:`accord.registry.combiner`) and whose
    other fields are ``record``, shared."""
    for variant in variants:
        bound = partial(function, variant.sign_election)
        bound.__module__ = function.__module__  # the record names the method's module
        combiner(
            variant.name,
            paper=variant.paper,
            label=variant.label,
            options=tuple(
                normalize(variant.sign_election) if option.name == "normalize" else option
                for option in options
            ),
            rowwise=partial(rowwise, sign_election=variant.sign_election) if rowwise else None,
            **record,
        )(bound)
