"""LoopedTrunk: N unique layers applied L times. One pass returns the state at any set of loop counts."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .layers import TransformerLayer

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

