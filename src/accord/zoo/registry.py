"""The table of zoo models and the check that turns a user's config into constructor arguments.

A model's config keys, their defaults and their types are its constructor's keyword
arguments, so they are written once, in the model's own file.
"""

from __future__ import annotations

import inspect
import math
import numbers
import typing
from typing import Any

from torch import nn

from accord.errors import ModelError, did_you_mean
from accord.zoo.mlp import MLP
from accord.zoo.resnet import ResNet20
from accord.zoo.vgg import VGG11, VGG16
from accord.zoo.vit import ViT

_CLASSES: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "resnet20": ResNet20,
    "vgg11": VGG11,
    "vgg16": VGG16,
    "vit": ViT,
}

MODELS: tuple[str, ...] = tuple(sorted(_CLASSES))


def model_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``; ModelError with the valid names if there is none."""
    if isinstance(name, str) and name in _CLASSES:
        return _CLASSES[name]
    hint = did_you_mean(str(name), MODELS)
    raise ModelError(f"unknown model {name!r}{hint}; valid models: {', '.join(MODELS)}")


def default_config(name: str) -> dict[str, Any]:
    """Every config key of model ``name`` with its default."""
    parameters = inspect.signature(model_class(name)).parameters
    return {key: parameter.default for key, parameter in parameters.items()}


def resolve_config(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The defaults of model ``name`` updated by ``config``, with every bad key reported at once."""
    defaults = default_config(name)
    types = typing.get_type_hints(model_class(name).__init__)
    accepted = ", ".join(sorted(defaults))
    resolved = dict(defaults)
    problems = []
    for key, value in config.items():
        if key not in defaults:
            hint = did_you_mean(key, defaults)
            problems.append(f"unknown key {key!r}{hint} (accepted keys: {accepted})")
            continue
        problem = _check_value(key, value, types[key])
        if problem:
            problems.append(problem)
        else:
            resolved[key] = _plain(value)
    if problems:
        raise ModelError(f"invalid config for model {name!r}: " + "; ".join(problems))
    return resolved


def _check_value(key: str, value: object, kind: Any) -> str | None:
    """Why ``value`` is not a valid ``kind`` config value, or None if it is."""
    options = typing.get_args(kind)
    if type(None) in options:  # an optional setting: None turns it off
        if value is None:
            return None
        kind = next(option for option in options if option is not type(None))
    if kind is bool:
        return None if isinstance(value, bool) else f"{key}={value!r} must be True or False"
    wanted, noun = (numbers.Integral, "an integer") if kind is int else (numbers.Real, "a number")
    if isinstance(value, bool) or not isinstance(value, wanted):
        return f"{key}={value!r} must be {noun}"
    # Every numeric setting of the zoo is a size, a count or a ratio.
    if not (math.isfinite(value) and value > 0):
        return f"{key}={value!r} must be positive"
    return None


def _plain(value: Any) -> bool | int | float | None:
    """``value`` as a built-in bool, int or float, so a config given numpy scalars is plain JSON."""
    if value is None or isinstance(value, bool):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)
