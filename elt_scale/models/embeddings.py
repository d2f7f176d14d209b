"""Patchify / unpatchify for 2D and 3D grids, positions, class and timestep embedders."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class Patchify(nn.Module):
    """(B, C, H, W) or (B, C, T, H, W) -> (B, tokens, width), a strided conv as in DiT."""

    def __init__(self, channels: int, width: int, patch: int, temporal_patch: int, video: bool):
        super().__init__()
        self.video = video
        if video:
            k = (temporal_patch, patch, patch)
            self.proj = nn.Conv3d(channels, width, kernel_size=k, stride=k)
        else:
            self.proj = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, channels: int, grid: list[int], patch: int, temporal_patch: int) -> torch.Tensor:
    """(B, tokens, C*pt*p*p) -> (B, C, [T,] H, W); the inverse of Patchify's token order."""
    b = x.shape[0]
    p = patch
    if len(grid) == 2:
        h, w = grid[0] // p, grid[1] // p
        x = x.view(b, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, channels, h * p, w * p)
    pt = temporal_patch
    t, h, w = grid[0] // pt, grid[1] // p, grid[2] // p
    x = x.view(b, t, h, w, pt, p, p, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, t * pt, h * p, w * p)


class ClassEmbedder(nn.Module):
    """Class labels -> vectors; index `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.null_class = num_classes
        self.table = nn.Embedding(num_classes + 1, width)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)


class TimestepEmbedder(nn.Module):
    """Continuous t in [0, 1] -> sinusoidal features -> MLP (DiT's embedder, with t scaled by 1000)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def num_tokens(grid: list[int], patch: int = 1, temporal_patch: int = 1) -> int:
    n = (grid[-2] // patch) * (grid[-1] // patch)
    return n * (grid[0] // temporal_patch) if len(grid) == 3 else n
