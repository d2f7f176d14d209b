"""Honest FLOP counts (matmuls as 2·m·n·k) for one sample, from the model config alone.

A looped trunk costs N unique layers × L loops; an ILSD training step runs the teacher pass once (the
student is a prefix of it) and adds only one extra readout for the student exit."""
from __future__ import annotations

from .models import num_tokens


def layer_flops(tokens: int, width: int, mlp_ratio: float, adaln: bool) -> float:
    n, d = tokens, width
    dense = (8 + 4 * mlp_ratio) * n * d * d          # qkv 6nd², proj 2nd², MLP 4·r·nd²
    attention = 4 * n * n * d                        # QKᵀ and AV
    modulation = 12 * d * d if adaln else 0          # adaLN: one 6d×d matvec per sample
    return dense + attention + modulation


def sequence_length(m) -> int:
    if m.family == "masked":
        return num_tokens(m.grid) + 1                # + class token
    return num_tokens(m.grid, m.patch_size, m.temporal_patch)


def trunk_flops(m, loops: int) -> float:
    return m.unique_layers * loops * layer_flops(sequence_length(m), m.width, m.mlp_ratio, m.family == "diffusion")


def readout_flops(m) -> float:
    n, d = sequence_length(m), m.width
    if m.family == "masked":
        return 2 * (n - 1) * d * m.vocab_size
    patch_dim = m.channels * m.patch_size ** 2 * (m.temporal_patch if len(m.grid) == 3 else 1)
    return 2 * n * d * patch_dim + 4 * d * d


def embed_flops(m) -> float:
    if m.family == "masked":
        return 0.0                                   # table lookups
    n, d = sequence_length(m), m.width
    patch_dim = m.channels * m.patch_size ** 2 * (m.temporal_patch if len(m.grid) == 3 else 1)
    return 2 * n * patch_dim * d + 2 * (256 * d + d * d)


def forward_flops(m, loops: int) -> float:
    """One forward pass at `loops` loops: what one sampling step of one sample costs (no CFG)."""
    return embed_flops(m) + trunk_flops(m, loops) + readout_flops(m)


def train_flops_per_sample(recipe) -> float:
    """Forward + backward (≈ 3× forward) of one ILSD training step: one pass to L_max, two readouts."""
    m = recipe.model
    readouts = 2 if recipe.ilsd.enabled else 1
    return 3 * (embed_flops(m) + trunk_flops(m, m.loops) + readouts * readout_flops(m))
