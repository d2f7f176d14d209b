"""Test-only fault injection, driven by the environment variable ELT_FAULT; never set it in a real run.

The recipe schema stays free of test hooks: a test that needs a fault the outside world cannot
produce (a signal, a kill -9, a truncated file) sets, for the processes it starts,

    ELT_FAULT="nan_steps:2,4,5;kill_in_save:2;die_at:1:3"

  nan_steps:S,...   rank 0's first micro-batch of step S (1-based) gets a NaN student exit (teacher,
                    without ILSD): exercises the numerics guard
  kill_in_save:S    every rank SIGKILLs itself inside the save of step S, after the files are written
                    and before `latest` moves
  die_at:R:S        rank R SIGKILLs itself as step S starts (a rank that always dies, when S comes
                    before the first checkpoint: a crash loop)

Unset, every hook is a dictionary lookup that returns False/None.
"""
from __future__ import annotations

import functools
import os
import signal

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
            else:
                raise ValueError(f"unknown fault {name!r}")
        except ValueError as e:
            raise ValueError(f"{ENV}={text!r}: cannot parse {part!r} ({e}); see elt_scale/engine/faults.py") from e
    return out


def nan_at(step: int, rank: int, micro: int) -> bool:
    return rank == 0 and micro == 0 and step in plan().get("nan_steps", ())


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_save(step: int) -> None:
    if plan().get("kill_in_save") == step:
        _die()


def die_at(step: int, rank: int) -> None:
    if plan().get("die_at") == (rank, step):
        _die()
