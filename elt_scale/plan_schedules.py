"""elt-plan --schedules: every schedule of a run over its whole length, as a table and a figure.

The numbers all come from elt_scale/schedules.py (the functions the trainer itself calls), so what is printed
here is what the run will do: lr and λ at evenly spaced steps (plus the warm-up's midpoint and end), the L_int
distribution, and, for masked recipes, the masking-ratio distribution. Needs no data, GPU or network."""
from __future__ import annotations

import math
from pathlib import Path

from .schedules import MEAN_MASK_RATIO, Schedules, mask_ratio


def schedule_summary(recipe, points: int = 11) -> dict:
    """Everything `elt-plan --schedules` prints (and `--json` dumps)."""
    s = Schedules.of(recipe)
    rows = {r["step"]: r for r in s.table(points)}
    mid = s.warmup_steps // 2                     # the warm-up's midpoint shows its shape (linear: lr/peak 0.5)
    if 1 <= mid <= s.steps and mid not in rows:
        rows[mid] = {"step": mid, "lr": s.lr(mid), "lr_factor": s.lr_factor(mid), "lambda": s.lam(mid)}
    lo, hi = s.l_int_range()
    masked = recipe.model.family == "masked"
    return {
        "recipe": recipe.run.name, "family": recipe.model.family, "steps": s.steps, "peak_lr": s.peak_lr,
        "warmup_steps": s.warmup_steps, "min_lr_ratio": s.min_lr_ratio,
        "ilsd": s.ilsd, "lambda_start": s.lambda_start if s.ilsd else 1.0,
        "lambda_end": s.lambda_end if s.ilsd else 1.0, "lambda_steps": s.lambda_steps,
        "l_max": s.max_loops, "l_int": {"low": lo, "high": hi, "p": 1 / (hi - lo + 1)},
        "mask_ratio_mean": MEAN_MASK_RATIO if masked else None,
        "table": [rows[k] for k in sorted(rows)],
    }


def format_schedules(summary: dict) -> str:
    s = summary
    lines = [f"{s['recipe']}: schedules over {s['steps']:,} steps ({s['family']})",
             f"  lr: linear warm-up over {s['warmup_steps']:,} steps to {s['peak_lr']:.3g}, then cosine to "
             f"{s['peak_lr'] * s['min_lr_ratio']:.3g} (min_lr_ratio {s['min_lr_ratio']:g}) at step {s['steps']:,}"]
    if s["ilsd"]:
        lines.append(f"  λ: linear {s['lambda_start']:g} → {s['lambda_end']:g} over {s['lambda_steps']:,} steps"
                     + (", then constant" if s["lambda_steps"] < s["steps"] else ""))
    else:
        lines.append("  λ: 1 throughout (no ILSD: the teacher's loss alone)")
    lines += ["", f"  {'step':>9}  {'lr':>10}  {'lr/peak':>7}  {'λ':>5}"]
    for r in s["table"]:
        mark = "  ← end of warm-up" if r["step"] == s["warmup_steps"] else ""
        lines.append(f"  {r['step']:>9,}  {r['lr']:>10.4e}  {r['lr_factor']:>7.4f}  {r['lambda']:>5.3f}{mark}")
    lines.append("")
    lo, hi = s["l_int"]["low"], s["l_int"]["high"]
    if s["ilsd"]:
        lines.append(f"  L_int ~ Uniform{{{lo}..{hi}}} per step, p = {s['l_int']['p']:.3g} each "
                     f"(L_max {s['l_max']} is the teacher)")
    else:
        lines.append(f"  no ILSD: every step runs L_max = {s['l_max']} (no student)")
    if s["mask_ratio_mean"] is not None:
        lines.append(f"  mask ratio cos(π/2·r), r ~ U(0,1) per sample: mean {s['mask_ratio_mean']:.2f}")
    return "\n".join(lines)


