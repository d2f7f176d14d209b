"""Diffusion ELT (DiT style): noisy latents + t + class -> x0 prediction, at any loop count."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .embeddings import ClassEmbedder, Patchify, TimestepEmbedder, num_tokens, unpatchify
from .layers import modulate
from .trunk import LoopedTrunk


class FinalLayer(nn.Module):
    """adaLN-modulated norm + linear to patch pixels, zero-initialised as in DiT."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)
        for m in (self.modulation[1], self.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiffusionELT(nn.Module):
    family = "diffusion"

    def __init__(self, channels: int, grid: list[int], num_classes: int, width: int, heads: int,
                 unique_layers: int, loops: int, mlp_ratio: float = 4.0, patch_size: int = 1,
                 temporal_patch: int = 1, checkpointing: str = "none"):
        super().__init__()
        self.channels, self.grid, self.num_classes = channels, list(grid), num_classes
        self.patch, self.temporal_patch = patch_size, temporal_patch
        self.null_class = num_classes
        video = len(grid) == 3
        self.patchify = Patchify(channels, width, patch_size, temporal_patch, video)
        self.pos_emb = nn.Parameter(torch.zeros(1, num_tokens(grid, patch_size, temporal_patch), width))
        self.t_emb = TimestepEmbedder(width)
        self.cls_emb = ClassEmbedder(num_classes, width)
        self.trunk = LoopedTrunk(width, heads, unique_layers, loops, mlp_ratio, adaln=True,
                                 checkpointing=checkpointing)
        patch_dim = channels * patch_size * patch_size * (temporal_patch if video else 1)
        self.final = FinalLayer(width, patch_dim)
        nn.init.normal_(self.pos_emb, std=0.02)

    def condition(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.t_emb(t) + self.cls_emb(labels)

    def readout(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return unpatchify(self.final(h, cond), self.channels, self.grid, self.patch, self.temporal_patch)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                exits: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
        """x_t: (B, C, [T,] H, W); t in [0, 1]. Returns the x0 prediction at each exit, in order."""
        cond = self.condition(t, labels)
        x_t = x_t.to(self.pos_emb.dtype)   # DeepSpeed bf16 casts the weights, not the (fp32) noisy latents
        states = self.trunk(self.patchify(x_t) + self.pos_emb, cond, exits=exits)
        return tuple(self.readout(h, cond) for h in states)
