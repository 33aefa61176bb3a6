"""VGG11 and VGG16 with a single linear classifier, as in Git Re-Basin and CCA Merge."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from accord.zoo.head import classifier

# Output channels of each 3x3 conv, "M" for a 2x2 max pool (Simonyan & Zisserman, 2015).
VGG11_LAYERS: tuple[int | str, ...] = (
    64,
    "M",
    128,
    "M",
    256,
    256,
    "M",
    512,
    512,
    "M",
    512,
    512,
    "M",
)
VGG16_LAYERS: tuple[int | str, ...] = (
    *(64, 64, "M", 128, 128, "M", 256, 256, 256, "M"),
    *(512, 512, 512, "M", 512, 512, 512, "M"),
)


class VGG(nn.Module):
    """Convolutional ``features`` then ``classifier`` = Flatten -> Linear.

    Each conv is Conv3x3(pad 1) -> [BatchNorm2d] -> ReLU with round(c·width) channels (at
    least 1). A pool is skipped once the map is 1x1, so 28x28 and 8x8 inputs work: the
    classifier reads C·h·w features, e.g. 512·1·1 for a 32x32 input at width 1.
    Subclasses set ``layers``.

    ``xavier_init``: convolutions and the classifier start from xavier-uniform weights with
    the ReLU gain (√2) and zero biases, as the CCA Merge reference code's VGG (Horoi et al.,
    ``models/vgg.py``); without BatchNorm, PyTorch's default (kaiming-uniform with a = √5,
    weights 1/√3 as large) starts the deep activations near zero. Off by default: with
    BatchNorm, the demo's models trained from it merged worse with every method; the
    quality bench's VGG without BatchNorm turns it on, as the reference trains them.
    """

    layers: ClassVar[tuple[int | str, ...]]

    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        width: float = 1.0,
        batch_norm: bool = False,
        xavier_init: bool = False,
        class_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        channels, size = in_channels, image_size
        for layer in self.layers:
            if layer == "M":
                if size >= 2:
                    modules.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out_channels = max(1, round(int(layer) * width))
            modules.append(nn.Conv2d(channels, out_channels, kernel_size=3, padding=1))
            if batch_norm:
                modules.append(nn.BatchNorm2d(out_channels))
            modules.append(nn.ReLU())
            channels = out_channels
        self.features = nn.Sequential(*modules)
        self.classifier = nn.Sequential(
            nn.Flatten(), classifier(channels * size * size, num_classes, class_embeddings)
        )
        if xavier_init:
            gain = nn.init.calculate_gain("relu")
            for module in self.modules():
                if isinstance(module, nn.Conv2d | nn.Linear):
                    nn.init.xavier_uniform_(module.weight, gain=gain)
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes) from images (B, in_channels, H, W)."""
        return self.classifier(self.features(x))


class VGG11(VGG):
    """VGG11: 8 convs (64, 128, 256×2, 512×4) and 5 pools."""

    layers = VGG11_LAYERS


class VGG16(VGG):
    """VGG16: 13 convs (64×2, 128×2, 256×3, 512×6) and 5 pools."""

    layers = VGG16_LAYERS
