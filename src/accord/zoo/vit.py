"""A tiny Vision Transformer (Dosovitskiy et al., 2021) with pre-norm blocks."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from accord.errors import ModelError
from accord.zoo.head import classifier


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections.

    Shapes: (B, L, dim) -> q, k, v of (B, heads, L, head_dim) -> softmax(q kᵀ/√head_dim) v
    -> (B, L, dim) -> proj -> (B, L, dim). Separate q/k/v weights keep each head's rows a
    contiguous block of one matrix, which head-aware alignment relies on.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output of shape (B, L, dim)."""
        batch, length = x.shape[0], x.shape[1]
        split = (batch, length, self.heads, self.head_dim)
        q = self.q(x).reshape(split).transpose(1, 2)
        k = self.k(x).reshape(split).transpose(1, 2)
        v = self.v(x).reshape(split).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)); (B, L, dim) kept."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output of shape (B, L, dim)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, class token, positional embedding, ``depth`` blocks, LayerNorm, head.

    Shapes: (B, C, S, S) -> patches (B, L, dim) with L = (S/patch_size)² -> with the class
    token (B, L+1, dim) -> blocks -> class token (B, dim) -> (B, num_classes).
    The MLP hidden size is round(dim·mlp_ratio).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        class_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        problems = []
        if image_size % patch_size:
            problems.append(f"patch_size={patch_size} must divide image_size={image_size}")
        if dim % heads:
            problems.append(f"heads={heads} must divide dim={dim}")
        if problems:
            raise ModelError("invalid ViT config: " + "; ".join(problems))
        patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, dim))
        # Small random embeddings, as in the ViT reference: with zeros the blocks would start
        # blind to the patches' order.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        hidden = max(1, round(dim * mlp_ratio))
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = classifier(dim, num_classes, class_embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes) from images (B, in_channels, S, S)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
