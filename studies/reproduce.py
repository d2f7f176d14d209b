"""The paper's two claims on digits, for both model families, on a CPU, over several seeds.

    python -m studies.reproduce [--seeds 0,1,2] [--steps N] [--num 150] [--quick] [--results docs]

For the masked (recipes/digits_masked.yaml) and the diffusion (recipes/digits_diffusion.yaml) recipe,
N unique layers looped L_max times, four models are trained through the real trainer with the same
steps, batch and optimizer (nothing tuned per model beyond the recipe), once per seed; each family trains
until it reaches a stated quality bar on every seed (QUALITY_BARS: a diffusion model that ignores its class
cannot tell one architecture from another): masked 400 steps, diffusion 1500 (by default).

    ilsd        N layers × L_max loops, ILSD                       (the paper's ELT)
    vanilla     N layers × L_max loops, plain looped training      (`ilsd.enabled=false`)
    plain_deep  N·L_max layers × 1 loop: equal effective depth, L_max × the parameters (MaskGIT / DiT)
    plain_small N layers × 1 loop: the looped model's parameter count, 1/L_max of its depth

Each is measured at every L it can run (the looped ones at 1 … L_max+1, the plain ones at 1): held-out
loss (masked-token cross-entropy or weighted x0-MSE), samples (MaskGIT, or DDIM for diffusion) scored by
the digits classifier (class accuracy, FD-digits), GFLOPs per sample and parameters. Claim 1 (any-time):
ILSD is good at every L, vanilla only at L_max. Claim 2 (efficiency): ELT at L_max matches plain_deep
with 1/L_max of its parameters and beats plain_small at the same parameter count; claim 2 can only tell
where plain_small is measurably worse than plain_deep (the first separation rows say whether this regime
does). Each is checked over the seeds (CLAIMS below) and written with the tables: reproduce.{csv,md,png,json}.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from elt_scale.cli import ArgumentParser
from elt_scale.config import load_recipe

from .claims import Claim, QualityBar, check_bars, evaluate
from .measure import measure_all
from .results import meta, publish
from .runs import ROOT, Run, tokenize, train_all

FAMILIES = {   # family -> (recipe, tokenize.py arguments, shard folder, training steps)
    "masked": (ROOT / "recipes" / "digits_masked.yaml", (), "digits", 400),
    "diffusion": (ROOT / "recipes" / "digits_diffusion.yaml", ("--pixel-mode", "identity"), "digits-pixels", 1500),
}
MODELS = ("ilsd", "vanilla", "plain_deep", "plain_small")
TITLE = "ELT on digits: any-time (ILSD vs vanilla) and parameter efficiency (vs plain transformers)"


def model_overrides(model: str, n: int, l_max: int) -> tuple[str, ...]:
    """The one difference between the four models: layers, loops and the ILSD switch."""
    return {"ilsd": ("ilsd.enabled=true",),
            "vanilla": ("ilsd.enabled=false",),
            "plain_deep": (f"model.unique_layers={n * l_max}", "model.loops=1", "ilsd.enabled=false"),
            "plain_small": (f"model.unique_layers={n}", "model.loops=1", "ilsd.enabled=false")}[model]


def family_claims(f: str) -> list[Claim]:
    return [
        Claim(f"{f}_ilsd_beats_vanilla_at_L1", f"{f}: at L=1 ILSD's held-out loss is lower than vanilla's",
              "better", "val_loss", (f, "ilsd", 1), (f, "vanilla", 1)),
        Claim(f"{f}_ilsd_anytime", f"{f}: ILSD's held-out loss at L=1 is at most 5% above its own at L_max",
              "no_worse", "val_loss", (f, "ilsd", 1), (f, "ilsd", "max"), tol=0.05),
        Claim(f"{f}_looping_beats_equal_params", f"{f}: ILSD at L_max has a lower held-out loss than the plain "
              "model with the same parameters", "better", "val_loss", (f, "ilsd", "max"), (f, "plain_small", 1)),
        Claim(f"{f}_matches_equal_depth", f"{f}: ILSD at L_max is at most 2% worse than the plain model of "
              "equal depth (L_max × its parameters) in held-out loss", "no_worse", "val_loss", (f, "ilsd", "max"),
              (f, "plain_deep", 1), tol=0.02),
        Claim(f"{f}_equal_depth_equal_cost", f"{f}: ILSD at L_max costs what the equal-depth plain model costs "
              "(GFLOPs per sample)", "within", "gflops_per_sample", (f, "ilsd", "max"), (f, "plain_deep", 1),
              tol=1e-6, quick=True),
    ]


CLAIMS = [c for f in FAMILIES for c in family_claims(f)]
QUALITY_BARS = [QualityBar(f"{f}_{m}_follows_its_class", f"{f}: {m} at L_max follows its class in at least 80% of "
                           "its samples (no guidance)", "class_acc", (f, m, "max"), 0.8)
                for f in FAMILIES for m in ("ilsd", "plain_deep")]
# the first row per family says whether this regime can tell claim 2 at all: does depth (parameters) matter here?
SEPARATIONS = [(f"{f}: {a[1]}@{a[2]} vs {b[1]}@{b[2]}", m, a, b) for f in FAMILIES
               for a, b in (((f, "plain_small", 1), (f, "plain_deep", 1)), ((f, "ilsd", 1), (f, "vanilla", 1)),
                            ((f, "ilsd", "max"), (f, "plain_small", 1)), ((f, "ilsd", "max"), (f, "plain_deep", 1)))
               for m in ("val_loss", "class_acc", "fd_digits")]


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m studies.reproduce", description=__doc__)
    p.add_argument("--out", default="reproduce_out", help="runs, logs and results (default reproduce_out)")
    p.add_argument("--results", default=None, help="where reproduce.{csv,md,png,json} go (default: --out; docs "
                                                   "to update the committed results)")
    p.add_argument("--shards", default=str(ROOT / "shards"), help="folder of the digits shard sets (default shards)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated run.seed values (default 0,1,2)")
    p.add_argument("--steps", type=int, default=None, help="training steps for every model (default: "
                   + ", ".join(f"{f} {v[3]}" for f, v in FAMILIES.items()) + ")")
    p.add_argument("--num", type=int, default=150, help="samples per model, seed and loop count (default 150)")
    p.add_argument("--masked-steps", type=int, default=12, help="MaskGIT decoding steps (default 12)")
    p.add_argument("--diffusion-steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--jobs", type=int, default=2, help="processes at once (default 2: one per core here)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, 16 samples, 4 sampling steps")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. train.micro_batch=16")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.num, args.masked_steps, args.diffusion_steps = 20, 16, 4, 4
    return args


def plan_runs(out: Path, shards: Path, seeds: list[int]) -> list[Run]:
    runs = []
    for family, (recipe, _, shard_dir, _) in FAMILIES.items():
        m = load_recipe(recipe).model
        runs += [Run(family, model, seed, recipe, shards / shard_dir, out / "runs" / f"{family}_{model}_s{seed}",
                     model_overrides(model, m.unique_layers, m.loops)) for seed in seeds for model in MODELS]
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    start, out, seeds = time.time(), Path(args.out).resolve(), [int(s) for s in args.seeds.split(",")]
    shards = Path(args.shards).resolve()
    for _, tok_args, shard_dir, _ in FAMILIES.values():
        tokenize(shards / shard_dir, tok_args)
    runs = plan_runs(out, shards, seeds)
    steps = {f: args.steps or v[3] for f, v in FAMILIES.items()}
    for family in FAMILIES:
        train_all([r for r in runs if r.family == family], steps[family], list(args.overrides), args.jobs, out / "logs")
    rows = measure_all(runs, args.num, {"masked": args.masked_steps, "diffusion": args.diffusion_steps}, args.jobs, out)
    verdicts = check_bars(QUALITY_BARS, rows) + evaluate(CLAIMS, rows)
    batch = load_recipe(FAMILIES["masked"][0], list(args.overrides)).train.micro_batch
    info = meta(start, seeds, " / ".join(f"{n} ({f})" for f, n in steps.items()), batch, args.num,
                f"MaskGIT {args.masked_steps} steps, DDIM {args.diffusion_steps} steps, no guidance", args.quick)
    publish(Path(args.results or out), "reproduce", TITLE, rows, verdicts, SEPARATIONS, info, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
