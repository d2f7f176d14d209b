"""MaskGIT objective: cosine mask schedule, masked cross-entropy, soft cross-entropy for distillation."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..schedules import mask_ratio as cosine_mask_ratio   # the one masking schedule (schedules.py)


def random_mask(tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask (B, n) of the positions to hide: per sample r ~ U(0,1), ceil(cos(pi/2 r)·n) positions."""
    b, n = tokens.shape[0], tokens[0].numel()
    device = generator.device if generator is not None else tokens.device   # drawn where the generator lives
    r = torch.rand(b, generator=generator, device=device)
    count = torch.ceil(cosine_mask_ratio(r) * n).clamp(1, n)
    scores = torch.rand(b, n, generator=generator, device=device)
    ranks = scores.argsort(dim=1).argsort(dim=1)      # rank of each position's score
    return (ranks < count[:, None]).to(tokens.device)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over masked positions. logits (B, n, V), targets/mask (B, n)."""
    # Rows of V contiguous logits: the (B, V, n) layout would run a strided "spatial" softmax instead,
    # 3× slower on CPU and ~1.2 ms a call on an H200 (bench/RESULTS.md, profile of run 2).
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none",
                         label_smoothing=label_smoothing).view_as(targets)
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's full distribution, over masked positions."""
    p_teacher = teacher_logits.float().softmax(-1)
    ce = -(p_teacher * student_logits.float().log_softmax(-1)).sum(-1)
    return (ce * mask).sum() / mask.sum().clamp(min=1)