def write_schedules_png(recipe, path: str | Path) -> Path:
    """lr vs step (warm-up end marked, zoomed in when it is a sliver of the run), λ vs step, the L_int
    distribution and, for masked recipes, the masking-ratio distribution."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = Schedules.of(recipe)
    masked = recipe.model.family == "masked"
    steps = np.unique(np.concatenate([np.linspace(1, s.steps, 2000).round(),
                                      np.linspace(1, max(1, min(s.steps, 2 * s.warmup_steps)), 400).round()]))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5)) if masked else plt.subplots(1, 3, figsize=(15, 4.2))
    ax_lr, ax_lam, ax_l, *rest = axes.flat
    _lr_panel(ax_lr, s, steps, np.array([s.lr(int(k)) for k in steps]))
    _lambda_panel(ax_lam, s, steps, np.array([s.lam(int(k)) for k in steps]))
    _loops_panel(ax_l, s)
    if masked:
        _mask_panel(rest[0])
    m = recipe.model
    fig.suptitle(f"{recipe.run.name}: schedules over {s.steps:,} steps ({m.family}, "
                 f"{m.unique_layers}N×{m.loops}L)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _lr_panel(ax, s: Schedules, steps, lr) -> None:
    ax.plot(steps, lr, color="C0")
    ax.set(title="learning rate", xlabel="step", ylabel="lr", xlim=(0, s.steps), ylim=(0, s.peak_lr * 1.08))
    if s.warmup_steps:
        ax.axvline(s.warmup_steps, color="C3", ls="--", lw=1)
        ax.annotate(f"end of warm-up\n(step {s.warmup_steps:,})", (s.warmup_steps, s.peak_lr),
                    xytext=(0.12, 0.35), textcoords="axes fraction", fontsize=8, color="C3",
                    arrowprops={"arrowstyle": "->", "color": "C3"})
        if s.warmup_steps < 0.05 * s.steps:      # a sliver of the x-axis: zoom in on it
            inset = ax.inset_axes([0.58, 0.55, 0.38, 0.36])
            near = steps <= 2 * s.warmup_steps
            inset.plot(steps[near], lr[near], color="C0")
            inset.axvline(s.warmup_steps, color="C3", ls="--", lw=1)
            inset.set_title(f"first {2 * s.warmup_steps:,} steps", fontsize=8)
            inset.tick_params(labelsize=7)
            inset.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            inset.yaxis.get_offset_text().set_fontsize(7)
            inset.xaxis.set_major_formatter(_step_formatter(2 * s.warmup_steps))
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.xaxis.set_major_formatter(_step_formatter(s.steps))


def _lambda_panel(ax, s: Schedules, steps, lam) -> None:
    ax.plot(steps, lam, color="C1")
    ax.set(title="ILSD λ (weight of the student's GT loss)" if s.ilsd else "λ (no ILSD: teacher's loss alone)",
           xlabel="step", ylabel="λ", xlim=(0, s.steps), ylim=(-0.05, 1.05))
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_formatter(_step_formatter(s.steps))


def _loops_panel(ax, s: Schedules) -> None:
    lo, hi = s.l_int_range()
    values = list(range(1, s.max_loops + 1))
    if s.ilsd:
        student = [v for v in values if lo <= v <= hi]
        bars = ax.bar(student, [1 / (hi - lo + 1)] * len(student), width=0.6, color="C2",
                      label="student L_int (one draw per step)")
        ax.bar_label(bars, labels=[f"1/{hi - lo + 1}"] * len(student), fontsize=8)
        ax.bar([s.max_loops], [1.0], width=0.6, fill=False, hatch="//", edgecolor="C3",
               label=f"teacher L_max = {s.max_loops} (every step)")
        ax.set_title(f"loops per step: L_int ~ Uniform{{{lo}..{hi}}}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.bar([s.max_loops], [1.0], width=0.6, color="C7", label="L_max")
        ax.set_title(f"no ILSD: every step runs L_max = {s.max_loops}", fontsize=10)
    ax.set(xlabel="loops", ylabel="probability per step", xticks=values, xlim=(0.4, s.max_loops + 0.6), ylim=(0, 1.3))
    ax.grid(alpha=0.3, axis="y")


def _mask_panel(ax) -> None:
    import numpy as np
    import torch
    r = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000   # the exact quantiles of U(0, 1)
    ax.hist(mask_ratio(r).numpy(), bins=50, range=(0, 1), density=True, color="C4", alpha=0.6,
            label="histogram (the trainer's mask_ratio)")
    m = np.linspace(0.0, 0.995, 400)
    ax.plot(m, (2 / math.pi) / np.sqrt(1 - m ** 2), color="C4", label="density 2/(π√(1−m²))")
    ax.axvline(MEAN_MASK_RATIO, color="k", ls=":", lw=1, label=f"mean 2/π = {MEAN_MASK_RATIO:.2f}")
    ax.set(title="masking ratio m = cos(π/2·r), r ~ U(0,1) per sample", xlabel="fraction of tokens masked",
           ylabel="density", xlim=(0, 1), ylim=(0, 4))
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)


def _step_formatter(last: int):
    """Step ticks as 200k / 1.5M on long runs, plain numbers on short ones."""
    from matplotlib.ticker import FuncFormatter

    def fmt(x, _pos):
        if x == 0:
            return "0"
        if last >= 2_000_000:
            return f"{x / 1e6:g}M"
        return f"{x / 1e3:g}k" if last >= 10_000 else f"{x:g}"
    return FuncFormatter(fmt)
