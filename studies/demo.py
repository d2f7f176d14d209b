"""The built-in demonstration of the paper's central claim (Figure 1) on scikit-learn's digits, on a CPU.

    python -m studies.demo [--seeds 0,1,2] [--steps 400] [--num 150] [--quick] [--results docs]

1. tokenizes digits (train + val) into shards/digits, where recipes/digits_masked.yaml looks for them;
2. trains the masked ELT with ILSD and as a vanilla looped transformer (`ilsd.enabled=false`, only ever
   L = L_max) for the same budget, once per seed (`run.seed`: initial weights, data order, every draw);
3. measures every model at L = 1 … L_max+1: held-out masked-token loss on the val split, and MaskGIT
   samples scored by the digits classifier (class accuracy, FD-digits), with GFLOPs per sample;
4. checks the claims below over the seeds and writes demo.{csv,md,png,json} (per-seed rows; mean and
   min–max per model and L; PASS/FAIL per claim; commit, date, machine, wall time).

Whatever the numbers say is printed and written as measured: a claim that fails is reported as failing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from elt_scale.cli import ArgumentParser

from .claims import Claim, evaluate
from .measure import measure_all
from .results import meta, publish
from .runs import ROOT, Run, tokenize, train_all

RECIPE = ROOT / "recipes" / "digits_masked.yaml"
MODELS = {"ilsd": ("ilsd.enabled=true",), "vanilla": ("ilsd.enabled=false",)}
TITLE = "Masked ELT on digits: ILSD vs vanilla looped training, same budget"
M = "masked"
CLAIMS = [
    Claim("ilsd_beats_vanilla_at_L1", "at L=1 the ILSD model's held-out loss is lower than the vanilla model's",
          "better", "val_loss", (M, "ilsd", 1), (M, "vanilla", 1)),
    Claim("vanilla_degrades_below_Lmax", "the vanilla model's held-out loss at L=1 is over 2% above its own at "
          "L_max", "better", "val_loss", (M, "vanilla", "max"), (M, "vanilla", 1), tol=0.02),
    Claim("ilsd_anytime", "the ILSD model's held-out loss at L=1 is at most 2% above its own at L_max",
          "no_worse", "val_loss", (M, "ilsd", 1), (M, "ilsd", "max"), tol=0.02),
    Claim("ilsd_free_at_Lmax", "at L_max the ILSD model's held-out loss is at most 1% above the vanilla "
          "model's", "no_worse", "val_loss", (M, "ilsd", "max"), (M, "vanilla", "max"), tol=0.01),
    Claim("ilsd_fd_beats_vanilla_at_L1", "at L=1 the ILSD model's FD-digits is lower than the vanilla model's",
          "better", "fd_digits", (M, "ilsd", 1), (M, "vanilla", 1)),
    Claim("ilsd_fd_free_at_Lmax", "at L_max the ILSD model's FD-digits is at most 10% above the vanilla "
          "model's", "no_worse", "fd_digits", (M, "ilsd", "max"), (M, "vanilla", "max"), tol=0.10),
    Claim("l1_costs_a_quarter", "L=1 costs at most a quarter of the compute of L_max (GFLOPs per sample)",
          "better", "gflops_per_sample", (M, "ilsd", 1), (M, "ilsd", "max"), tol=0.74, quick=True),
]
SEPARATIONS = [(f"ILSD vs vanilla at L={L}", m, (M, "ilsd", L), (M, "vanilla", L))
               for L in (1, "max") for m in ("val_loss", "class_acc", "fd_digits")]


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m studies.demo", description=__doc__)
    p.add_argument("--out", default="demo_out", help="runs, logs and results (default demo_out)")
    p.add_argument("--results", default=None, help="where demo.{csv,md,png,json} go (default: --out; "
                                                   "docs to update the committed results)")
    p.add_argument("--shards", default=str(ROOT / "shards" / "digits"), help="digits shards (default shards/digits)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated run.seed values (default 0,1,2)")
    p.add_argument("--steps", type=int, default=400, help="training steps per model (default 400)")
    p.add_argument("--num", type=int, default=150, help="samples per model, seed and loop count (default 150)")
    p.add_argument("--sample-steps", type=int, default=12, help="MaskGIT decoding steps (default 12)")
    p.add_argument("--jobs", type=int, default=2, help="processes at once (default 2: one per core here)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 30 steps, 40 samples, 4 MaskGIT steps")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. model.width=96")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.num, args.sample_steps = 30, 40, 4
    return args


def plan_runs(out: Path, shards: Path, seeds: list[int]) -> list[Run]:
    return [Run(M, model, seed, RECIPE, shards, out / "runs" / f"demo_{model}_s{seed}", switch)
            for seed in seeds for model, switch in MODELS.items()]


def main(argv=None) -> int:
    from elt_scale.config import load_recipe
    args = parse_args(argv)
    start, out, seeds = time.time(), Path(args.out).resolve(), [int(s) for s in args.seeds.split(",")]
    tokenize(Path(args.shards))
    runs = plan_runs(out, Path(args.shards).resolve(), seeds)
    train_all(runs, args.steps, list(args.overrides), args.jobs, out / "logs")
    rows = measure_all(runs, args.num, {M: args.sample_steps}, args.jobs, out)
    verdicts = evaluate(CLAIMS, rows)
    batch = load_recipe(RECIPE, list(args.overrides)).train.micro_batch
    info = meta(start, seeds, args.steps, batch, args.num, f"MaskGIT {args.sample_steps} steps", args.quick)
    publish(Path(args.results or out), "demo", TITLE, rows, verdicts, SEPARATIONS, info, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
