"""The paper's two claims on digits, for both model families, on a CPU.

    python -m elt_scale.reproduce [--out reproduce_out] [--steps 600] [--num 400] [--quick]

For the masked (recipes/digits_masked.yaml) and the diffusion (recipes/digits_diffusion.yaml) recipe,
N unique layers looped L_max times, four models are trained through the real trainer with the same
steps, batch and optimizer (nothing tuned per model beyond the recipe):

    ilsd        N layers × L_max loops, ILSD                       (the paper's ELT)
    vanilla     N layers × L_max loops, plain looped training      (`ilsd.enabled=false`)
    plain_deep  N·L_max layers × 1 loop: equal effective depth, L_max × the parameters (MaskGIT / DiT)
    plain_small N layers × 1 loop: the looped model's parameter count, 1/L_max of its depth

Each is measured at every L it can run (the looped ones at 1 … L_max+1, the plain ones at 1): held-out
loss (masked-token cross-entropy or weighted x0-MSE), samples (MaskGIT, or DDIM for diffusion) scored by
the digits classifier (class accuracy, FD-digits), GFLOPs per sample and parameters. Claim 1 (any-time):
ILSD is good at every L, vanilla only at L_max. Claim 2 (efficiency): ELT at L_max matches plain_deep
with 1/L_max of its parameters and beats plain_small at the same parameter count.
Writes reproduce.csv, reproduce.md and reproduce.png under --out; numbers are printed as measured.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from .demo import ROOT, cpu_seconds, machine, read_split, tokenize, val_loss_by_loops
from .models import count_params

FAMILIES = {   # family -> (recipe, tokenize.py arguments, shard folder)
    "masked": (ROOT / "recipes" / "digits_masked.yaml", (), "digits"),
    "diffusion": (ROOT / "recipes" / "digits_diffusion.yaml", ("--pixel-mode", "identity"), "digits-pixels"),
}
MODELS = ("ilsd", "vanilla", "plain_deep", "plain_small")
COLUMNS = ["family", "model", "unique_layers", "trained_L", "L", "params", "gflops_per_sample", "val_loss",
           "class_acc", "fd_digits", "train_loss_first", "train_loss_last", "sample_wall_s"]


def model_overrides(model: str, n: int, l_max: int) -> list[str]:
    """The one difference between the four models: layers, loops and the ILSD switch."""
    return {"ilsd": ["ilsd.enabled=true"],
            "vanilla": ["ilsd.enabled=false"],
            "plain_deep": [f"model.unique_layers={n * l_max}", "model.loops=1", "ilsd.enabled=false"],
            "plain_small": [f"model.unique_layers={n}", "model.loops=1", "ilsd.enabled=false"]}[model]


# ---------------------------------------------------------------------------------------------
# training: every model of both families through elt_scale.train, `jobs` processes at a time

def plan_runs(out: Path) -> dict[tuple[str, str], dict]:
    from .config import load_recipe
    runs = {}
    for family, (recipe_path, tok_args, shard_dir) in FAMILIES.items():
        m = load_recipe(recipe_path).model
        for model in MODELS:
            runs[family, model] = {"recipe": recipe_path, "shards": out / "shards" / shard_dir,
                                   "dir": out / "runs" / f"{family}_{model}",
                                   "overrides": model_overrides(model, m.unique_layers, m.loops)}
    return runs


def train_all(out: Path, runs: dict, steps: int, extra: list[str], jobs: int) -> None:
    """One trainer process per model, at most `jobs` at once on one thread each (small matrices: a process
    per core beats threads in one); a single progress bar over all of them."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    waiting, active = list(runs.items()), []
    bar = tqdm(total=steps * len(runs), desc=f"train {len(runs)} models", unit="step")
    while waiting or active:
        while waiting and len(active) < jobs:
            (family, model), run = waiting.pop(0)
            active.append(_start_training(out, family, model, run, steps, extra, env))
        for job in [j for j in active if j[1].poll() is not None]:
            active.remove(job)
            _check_finished(*job)
        bar.update(sum(_last_step(r["dir"]) for r in runs.values()) - bar.n)
        time.sleep(0.5)
    bar.close()


def _start_training(out, family, model, run, steps, extra, env):
    shutil.rmtree(run["dir"], ignore_errors=True)     # this target's own output: each run trains afresh
    cmd = [sys.executable, "-m", "elt_scale.train", str(run["recipe"]), f"data.shards={run['shards']}",
           f"run.out_dir={run['dir'].parent}", f"run.name={run['dir'].name}", f"train.steps={steps}",
           "train.resume=never", "train.save_every=0", f"train.log_every={max(1, min(10, steps // 10))}",
           *run["overrides"], *extra]
    log = open(out / f"train_{family}_{model}.log", "w")
    return f"{family}_{model}", subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _check_finished(name, proc, log) -> None:
    log.close()
    if proc.returncode != 0:
        tail = Path(log.name).read_text()[-3000:]
        raise RuntimeError(f"training {name} failed (exit {proc.returncode}); log {log.name}:\n{tail}")


