"""Every schedule a run follows, in one place, as pure functions of the recipe and the step: the learning
rate, ILSD's λ, the L_int distribution and MaskGIT's masking ratio.

    s = Schedules.of(recipe)
    s.lr(step)             learning rate of the update that completes `step` (1-based, as logged)
    s.lam(step)            λ of that update
    s.l_int_range()        (lo, hi): L_int ~ Uniform{lo, …, hi}, one draw per step (ilsd.draw_l_int)
    mask_ratio(r)          fraction of tokens hidden at schedule position r ∈ [0, 1)

The learning rate rises linearly from lr/warmup_steps at step 1 to lr at step warmup_steps (MaskGIT's and
DiT's warm-up), then follows a half cosine to lr·min_lr_ratio at the last step. Because it is a function of
the step alone, a resume on any layout and a step skipped for non-finite gradients leave it where the closed
form says (DeepSpeed's own WarmupCosineLR warms up on a log ramp by default and does not advance over skipped
steps). The trainer writes it into the optimizer before every update (engine/resume.set_lr)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedules:
    steps: int
    peak_lr: float
    warmup_steps: int
    min_lr_ratio: float
    ilsd: bool
    lambda_start: float
    lambda_end: float
    lambda_steps: int
    min_loops: int
    max_loops: int

    @classmethod
    def of(cls, recipe) -> "Schedules":
        t, i = recipe.train, recipe.ilsd
        return cls(t.steps, t.lr, t.warmup_steps, t.min_lr_ratio, i.enabled, i.lambda_start, i.lambda_end,
                   i.lambda_steps or t.steps, i.min_loops, recipe.model.loops)

    def lr_factor(self, step: int) -> float:
        """lr(step) / peak lr: linear warm-up, then cosine down to min_lr_ratio at `steps`."""
        if step <= self.warmup_steps:
            return step / self.warmup_steps if self.warmup_steps else 1.0
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr(self, step: int) -> float:
        return self.peak_lr * self.lr_factor(step)

    def lam(self, step: int) -> float:
        """λ of the update that completes `step`: linear from lambda_start (step 1) to lambda_end at
        lambda_steps, then constant; 1 without ILSD (the teacher's loss alone)."""
        if not self.ilsd:
            return 1.0
        return ilsd_lambda(step - 1, self.lambda_start, self.lambda_end, self.lambda_steps)

    def l_int_range(self) -> tuple[int, int]:
        """Inclusive bounds of L_int; (L_max, L_max) without ILSD (no student)."""
        return (self.min_loops, self.max_loops - 1) if self.ilsd else (self.max_loops, self.max_loops)

    def table(self, points: int = 11) -> list[dict]:
        """The schedules at `points` evenly spaced steps (and the end of warm-up), for elt-plan."""
        steps = sorted({1, self.warmup_steps, self.steps, *(round(1 + k * (self.steps - 1) / (points - 1))
                                                            for k in range(points))} - {0})
        return [{"step": s, "lr": self.lr(s), "lr_factor": self.lr_factor(s), "lambda": self.lam(s)}
                for s in steps if s <= self.steps]


def ilsd_lambda(step: int, start: float, end: float, steps: int) -> float:
    """λ linear from `start` at step 0 to `end` at `steps` (0-based), constant afterwards."""
    if steps <= 0:
        return end
    frac = min(max(step / steps, 0.0), 1.0)
    return start + (end - start) * frac


def mask_ratio(r):
    """Fraction of tokens masked at schedule position r in [0, 1): MaskGIT's cosine schedule. Training draws
    r ~ U(0, 1) per sample (mean ratio 2/π); sampling step k of K uses r = (k + 1) / K."""
    return math.cos(math.pi / 2 * r) if isinstance(r, (int, float)) else (r * (math.pi / 2)).cos()   # tensors too


MEAN_MASK_RATIO = 2 / math.pi      # E[cos(π/2 · r)] for r ~ U(0, 1)
