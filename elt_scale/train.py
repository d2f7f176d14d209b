"""Train an Elastic Looped Transformer with ILSD through DeepSpeed.

    elt-train RECIPE.yaml [key.sub=value ...]
    python -m elt_scale.train RECIPE.yaml train.steps=200
    deepspeed --num_gpus 8 --module elt_scale.train RECIPE.yaml deepspeed.zero_stage=2

Writes <run.out_dir>/<run.name>/{recipe.yaml, run_info.json, metrics.jsonl, ckpt/}. A run directory
that already holds a checkpoint is resumed (train.resume=auto|never|PATH), also on another world size.
Exit codes: 0 done, 2 bad recipe, 3 numerics guard stopped the run, 75 preempted (checkpoint saved;
requeue it: see elt_scale/engine/preemption.py), 124 a stalled step (elt_scale/engine/watchdog.py).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from .config import RecipeError, load_recipe, save_recipe
from .data import check_data, make_loader
from .engine import checkpoint as ckpt
from .engine import faults, universal
from .engine.distributed import init_distributed
from .engine.ds_config import BatchMismatch, make_ds_config, make_optimizer
from .engine.ema import ShardedEMA
from .engine.guard import NumericsGuard, NumericsStop, poison, term_flags
from .engine.live_eval import LiveEval
from .engine.logger import MetricsLog, Throughput, init_wandb, new_wandb_id, write_run_info
from .engine.preemption import PREEMPT_EXIT_CODE, PreemptionFlag
from .engine.watchdog import StepWatchdog
from .ilsd import draw_l_int, ilsd_lambda, ilsd_loss
from .models import build_model
from .objectives import build_objective


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="elt-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (recipes/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 deepspeed.zero_stage=3")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    return p.parse_args(argv)


def step_generator(seed: int, step: int, index: int, device="cpu") -> torch.Generator:
    """All randomness of one micro-batch (masks, noise, t, label drop) from (seed, step, index), index =
    rank * grad_accum + micro being the micro-batch's place in the global batch: the same draws for any
    world size x grad_accum, and after a resume without saving RNG state. On the training device, so
    preparing a batch needs no copy from the host (a pageable copy would wait for the GPU's queue); the
    CPU and CUDA streams differ, each is reproducible."""
    return torch.Generator(device=device).manual_seed(hash((seed, step, index)) % (2**63))


def train_step(engine, objective, batch, recipe, step: int, rank: int, micro: int):
    """One micro-batch: ILSD exits from one forward pass, loss, backward. Returns (loss, terms, l_int, λ)."""
    r = recipe
    faults.die_at(step + 1, rank)                                         # test-only (ELT_FAULT)
    x, labels = (t.to(engine.device, non_blocking=True) for t in batch)
    index = rank * r.train.grad_accum + micro
    prepared = objective.prepare(x, labels, step_generator(r.run.seed, step, index, engine.device))
    l_max = r.model.loops
    if r.ilsd.enabled:
        l_int = draw_l_int(r.run.seed, step, r.ilsd.min_loops, l_max)     # same on every rank, no comm
        student, teacher = engine(*prepared.inputs, exits=(l_int, l_max))
        lam = ilsd_lambda(step, r.ilsd.lambda_start, r.ilsd.lambda_end, r.ilsd.lambda_steps or r.train.steps)
    else:
        l_int, lam, student = l_max, 1.0, None
        (teacher,) = engine(*prepared.inputs, exits=(l_max,))
    if faults.nan_at(step + 1, rank, micro):                              # test-only (ELT_FAULT): a bad exit
        student = student * float("nan") if student is not None else None
        teacher = teacher * float("nan") if student is None else teacher
    loss, terms = ilsd_loss(teacher, student, objective, prepared, lam)
    engine.backward(poison(loss))
    engine.step()
    return loss.detach(), terms, l_int, lam


def agree(bad: torch.Tensor, preempt: bool) -> list[float]:
    """Element-wise max over ranks of the numerics flags and the preemption flag: one small all-reduce and
    the step's one host read of them."""
    t = torch.cat([bad.float(), bad.new_full((1,), float(preempt), dtype=torch.float32)])   # no host->device copy
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def global_mean(sums: dict, count: int) -> dict:
    """Loss terms summed over this rank's micro-batches -> their mean over the whole global batch (one
    all-reduce; called on logging steps only, by every rank), so the logged curve is layout-free."""
    t = torch.stack(list(sums.values()))
    dist.all_reduce(t)
    return dict(zip(sums, (t / count).tolist()))


def as_float(x) -> float | None:
    return None if x is None else float(x)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_data(recipe)                   # missing or mismatched shards: before a run dir or DeepSpeed exists
        resume_from = ckpt.find_resume(recipe.train.resume, recipe.run_dir / "ckpt")
    except (RecipeError, FileNotFoundError, ValueError) as e:
        print(f"elt-train: {e}", file=sys.stderr)
        return 2
    rank, world = init_distributed(recipe.train.collective_timeout_s)
    status = train(recipe, resume_from, rank, world)
    # Only on a normal return: gloo's worker threads still hold tensors if the interpreter tears the process
    # group down itself, and exit aborts ("terminate called without an active exception", seen on a Slurm
    # rank). After an exception a collective teardown could hang on a rank that never arrives: let it die.
    dist.destroy_process_group()
    return status


def train(recipe, resume_from, rank: int, world: int) -> int:
    """The run itself, on an initialised process group. Returns the exit code (0, 2, 3 or 75)."""
    import deepspeed  # heavy import, after argument errors are reported

    preempt = PreemptionFlag()                   # from here on a SIGTERM/SIGUSR1 waits for a step boundary
    try:
        ds_config = make_ds_config(recipe, world)
    except BatchMismatch as e:
        print(f"elt-train: {e}", file=sys.stderr)
        return 2
    run_dir, ckpt_dir, t = recipe.run_dir, recipe.run_dir / "ckpt", recipe.train

    # --- where to start: a complete checkpoint of this run (or train.resume=PATH, found above), or step 0 ----
    client = ckpt.read_client(resume_from) if resume_from else None
    layout = (world, recipe.deepspeed.zero_stage)
    same_layout = client is not None and (client["world_size"], client["zero_stage"]) == layout

    torch.manual_seed(recipe.run.seed)           # identical initial weights on every rank
    model = build_model(recipe)
    shapes = ckpt.param_shapes(model)
    if client and (why := ckpt.shape_mismatch(client.get("model_shapes"), shapes)):
        if rank == 0:                             # else DeepSpeed's size-mismatch traceback, on every rank
            print(f"elt-train: cannot resume from {resume_from}: {why}; a different model needs its own "
                  f"run.name", file=sys.stderr)
        return 2
    if client and not same_layout:               # other world size/stage: consolidated fp32 weights, then moments
        model.load_state_dict(ckpt.consolidated_weights(resume_from))
        ds_config = universal.universal_config(ds_config, resume_from, recipe.deepspeed.zero_stage)
    if t.compile:
        model.trunk.compile_block()
    objective = build_objective(recipe)
    optimizer = None if "optimizer" in ds_config else make_optimizer(recipe, model)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if same_layout:
        client = ckpt.load_same_world(engine, resume_from)
    elif client:
        how = universal.load(engine, resume_from, recipe.deepspeed.zero_stage)
        if rank == 0:
            print(f"elt-train: optimizer state from layout (world {client['world_size']}, ZeRO-{client['zero_stage']}) "
                  f"loaded by {how}", file=sys.stderr)
        ckpt.restore_schedule(engine, scheduler, client["step"])
    ema = ShardedEMA(engine.module, t.ema_decay, rank, world) if t.ema_decay > 0 else None
    if ema and client:
        if any(resume_from.glob("ema_rank*.safetensors")):
            ema.load(resume_from)
        elif rank == 0:
            print(f"elt-train: WARNING {resume_from} holds no EMA; it starts from the resumed weights",
                  file=sys.stderr)
    client = client or {"step": 0, "data_position": 0, "wandb_id": new_wandb_id(), "skipped_steps": 0,
                        "bad_streak": 0}
    start = client["step"]
    guard = NumericsGuard(t.max_bad_steps, client["skipped_steps"], client["bad_streak"])

    # --- run directory, logging ---------------------------------------------------------------------------
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        if ckpt_dir.exists():
            ckpt.prune(ckpt_dir, t.keep_last)     # drops folders of saves that never completed
        info = write_run_info(run_dir / "run_info.json", recipe, model, world, ds_config, client["wandb_id"])
        metrics = MetricsLog(run_dir, resume_step=start)
        wandb_run = init_wandb(recipe, client["wandb_id"])
        print(f"elt-train: {recipe.model.family} {recipe.model.unique_layers}N×{recipe.model.loops}L, "
              f"{info['unique_params'] / 1e6:.2f}M params ({info['effective_params'] / 1e6:.2f}M effective), "
              f"world {world}, ZeRO-{recipe.deepspeed.zero_stage}, global batch {info['global_batch']} = "
              f"{t.micro_batch} micro × {t.grad_accum} accum × {world} ranks, steps {start}→{t.steps}"
              + (f", resumed from {resume_from}" if resume_from else ""))
    loader = make_loader(recipe, rank, world, client["data_position"])
    meter = Throughput(recipe, world)
    live = LiveEval(recipe, rank, world)

    def save(step: int) -> None:
        state = {"step": step, "data_position": loader.position, "world_size": world,
                 "zero_stage": recipe.deepspeed.zero_stage, "lambda": lam, "wandb_id": client["wandb_id"],
                 "skipped_steps": guard.skipped, "bad_streak": guard.streak, "model_shapes": shapes}
        with watchdog.paused():                  # long and legitimate: not a stalled step
            ckpt.save(engine, ckpt_dir, state, ema, t.keep_last)

    from tqdm import tqdm
    bar = tqdm(total=t.steps, initial=start, disable=rank != 0, desc=recipe.run.name, unit="step")
    lam, status = None, 0
    watchdog = StepWatchdog(t.watchdog_factor, t.watchdog_min_s, t.watchdog_first_s, rank)
    for step in range(start, t.steps):
        done = step + 1
        skipped_before, bad, sums = engine.skipped_steps, None, {}
        for micro in range(t.grad_accum):
            loss, terms, l_int, lam = train_step(engine, objective, next(loader), recipe, step, rank, micro)
            bad = term_flags(terms) if bad is None else torch.maximum(bad, term_flags(terms))
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
        skipped = engine.skipped_steps > skipped_before
        if ema and not skipped:
            ema.update()
        meter.add(ds_config["train_batch_size"])
        *bad, preempted = agree(bad, preempt.requested)
        watchdog.beat(done)
        preempted = preempted > 0 and done < t.steps             # on the last step: just finish
        grad_norm = as_float(engine.get_global_grad_norm())
        try:
            guard.after_step(done, skipped, bad, grad_norm)
        except NumericsStop as e:
            if rank == 0:
                print(f"elt-train: stopping: {e}", file=sys.stderr)
            status = 3
            break
        log_now = done % t.log_every == 0 or done == t.steps or preempted     # the same on every rank
        means = global_mean(sums, world * t.grad_accum) if log_now else None
        if rank == 0 and log_now:
            row = {"step": done, **means,
                   "lambda": lam, "l_int": l_int, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "skipped_steps": guard.skipped, **meter.read(), "world_size": world}
            metrics.write(row)
            if wandb_run:
                wandb_run.log(row, step=done)
            bar.set_postfix(loss=f"{row['loss']:.4f}", L_int=l_int)
        bar.update(1)
        if not preempted:                        # a preempted job saves and leaves: no sampling first
            with watchdog.paused():              # sampling is not a slow step
                live.after_step(done, engine, ema, metrics if rank == 0 else None, wandb_run if rank == 0 else None)
        if (t.save_every and done % t.save_every == 0) or done == t.steps or preempted:
            save(done)
        if preempted:
            if rank == 0:
                print(f"elt-train: preempted ({preempt.signal_name or 'signal on another rank'}) at step {done}; "
                      f"checkpoint saved; exiting {PREEMPT_EXIT_CODE} to be requeued", file=sys.stderr)
            status = PREEMPT_EXIT_CODE
            break
    watchdog.stop()
    bar.close()
    if rank == 0:
        metrics.close()
        if wandb_run:
            wandb_run.finish()
        if status == 0:
            print(f"elt-train: finished {t.steps} steps, {guard.skipped} skipped; run in {run_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
