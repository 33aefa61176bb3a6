"""Random shifted crops: the translation augmentation of the CCA Merge training recipe."""

from __future__ import annotations

import torch

from accord.errors import ConfigError


def random_crops(
    images: torch.Tensor, padding: int, generator: torch.Generator, fill: torch.Tensor
) -> torch.Tensor:
    """Each image of the batch N×C×H×W padded by ``padding`` pixels of ``fill`` (one value per
    channel, the background) and cropped back to H×W at a random offset in [0, 2·padding]²,
    drawn per image from ``generator``; ``padding`` 0 returns ``images`` itself."""
    if padding < 0:
        raise ConfigError(f"crop padding {padding}: give 0 (no crops) or a positive pixel count")
    if padding == 0:
        return images
    n, channels, height, width = images.shape
    padded = (
        fill.to(images)
        .view(1, channels, 1, 1)
        .expand(n, channels, height + 2 * padding, width + 2 * padding)
        .clone()
    )
    padded[:, :, padding : padding + height, padding : padding + width] = images
    top, left = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    rows = (top[:, None] + torch.arange(height))[:, :, None]  # N×H×1
    cols = (left[:, None] + torch.arange(width))[:, None, :]  # N×1×W
    batch = torch.arange(n)[:, None, None]
    index = [i.to(images.device) for i in (batch, rows, cols)]
    crops = padded[index[0], :, index[1], index[2]]  # N×H×W×C: advanced indices come first
    return crops.permute(0, 3, 1, 2).contiguous()
