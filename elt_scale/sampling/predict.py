"""One denoising/unmasking prediction at a given loop count, with classifier-free guidance and an
honest per-sample cost count (forward passes and trunk loops actually run)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..loopspec import Adaptive
from ..flops import embed_flops, readout_flops, trunk_flops
from .loops import run_trunk


@dataclass
class Cost:
    """Per-sample compute spent by a sampler: forward passes and trunk loops (CFG counts both halves)."""
    passes: int = 0
    loops: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    steps: int = 0

    def add(self, spent: torch.Tensor, passes: int) -> None:
        self.loops = spent.cpu() if self.loops.numel() == 0 else self.loops + spent.cpu()
        self.passes += passes
        self.steps += 1

    def flops_per_sample(self, model_config) -> torch.Tensor:
        """Per sample: passes × (embedding + readout) + loops spent × one loop of N unique layers."""
        fixed = self.passes * (embed_flops(model_config) + readout_flops(model_config))
        return fixed + self.loops.double() * trunk_flops(model_config, 1)

    def loops_per_step(self) -> float:
        """Mean trunk loops per sampling step per forward pass (the L the sampler effectively used)."""
        return float(self.loops.double().mean()) / max(self.passes, 1)


def masked_logits(model, tokens: torch.Tensor, labels: torch.Tensor, loops: int | Adaptive):
    h, spent = run_trunk(model.trunk, model.embed(tokens, labels), None, loops)
    return model.readout(h), spent


def diffusion_x0(model, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, loops: int | Adaptive):
    cond = model.condition(t, labels)
    h, spent = run_trunk(model.trunk, model.patchify(x_t) + model.pos_emb, cond, loops)
    return model.readout(h, cond), spent


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + s·(cond − uncond); s = 1 is the plain conditional output."""
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def guided(predict, inputs: tuple, labels: torch.Tensor, null_class: int, cfg: float, cost: Cost):
    """predict(*inputs, labels) -> (out, spent). With cfg != 1, conditional and null-class halves run
    as one doubled batch and are combined by `guide`; cfg == 1 runs the conditional pass only."""
    if cfg == 1.0:
        out, spent = predict(*inputs, labels)
        cost.add(spent, 1)
        return out
    b = labels.shape[0]
    both = torch.cat([labels, torch.full_like(labels, null_class)])
    out, spent = predict(*(torch.cat([x, x]) for x in inputs), both)
    cost.add(spent[:b] + spent[b:], 2)
    return guide(out[:b], out[b:], cfg)
