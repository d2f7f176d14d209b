"""Loop specs (no torch: recipes validate them too): which loop counts sampling runs: a constant, a per-step schedule across sampling steps, or adaptive.

Spec strings (one per sampled model variant; `elt-sample --loops` takes several, comma-separated):

    4          every sampling step runs 4 loops (any L >= 1, also above L_max)
    6>2        a linear ramp across the sampling steps: 6 loops at the first step, 2 at the last
    6/4/2      piecewise: the steps are cut into equal parts, one loop count each
    auto:0.02  adaptive: inside each step keep looping until the hidden state's relative change
               ||h_l - h_{l-1}|| / ||h_{l-1}|| drops below 0.02, at most L_max + 2 loops
    auto:0.02:8  the same with an explicit cap of 8 loops
"""
from __future__ import annotations

from dataclasses import dataclass

AUTO_EXTRA_LOOPS = 2       # default cap of adaptive loops: L_max + 2 (the paper: far beyond L_max degrades)


@dataclass(frozen=True)
class Adaptive:
    tau: float
    max_loops: int


@dataclass(frozen=True)
class LoopSchedule:
    spec: str
    per_step: tuple[int, ...] = ()       # constant: one entry; ramp: (start, end); piecewise: the parts
    mode: str = "constant"               # constant | ramp | piecewise | auto
    adaptive: Adaptive | None = None

    def at(self, k: int, steps: int) -> int | Adaptive:
        """Loop count (or the adaptive rule) at sampling step k of `steps`."""
        if self.mode == "auto":
            return self.adaptive
        if self.mode == "constant":
            return self.per_step[0]
        if self.mode == "ramp":
            start, end = self.per_step
            frac = k / max(steps - 1, 1)
            return max(1, round(start + (end - start) * frac))
        part = min(k * len(self.per_step) // steps, len(self.per_step) - 1)
        return self.per_step[part]

    @property
    def label(self) -> str:
        """Filesystem-safe name for output files (`L4`, `L6to2`, `L6-4-2`, `Lauto_0.02`, `Lauto_0.02_8`)."""
        return "L" + self.spec.replace(">", "to").replace("/", "-").replace(":", "_")


def parse_loops(spec: str | int, max_trained: int) -> LoopSchedule:
    """Parse one loop spec (see the module doc). `max_trained` is the model's L_max (for auto's cap)."""
    text = str(spec).strip()
    try:
        if text.startswith("auto:"):
            parts = text.split(":")[1:]
            tau = float(parts[0])
            cap = int(parts[1]) if len(parts) > 1 else max_trained + AUTO_EXTRA_LOOPS
            if tau <= 0 or cap < 1 or len(parts) > 2:
                raise ValueError
            return LoopSchedule(text, mode="auto", adaptive=Adaptive(tau, cap))
        if ">" in text:
            start, end = (int(v) for v in text.split(">"))
            schedule = LoopSchedule(text, (start, end), "ramp")
        elif "/" in text:
            schedule = LoopSchedule(text, tuple(int(v) for v in text.split("/")), "piecewise")
        else:
            schedule = LoopSchedule(text, (int(text),), "constant")
    except ValueError:
        raise ValueError(f"loop spec {text!r}: expected L, START>END, L1/L2/..., or auto:TAU[:MAX] "
                         f"(L >= 1, TAU > 0)") from None
    if min(schedule.per_step) < 1:
        raise ValueError(f"loop spec {text!r}: loop counts must be >= 1")
    return schedule


def parse_loop_list(text: str, max_trained: int) -> list[LoopSchedule]:
    """'1,2,4' or '1-6' (inclusive range) or a mix: '1-3,6>2,auto:0.05' -> schedules, in order."""
    out = []
    for item in (t.strip() for t in str(text).split(",") if t.strip()):
        parts = item.split("-")
        if len(parts) == 2 and all(v.isdigit() for v in parts):     # not '-1' or '1-2-3': parse_loops names those
            lo, hi = (int(v) for v in parts)
            if lo > hi:
                raise ValueError(f"loop range {item!r}: start > end")
            out += [parse_loops(v, max_trained) for v in range(lo, hi + 1)]
        else:
            out.append(parse_loops(item, max_trained))
    if not out:
        raise ValueError(f"--loops {text!r}: no loop counts given")
    return out
