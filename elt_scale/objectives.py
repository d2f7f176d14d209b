"""What the model is trained to predict, and how ILSD combines its two exits into one loss. Read top-down:
ILSD's loss -> one objective class per family (masked tokens; x0 under noise) -> their schedules and losses.

Intra-Loop Self Distillation:

    L = GT(teacher) + λ·GT(student) + (1−λ)·Distill(student, stopgrad(teacher))

The student is the state after L_int loops of the *same* forward pass that reaches L_max (an exit of
the LoopedTrunk), so one pass gives both predictions.

Each family's objective has the same three methods: prepare a batch, GT loss, distill loss. `prepare` draws
all randomness (masks, noise, t, label drop) from the generator it is given, on that generator's device, so
the trainer can make each step's randomness a pure function of (seed, step, rank, micro-step) and, with a
generator on the GPU, prepare a batch without a host-device copy or sync."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .schedules import ilsd_lambda  # noqa: F401 -- λ lives with the other schedules; imported here for callers
from .schedules import mask_ratio as cosine_mask_ratio   # the one masking schedule (schedules.py)
from .seeding import generator


# ---------------------------------------------------------------------------------------------------------
# ILSD: the loop sampler and the dual-path loss

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


# ---------------------------------------------------------------------------------------------------------
# one objective per family: prepare a batch, GT loss, distill loss

def build_objective(recipe):
    m, o = recipe.model, recipe.objective
    if m.family == "masked":
        return MaskedObjective(m.vocab_size, m.num_classes, m.class_dropout, o.label_smoothing)
    return DiffusionObjective(m.num_classes, m.class_dropout, o.noise_shift, o.sigmoid_bias)


@dataclass
class Prepared:
    inputs: tuple            # positional model inputs
    target: torch.Tensor     # what GT compares against
    extra: torch.Tensor      # mask (masked) or per-sample weight (diffusion)


class MaskedObjective:
    def __init__(self, vocab_size: int, num_classes: int, class_dropout: float, label_smoothing: float = 0.0):
        self.mask_id, self.null_class = vocab_size, num_classes
        self.class_dropout, self.label_smoothing = class_dropout, label_smoothing

    def prepare(self, codes: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> Prepared:
        codes = codes.long()
        mask = random_mask(codes, g).view_as(codes)
        inputs = torch.where(mask, torch.full_like(codes, self.mask_id), codes)
        labels = drop_labels(labels.long(), self.class_dropout, self.null_class, g)
        return Prepared((inputs, labels), codes.flatten(1), mask.flatten(1))

    def gt(self, logits: torch.Tensor, p: Prepared) -> torch.Tensor:
        return masked_ce(logits, p.target, p.extra, self.label_smoothing)

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, p: Prepared) -> torch.Tensor:
        return soft_ce(student, teacher.detach(), p.extra)


class DiffusionObjective:
    def __init__(self, num_classes: int, class_dropout: float, shift: float = 1.0, bias: float = 0.0):
        self.null_class, self.class_dropout = num_classes, class_dropout
        self.shift, self.bias = shift, bias

    def prepare(self, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> Prepared:
        x0 = x0.float()
        t = torch.rand(x0.shape[0], generator=g, device=g.device).to(x0.device)
        noise = torch.randn(x0.shape, generator=g, device=g.device).to(x0.device)
        x_t = add_noise(x0, t, noise, self.shift)
        labels = drop_labels(labels.long(), self.class_dropout, self.null_class, g)
        return Prepared((x_t, t, labels), x0, x0_weight(t, self.shift, self.bias))

    def gt(self, pred: torch.Tensor, p: Prepared) -> torch.Tensor:
        return weighted_mse(pred, p.target, p.extra)

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, p: Prepared) -> torch.Tensor:
        return weighted_mse(student, teacher.detach(), p.extra)


def drop_labels(labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    drop = torch.rand(labels.shape[0], generator=generator, device=generator.device) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


# ---------------------------------------------------------------------------------------------------------
# masked tokens (MaskGIT): cosine mask schedule, masked cross-entropy, soft cross-entropy for distillation

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


# ---------------------------------------------------------------------------------------------------------
# x0 under noise (diffusion): shifted-cosine noise schedule in continuous t, sigmoid-weighted MSE on x0

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
