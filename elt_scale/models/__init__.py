"""Model families on top of the LoopedTrunk. `build_model(recipe)` is the public constructor."""
from __future__ import annotations

import torch.nn as nn

from .diffusion import DiffusionELT
from .masked import MaskedELT
from .trunk import LoopedTrunk


def build_model(recipe) -> nn.Module:
    m = recipe.model
    common = dict(grid=m.grid, num_classes=m.num_classes, width=m.width, heads=m.heads,
                  unique_layers=m.unique_layers, loops=m.loops, mlp_ratio=m.mlp_ratio,
                  checkpointing=recipe.train.checkpointing)
    if m.family == "masked":
        return MaskedELT(vocab_size=m.vocab_size, **common)
    return DiffusionELT(channels=m.channels, patch_size=m.patch_size, temporal_patch=m.temporal_patch, **common)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["build_model", "count_params", "LoopedTrunk", "MaskedELT", "DiffusionELT"]
