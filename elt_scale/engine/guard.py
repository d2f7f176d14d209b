"""Numerics guard: skip steps with a non-finite loss or gradient; stop after K bad steps in a row.

The skip itself is DeepSpeed's: with ZeRO 1-3 (and its bf16 optimizer) a non-finite gradient norm marks
the step as overflowed and the optimizer step is not taken (`engine.skipped_steps`); for stage 0
`GuardedAdamW` does the same. The learning rate stays a function of the step (schedules.py). A non-finite
loss is turned into non-finite gradients (`poison`) so both cases go the same way and every rank agrees (the
gradient norm is global). The per-term flags are all-reduced with the preemption flag (`AgreedFlags`), so all
ranks name the same culprit."""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist

TERMS = ("loss_teacher", "loss_student", "loss_distill")


class NumericsStop(RuntimeError):
    """K consecutive bad steps: the message names the step and the offending loss term."""


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not finite, reporting it the way DeepSpeed's own
    optimizers do (`overflow`, `_global_grad_norm`), so the engine counts it.
    Used only at stage 0 in fp32 (DeepSpeed hands it the gradients unwrapped), where it also clips and
    reports the pre-clip norm; under ZeRO/bf16 DeepSpeed's own wrapper does all three."""

    def __init__(self, params, max_grad_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm, self.overflow, self._global_grad_norm = max_grad_norm, False, None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        return None if self.overflow else super().step(closure)


def term_flags(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """1.0 per term in TERMS that is non-finite on this rank (absent terms: 0), as a float32 tensor on the
    terms' device: no host read here, the train loop reads all flags once per step (`train.agree`)."""
    device = next(iter(terms.values())).device
    return torch.stack([(~torch.isfinite(terms[k]).all()) if k in terms else torch.zeros((), dtype=torch.bool,
                        device=device) for k in TERMS]).float()


def poison(loss: torch.Tensor) -> torch.Tensor:
    """A non-finite loss gives NaN gradients for sure (a NaN added as a constant would not). Multiplying
    by 1 or NaN picked on the device keeps the step free of a host sync between forward and backward,
    and leaves a finite loss's gradients bit-identical."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)


class NumericsGuard:
    def __init__(self, max_bad_steps: int, skipped_steps: int = 0, streak: int = 0):
        self.max_bad, self.skipped, self.streak = max_bad_steps, skipped_steps, streak

    def after_step(self, step: int, skipped: bool, bad_terms: list[float], grad_norm: float | None = None) -> None:
        """Count the step; raise NumericsStop on the K-th consecutive bad one."""
        bad = skipped or any(bad_terms)
        if not bad:
            self.streak = 0
            return
        self.skipped += 1
        self.streak += 1
        culprit = next((k for k, f in zip(TERMS, bad_terms) if f), None)
        what = f"non-finite {culprit}" if culprit else "non-finite gradient" + (
            f" (grad norm {grad_norm})" if grad_norm is not None else "")
        if self.streak >= self.max_bad:
            raise NumericsStop(f"{self.streak} consecutive bad steps (train.max_bad_steps={self.max_bad}); "
                               f"last at step {step}: {what}; skipped {self.skipped} step(s) in total")


class AgreedFlags:
    """The flags every rank must agree on after every step - each loss term non-finite, a preemption signal
    seen, rank 0 unable to write metrics.jsonl - max-reduced over ranks in one small all-reduce that does not
    block the step: `launch` starts it after the step, `settle(through)` reads the steps up to `through`.
    The loop settles a step at once where it logs, evaluates or saves (those read the device anyway), and
    otherwise one step later, after the next step's work is queued: the read then finds the values there.
    On a GPU the flags reach the host through a pinned buffer and an event, not a stream-wide sync."""

    def __init__(self, device):
        self.device, self.pending = torch.device(device), deque()

    def launch(self, step: int, skipped: bool, bad: torch.Tensor, preempt: bool, write_failed: bool) -> None:
        t = torch.cat([bad.float(), *(bad.new_full((1,), float(f), dtype=torch.float32)   # no host->device copy
                                      for f in (preempt, write_failed))])
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
        host, ready = t, None
        if self.device.type == "cuda":
            work.wait()                      # NCCL: orders the copy after the reduction on the stream, no host wait
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            ready, work = torch.cuda.Event(), None
            ready.record()
        self.pending.append((step, skipped, work, host, ready))

    def settle(self, through: int):
        """Yields (step, skipped, bad term flags, preempted, write_failed) of every launched step <= through."""
        while self.pending and self.pending[0][0] <= through:
            step, skipped, work, host, ready = self.pending.popleft()
            if work is not None:
                work.wait()
            if ready is not None:
                ready.synchronize()
            *bad, preempted, write_failed = host.tolist()
            yield step, skipped, bad, preempted > 0, write_failed > 0
