"""Masked generative ELT (MaskGIT/BERT style): code grid + class -> logits over the codebook, at any loop count."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .embeddings import ClassEmbedder, num_tokens
from .trunk import LoopedTrunk


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
