"""Where a run's engine comes from, in one call (`start_engine`): the model, the DeepSpeed engine with its
config and optimizer, and the train state, fresh or resumed.

    same layout (world size and ZeRO stage)   DeepSpeed's own load: bitwise-exact continuation
    another layout                             fp32 weights parameter by parameter from a universal checkpoint
                                               before `deepspeed.initialize`, then Adam's moments from it
                                               (universal.py): no rank holds a consolidated copy of the model
    fresh                                      step 0, a new wandb id
The EMA, kept sharded like the master weights, is re-sliced from its shards on any layout.

The DeepSpeed config (`make_ds_config`: ZeRO stage, batch arithmetic, precision) and the optimizer
(`make_optimizer`) come from the recipe, below. The learning rate is not DeepSpeed's scheduler's: `set_lr`
writes elt_scale/schedules.py's value before every update."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import merge
from ..models import build_model
from . import checkpoint as ckpt
from . import universal
from .checkpoint import TrainState
from .ema import ShardedEMA
from .guard import GuardedAdamW
from .logger import new_wandb_id
from .startup import waiting


class ResumeRefused(ValueError):
    """The checkpoint cannot be resumed into this recipe's model; the message says why (exit 2)."""


@dataclass
class Started:
    engine: object                  # deepspeed.DeepSpeedEngine (model inside: engine.module)
    ema: ShardedEMA | None
    state: TrainState               # for this run's layout; step 0 when fresh
    notes: list[str] = field(default_factory=list)   # what rank 0 should tell the user about the resume


def start_engine(recipe, ds_config: dict, resume_from: Path | None, rank: int, world: int) -> Started:
    """Collective. Builds the model (seeded: identical on every rank), compiles its block if asked, wraps it
    in DeepSpeed and restores `resume_from` (a checkpoint folder) when given."""
    import deepspeed

    stage = recipe.deepspeed.zero_stage
    saved = TrainState.read(resume_from) if resume_from else None
    same_layout = saved is not None and (saved.world_size, saved.zero_stage) == (world, stage)
    torch.manual_seed(recipe.run.seed)
    model = build_model(recipe)
    shapes = ckpt.param_shapes(model)
    if saved and (why := ckpt.shape_mismatch(saved.model_shapes, shapes)):
        raise ResumeRefused(f"cannot resume from {resume_from}: {why}; a different model needs its own run.name")
    if saved and not same_layout:
        universal.load_weights(model, resume_from, recipe.train.solo_timeout_s)
        ds_config = universal.universal_config(ds_config, resume_from, stage)
    if recipe.train.compile:
        model.trunk.compile_block()
    optimizer = None if "optimizer" in ds_config else make_optimizer(recipe, model)
    with waiting("DeepSpeed's engine (its ops load here)", recipe.train.startup_timeout_s, recipe.train.stale_lock_s):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    notes = []
    if same_layout:
        state = ckpt.load_same_world(engine, resume_from)
    elif saved:
        how = universal.load(engine, resume_from, stage, recipe.train.solo_timeout_s)
        notes.append(f"optimizer state from layout (world {saved.world_size}, ZeRO-{saved.zero_stage}) loaded by {how}")
        engine.global_steps = saved.step      # DeepSpeed's own counter (the lr is a function of the step)
        state = saved
    else:
        state = TrainState(wandb_id=new_wandb_id())
    state.world_size, state.zero_stage, state.model_shapes = world, stage, shapes

    ema = ShardedEMA(engine.module, recipe.train.ema_decay, rank, world) if recipe.train.ema_decay > 0 else None
    if ema and saved:
        if any(resume_from.glob("ema_rank*.safetensors")):
            ema.load(resume_from)
        else:
            notes.append(f"WARNING {resume_from} holds no EMA; it starts from the resumed weights")
    return Started(engine, ema, state, notes)


# ---------------------------------------------------------------------------------------------------------
# the recipe's DeepSpeed config and optimizer: what start_engine hands deepspeed.initialize

class BatchMismatch(ValueError):
    pass


def global_batch(recipe, world: int) -> int:
    t = recipe.train
    g = t.micro_batch * t.grad_accum * world
    if t.global_batch and t.global_batch != g:
        raise BatchMismatch(f"train.global_batch={t.global_batch} but train.micro_batch ({t.micro_batch}) × "
                            f"train.grad_accum ({t.grad_accum}) × world size ({world}) = {g}")
    return g


def bf16_enabled(recipe) -> bool:
    return bool(recipe.train.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def own_clip(recipe) -> bool:
    """Stage 0 in fp32 hands our optimizer to DeepSpeed unwrapped: GuardedAdamW clips (and reports the
    pre-clip norm and skips non-finite steps) itself."""
    return recipe.deepspeed.zero_stage == 0 and not bf16_enabled(recipe) and not recipe.deepspeed.offload_optimizer


def make_ds_config(recipe, world: int) -> dict:
    t, d = recipe.train, recipe.deepspeed
    if "scheduler" in d.extra:     # a second schedule would fight set_lr's every step
        raise BatchMismatch("deepspeed.extra.scheduler: the learning-rate schedule is train.lr, train.warmup_steps "
                            "and train.min_lr_ratio (linear warm-up, then cosine: elt-plan RECIPE --schedules "
                            "shows it); remove deepspeed.extra.scheduler")
    zero: dict = {"stage": d.zero_stage}
    if d.zero_stage >= 2:
        # one rank has no communication to overlap, and the side stream cost 5-15% of an H200 step (bench/RESULTS.md)
        zero.update(overlap_comm=torch.cuda.is_available() and world > 1, contiguous_gradients=True)
    if d.zero_stage == 3:    # the looped block runs the same modules L times: say so if the prefetch trace breaks
        zero["log_trace_cache_warnings"] = True
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        "train_batch_size": global_batch(recipe, world),
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 0.0 if own_clip(recipe) else t.grad_clip,
        "bf16": {"enabled": bf16_enabled(recipe)},
        "zero_optimization": zero,
        "steps_per_print": 10**9,           # we log ourselves
        "wall_clock_breakdown": False,
    }
    return merge(cfg, d.extra)


def set_lr(engine, lr: float) -> float:
    """Write `lr` into every param group of the optimizer that takes the step (under ZeRO/bf16 the torch
    optimizer DeepSpeed wraps); returns the value now in force, read back from the optimizer."""
    opt = engine.optimizer
    groups = opt.param_groups if opt is not None else []
    for g in groups:
        g["lr"] = lr
    return groups[0]["lr"] if groups else lr


def make_optimizer(recipe, model):
    """torch AdamW (fused on GPU), DeepSpeed's CPU Adam under ZeRO-Offload; no weight decay on norms, biases
    and embeddings-as-vectors."""
    t = recipe.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.deepspeed.offload_optimizer:   # ZeRO-Offload steps on the host and accepts only its CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=tuple(t.betas), adamw_mode=True)
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), fused=torch.cuda.is_available())
    if own_clip(recipe):          # unwrapped by DeepSpeed: skip non-finite steps ourselves
        return GuardedAdamW(groups, max_grad_norm=t.grad_clip, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)   # DeepSpeed's ZeRO/bf16 wrapper skips non-finite steps
