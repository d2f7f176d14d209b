"""DDPM (ancestral) and DDIM (deterministic) sampling for the diffusion ELT, in the continuous-t
shifted-cosine schedule used in training (`objectives.py`); the model predicts x0.

Time runs from t=1 (pure noise) to t=0 in `steps` equal steps. Each step predicts x0, turns it into
the implied noise, and moves to the next t: DDIM along the deterministic path, DDPM by drawing from
the Gaussian posterior q(x_s | x_t, x0). The last step returns the x0 prediction itself."""
from __future__ import annotations

import torch

from ..loopspec import LoopSchedule
from ..objectives import alpha_sigma
from .predict import Cost, diffusion_x0, guided

SAMPLERS = ("ddpm", "ddim")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def ddim_step(x_t, x0, a_t, s_t, a_s, s_s):
    eps = (x_t - a_t * x0) / s_t
    return a_s * x0 + s_s * eps


def ddpm_step(x_t, x0, a_t, s_t, a_s, s_s, noise):
    """Posterior q(x_s | x_t, x0) for s < t (Kingma et al. 2021, eq. 32-33)."""
    a_ts = a_t / a_s
    var_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
    mean = (a_ts * s_s ** 2 / s_t ** 2) * x_t + (a_s * var_ts / s_t ** 2) * x0
    return mean + (var_ts * s_s ** 2 / s_t ** 2).clamp_min(0).sqrt() * noise


@torch.no_grad()
def diffusion_sample(model, labels: torch.Tensor, schedule: LoopSchedule, shift: float = 1.0,
                     steps: int = 512, sampler: str = "ddpm", cfg: float = 1.0,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, Cost]:
    """-> (latents (B, C, *grid), cost)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; allowed: {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"diffusion steps must be >= 1, got {steps}")
    generator = generator or torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    b = labels.shape[0]
    x = torch.randn((b, model.channels, *model.grid), generator=generator).to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    cost = Cost()
    for k in range(steps):
        t, s = ts[k].expand(b).to(device), ts[k + 1].expand(b).to(device)
        loops = schedule.at(k, steps)
        x0 = guided(lambda xt, tt, y: diffusion_x0(model, xt, tt, y, loops), (x, t), labels,
                    model.null_class, cfg, cost).float()
        if k == steps - 1:
            return x0, cost
        (a_t, s_t), (a_s, s_s) = alpha_sigma(t, shift), alpha_sigma(s, shift)
        a_t, s_t, a_s, s_s = (_bcast(v, x) for v in (a_t, s_t, a_s, s_s))
        if sampler == "ddim":
            x = ddim_step(x, x0, a_t, s_t, a_s, s_s)
        else:
            noise = torch.randn(x.shape, generator=generator).to(device)
            x = ddpm_step(x, x0, a_t, s_t, a_s, s_s, noise)
    return x, cost
