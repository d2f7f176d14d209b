"""Train an Elastic Looped Transformer with ILSD through DeepSpeed.

    elt-train RECIPE.yaml [key.sub=value ...]
    python -m elt_scale.train RECIPE.yaml train.steps=200
    deepspeed --num_gpus 8 --module elt_scale.train RECIPE.yaml deepspeed.zero_stage=2

Writes <run.out_dir>/<run.name>/{recipe.yaml, metrics.jsonl, ckpt/}. A run directory that already
holds a checkpoint is resumed (train.resume=auto|never|PATH).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .config import RecipeError, load_recipe, save_recipe
from .data import make_loader
from .engine.distributed import device, init_distributed
from .engine.ds_config import make_ds_config, make_optimizer
from .ilsd import draw_l_int, ilsd_lambda, ilsd_loss
from .models import build_model, count_params
from .objectives import build_objective


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="elt-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (recipes/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 deepspeed.zero_stage=3")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    return p.parse_args(argv)


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """All randomness of one micro-step (masks, noise, t, label drop) from (seed, step, rank, micro):
    reproducible after a resume without saving RNG state."""
    return torch.Generator().manual_seed(hash((seed, step, rank, micro)) % (2**63))


def train_step(engine, objective, batch, recipe, step: int, rank: int, micro: int):
    """One micro-batch: ILSD exits from one forward pass, loss, backward. Returns (loss, terms, l_int)."""
    r = recipe
    x, labels = (t.to(engine.device, non_blocking=True) for t in batch)
    prepared = objective.prepare(x, labels, step_generator(r.run.seed, step, rank, micro))
    l_max = r.model.loops
    if r.ilsd.enabled:
        l_int = draw_l_int(r.run.seed, step, r.ilsd.min_loops, l_max)
        student, teacher = engine(*prepared.inputs, exits=(l_int, l_max))
        lam = ilsd_lambda(step, r.ilsd.lambda_start, r.ilsd.lambda_end, r.ilsd.lambda_steps or r.train.steps)
    else:
        l_int, lam, student = l_max, 1.0, None
        (teacher,) = engine(*prepared.inputs, exits=(l_max,))
    loss, terms = ilsd_loss(teacher, student, objective, prepared, lam)
    engine.backward(loss)
    engine.step()
    return loss.detach(), terms, l_int, lam


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"elt-train: {e}", file=sys.stderr)
        return 2
    import deepspeed  # heavy import, after argument errors are reported

    rank, world = init_distributed()
    torch.manual_seed(recipe.run.seed)           # identical initial weights on every rank
    model = build_model(recipe)
    if recipe.train.compile:
        model.trunk.compile_block()
    objective = build_objective(recipe)
    ds_config = make_ds_config(recipe, world)
    optimizer = None if "optimizer" in ds_config else make_optimizer(recipe, model)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    run_dir = recipe.run_dir
    ckpt_dir = run_dir / "ckpt"
    start_step, position = 0, 0
    if recipe.train.resume != "never":
        load_dir = ckpt_dir if recipe.train.resume == "auto" else recipe.train.resume
        if (load_dir == ckpt_dir and (ckpt_dir / "latest").exists()) or load_dir != ckpt_dir:
            path, client = engine.load_checkpoint(str(load_dir))
            if path is None and load_dir != ckpt_dir:
                raise FileNotFoundError(f"train.resume={load_dir}: no DeepSpeed checkpoint there")
            if path is not None:
                start_step, position = client["step"], client["data_position"]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    loader = make_loader(recipe, rank, world, position)

    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    from tqdm import tqdm
    bar = tqdm(total=recipe.train.steps, initial=start_step, disable=rank != 0, desc=recipe.run.name, unit="step")
    if rank == 0:
        print(f"elt-train: {recipe.model.family} {recipe.model.unique_layers}N×{recipe.model.loops}L, "
              f"{count_params(model) / 1e6:.2f}M params, world {world}, ZeRO-{recipe.deepspeed.zero_stage}, "
              f"global batch {ds_config['train_batch_size']}, steps {start_step}→{recipe.train.steps}")
    t_last, samples_since = time.time(), 0
    for step in range(start_step, recipe.train.steps):
        for micro in range(recipe.train.grad_accum):
            loss, terms, l_int, lam = train_step(engine, objective, next(loader), recipe, step, rank, micro)
        samples_since += ds_config["train_batch_size"]
        done = step + 1
        if rank == 0 and (done % recipe.train.log_every == 0 or done == recipe.train.steps):
            now = time.time()
            row = {"step": done, "loss": loss.item(), **{k: v.item() for k, v in terms.items()},
                   "lambda": lam, "l_int": l_int, "lr": scheduler.get_last_lr()[0],
                   "samples_per_s": samples_since / (now - t_last), "world_size": world}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{row['loss']:.4f}", L_int=l_int)
            t_last, samples_since = now, 0
        bar.update(1)
        if (recipe.train.save_every and done % recipe.train.save_every == 0) or done == recipe.train.steps:
            engine.save_checkpoint(str(ckpt_dir), tag=f"step_{done:08d}",
                                   client_state={"step": done, "data_position": loader.position})
    bar.close()
    if rank == 0:
        metrics.close()
        print(f"elt-train: finished {recipe.train.steps} steps; run in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
