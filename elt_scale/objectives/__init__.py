"""One small class per family with the same three methods: prepare a batch, GT loss, distill loss.

`prepare` draws all randomness (masks, noise, t, label drop) from the generator it is given, on that
generator's device, so the trainer can make each step's randomness a pure function of (seed, step, rank,
micro-step) and, with a generator on the GPU, prepare a batch without a host-device copy or sync."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .masking import masked_ce, random_mask, soft_ce
from .noise import add_noise, weighted_mse, x0_weight


def drop_labels(labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    drop = torch.rand(labels.shape[0], generator=generator, device=generator.device) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


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


def build_objective(recipe):
    m, o = recipe.model, recipe.objective
    if m.family == "masked":
        return MaskedObjective(m.vocab_size, m.num_classes, m.class_dropout, o.label_smoothing)
    return DiffusionObjective(m.num_classes, m.class_dropout, o.noise_shift, o.sigmoid_bias)
