"""Video tokenizers: any image tokenizer applied frame by frame, and a 3D video VAE from diffusers
(AutoencoderKLWan by default; `vae_class` names another diffusers 3D KL autoencoder)."""
from __future__ import annotations

import numpy as np
import torch

from ..seeding import derive_seed
from .common import key_noise, load_diffusers, recorded_path, resolve_device, resolve_precision


class PerFrame:
    """Wraps an image tokenizer: (B, C, T, H, W) -> per-frame latents (B, C', T, h, w) or codes (B, T, h, w)."""

    video_native = True

    def __init__(self, inner):
        self.inner = inner
        for attr in ("name", "kind", "dtype", "vocab_size", "scaling_factor"):
            setattr(self, attr, getattr(inner, attr))

    def manifest_entry(self) -> dict:
        return {**self.inner.manifest_entry(), "per_frame": True}

    def output_shape(self, channels: int, grid: list[int]) -> list[int]:
        t, *hw = grid
        frame = self.inner.output_shape(channels, hw)
        return [t] + frame if self.kind == "codes" else [frame[0], t] + frame[1:]

    @staticmethod
    def _frames(x: torch.Tensor, channel_axis: bool) -> tuple[torch.Tensor, int]:
        if channel_axis:                           # (B, C, T, ...) -> (B*T, C, ...)
            b, c, t = x.shape[:3]
            return x.transpose(1, 2).reshape(b * t, c, *x.shape[3:]), t
        b, t = x.shape[:2]                         # codes (B, T, h, w) -> (B*T, h, w)
        return x.reshape(b * t, *x.shape[2:]), t

    @staticmethod
    def _video(y: torch.Tensor, t: int, channel_axis: bool) -> torch.Tensor:
        y = y.reshape(-1, t, *y.shape[1:])
        return y.transpose(1, 2).contiguous() if channel_axis else y

    def encode(self, images: torch.Tensor, seeds=None) -> torch.Tensor:
        frames, t = self._frames(images, True)
        frame_seeds = None if seeds is None else [derive_seed(s, "frame", i) for s in seeds for i in range(t)]
        return self._video(self.inner.encode(frames, frame_seeds), t, self.kind == "latents")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        frames, t = self._frames(z, self.kind == "latents")
        return self._video(self.inner.decode(frames), t, True)


class VideoVAETokenizer:
    """A causal 3D KL autoencoder: (B, 3, T, H, W) -> (B, C, T', h, w), normalised per channel with the
    model's latents_mean/latents_std when it has them (Wan), else scaled by its scaling_factor."""

    name = "video-vae"
    kind = "latents"
    dtype = np.float16
    vocab_size = None
    video_native = True

    def __init__(self, path: str = "", subfolder: str | None = None, vae_class: str = "AutoencoderKLWan",
                 latent_sample: bool = False, device: str | None = None, precision: str = "auto", **_):
        self.path, self.subfolder, self.vae_class = recorded_path(path), subfolder, vae_class
        self.latent_sample = latent_sample
        self.device = resolve_device(device)
        self.compute_dtype = resolve_precision(precision, self.device)
        self.model = load_diffusers(vae_class, path, subfolder, self.device, self.compute_dtype)
        cfg = self.model.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        sf = float(cfg.get("scaling_factor") or 1.0)
        self.mean = torch.tensor(mean if mean is not None else [0.0]).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0 / sf]).view(1, -1, 1, 1, 1)
        self.scaling_factor = 1.0 if std is not None else sf

    def manifest_entry(self) -> dict:
        return {"name": self.name, "path": self.path, "subfolder": self.subfolder, "vae_class": self.vae_class,
                "latent_sample": self.latent_sample}

    def output_shape(self, channels: int, grid: list[int]) -> list[int]:
        """Also checks that the clip length survives a round trip: Wan, for one, encodes 1 + 4k frames."""
        if len(grid) != 3:
            raise ValueError(f"{self.vae_class} is a video tokenizer; the source gives images {grid}")
        z = self.encode(torch.zeros(1, channels, *grid))
        frames = self.decode(z).shape[2]
        if frames != grid[0]:
            raise ValueError(f"{self.vae_class} turns {grid[0]} frames into {z.shape[2]} latent frames that "
                             f"decode to {frames}; choose --frames so they match (Wan: 1 + 4k, e.g. 17)")
        return list(z.shape[1:])

    @torch.no_grad()
    def encode(self, videos: torch.Tensor, seeds=None) -> torch.Tensor:
        x = videos.to(self.device, self.compute_dtype) * 2 - 1
        dist = self.model.encode(x).latent_dist
        z = dist.mean.float()
        if self.latent_sample:
            z = z + dist.std.float() * key_noise(z.shape[1:], seeds, len(z)).to(z.device)
        return ((z.cpu() - self.mean) / self.std).to(torch.float16)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float().cpu() * self.std + self.mean
        x = self.model.decode(z.to(self.device, self.compute_dtype)).sample.float()
        return ((x + 1) / 2).clamp(0, 1).cpu()
