"""Measuring a trained model at every loop count it can run: held-out loss on the val split (all exits of
one forward pass), and samples scored by the digits classifier (class accuracy, FD-digits) with the
GFLOPs per sample. Each model in its own process on one thread; samples drawn from the run's seed, the
held-out loss from one fixed draw shared by every run."""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from elt_scale.seeding import generator

from .runs import Run, train_losses

VAL_SEED = 0     # the held-out draws' seed, the same for every run (not run.seed)


def loop_counts(trained_l: int) -> list[int]:
    """Looped models at 1 … L_max+1 (a little beyond training); a plain model only at its own depth."""
    return list(range(1, trained_l + 2)) if trained_l > 1 else [1]


def read_split(shards: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of a split, in stored order: (codes (N, H, W) long or pixels float, labels (N,) long)."""
    from elt_scale.data.webds import split_samples
    samples = list(split_samples(str(shards), split))
    x = torch.from_numpy(np.stack([a for _, a, _ in samples]))
    return (x.float() if x.is_floating_point() else x.long()), torch.tensor([label for _, _, label in samples])


@torch.no_grad()
def val_loss_by_loops(model, codes: torch.Tensor, labels: torch.Tensor, loops: list[int], seed: int = 0,
                      repeats: int = 4, batch: int = 256) -> dict[int, float]:
    """Held-out masked-token cross-entropy at each loop count: the same masks (cosine schedule, seeded)
    for every L, true class labels; all exits come from one forward pass to max(loops)."""
    from elt_scale.objectives import masked_ce, random_mask
    g = generator(seed, "val")
    totals, count = {L: 0.0 for L in loops}, 0.0
    for _ in range(repeats):
        for i in range(0, len(codes), batch):
            x, y = codes[i:i + batch], labels[i:i + batch]
            mask = random_mask(x, g).view_as(x)
            inputs = torch.where(mask, torch.full_like(x, model.mask_id), x)
            for L, logits in zip(loops, model(inputs, y, exits=loops)):
                totals[L] += masked_ce(logits, x.flatten(1), mask.flatten(1)).item() * mask.sum().item()
            count += mask.sum().item()
    return {L: totals[L] / count for L in loops}


@torch.no_grad()
def val_mse_by_loops(model, recipe, x0: torch.Tensor, labels: torch.Tensor, loops: list[int], seed: int = 0,
                     repeats: int = 4, batch: int = 256) -> dict[int, float]:
    """Held-out diffusion loss at each loop count: the training objective's weighted x0-MSE, with the same
    seeded times and noise for every L and true class labels; all exits from one forward pass."""
    from elt_scale.objectives import add_noise, weighted_mse, x0_weight
    o, g = recipe.objective, generator(seed, "val")
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


def measure_run(run: Run, num: int, sample_steps: int, sampler: str, out: str) -> list[dict]:
    """One model (in its own process, one thread): held-out loss and the any-time sweep at each L."""
    torch.set_num_threads(1)
    from elt_scale.inference.anytime import anytime_sweep
    from elt_scale.inference.load import load
    from elt_scale.models import count_params

    loaded = load(run.dir)
    model, recipe = loaded.model, loaded.recipe
    loops = loop_counts(recipe.model.loops)
    x, y = read_split(run.shards, "val")
    # one held-out draw (masks, or times and noise) for every model and seed: the seed spread of the val loss
    # is then the training's alone, and two models are compared on the very same questions
    val = (val_loss_by_loops(model, x, y, loops, VAL_SEED) if recipe.model.family == "masked"
           else val_mse_by_loops(model, recipe, x, y, loops, VAL_SEED))
    sweep = anytime_sweep([run.dir], [str(L) for L in loops], num, out, names=[run.name], steps=sample_steps,
                          sampler=sampler, seed=run.seed, progress=False)
    losses = train_losses(run.dir)
    return [{"family": run.family, "model": run.model, "seed": run.seed, "unique_layers": recipe.model.unique_layers,
             "trained_L": recipe.model.loops, "L": int(r["L"]), "params": count_params(model),
             "gflops_per_sample": r["gflops_per_sample"], "val_loss": round(val[int(r["L"])], 5),
             "class_acc": r.get("class_acc"), "fd_digits": r.get("fd_digits"),
             "train_loss_first": round(losses[0][1], 5), "train_loss_last": round(losses[-1][1], 5),
             "sample_wall_s": r["wall_s"]} for r in sweep]


def measure_all(runs: list[Run], num: int, sample_steps: dict[str, int], jobs: int, out: Path) -> list[dict]:
    """Every run measured, `jobs` processes at once; rows in the order of `runs`."""
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(measure_run, run, num, sample_steps[run.family],
                               "ddim" if run.family == "diffusion" else "ddpm", str(out / "anytime" / run.name))
                   for run in runs]
        rows = []
        for f in tqdm(futures, desc="measure (val loss, sample, classify)", unit="model"):
            rows += f.result()
    return rows