def _last_step(run_dir: Path) -> int:
    losses = train_losses(run_dir)
    return losses[-1][0] if losses else 0


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, total training loss) from the run's metrics.jsonl; [] while it has none."""
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]
    except (OSError, ValueError, KeyError):
        return []


# ---------------------------------------------------------------------------------------------
# measurement

@torch.no_grad()
def val_mse_by_loops(model, recipe, x0: torch.Tensor, labels: torch.Tensor, loops: list[int],
                     repeats: int = 4, batch: int = 256) -> dict[int, float]:
    """Held-out diffusion loss at each loop count: the training objective's weighted x0-MSE, with the same
    seeded times and noise for every L and true class labels; all exits from one forward pass."""
    from .objectives.noise import add_noise, weighted_mse, x0_weight
    o = recipe.objective
    g = torch.Generator().manual_seed(1234)
    totals, count = {L: 0.0 for L in loops}, 0
    for _ in range(repeats):
        for i in range(0, len(x0), batch):
            x, y = x0[i:i + batch].float(), labels[i:i + batch]
            t = torch.rand(len(x), generator=g)
            x_t = add_noise(x, t, torch.randn(x.shape, generator=g), o.noise_shift)
            w = x0_weight(t, o.noise_shift, o.sigmoid_bias)
            for L, pred in zip(loops, model(x_t, t, y, exits=loops)):
                totals[L] += weighted_mse(pred, x, w).item() * len(x)
            count += len(x)
    return {L: totals[L] / count for L in loops}


def loop_counts(trained_l: int) -> list[int]:
    """Looped models at 1 … L_max+1 (a little beyond training); a plain model only at its own depth."""
    return list(range(1, trained_l + 2)) if trained_l > 1 else [1]


def measure_run(name: str, run_dir: str, shards: str, num: int, sample_steps: int, sampler: str,
                out: str) -> list[dict]:
    """One model in its own process on one thread: held-out loss and the any-time sweep at each L."""
    torch.set_num_threads(1)
    from .inference.anytime import anytime_sweep
    from .inference.load import load

    loaded = load(run_dir)
    model, recipe = loaded.model, loaded.recipe
    loops = loop_counts(recipe.model.loops)
    x, y = read_split(Path(shards), "val")
    val = (val_loss_by_loops(model, x, y, loops) if recipe.model.family == "masked"
           else val_mse_by_loops(model, recipe, x, y, loops))
    sweep = anytime_sweep([run_dir], [str(L) for L in loops], num, out, names=[name], steps=sample_steps,
                          sampler=sampler, seed=0, shards=shards, progress=False)
    losses = train_losses(Path(run_dir))
    params = count_params(model)
    return [{"unique_layers": recipe.model.unique_layers, "trained_L": recipe.model.loops, "L": int(r["L"]),
             "params": params, "gflops_per_sample": r["gflops_per_sample"], "val_loss": round(val[int(r["L"])], 5),
             "class_acc": r.get("class_acc"), "fd_digits": r.get("fd_digits"),
             "train_loss_first": round(losses[0][1], 5), "train_loss_last": round(losses[-1][1], 5),
             "sample_wall_s": r["wall_s"]} for r in sweep]


def measure_all(out: Path, runs: dict, num: int, steps: dict[str, int], jobs: int) -> list[dict]:
    """Every model measured, `jobs` processes at once; rows in the fixed family × model order."""
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {key: pool.submit(measure_run, f"{key[0]}_{key[1]}", str(run["dir"]), str(run["shards"]), num,
                                    steps[key[0]], "ddim" if key[0] == "diffusion" else "ddpm",
                                    str(out / "anytime" / f"{key[0]}_{key[1]}"))
                   for key, run in runs.items()}
        rows = []
        for (family, model), f in tqdm(futures.items(), desc="measure (val loss, sample, classify)", unit="model"):
            rows += [{"family": family, "model": model, **r} for r in f.result()]
    return rows


# ---------------------------------------------------------------------------------------------
# outputs

