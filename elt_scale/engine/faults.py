"""Test-only fault injection, driven by the environment variable ELT_FAULT; never set it in a real run.

The recipe schema stays free of test hooks: a test that needs a fault the outside world cannot
produce (a signal, a kill -9, a truncated file) sets, for the processes it starts,

    ELT_FAULT="nan_steps:2,4,5;kill_in_save:2;die_at:1:3;eval_fails:1:4,6"

  nan_steps:S,...   rank 0's first micro-batch of step S (1-based) gets a NaN student exit (teacher,
                    without ILSD): exercises the numerics guard
  kill_in_save:S    every rank SIGKILLs itself inside the save of step S, after the files are written
                    and before `latest` moves; once per run (a restarted job saves step S again)
  die_at:R:S        rank R SIGKILLs itself as step S starts (a rank that always dies, when S comes
                    before the first checkpoint: a crash loop)
  eval_fails:R:S,.. rank R's in-training evaluation at step S raises while it samples (after the first loop
                    spec), an error on one rank that the others do not see (engine/live_eval.py)

nan_steps and die_at reach the training step as hooks on the model (`install`, once at set-up), so the
step itself (train.py's micro_step) carries no test code; unset, nothing is registered and the hooks left in
the save path (kill_in_save) and the evaluation (eval_fails) are dictionary lookups.
"""
from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

import torch

ENV = "ELT_FAULT"


@functools.cache
def plan(text: str | None = None) -> dict:
    """ELT_FAULT parsed: {"nan_steps": {2, 4}, "kill_in_save": 2, "die_at": (1, 3)}; a malformed value
    is an error naming the variable (a typo must not silently disable the fault a test relies on)."""
    text = os.environ.get(ENV, "") if text is None else text
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, value = part.partition(":")
        try:
            if name == "nan_steps":
                out[name] = {int(s) for s in value.split(",")}
            elif name == "kill_in_save":
                out[name] = int(value)
            elif name == "die_at":
                rank, step = value.split(":")
                out[name] = (int(rank), int(step))
            elif name == "eval_fails":
                rank, steps = value.split(":")
                out[name] = (int(rank), {int(s) for s in steps.split(",")})
            else:
                raise ValueError(f"unknown fault {name!r}")
        except ValueError as e:
            raise ValueError(f"{ENV}={text!r}: cannot parse {part!r} ({e}); see elt_scale/engine/faults.py") from e
    return out


def nan_at(step: int, rank: int, micro: int) -> bool:
    return rank == 0 and micro == 0 and step in plan().get("nan_steps", ())


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_save(step: int, run_dir: Path) -> None:
    """Once per run directory and rank: a marker left as the rank dies keeps the restarted job (which inherits
    ELT_FAULT and saves step S again) from dying there forever; its mtime is the fault's time."""
    marker = run_dir / f".fault_kill_in_save_{step}_rank{torch.distributed.get_rank()}"
    if plan().get("kill_in_save") == step and not marker.exists():
        marker.touch()
        _die()


def die_at(step: int, rank: int) -> None:
    if plan().get("die_at") == (rank, step):
        _die()


class InjectedFault(RuntimeError):
    """The error ELT_FAULT asked for."""


def eval_fails(step: int, rank: int) -> None:
    r, steps = plan().get("eval_fails", (None, ()))
    if r == rank and step in steps:
        raise InjectedFault(f"ELT_FAULT eval_fails: rank {rank}, step {step}")


def install(model, rank: int, first_step: int, grad_accum: int) -> list:
    """Registers nan_steps / die_at on the training model (engine.module), only when ELT_FAULT asks for them;
    returns the hook handles ([] when unset). Called once, before the first step.

    A hook knows the step by counting training forwards: the trainer runs exactly grad_accum of them per step,
    one per micro-batch, from the step it starts at (`first_step`: 0, or a resumed checkpoint's step), so the
    n-th forward is micro-batch n % grad_accum of step first_step + n // grad_accum + 1 (1-based, as ELT_FAULT
    counts). Only forwards with gradients count: in-training evaluation samples with its own copy of the model
    (engine/live_eval.py) under no_grad, and would not shift the count even if it used this one."""
    faults = plan()
    if "nan_steps" not in faults and "die_at" not in faults:
        return []
    forwards = [0]

    def where() -> tuple[int, int]:
        return first_step + forwards[0] // grad_accum + 1, forwards[0] % grad_accum

    def before(module, args):
        if torch.is_grad_enabled():
            die_at(where()[0], rank)                    # as step S starts: before its first forward

    def after(module, args, exits):
        if not torch.is_grad_enabled():
            return None
        step, micro = where()
        forwards[0] += 1
        if nan_at(step, rank, micro):                   # the first exit: the student (ILSD), else the teacher
            return (exits[0] * float("nan"), *exits[1:])
        return None

    return [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
