"""The models, in one file, read top-down: `build_model(recipe)` -> the two families (MaskedELT, DiffusionELT) ->
the LoopedTrunk they share -> its TransformerLayer -> attention, MLP and the embedders.

An Elastic Looped Transformer is N unique layers applied L times (the trunk). One forward pass returns the
hidden state after any set of loop counts (its "exits"), so ILSD's student (L_int loops) and teacher (L_max)
come from the same pass, and sampling can stop at any loop count. FLOP counts live in flops.py."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ---------------------------------------------------------------------------------------------------------
# the public constructor and parameter counts

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


# ---------------------------------------------------------------------------------------------------------
# masked family (MaskGIT/BERT style): code grid + class -> logits over the codebook, at any loop count

class MaskedELT(nn.Module):
    family = "masked"

    def __init__(self, vocab_size: int, grid: list[int], num_classes: int, width: int, heads: int,
                 unique_layers: int, loops: int, mlp_ratio: float = 4.0, checkpointing: str = "none"):
        super().__init__()
        self.vocab_size, self.grid, self.num_classes = vocab_size, list(grid), num_classes
        self.mask_id = vocab_size                      # one extra embedding row: [MASK]
        self.null_class = num_classes
        self.seq_len = num_tokens(grid)
        self.tok_emb = nn.Embedding(vocab_size + 1, width)
        self.cls_emb = ClassEmbedder(num_classes, width)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len + 1, width))   # +1: the class token
        self.trunk = LoopedTrunk(width, heads, unique_layers, loops, mlp_ratio, adaln=False,
                                 checkpointing=checkpointing)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    def embed(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens.flatten(1))
        x = torch.cat([self.cls_emb(labels)[:, None], x], dim=1)
        return x + self.pos_emb

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden state (class token first) -> logits (B, tokens, vocab)."""
        return self.head(self.norm(h[:, 1:]))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor,
                exits: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
        """tokens: (B, *grid) ints, `mask_id` where masked. Returns logits at each exit, in order."""
        states = self.trunk(self.embed(tokens, labels), exits=exits)
        return tuple(self.readout(h) for h in states)


# ---------------------------------------------------------------------------------------------------------
# diffusion family (DiT style): noisy latents + t + class -> x0 prediction, at any loop count

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


# ---------------------------------------------------------------------------------------------------------
# the looped trunk: N unique layers applied L times; one pass returns the state at any set of loop counts

CHECKPOINTING = ("none", "loop", "layer")


class LoopedTrunk(nn.Module):
    def __init__(self, width: int, heads: int, unique_layers: int, loops: int, mlp_ratio: float = 4.0,
                 adaln: bool = False, checkpointing: str = "none"):
        super().__init__()
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing={checkpointing!r}; allowed: {', '.join(CHECKPOINTING)}")
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_ratio, adaln) for _ in range(unique_layers))
        self.loops = loops            # L_max: the default exit
        self.checkpointing = checkpointing
        self._block = self.block      # replaced by the compiled block after compile_block()

    def compile_block(self, scope: str = "layer", **kwargs) -> None:
        """torch.compile the looped block; every loop (and every exit) reuses the same compiled code.

        scope="layer" (default) compiles one TransformerLayer's forward in place and all N layers share
        it (regional compilation: compile time of one layer, state_dict keys unchanged);
        scope="block" traces the whole block of N layers into one graph (longer compile, may fuse
        across layer boundaries). bench/train_throughput.py measures both."""
        if scope == "layer":
            for layer in self.layers:
                layer.compile(**kwargs)
        elif scope == "block":
            self._block = torch.compile(self.block, **kwargs)
        else:
            raise ValueError(f"compile scope={scope!r}; allowed: layer, block")

    def block(self, x: torch.Tensor, cond: torch.Tensor | None, last: bool = False) -> torch.Tensor:
        """One loop: the N unique layers in order (the block g of the paper). `last`: this is the pass's
        final loop, whose final layer is not checkpointed under checkpointing="layer" (see step)."""
        for i, layer in enumerate(self.layers):
            final_unit = last and i == len(self.layers) - 1
            if self.checkpointing == "layer" and torch.is_grad_enabled() and not final_unit:
                x = checkpoint(layer, x, cond, use_reentrant=False)
            else:
                x = layer(x, cond)
        return x

    def step(self, x: torch.Tensor, cond: torch.Tensor | None = None, last: bool = False) -> torch.Tensor:
        """Apply the block once, checkpointed per loop if asked (then only loop-boundary states are kept).

        The pass's last unit (loop, or layer) is never checkpointed: backward starts with it, so its
        activations would be rebuilt at once to the same peak; keeping them saves 1/L of the loop
        policy's recompute (1/(N·L) of the layer policy's) and costs no peak memory."""
        if self.checkpointing == "loop" and torch.is_grad_enabled() and not last:
            return checkpoint(self._block, x, cond, use_reentrant=False)
        return self._block(x, cond, last)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                exits: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Run max(exits) loops; return the hidden state after each requested loop count, in `exits` order."""
        exits = tuple(exits) if exits is not None else (self.loops,)
        if not exits or min(exits) < 1:
            raise ValueError(f"exits must be loop counts >= 1, got {exits}")
        wanted = set(exits)
        states = {}
        final = max(exits)
        for loop in range(1, final + 1):
            x = self.step(x, cond, last=loop == final)
            if loop in wanted:
                states[loop] = x
        return [states[e] for e in exits]


# ---------------------------------------------------------------------------------------------------------
# the layer both families share: attention, MLP, pre-norm with optional adaLN-Zero

class TransformerLayer(nn.Module):
    """Pre-norm layer. With `adaln=True` (DiT), shift/scale/gate come from a conditioning vector and
    start at zero, so every layer begins as the identity (adaLN-Zero)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, adaln: bool = False):
        super().__init__()
        self.adaln = adaln
        self.norm1 = nn.LayerNorm(width, elementwise_affine=not adaln, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=not adaln, eps=1e-6)
        self.mlp = MLP(width, mlp_ratio)
        if adaln:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if not self.adaln:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(cond).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # SDPA picks flash / memory-efficient kernels on GPU by itself.
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float):
        super().__init__()
        hidden = int(width * ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------
# inputs: patchify / unpatchify for 2D and 3D grids, class and timestep embedders, token counts

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


__all__ = ["build_model", "count_params", "param_counts", "LoopedTrunk", "MaskedELT", "DiffusionELT"]
