"""A user's own ``nn.Module`` class by import path (``mypkg.nets:Net``), built with constructor
arguments and given a state dict from ``.safetensors`` or a ``.pt`` file.

``.pt`` / ``.pth`` / ``.bin`` files are read with ``torch.load(weights_only=True)``: tensors and
plain containers only, never arbitrary pickled code. A file holding ``{"state_dict": {...}}``
(as training loops often save) is read for its state dict.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from accord.errors import ModelError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def import_class(path: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass at ``"package.module:Class"``; ModelError naming what is
    wrong (the format, the module that does not import, the missing name, not a module)."""
    module_name, sep, name = path.partition(":")
    if not sep or not module_name or not name:
        raise ModelError(f"--model {path!r}: expected MODULE:CLASS, e.g. mypkg.nets:Net")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"--model {path!r}: module {module_name!r} does not import ({exc}); install your "
            "package or add its folder to PYTHONPATH"
        ) from None
    found: Any = module
    for part in name.split("."):
        found = getattr(found, part, None)
    if found is None:
        raise ModelError(f"--model {path!r}: module {module_name!r} has no {name!r}")
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ModelError(f"--model {path!r}: {name} is not a torch.nn.Module subclass")
    return found


def build_imported(path: str, args: Mapping[str, Any] | None = None) -> nn.Module:
    """``Class(**args)`` for the class at import ``path`` (:func:`import_class`)."""
    cls = import_class(path)
    try:
        return cls(**dict(args or {}))
    except TypeError as exc:
        raise ModelError(
            f"--model {path!r} with --model-args {dict(args or {})}: {exc}; give the "
            f"constructor's arguments as JSON, e.g. --model-args '{{\"width\": 2}}'"
        ) from None


def read_state_dict(file: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` or ``.pt`` file; ModelError naming the file when it
    is missing, of another kind, unreadable, or not a mapping of names to tensors."""
    file = Path(file)
    if not file.is_file():
        raise ModelError(f"weights file {file} does not exist")
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{file} cannot be read as safetensors ({exc})") from None
    if file.suffix not in TORCH_SUFFIXES:
        raise ModelError(
            f"{file}: weights must be .safetensors or a torch state dict "
            f"({', '.join(TORCH_SUFFIXES)}); save them with safetensors.torch.save_file"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        raise ModelError(
            f"{file} cannot be read with torch.load(weights_only=True) ({exc}); save the state "
            "dict itself (torch.save(model.state_dict(), path)), not the model object"
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelError(
            f"{file} holds a {type(state).__name__}, not a state dict (names to tensors); save "
            "it with torch.save(model.state_dict(), path)"
        )
    return dict(state)


def load_weights(model: nn.Module, file: str | Path, path: str) -> None:
    """Load the state dict in ``file`` into ``model`` (built from import ``path``), in place;
    ModelError naming the first missing or unexpected key, or the first misshapen tensor."""
    state = read_state_dict(file)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ModelError(
            f"{file} does not match {path}: {first} ({len(missing)} missing, {len(unexpected)} "
            "unexpected); check --model and --model-args, and save the weights of that class "
            "(a wrapper's state dict has prefixed keys such as 'module.')"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ModelError(
                f"{file}: tensor {key!r} has shape {tuple(state[key].shape)}, {path} expects "
                f"{tuple(tensor.shape)}; check --model-args"
            )
    model.load_state_dict(state)