def write_csv(rows: list[dict], path: Path) -> None:
    import csv
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown_tables(rows: list[dict], meta: dict) -> str:
    """One table per family: a line per (model, L), the looped models' training depth in bold."""
    lines = [f"Digits reproduction, {meta['date']}, {meta['machine']}: {meta['steps']} training steps × batch "
             f"{meta['batch']} for every model, {meta['num']} samples per L (MaskGIT {meta['masked_steps']} steps; "
             f"DDIM {meta['diffusion_steps']} steps); {meta['wall_min']:.1f} min wall, {meta['cpu_min']:.1f} CPU-min.", ""]
    for family in FAMILIES:
        mine = [r for r in rows if r["family"] == family]
        if not mine:
            continue
        loss = "masked-token CE" if family == "masked" else "weighted x0-MSE"
        lines += [f"**{family}**", "",
                  f"| model | layers × loops | params | L | GFLOPs/sample | val loss ({loss}) | class acc | FD-digits "
                  "| train loss first → last |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            L = f"**{r['L']}**" if r["L"] == r["trained_L"] else str(r["L"])
            lines.append(f"| {r['model']} | {r['unique_layers']}×{r['trained_L']} | {r['params'] / 1e3:.1f}k | {L} "
                         f"| {_fmt(r['gflops_per_sample'], '.4f')} | {_fmt(r['val_loss'], '.4f')} "
                         f"| {_fmt(r['class_acc'], '.3f')} | {_fmt(r['fd_digits'], '.2f')} "
                         f"| {r['train_loss_first']:.3f} → {r['train_loss_last']:.3f} |")
        lines.append("")
    lines += ["val loss: held-out loss on the val split (lower is better); class acc: the digits classifier agrees "
              "with the conditioning class (higher is better); FD-digits: Fréchet distance in the classifier's "
              "feature space to real digits (lower is better). Bold L: the model's training loop count."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Rows: families; columns: val loss, class acc, FD-digits against GFLOPs per sample. Looped models are
    lines over L (annotated), plain models single points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val_loss", "held-out loss ↓"), ("class_acc", "class accuracy ↑"), ("fd_digits", "FD-digits ↓")]
    styles = {"ilsd": "o-", "vanilla": "s--", "plain_deep": "D", "plain_small": "^"}
    fams = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    fig, axes = plt.subplots(len(fams), 3, figsize=(14, 3.8 * len(fams)), squeeze=False)
    for i, family in enumerate(fams):
        for j, (key, title) in enumerate(panels):
            ax = axes[i, j]
            for model, style in styles.items():
                mine = [r for r in rows if r["family"] == family and r["model"] == model and r.get(key) is not None]
                if not mine:
                    continue
                xs, ys = [r["gflops_per_sample"] for r in mine], [r[key] for r in mine]
                label = f"{model} {mine[0]['unique_layers']}×{mine[0]['trained_L']} ({mine[0]['params'] / 1e3:.0f}k)"
                ax.plot(xs, ys, style, label=label, ms=7)
                if len(mine) > 1:
                    for r, x, y in zip(mine, xs, ys):
                        ax.annotate(f"L{r['L']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("GFLOPs per sample")
            ax.set_title(f"{family}: {title}")
            ax.grid(alpha=0.3)
        axes[i, 0].legend(fontsize=7)
    fig.suptitle("ELT on digits: any-time (ILSD vs vanilla) and parameter efficiency (vs plain transformers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m elt_scale.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reproduce_out", help="where shards, runs and results go (default reproduce_out)")
    p.add_argument("--steps", type=int, default=600, help="training steps for every model (default 600)")
    p.add_argument("--num", type=int, default=400, help="samples per model and loop count (default 400)")
    p.add_argument("--masked-steps", type=int, default=12, help="MaskGIT decoding steps (default 12)")
    p.add_argument("--diffusion-steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes at once (default: CPU cores)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, 16 samples, 4 sampling steps")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. train.micro_batch=16")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from .config import load_recipe
    args = parse_args(argv)
    if args.quick:
        args.steps, args.num, args.masked_steps, args.diffusion_steps = 20, 16, 4, 4
    start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for recipe, tok_args, shard_dir in FAMILIES.values():
        tokenize(out / "shards" / shard_dir, tok_args)
    runs = plan_runs(out)
    train_all(out, runs, args.steps, list(args.overrides), args.jobs)
    rows = measure_all(out, runs, args.num, {"masked": args.masked_steps, "diffusion": args.diffusion_steps}, args.jobs)
    batch = {load_recipe(r, list(args.overrides)).train.micro_batch for r, _, _ in FAMILIES.values()}
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "steps": args.steps,
            "batch": "/".join(map(str, sorted(batch))), "num": args.num, "masked_steps": args.masked_steps,
            "diffusion_steps": args.diffusion_steps, "wall_min": (time.time() - start) / 60,
            "cpu_min": cpu_seconds() / 60}
    write_csv(rows, out / "reproduce.csv")
    tables = markdown_tables(rows, meta)
    (out / "reproduce.md").write_text(tables)
    plot(rows, out / "reproduce.png")
    print(tables)
    print(f"reproduce: finished in {time.time() - start:.0f}s ({cpu_seconds():.0f} CPU-s); tables "
          f"{out / 'reproduce.md'}, plot {out / 'reproduce.png'}, csv {out / 'reproduce.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
