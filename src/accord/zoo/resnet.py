"""ResNet20 for 32x32 images (He et al., 2016, section 4.2) with projection shortcuts."""

from __future__ import annotations

import torch
from torch import nn

from accord.zoo.head import classifier


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BatchNorm that follows has its own shift.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU.

    The shortcut is conv1x1(stride) -> BN where the shape changes, identity elsewhere.
    Shapes: (B, in_channels, H, W) -> (B, out_channels, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output of shape (B, out_channels, H/stride, W/stride)."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = self.shortcut(x)
        out = out + shortcut
        return self.relu2(out)


class ResNet20(nn.Module):
    """Stem conv3x3 -> BN -> ReLU, three stages of three BasicBlocks, avg pool, Linear.

    Stage channels are round(16·width), round(32·width), round(64·width) (at least 1);
    stages 2 and 3 halve the spatial size. Shapes: (B, in_channels, S, S) -> (B, 16w, S, S)
    -> (B, 32w, S/2, S/2) -> (B, 64w, S/4, S/4) -> (B, 64w) -> (B, num_classes).
    The pool is adaptive, so ``image_size`` does not change the parameters.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        width: float = 1,
        class_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        widths = [max(1, round(base * width)) for base in (16, 32, 64)]
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = _stage(widths[0], widths[0], stride=1)
        self.layer2 = _stage(widths[0], widths[1], stride=2)
        self.layer3 = _stage(widths[1], widths[2], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = classifier(widths[2], num_classes, class_embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def _stage(in_channels: int, out_channels: int, stride: int, blocks: int = 3) -> nn.Sequential:
    """``blocks`` BasicBlocks; only the first changes the shape."""
    first = BasicBlock(in_channels, out_channels, stride)
    rest = [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(first, *rest)
