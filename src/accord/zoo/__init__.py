"""Reference architectures for merging experiments: MLP, VGG11/16, ResNet20 and a tiny ViT.

Every model takes ``in_channels`` (3), ``image_size`` (32) and ``num_classes`` (10), maps
(B, in_channels, image_size, image_size) images to (B, num_classes) logits and is traceable
by ``torch.fx.symbolic_trace``. A built model remembers its full config, so it can be rebuilt:

>>> import torch
>>> from accord.zoo import build_model, model_config
>>> model = build_model("resnet20", width=2, num_classes=100)
>>> model(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 100])
>>> model_config(model)
{'name': 'resnet20', 'in_channels': 3, 'image_size': 32, 'num_classes': 100, 'width': 2}
>>> twin = build_model(**model_config(model))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from accord.errors import ModelError
from accord.zoo.head import set_class_embeddings
from accord.zoo.registry import MODELS, model_class, resolve_config

__all__ = ["MODELS", "build_model", "example_input", "model_config", "set_class_embeddings"]


def build_model(name: str, **config: Any) -> nn.Module:
    """Build zoo model ``name`` (one of :data:`MODELS`) with ``config`` over its defaults.

    Keys per model (defaults in brackets), besides in_channels, image_size, num_classes:

    - ``mlp``: width [128] hidden units, depth [3] hidden layers.
    - ``vgg11``, ``vgg16``: width [1.0] channel multiplier, batch_norm [False].
    - ``resnet20``: width [1] channel multiplier (stages 16w, 32w, 64w).
    - ``vit``: patch_size [4] (divides image_size), dim [64], depth [2], heads [4]
      (divides dim), mlp_ratio [2.0].
    - every model: class_embeddings [None]: None gives a trainable Linear head; an integer d
      gives the head that models trained on different classes share
      (:class:`accord.zoo.head.SharedClassHead`: the last Linear maps to d features, whose
      cosines with fixed class embeddings, the same in every model, are the logits;
      :func:`set_class_embeddings` puts one's own in their place).

    Raises ModelError for an unknown name, an unknown key or an invalid value. Weights come
    from torch's global generator: the same ``torch.manual_seed`` gives the same model.
    """
    resolved = resolve_config(name, config)
    model = model_class(name)(**resolved)
    # An optional setting left off (None) is absent, so the configs, and the model store's
    # keys, of models built before it existed stay as they were.
    model.accord_config = {"name": name, **{k: v for k, v in resolved.items() if v is not None}}
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """``{"name": ..., **config}`` of a model from :func:`build_model`, all defaults filled in.

    ``build_model(**model_config(model))`` builds the same architecture.
    """
    config = getattr(model, "accord_config", None)
    if not isinstance(config, dict):
        raise ModelError(
            f"{type(model).__name__} was not built by accord.zoo.build_model, so it has no "
            "config; build it with build_model(name, **config)"
        )
    return dict(config)


def example_input(config: dict[str, Any], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random input batch of the shape a model with zoo ``config`` expects."""
    resolved = resolve_config(config["name"], {k: v for k, v in config.items() if k != "name"})
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, resolved["in_channels"], resolved["image_size"], resolved["image_size"])
    return torch.randn(shape, generator=generator)
