"""MaskGIT decoding for the masked ELT: start fully masked, and over K steps commit the most confident
tokens, following the cosine schedule; committed tokens are never masked again.

Confidence is the log-probability of each sampled token plus Gumbel noise scaled by the choice
temperature 0.5 + 0.8·(1 − (k+1)/K) (the ELT paper), so early steps pick positions more randomly."""
from __future__ import annotations

import math

import torch

from ..loopspec import LoopSchedule
from ..schedules import mask_ratio
from .predict import Cost, guided, masked_logits


def choice_temperature(k: int, steps: int) -> float:
    return 0.5 + 0.8 * (1 - (k + 1) / steps)


def masked_after(k: int, steps: int, n: int) -> int:
    """Positions still masked after step k (cosine schedule): n·cos(π/2·(k+1)/K), 0 after the last step."""
    return int(math.floor(n * mask_ratio((k + 1) / steps)))


def gumbel(shape, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp(1e-20, 1.0)
    return -torch.log((-torch.log(u)).clamp_min(1e-20))


@torch.no_grad()
def maskgit_sample(model, labels: torch.Tensor, schedule: LoopSchedule, steps: int = 12, cfg: float = 1.0,
                   temperature: float = 1.0, generator: torch.Generator | None = None,
                   trace: list | None = None) -> tuple[torch.Tensor, Cost]:
    """-> (codes (B, *grid) in [0, vocab), cost). `trace`, if given, collects the token grid after
    each step (for tests and visualisations)."""
    if steps < 1:
        raise ValueError(f"MaskGIT steps must be >= 1, got {steps}")
    generator = generator or torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    b, n = labels.shape[0], model.seq_len
    tokens = torch.full((b, n), model.mask_id, dtype=torch.long, device=device)
    cost = Cost()
    for k in range(steps):
        loops = schedule.at(k, steps)
        logits = guided(lambda t, y: masked_logits(model, t, y, loops), (tokens,), labels,
                        model.null_class, cfg, cost).float()
        probs = (logits / temperature).softmax(-1).cpu()
        sampled = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(b, n)
        is_masked = (tokens == model.mask_id).cpu()
        sampled = torch.where(is_masked, sampled, tokens.cpu())           # committed tokens stay
        confidence = probs.gather(-1, sampled[..., None]).squeeze(-1).clamp_min(1e-20).log()
        confidence = confidence + choice_temperature(k, steps) * gumbel((b, n), generator)
        confidence = torch.where(is_masked, confidence, torch.full_like(confidence, math.inf))
        # keep masked the least confident positions; always commit at least one new token per step
        still_masked = is_masked.sum(1)
        keep = torch.minimum(torch.full_like(still_masked, masked_after(k, steps, n)), still_masked - 1).clamp_min(0)
        ranks = confidence.argsort(dim=1).argsort(dim=1)
        remask = ranks < keep[:, None]
        tokens = torch.where(remask, torch.full_like(sampled, model.mask_id), sampled).to(device)
        if trace is not None:
            trace.append(tokens.clone())
    return tokens.view(b, *model.grid), cost
