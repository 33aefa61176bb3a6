"""Merge parameters that vary by tensor, written as mergekit writes them.

A setting is one of

- a number, used for every tensor;
- a gradient ``[v_0, …, v_m]``: piecewise linear in the tensor's layer position ``x ∈ [0, 1]``,
  ``v_i`` at ``x = i/m``;
- a list of filters ``[{filter: mlp, value: …}, …, {value: …}]``: the first entry whose
  ``filter`` is part of the tensor's name (or that has no filter, or ``*``) gives the value, a
  number or a gradient; when none matches, the setting gives nothing for that tensor.

Layer positions follow mergekit's plan: layer ``i`` of a stack of ``L`` is at ``i / (L − 1)``
(1 when ``L = 1``), and every tensor outside the layers (embeddings, final norm, head) at 0. A
tensor's layer is the first integer of its dotted name (``model.layers.3.mlp.up_proj.weight``:
layer 3 of the stack ``model.layers``), and ``L`` is the number of layers of that stack in the
checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from accord.errors import did_you_mean


@dataclass(frozen=True)
class Filtered:
    """A value for the tensors whose name contains ``filter`` (every tensor when None)."""

    filter: str | None
    value: float | tuple[float, ...]


Setting = float | tuple[float, ...] | tuple[Filtered, ...]

_EXPECTED = (
    "expected a number, a list of numbers (a gradient across the layers) or a list of "
    "{filter, value} entries"
)


def parse_setting(raw: Any) -> Setting:
    """A :data:`Setting` from YAML data; ValueError saying what is expected."""
    if _number(raw) is not None:
        return _number(raw)  # type: ignore[return-value]
    if isinstance(raw, (list, tuple)) and raw:
        numbers = [_number(item) for item in raw]
        if all(number is not None for number in numbers):
            return tuple(numbers)  # type: ignore[arg-type]
        if all(isinstance(item, (dict, Filtered)) for item in raw):
            return tuple(_filtered(item) for item in raw)
    raise ValueError(f"{raw!r}: {_EXPECTED}")


def _number(value: Any) -> float | None:
    """``value`` as a float, or None. YAML's true/false are ints to Python, and no parameter
    read here is a switch; PyYAML reads ``1e-3`` (no dot) as text, which mergekit takes for
    the number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _filtered(item: dict[str, Any] | Filtered) -> Filtered:
    if isinstance(item, Filtered):
        return item
    unknown = sorted(set(item) - {"filter", "value"})
    if unknown:
        hint = did_you_mean(unknown[0], ("filter", "value"))
        raise ValueError(f"filter entry {item!r}: unknown key {unknown[0]!r}{hint}")
    if "value" not in item:
        raise ValueError(f"filter entry {item!r} has no value")
    value = parse_setting(item["value"])
    name = item.get("filter")
    if isinstance(value, tuple) and value and isinstance(value[0], Filtered):
        raise ValueError(f"filter entry {item!r}: the value must be a number or a gradient")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"filter entry {item!r}: the filter must be text (part of tensor names)")
    return Filtered(name, value)  # type: ignore[arg-type]


def setting_at(setting: Setting, name: str, position: float) -> float | None:
    """The value of ``setting`` for tensor ``name`` at layer position ``position`` (None when no
    filter matches)."""
    if isinstance(setting, float):
        return setting
    if isinstance(setting[0], Filtered):
        for entry in setting:
            assert isinstance(entry, Filtered)
            if entry.filter in (None, "*") or entry.filter in name:
                return setting_at(entry.value, name, position)
        return None
    return _gradient_at(setting, position)  # type: ignore[arg-type]


def _gradient_at(anchors: tuple[float, ...], position: float) -> float:
    # mergekit's arithmetic, operation for operation, so that both give the same float
    scaled = position * (len(anchors) - 1)
    low = int(scaled)
    high = min(len(anchors) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * anchors[low] + fraction * anchors[high]


def setting_numbers(setting: Setting) -> list[float]:
    """Every number written in ``setting``: every value it gives lies between their extremes."""
    if isinstance(setting, float):
        return [setting]
    numbers: list[float] = []
    for item in setting:
        numbers += setting_numbers(item.value) if isinstance(item, Filtered) else [item]
    return numbers


def map_setting(setting: Setting, function: Callable[[float], float]) -> Setting:
    """``setting`` with ``function`` applied to every number (exact for an affine function,
    which commutes with the gradients' interpolation)."""
    if isinstance(setting, float):
        return function(setting)
    return tuple(
        Filtered(item.filter, map_setting(item.value, function))  # type: ignore[arg-type]
        if isinstance(item, Filtered)
        else function(item)
        for item in setting
    )


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """Every tensor's layer position in [0, 1] (see the module docs)."""
    names = list(names)
    layers = {name: _layer(name) for name in names}
    depth: dict[str, int] = {}
    for found in layers.values():
        if found is not None:
            depth[found[0]] = max(depth.get(found[0], 0), found[1] + 1)
    positions = {}
    for name, found in layers.items():
        if found is None:
            positions[name] = 0.0
        else:
            stack, index = found
            positions[name] = index / (depth[stack] - 1) if depth[stack] > 1 else 1.0
    return positions


def _layer(name: str) -> tuple[str, int] | None:
    """``(stack, index)`` from the first integer part of a dotted name."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None
