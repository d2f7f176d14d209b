"""Fréchet distances through torchmetrics with any feature network: FVD (I3D), FD-digits (the digits
classifier), tiny test networks. Images are uint8 (N, H, W, 3) as in ADM .npz files; videos uint8
(N, T, H, W, 3). ImageNet's IS/FID/sFID/precision/recall follow ADM's evaluator instead (adm.py)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

FVD_CLIP = 16          # StyleGAN-V protocol: 16-frame clips


def to_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, 3, H, W)."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    return x.permute(0, 3, 1, 2).contiguous()


def _feed(metric, images: torch.Tensor, batch: int, desc: str, **kw) -> None:
    for i in tqdm(range(0, len(images), batch), desc=desc, leave=False, disable=len(images) <= 4 * batch):
        metric.update(images[i:i + batch], **kw)


def frechet_distance(samples, reference, features: nn.Module, batch: int = 100,
                     layout: str = "images") -> float:
    """Fréchet distance between feature Gaussians of two sets (FID for Inception, FVD for I3D)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    prep = to_nchw if layout == "images" else (lambda v: torch.as_tensor(np.asarray(v)))
    fake, real = prep(samples), prep(reference)
    if len(fake) < 2 or len(real) < 2:
        raise ValueError(f"a Fréchet distance needs >= 2 samples per side, got {len(fake)} and {len(real)}")
    with torch.no_grad():
        features.num_features = int(features(fake[:2]).shape[-1])
    # a local computation on the arrays given: never wait for other ranks (in-training eval runs it on rank 0)
    metric = FrechetInceptionDistance(feature=features, reset_real_features=True, sync_on_compute=False)
    with torch.no_grad():
        _feed(metric, real, batch, "reference features", real=True)
        _feed(metric, fake, batch, "sample features", real=False)
        return float(metric.compute())


def video_clips(videos: np.ndarray, clip: int = FVD_CLIP) -> np.ndarray:
    """uint8 (N, T, H, W, 3) -> the first `clip` frames of each video (the StyleGAN-V protocol)."""
    v = np.asarray(videos)
    if v.ndim != 5 or v.shape[-1] != 3:
        raise ValueError(f"FVD expects uint8 videos (N, T, H, W, 3), got {v.shape}")
    if v.shape[1] < clip:
        raise ValueError(f"FVD uses {clip}-frame clips; these videos have {v.shape[1]} frames")
    return v[:, :clip]


def fvd(samples, reference, i3d: nn.Module, clip: int = FVD_CLIP, batch: int = 16) -> float:
    return frechet_distance(video_clips(samples, clip), video_clips(reference, clip), i3d, batch, layout="videos")
