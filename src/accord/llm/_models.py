"""The model forms the public functions accept, and the conversions between them.

A model is given as one of

- a Hugging Face ``PreTrainedModel`` (``LlamaForCausalLM``, ...): its ``state_dict()`` and config;
- a ``(state, config)`` pair: a state dict (name → tensor, possibly lazy) and the ``config.json``
  contents as a dict (or a transformers config object);
- a checkpoint directory (``str`` or path): read lazily, see :mod:`accord.checkpoint`.

Results come back in the form given: a new module for a module, a ``(state, config)`` pair for a
pair or a directory. Inputs are never modified.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from accord.checkpoint import LazyState, open_checkpoint
from accord.errors import ModelError
from accord.llm.arch import Architecture

ModelLike = Any  # nn.Module | tuple[Mapping[str, Tensor], dict] | str | os.PathLike


@dataclass(frozen=True)
class Model:
    """A model taken apart: its state (name → tensor), config dict, layout, and the module it
    came from (None for a pair or a directory)."""

    state: Mapping[str, Tensor]
    config: dict[str, Any]
    arch: Architecture
    module: nn.Module | None
    label: str


def unpack(model: ModelLike, label: str = "model") -> Model:
    """Take ``model`` apart, checking every tensor's shape against its config; ModelError
    (naming ``label``) for anything else."""
    unpacked = _unpack(model, label)
    unpacked.arch.check_shapes(shapes(unpacked.state), unpacked.label)
    return unpacked


def shapes(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the shard headers for a lazy state."""
    if isinstance(state, LazyState):
        return {name: state.info(name).shape for name in state}
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def _unpack(model: ModelLike, label: str) -> Model:
    if isinstance(model, nn.Module):
        if not hasattr(model, "config"):
            raise ModelError(f"{label}: a {type(model).__name__} has no Hugging Face config")
        config = model.config.to_dict()
        config["architectures"] = config.get("architectures") or [type(model).__name__]
        state = {name: t.detach() for name, t in model.state_dict().items()}
        return Model(state, config, Architecture.from_config(config, label), model, label)
    if isinstance(model, (str, os.PathLike)):
        checkpoint = open_checkpoint(model)
        arch = Architecture.from_config(checkpoint.config, str(checkpoint.path))
        return Model(checkpoint.state, checkpoint.config, arch, None, str(checkpoint.path))
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], Mapping):
        state, config = model
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return Model(state, config, Architecture.from_config(config, label), None, label)
    raise ModelError(
        f"{label}: expected a Hugging Face model, a (state, config) pair or a checkpoint "
        f"directory, got {type(model).__name__}"
    )


def repack(model: Model, state: dict[str, Tensor]) -> Any:
    """``state`` in the form ``model`` was given: a new module, or a ``(state, config)`` pair."""
    if model.module is None:
        return state, dict(model.config)
    module = copy.deepcopy(model.module)
    module.load_state_dict(state)
    return module


def to_module(model: Model) -> nn.Module:
    """A Hugging Face module running ``model`` (the given module itself when there is one)."""
    if model.module is not None:
        return model.module
    from transformers import AutoConfig, AutoModelForCausalLM

    options = {k: v for k, v in model.config.items() if k != "model_type"}
    config = AutoConfig.for_model(model.config["model_type"], **options)
    first = next(iter(model.state.values()))
    module = AutoModelForCausalLM.from_config(config).to(first.dtype)
    missing, unexpected = module.load_state_dict(dict(model.state), strict=False)
    allowed = {"lm_head.weight"} if model.arch.tied else set()
    if set(missing) - allowed or unexpected:
        raise ModelError(
            f"{model.label}: weights do not match the config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return module.eval()
