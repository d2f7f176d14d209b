"""Running the looped trunk at a loop spec (elt_scale/loopspec.py parses the specs): a fixed count, or
adaptive (loop until the hidden state stops changing)."""
from __future__ import annotations

import torch

from ..loopspec import Adaptive


@torch.no_grad()
def run_trunk(trunk, x: torch.Tensor, cond: torch.Tensor | None,
              loops: int | Adaptive) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the looped trunk at a fixed count or adaptively -> (state, loops spent per sample (B,))."""
    if not isinstance(loops, Adaptive):
        return trunk(x, cond, exits=(loops,))[0], torch.full((x.shape[0],), loops, dtype=torch.long)
    return run_adaptive(trunk, x, cond, loops.tau, loops.max_loops)


def run_adaptive(trunk, x: torch.Tensor, cond: torch.Tensor | None, tau: float,
                 max_loops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop each sample until its relative state change falls below tau (or max_loops).

    Converged samples leave the batch, so the compute saved is real, not just reported."""
    spent = torch.zeros(x.shape[0], dtype=torch.long)
    active = torch.arange(x.shape[0])
    for _ in range(max_loops):
        prev = x[active]
        new = trunk.step(prev, cond[active] if cond is not None else None)
        x = x.index_copy(0, active.to(x.device), new)
        spent[active] += 1
        change = (new - prev).flatten(1).norm(dim=1) / prev.flatten(1).norm(dim=1).clamp_min(1e-12)
        active = active[(change >= tau).cpu()]
        if active.numel() == 0:
            break
    return x, spent
