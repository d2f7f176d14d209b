"""The any-time sweep: sample each model at each loop spec, score it, count its compute, and write
anytime.csv (one row per model and L) and anytime.png (metric vs L and metric vs GFLOPs per sample)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from ..sampling import parse_loop_list, parse_loops
from .load import load
from .samples import sample_set
from .scoring import LOWER_IS_BETTER, Scorer, choose_metric

CSV_NAME, PLOT_NAME = "anytime.csv", "anytime.png"


def anytime_sweep(run_dirs: Sequence[str | Path], loops: str | Sequence[str | int], num: int,
                  out_dir: str | Path, *, names: Sequence[str] | None = None, metric: str = "auto",
                  cfg: float = 1.0, steps: int | None = None, sampler: str = "ddpm", seed: int = 0,
                  batch_size: int = 64, ema: bool | None = None, shards: str | Path | None = None,
                  scorer: Scorer | None = None, progress: bool = True) -> list[dict]:
    """Rows {run, L, loops_per_step, <metrics...>, gflops_per_sample, wall_s}, one per model and loop spec.

    run_dirs: anything `load` takes; loops: '1-6' / '1,2,4,auto:0.02' or a list of specs; names: labels for
    the runs (default: directory names). The CSV is rewritten after every row, so an interrupted sweep keeps
    what it measured."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(names) if names else [Path(r).stem if Path(r).suffix else Path(r).name for r in run_dirs]
    if len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} runs")
    scorer = scorer or Scorer()
    rows: list[dict] = []
    for run, name in zip(run_dirs, names):
        loaded = load(run, ema=ema)
        recipe, decoder = loaded.recipe, loaded.decoder(shards)
        schedules = (parse_loop_list(loops, recipe.model.loops) if isinstance(loops, str)
                     else [parse_loops(spec, recipe.model.loops) for spec in loops])
        for schedule in schedules:
            s = sample_set(loaded.model, recipe, schedule, num, decoder, cfg, steps, sampler, seed, batch_size,
                           progress=progress)
            values = scorer(s.images, s.labels, choose_metric(metric, s.images, recipe.model.num_classes))
            rows.append({"run": name, "L": schedule.spec, "loops_per_step": round(s.loops_per_step, 4),
                         **{k: round(v, 6) for k, v in values.items()},
                         "gflops_per_sample": round(s.gflops_per_sample, 6), "wall_s": round(s.wall_s, 3)})
            write_csv(out_dir / CSV_NAME, rows)
            if progress:
                print(f"anytime: {name} L={schedule.spec} " + " ".join(f"{k}={v:.4g}" for k, v in values.items()) +
                      f" {s.gflops_per_sample:.4g} GFLOPs/sample {s.wall_s:.1f}s", flush=True)
    plot_anytime(rows, out_dir / PLOT_NAME)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    """Atomic: a reader sees the old file or the new one."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def metric_columns(rows: list[dict]) -> list[str]:
    return [k for k in dict.fromkeys(k for r in rows for k in r) if k in LOWER_IS_BETTER]


def plot_anytime(rows: list[dict], path: Path) -> Path:
    """One row of panels per metric: metric vs loops per step, and metric vs GFLOPs per sample."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metric_columns(rows)
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.6 * len(metrics)), squeeze=False)
    for i, m in enumerate(metrics):
        for run in dict.fromkeys(r["run"] for r in rows):
            mine = [r for r in rows if r["run"] == run and m in r]
            fixed = [r for r in mine if not str(r["L"]).startswith("auto")]
            auto = [r for r in mine if str(r["L"]).startswith("auto")]
            for j, x in enumerate(("loops_per_step", "gflops_per_sample")):
                ax = axes[i, j]
                line, = ax.plot([r[x] for r in fixed], [r[m] for r in fixed], "o-", label=run)
                if auto:
                    ax.scatter([r[x] for r in auto], [r[m] for r in auto], marker="*", s=120,
                               color=line.get_color(), label=f"{run} (auto)")
                ax.set_xlabel("loops per step (L)" if j == 0 else "GFLOPs per sample")
                ax.set_ylabel(f"{m} ({'lower' if LOWER_IS_BETTER[m] else 'higher'} is better)")
                ax.grid(alpha=0.3)
        axes[i, 0].legend(fontsize=8)
    fig.suptitle("ELT any-time inference: quality vs loops and compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
