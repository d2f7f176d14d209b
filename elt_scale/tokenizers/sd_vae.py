"""Stable Diffusion's KL autoencoder (diffusers AutoencoderKL): pixels <-> latents x scaling factor."""
from __future__ import annotations

import numpy as np
import torch

from .common import key_noise, load_diffusers, recorded_path, resolve_device, resolve_precision


class SDVAETokenizer:
    name = "sd-vae"
    kind = "latents"
    dtype = np.float16
    vocab_size = None
    video_native = False

    def __init__(self, path: str = "stabilityai/sd-vae-ft-ema", subfolder: str | None = None,
                 latent_sample: bool = False, scaling_factor: float | None = None,
                 shift_factor: float | None = None, device: str | None = None, precision: str = "auto", **_):
        self.path, self.subfolder, self.latent_sample = recorded_path(path), subfolder, latent_sample
        self.device = resolve_device(device)
        self.compute_dtype = resolve_precision(precision, self.device)
        self.model = load_diffusers("AutoencoderKL", path, subfolder, self.device, self.compute_dtype)
        cfg = self.model.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        self.shift_factor = float(shift_factor if shift_factor is not None else (cfg.get("shift_factor") or 0.0))

    def manifest_entry(self) -> dict:
        return {"name": self.name, "path": self.path, "subfolder": self.subfolder,
                "latent_sample": self.latent_sample, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor}

    def output_shape(self, channels: int, grid: list[int]) -> list[int]:
        return list(self.encode(torch.zeros(1, channels, *grid)).shape[1:])

    @torch.no_grad()
    def encode(self, images: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, H/f, W/f) fp16: the posterior mean, or a sample from it
        (--latent-sample, noise seeded per sample), shifted and scaled for the diffusion model."""
        x = images.to(self.device, self.compute_dtype) * 2 - 1
        dist = self.model.encode(x).latent_dist
        z = dist.mean.float()
        if self.latent_sample:
            z = z + dist.std.float() * key_noise(z.shape[1:], seeds, len(z)).to(z.device)
        return ((z - self.shift_factor) * self.scaling_factor).cpu().to(torch.float16)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as stored (scaled) -> images (B, 3, H, W) in [0, 1]."""
        z = z.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        x = self.model.decode(z.to(self.compute_dtype)).sample.float()
        return ((x + 1) / 2).clamp(0, 1).cpu()
