"""Ablation (issue 40, item 4): why does diffusion ELT at L_max fall short of the plain model of equal depth?

    python -m studies.diffusion_ablation [--seeds 0,1] [--steps 1500] [--jobs 2] [--variants a,b,...]

On recipes/digits_diffusion.yaml (2 layers looped 4 times, width 64) each variant changes one thing of the
reproduce study's ILSD model and is paired with the plain 8-layer model trained under the same steps and
width, seed by seed: the gap is ILSD at L_max against that plain model in held-out loss (studies.measure's
val_mse_by_loops, the same times and noise for every model), and the any-time cost is ILSD at L=1 against
its own L_max. Variants (VARIANTS below):

    base        the reproduce study's ILSD model (L_int ~ U{1..3}, λ 1 -> 0 over training)
    vanilla     no ILSD (GT at L_max only): the cost of weight sharing alone
    lint3       L_int = 3 only (ilsd.min_loops=3): the student one loop short of the teacher
    no_distill  λ = 1 throughout: GT on the student, no distillation term
    lam_half    λ 1 -> 0 over the first half of training, then distillation alone
    steps2x     twice the training steps (and its own plain 8-layer model)
    width96     width 96, 6 heads (and its own plain 8-layer model)

Rows (variant, seed, val loss at L=1 … L_max, the paired plain model's, wall time) go to OUT/rows.jsonl and
the summary table to OUT/ablation.md; not a study with claims: a question answered with its spread.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from elt_scale.cli import ArgumentParser

from .measure import VAL_SEED, read_split, val_mse_by_loops
from .runs import ROOT, Run, tokenize, train_all

RECIPE = ROOT / "recipes" / "digits_diffusion.yaml"
DEEP = ("model.unique_layers=8", "model.loops=1", "ilsd.enabled=false")
# variant -> (the looped model's overrides, the setting it shares with its plain pair: steps factor, width)
VARIANTS = {
    "base": ((), (1, ())),
    "vanilla": (("ilsd.enabled=false",), (1, ())),
    "lint3": (("ilsd.min_loops=3",), (1, ())),
    "no_distill": (("ilsd.lambda_end=1.0",), (1, ())),
    "lam_half": (("ilsd.lambda_steps=HALF",), (1, ())),
    "steps2x": ((), (2, ())),
    "width96": ((), (1, ("model.width=96", "model.heads=6"))),
}


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m studies.diffusion_ablation", description=__doc__)
    p.add_argument("--out", default="ablation_out", help="runs, logs, rows.jsonl and ablation.md (default ablation_out)")
    p.add_argument("--shards", default=str(ROOT / "shards"), help="folder of the digits shard sets (default shards)")
    p.add_argument("--seeds", default="0,1", help="comma-separated run.seed values (default 0,1)")
    p.add_argument("--steps", type=int, default=1500, help="training steps of the base setting (default 1500, "
                                                           "the reproduce study's)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="which of " + ", ".join(VARIANTS))
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2: one per core here)")
    return p.parse_args(argv)


def setting(variant: str) -> str:
    """The key of the plain model a variant is paired with: its steps factor and width ("x1", "x2", "x196")."""
    factor, width = VARIANTS[variant][1]
    return f"x{factor}" + "".join(w.split("=")[1] for w in width[:1])


def plan(variants: list[str], seeds: list[int], steps: int, shards: Path, out: Path) -> dict[tuple, Run]:
    """(kind, variant-or-setting, seed) -> Run; plain models are keyed by their setting, so variants that share
    one (steps and width) share one plain model."""
    runs = {}
    for seed in seeds:
        for v in variants:
            looped, (factor, width) = VARIANTS[v]
            looped = tuple(o.replace("HALF", str(steps * factor // 2)) for o in looped)
            key = setting(v)
            runs["looped", v, seed] = Run("diffusion", v, seed, RECIPE, shards, out / "runs" / f"{v}_s{seed}",
                                          (*looped, *width, f"train.steps={steps * factor}"))
            runs["plain", key, seed] = Run("diffusion", f"plain_deep_{key}", seed, RECIPE, shards,
                                           out / "runs" / f"plain_deep_{key}_s{seed}",
                                               (*DEEP, *width, f"train.steps={steps * factor}"))
    return runs


def held_out(run: Run) -> dict[int, float]:
    from elt_scale.inference.load import load
    loaded = load(run.dir)
    x, y = read_split(run.shards, "val")
    loops = list(range(1, loaded.recipe.model.loops + 1))
    return val_mse_by_loops(loaded.model, loaded.recipe, x, y, loops, VAL_SEED)


def table(rows: list[dict], steps: int) -> str:
    lines = ["| variant | seeds | ILSD/looped @L_max | plain 8×1 | gap to plain (%) | L=1 vs own L_max (%) |",
             "|---|---|---|---|---|---|"]
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]
        gap = [100 * (r["looped"][-1] / r["plain"] - 1) for r in rs]
        anytime = [100 * (r["looped"][0] / r["looped"][-1] - 1) for r in rs]
        span = lambda xs, f: f"{min(xs):{f}}–{max(xs):{f}}"
        lines.append(f"| {v} | {','.join(str(r['seed']) for r in rs)} | {span([r['looped'][-1] for r in rs], '.5f')} "
                     f"| {span([r['plain'] for r in rs], '.5f')} | {span(gap, '+.1f')} | {span(anytime, '+.1f')} |")
    return f"Base setting: {steps} steps, width 64; gap = looped@L_max / plain − 1 (lower is better).\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    start, out, shards = time.time(), Path(args.out).resolve(), Path(args.shards).resolve() / "digits-pixels"
    seeds, variants = [int(s) for s in args.seeds.split(",")], args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    tokenize(shards, ("--pixel-mode", "identity"))
    runs = plan(variants, seeds, args.steps, shards, out)
    # longest first, so two jobs end together; each run carries its own train.steps (the last override wins)
    cost = lambda r: int(r.overrides[-1].split("=")[1]) * (2 if "model.width=96" in r.overrides else 1)  # noqa: E731
    order = sorted(runs.values(), key=cost, reverse=True)
    train_all(order, args.steps, [], args.jobs, out / "logs")
    losses = {key: held_out(run) for key, run in runs.items()}
    rows = []
    for (kind, v, seed), run in runs.items():
        if kind != "looped":
            continue
        rows.append({"variant": v, "seed": seed, "overrides": list(run.overrides),
                     "looped": [round(loss, 5) for _, loss in sorted(losses[kind, v, seed].items())],
                     "plain": round(losses["plain", setting(v), seed][1], 5)})
    with open(out / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    text = table(rows, args.steps) + f"\n\nWall {(time.time() - start) / 60:.1f} min.\n"
    (out / "ablation.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
