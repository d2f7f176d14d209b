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


def param_counts(model: nn.Module, numel=lambda p: p.numel()) -> dict[str, int]:
    """Unique parameters, the trunk's share, the largest trunk layer, and the effective count of the unrolled
    network (trunk × L_max + everything else). `numel` counts one parameter (ZeRO-3 leaves placeholders)."""
    count = lambda params: sum(numel(p) for p in params)   # noqa: E731
    unique, trunk = count(model.parameters()), count(model.trunk.parameters())
    return {"unique": unique, "trunk": trunk, "effective": unique + trunk * (model.trunk.loops - 1),
            "largest_layer": max(count(layer.parameters()) for layer in model.trunk.layers)}


def count_params(model: nn.Module) -> int:
    return param_counts(model)["unique"]


__all__ = ["build_model", "count_params", "param_counts", "LoopedTrunk", "MaskedELT", "DiffusionELT"]
