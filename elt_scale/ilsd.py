"""Intra-Loop Self Distillation: loop sampler, lambda schedule, and the dual-path loss.

    L = GT(teacher) + λ·GT(student) + (1−λ)·Distill(student, stopgrad(teacher))

The student is the state after L_int loops of the *same* forward pass that reaches L_max (an exit of
the LoopedTrunk), so one pass gives both predictions."""
from __future__ import annotations

import torch

from .schedules import ilsd_lambda  # noqa: F401 -- λ lives with the other schedules; imported here for callers
from .seeding import generator


def draw_l_int(seed: int, step: int, min_loops: int, max_loops: int) -> int:
    """L_int ~ Uniform{min_loops, …, max_loops−1}, a pure function of (seed, step): identical on every
    rank without communication, and the same sequence after a resume."""
    return int(torch.randint(min_loops, max_loops, (1,), generator=generator(seed, "l_int", step)))


def ilsd_loss(teacher: torch.Tensor, student: torch.Tensor | None, objective, prepared, lam: float):
    """Returns (loss, terms). With student=None this is the vanilla looped loss GT(teacher)."""
    gt_teacher = objective.gt(teacher, prepared)
    if student is None:
        return gt_teacher, {"loss_teacher": gt_teacher.detach()}
    gt_student = objective.gt(student, prepared)
    distill = objective.distill(student, teacher, prepared)    # teacher detached inside: stop-gradient
    loss = gt_teacher + lam * gt_student + (1.0 - lam) * distill
    return loss, {"loss_teacher": gt_teacher.detach(), "loss_student": gt_student.detach(),
                  "loss_distill": distill.detach()}
