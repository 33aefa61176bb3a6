"""Models users bring: Hugging Face model folders and their own ``nn.Module`` classes.

>>> model = load_user_model("runs/vit-a")                       # doctest: +SKIP
>>> model = load_user_model("a.safetensors", model="mypkg.nets:Net",
...                         model_args={"width": 2}, input_shape=(3, 32, 32))  # doctest: +SKIP

Either way ``model.module`` maps one input tensor to one output tensor (a Hugging Face model
is wrapped as ``x -> model(x).logits``), which is what :func:`accord.trace` and
:func:`accord.merge` take; ``model.example`` is an input batch for tracing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from accord.errors import ModelError
from accord.models.hf import hf_example_input, input_kind, is_hf_folder, load_hf_model
from accord.models.imported import build_imported, load_weights

__all__ = ["UserModel", "is_hf_folder", "load_user_model", "uses_user_models"]


@dataclass(frozen=True, eq=False)
class UserModel:
    """A loaded model: ``module`` (eval mode; float32 for a folder) maps ``inputs`` ("image",
    "tokens", or "tensor" for a user's class) to one tensor. ``kind`` is "hf" (a folder,
    ``config`` its config.json, ``dtype`` that of its stored weights) or "module" (``model``
    and ``model_args`` rebuild it). ``example`` is an input batch for tracing, None for a class
    given no input shape (the data's first batch then serves)."""

    source: Path
    module: nn.Module
    kind: str
    inputs: str
    example: torch.Tensor | None
    dtype: torch.dtype = torch.float32
    config: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)


def uses_user_models(models: Sequence[str | Path], model: str | None) -> bool:
    """Whether these ``accord merge`` inputs are users' models (``--model`` given, or any is a
    Hugging Face folder) rather than accord checkpoints."""
    return model is not None or any(is_hf_folder(p) for p in models)


def load_user_model(
    source: str | Path,
    model: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
) -> UserModel:
    """A Hugging Face model folder (``model`` None), or the class at import path ``model``
    (``"mypkg.nets:Net"``) built with ``model_args`` and given the weights in ``source``
    (``.safetensors``, ``.pt``); ``input_shape`` (one example, no batch axis) makes its
    example input. ModelError naming the file and the fix for what does not load."""
    path = Path(source)
    if model is None:
        if not path.is_dir():
            raise ModelError(
                f"{path} is not a folder: give a Hugging Face model folder, or a weights file "
                "with --model mypkg.nets:Net (your nn.Module class)"
            )
        wrapped, config, dtype = load_hf_model(path)
        return UserModel(
            path,
            wrapped,
            "hf",
            input_kind(wrapped.model),
            hf_example_input(wrapped.model),
            dtype,
            config,
        )
    module = build_imported(model, model_args)
    load_weights(module, path, model)
    module = module.eval()
    example = None
    if input_shape is not None:
        example = _example(module, path, model, tuple(input_shape))
    return UserModel(
        path, module, "module", "tensor", example, model=model, model_args=dict(model_args or {})
    )


def _example(module: nn.Module, path: Path, model: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Two random inputs of ``shape`` in the dtype of ``module``'s weights; ModelError naming
    the shape, the class and its failure when ``module`` does not run on them."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((2, *shape), generator=generator).to(dtype)
    try:
        with torch.no_grad():
            module(example)
    except Exception as exc:  # any failure of the user's forward on this shape
        given = ",".join(map(str, shape))
        raise ModelError(
            f"--input-shape {given}: {model} with the weights of {path} does not run on inputs "
            f"of shape {tuple(example.shape)} ({type(exc).__name__}: {exc}); give the shape "
            "of one input it reads, without the batch axis"
        ) from None
    return example
