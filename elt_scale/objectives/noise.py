"""Diffusion objective: shifted-cosine noise schedule in continuous t, sigmoid-weighted MSE on x0."""
from __future__ import annotations

import math

import torch

LOGSNR_MIN, LOGSNR_MAX = -15.0, 15.0


def logsnr(t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Cosine schedule's log SNR, shifted by -2·log(shift) (simple diffusion), clipped to stay finite."""
    t = t.clamp(1e-6, 1 - 1e-6)
    out = -2.0 * torch.log(torch.tan(math.pi / 2 * t)) - 2.0 * math.log(shift)
    return out.clamp(LOGSNR_MIN, LOGSNR_MAX)


def alpha_sigma(t: torch.Tensor, shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    lam = logsnr(t, shift)
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    a, s = alpha_sigma(t, shift)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return a.view(shape) * x0 + s.view(shape) * noise


def x0_weight(t: torch.Tensor, shift: float = 1.0, bias: float = 0.0) -> torch.Tensor:
    """Weight on ||x0_hat - x0||^2 equal to the sigmoid-weighted eps loss (Kingma & Gao 2023):
    ||eps - eps_hat||^2 = SNR·||x0 - x0_hat||^2, times sigmoid(bias - logSNR). Bounded by e^bias."""
    lam = logsnr(t, shift)
    return torch.sigmoid(bias - lam) * torch.exp(lam)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (weight * per_sample).mean()
