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
    function: Callable[[bool], Callable[..., Tensor]],
    options: Callable[[Option], tuple[Option, ...]],
    rowwise: Callable[..., Any] | None = None,
    **record: Any,
) -> None:
    """Register each variant as a combiner: ``function(sign_election)`` is its record's
    function, ``options(normalize_option)`` its options (given ``normalize`` with the
    variant's default, so that the caller places it), ``rowwise(options, sign_election=...)`` its
    row form (see :func:`accord.registry.combiner`) and ``record`` the other fields, shared."""
    for variant in variants:
        row_form = None
        if rowwise is not None:
            row_form = partial(_variant_rows, rowwise, sign_election=variant.sign_election)
        combiner(
            variant.name,
            paper=variant.paper,
            label=variant.label,
            options=options(normalize(variant.sign_election)),
            rowwise=row_form,
            **record,
        )(function(variant.sign_election))


def _variant_rows(
    rowwise: Callable[..., Any], options: dict[str, Any], *, sign_election: bool
) -> Any:
    return rowwise(options, sign_election=sign_election)
