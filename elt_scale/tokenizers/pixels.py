"""The identity tokenizer: pixels quantized to `levels` grey levels (codes) or scaled to [-1, 1] (latents)."""
from __future__ import annotations

import numpy as np
import torch


class PixelTokenizer:
    name = "pixels"
    video_native = True          # works on (B, C, T, H, W) as well

    def __init__(self, mode: str = "quantized", levels: int = 17, **_):
        if mode not in ("quantized", "identity"):
            raise ValueError(f"pixels tokenizer mode={mode!r}; allowed: quantized, identity")
        self.mode, self.levels = mode, levels
        self.kind = "codes" if mode == "quantized" else "latents"
        self.dtype = np.int16 if mode == "quantized" else np.float16
        self.vocab_size = levels if mode == "quantized" else None
        self.scaling_factor = 1.0

    def manifest_entry(self) -> dict:
        return {"name": self.name, "mode": self.mode, "levels": self.levels}

    def output_shape(self, channels: int, grid: list[int]) -> list[int]:
        """Shape of one stored sample: codes drop the channel axis (grey images only)."""
        if self.mode == "quantized":
            if channels != 1:
                raise ValueError("pixels tokenizer in quantized mode supports single-channel images only")
            return list(grid)
        return [channels] + list(grid)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, seeds=None) -> torch.Tensor:
        """images (B, C, [T,] H, W) in [0, 1] -> codes (B, [T,] H, W) or latents (B, C, [T,] H, W)."""
        if self.mode == "quantized":
            return torch.round(images[:, 0].clamp(0, 1) * (self.levels - 1)).to(torch.int16)
        return (images * 2 - 1).to(torch.float16)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of encode -> images (B, C, [T,] H, W) in [0, 1]."""
        if self.mode == "quantized":
            return (z.float() / (self.levels - 1)).clamp(0, 1).unsqueeze(1)
        return ((z.float() + 1) / 2).clamp(0, 1)
