"""A VQ-GAN style tokenizer (diffusers VQModel): pixels <-> integer code grids."""
from __future__ import annotations

import numpy as np
import torch

from .common import load_diffusers, recorded_path, resolve_device, resolve_precision


class VQTokenizer:
    name = "vq"
    kind = "codes"
    scaling_factor = 1.0
    video_native = False

    def __init__(self, path: str = "", subfolder: str | None = None, device: str | None = None,
                 precision: str = "auto", **_):
        self.path, self.subfolder = recorded_path(path), subfolder
        self.device = resolve_device(device)
        # auto = fp32 here: in bf16 the nearest-code search flips codes between near-equidistant entries
        self.compute_dtype = resolve_precision("fp32" if precision == "auto" else precision, self.device)
        self.model = load_diffusers("VQModel", path, subfolder, self.device, self.compute_dtype)
        self.vocab_size = int(self.model.config.num_vq_embeddings)
        self.dtype = np.int16 if self.vocab_size <= np.iinfo(np.int16).max + 1 else np.int32

    def manifest_entry(self) -> dict:
        return {"name": self.name, "path": self.path, "subfolder": self.subfolder}

    def output_shape(self, channels: int, grid: list[int]) -> list[int]:
        return list(self.encode(torch.zeros(1, channels, *grid)).shape[1:])

    @torch.no_grad()
    def encode(self, images: torch.Tensor, seeds=None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> codes (B, H/f, W/f), int16 (int32 for codebooks > 32768)."""
        x = images.to(self.device, self.compute_dtype) * 2 - 1
        h = self.model.encode(x).latents
        _, _, (_, _, idx) = self.model.quantize(h)
        return idx.view(h.shape[0], *h.shape[2:]).cpu().to(torch.int16 if self.dtype == np.int16 else torch.int32)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, 3, H, W) in [0, 1]."""
        b, h, w = codes.shape
        dim = self.model.config.vq_embed_dim or self.model.config.latent_channels
        quant = self.model.quantize.get_codebook_entry(codes.reshape(-1).long().to(self.device), (b, h, w, dim))
        x = self.model.decode(quant.to(self.compute_dtype), force_not_quantize=True).sample.float()
        return ((x + 1) / 2).clamp(0, 1).cpu()
