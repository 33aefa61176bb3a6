"""NaN and inf, found and described: the one check behind every refusal of non-finite numbers
(input weights, activation statistics, maps, merged tensors)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def describe_non_finite(tensor: torch.Tensor) -> str | None:
    """``"2 NaN and 1 inf among 576 values"`` when a floating tensor holds NaN or inf, else
    None (integer tensors are always finite)."""
    if not tensor.is_floating_point():
        return None
    # A sum is finite only when every entry is: one fast pass, where isfinite is many times
    # slower; a sum that overflows falls through to the exact check.
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tensor.sum(dtype=wide))) or bool(torch.isfinite(tensor).all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    counts = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
    return f"{counts} among {tensor.numel()} values"


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """``(name, description)`` of the first tensor holding NaN or inf, else None."""
    for name, tensor in tensors.items():
        problem = describe_non_finite(tensor)
        if problem is not None:
            return name, problem
    return None
