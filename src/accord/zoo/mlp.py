"""A fully connected classifier on flattened images."""

from __future__ import annotations

import torch
from torch import nn

from accord.zoo.head import classifier


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * depth -> Linear.

    Shapes: (B, in_channels, image_size, image_size) -> (B, in_channels·image_size²)
    -> (B, width) after each hidden layer -> (B, num_classes).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        width: int = 128,
        depth: int = 3,
        class_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_channels * image_size * image_size
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        layers.append(classifier(fan_in, num_classes, class_embeddings))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes)."""
        return self.layers(x)
