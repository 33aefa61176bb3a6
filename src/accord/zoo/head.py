"""A class head that models trained apart share: cosine logits against fixed class embeddings.

Models trained on different data (disjoint class subsets, the 80/20 split) each learn their
own trainable head, whose rows mean nothing to the other models, so their outputs cannot be
merged. CCA Merge's reference code gives every model the same frozen head instead, CLIP text
embeddings of the class names; any fixed embeddings shared by the models serve, and these are
random unit vectors drawn from a seed of their own, so every model with the same number of
classes and embedding dimension has the very same ones, whatever its training seed.
:func:`set_class_embeddings` puts a user's own in their place (CLIP's, say) before training.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from accord.errors import ModelError

# Not the training seed: the embeddings must be the same in every model of a set.
EMBEDDING_SEED = 1234
# Cosine logits lie in [-1, 1]; scaled so that softmax can approach a one-hot target
# (CLIP's learned temperature ends near 100; 10 trains from scratch without saturating early).
LOGIT_SCALE = 10.0


def fixed_class_embeddings(num_classes: int, dim: int) -> torch.Tensor:
    """(num_classes, dim) unit rows drawn from :data:`EMBEDDING_SEED` (torch's global
    generator untouched)."""
    generator = torch.Generator().manual_seed(EMBEDDING_SEED)
    return F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)


class SharedClassHead(nn.Module):
    """Linear features -> dim, normalised, then ``scale · ẑ · Eᵀ``.

    ``embeddings`` E (num_classes × dim) and ``scale`` are buffers, never trained: saved and
    loaded with the weights, averaged unchanged by a merge (identical in every model), and
    fixed under alignment (the normalisation across the dim features fixes the space
    ``proj`` writes, while the space ``proj`` reads stays free).
    Shapes: (B, in_features) -> (B, dim) -> (B, num_classes).
    """

    def __init__(self, in_features: int, num_classes: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, dim)
        self.register_buffer("embeddings", fixed_class_embeddings(num_classes, dim))
        self.register_buffer("scale", torch.tensor(LOGIT_SCALE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes)."""
        return self.scale * (F.normalize(self.proj(x), dim=-1) @ self.embeddings.T)


def classifier(in_features: int, num_classes: int, class_embeddings: int | None) -> nn.Module:
    """A zoo model's last layer: a trainable Linear, or with ``class_embeddings`` = d a
    :class:`SharedClassHead` of embedding dimension d."""
    if class_embeddings is None:
        return nn.Linear(in_features, num_classes)
    return SharedClassHead(in_features, num_classes, class_embeddings)


def set_class_embeddings(
    model: nn.Module, embeddings: torch.Tensor | np.ndarray | str | os.PathLike[str]
) -> nn.Module:
    """Give ``model``'s shared head the class embeddings ``embeddings`` (num_classes × d), a
    tensor, an array or a ``.npy`` / ``.pt`` file of one, e.g. CLIP text embeddings of the class
    names; rows are normalised. Do it to every model of a set before training: the embeddings
    are saved with the weights. Returns ``model``; ModelError for a model without a shared head
    (build it with ``class_embeddings=d``), a file of another kind or a shape that is not the
    head's."""
    heads = [m for m in model.modules() if isinstance(m, SharedClassHead)]
    if len(heads) != 1:
        raise ModelError(
            f"{type(model).__name__} has {len(heads)} shared class heads, not one; build it "
            "with accord.build_model(name, class_embeddings=d)"
        )
    where = "the embeddings"
    if isinstance(embeddings, str | os.PathLike):
        where = str(embeddings)
        embeddings = _read_embeddings(Path(embeddings))
    values = torch.as_tensor(embeddings, dtype=torch.float32)
    head = heads[0]
    if values.shape != head.embeddings.shape:
        raise ModelError(
            f"{where} have shape {tuple(values.shape)}; this head needs "
            f"{tuple(head.embeddings.shape)} (num_classes × class_embeddings)"
        )
    with torch.no_grad():
        head.embeddings.copy_(F.normalize(values, dim=1))
    return model


def _read_embeddings(path: Path) -> torch.Tensor | np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".pt":
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(loaded, torch.Tensor):
            return loaded
        raise ModelError(f"{path} holds a {type(loaded).__name__}, not one tensor")
    raise ModelError(f"{path}: class embeddings are read from a .npy or .pt file")
