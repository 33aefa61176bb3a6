"""A class head that models trained apart share: cosine logits against fixed class embeddings.

Models trained on different data (disjoint class subsets, the 80/20 split) each learn their
own trainable head, whose rows mean nothing to the other models, so their outputs cannot be
merged. CCA Merge's reference code gives every model the same frozen head instead, CLIP text
embeddings of the class names; any fixed embeddings shared by the models serve, and these are
random unit vectors drawn from a seed of their own, so every model with the same number of
classes and embedding dimension has the very same ones, whatever its training seed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

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
