"""Samplers for both model families; every one takes a loop schedule (any L, per-step, or adaptive).

    z, cost = generate(model, recipe, labels, parse_loops("4", recipe.model.loops), cfg=2.0, seed=0)
"""
from __future__ import annotations

import torch

from ..loopspec import Adaptive, LoopSchedule, parse_loop_list, parse_loops
from .diffusion import SAMPLERS, diffusion_sample
from .maskgit import maskgit_sample
from .predict import Cost


def default_steps(recipe, sampler: str | None = None) -> int:
    """The paper's defaults: MaskGIT 24 steps for images, 12 for video; DDPM 512; DDIM 50."""
    if recipe.model.family == "masked":
        return 12 if len(recipe.model.grid) == 3 else 24
    return 50 if sampler == "ddim" else 512


def generate(model, recipe, labels: torch.Tensor, schedule: LoopSchedule | str | int, cfg: float = 1.0,
             steps: int | None = None, sampler: str = "ddpm", generator: torch.Generator | None = None,
             temperature: float = 1.0) -> tuple[torch.Tensor, Cost]:
    """Class labels (B,) -> (codes (B, *grid) or latents (B, C, *grid), per-sample cost)."""
    if not isinstance(schedule, LoopSchedule):
        schedule = parse_loops(schedule, recipe.model.loops)
    steps = steps or default_steps(recipe, sampler)
    if recipe.model.family == "masked":
        return maskgit_sample(model, labels, schedule, steps, cfg, temperature, generator)
    return diffusion_sample(model, labels, schedule, recipe.objective.noise_shift, steps, sampler, cfg, generator)


__all__ = ["generate", "default_steps", "parse_loops", "parse_loop_list", "LoopSchedule", "Adaptive", "Cost",
           "SAMPLERS", "maskgit_sample", "diffusion_sample"]
