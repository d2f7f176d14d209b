"""Exploration (issue 40): do the plain 2-layer and 8-layer masked models separate on the digit-mosaic proxy?

    python -m studies.mosaic_explore [--grid 2x2] [--rule sum] [--seeds 0,1] [--steps 300] [overrides ...]

Trains plain_small and plain_deep (the reproduce study's model_overrides on recipes/digits_masked.yaml) one
at a time through the real trainer, then measures the held-out masked-token loss on the mosaic val split
with the same shared draw of masks as studies.measure. Each row (config, seed, steps, val loss, wall time)
is printed and appended to OUT/rows.jsonl, with the loss under a wrong class
(does the model use the class at all?). Not a study with claims: sizing for a later one.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from elt_scale.cli import ArgumentParser
from elt_scale.config import load_recipe

from .measure import VAL_SEED, read_split, val_loss_by_loops
from .reproduce import model_overrides
from .runs import ROOT, Run, tokenize, train_all

RECIPE = ROOT / "recipes" / "digits_masked.yaml"


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m studies.mosaic_explore", description=__doc__)
    p.add_argument("--out", default="mosaic_out", help="runs, logs and rows.jsonl (default mosaic_out)")
    p.add_argument("--grid", default="2x2", help="--mosaic-grid (default 2x2); 1x1: the plain 8x8 digits source "
                                                 "(the reproduce study's masked data; --rule is then unused)")
    p.add_argument("--rule", default="sum", help="--mosaic-rule (default sum)")
    p.add_argument("--seeds", default="0,1", help="comma-separated run.seed values (default 0,1)")
    p.add_argument("--steps", type=int, default=300, help="training steps per model (default 300)")
    p.add_argument("--models", default="plain_small,plain_deep", help="models of studies.reproduce to train")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. model.width=96")
    return p.parse_args(argv)


def held_out_loss(run: Run) -> tuple[float, float]:
    """(loss with the true class, loss with class (label + 5) mod 10). Equal numbers mean the model ignores the
    class, i.e. has not learned the rule that ties the cells together: the part of the task depth is for."""
    from elt_scale.inference.load import load
    loaded = load(run.dir)
    x, y = read_split(run.shards, "val")
    L = loaded.recipe.model.loops
    return tuple(val_loss_by_loops(loaded.model, x, labels, [L], VAL_SEED)[L] for labels in (y, (y + 5) % 10))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    rows, cols = (int(v) for v in args.grid.split("x"))
    if (rows, cols) == (1, 1):
        shards = out / "shards" / "digits"
        tokenize(shards, ("--workers", "0"), "digits")
    else:
        shards = out / "shards" / f"mosaic-{args.grid}-{args.rule}"
        tokenize(shards, ("--mosaic-grid", args.grid, "--mosaic-rule", args.rule, "--workers", "0"), "digit-mosaic")
    m = load_recipe(RECIPE).model
    extra = [f"model.grid=[{8 * rows},{8 * cols}]", *args.overrides]
    for seed in (int(s) for s in args.seeds.split(",")):
        for model in args.models.split(","):
            tag = f"{args.grid}_{args.rule}_{model}_s{seed}_{args.steps}" + "".join(f"_{o}" for o in args.overrides)
            run = Run("masked", model, seed, RECIPE, shards, out / "runs" / tag.replace("=", "-"),
                      model_overrides(model, m.unique_layers, m.loops))
            start = time.time()
            train_all([run], args.steps, extra, 1, out / "logs")
            wall = time.time() - start
            true, wrong = held_out_loss(run)
            row = {"grid": args.grid, "rule": args.rule, "model": model, "seed": seed, "steps": args.steps,
                   "overrides": args.overrides, "val_loss": round(true, 5), "val_loss_wrong_class": round(wrong, 5),
                   "train_wall_s": round(wall, 1)}
            print(json.dumps(row), flush=True)
            with open(out / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
